"""Multi-node training as the README shows it: two torchrun "nodes" on this machine (``--nnodes 2``, one process
each, c10d rendezvous on the loopback, gloo), stopped and resumed, within a time budget. Both ranks must hold
identical weights after the steps (the time-based learning rate is agreed on), and only global rank 0 may write:
each node is given its own run folder, so a write by rank 1 would show up in its folder (and a rank 1 that resumed
from its own folder would find nothing there).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import torch

from mosaicseg.runtime import load_checkpoint

NODE_SCRIPT = """
import os, sys
import torch
from mosaicseg.config import TrainConfig
from mosaicseg.training.loop import Trainer

workdir, run, dump = sys.argv[1:4]
# a time budget: its learning rate follows the elapsed time, which every rank must agree on
cfg = TrainConfig(
    time_budget_s=8.0, iterations_per_epoch=2, val_max_cases=1, seed=3, device="cpu", batch_size=1,
    optimizer="adamw", amp=False,
)



class StopAt:
    def on_step_end(self, trainer, batch, outputs, losses):
        if trainer.iteration == 2:
            trainer.request_stop()


# stopped at iteration 2, then resumed: rank 1 cannot see rank 0's checkpoint in its own run folder
first = Trainer(workdir, cfg, run, progress=False)
first.recipe.hooks.append(StopAt())
first.fit()
assert first.iteration == 2, first.iteration
trainer = Trainer(workdir, cfg, run, resume=True, progress=False)
assert trainer.iteration == 2, trainer.iteration
trainer.fit()
# the test's own record of this rank's weights (the trainer writes only on rank 0)
torch.save(trainer.model.state_dict(), os.path.join(dump, f"rank{os.environ['RANK']}.pt"))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_two_torchrun_nodes_train_identical_weights_and_only_global_rank_0_writes(tiny_workdir_2d, tmp_path):
    script = tmp_path / "node.py"
    script.write_text(NODE_SCRIPT)
    dump = tmp_path / "weights"
    dump.mkdir()
    port = _free_port()
    runs = [tmp_path / f"node{n}" / "run" for n in range(2)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = []
    for node in range(2):
        cmd = [
            sys.executable, "-m", "torch.distributed.run",
            "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(node),
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "mosaicseg-test",
            str(script), str(tiny_workdir_2d), str(runs[node]), str(dump),
        ]  # fmt: skip
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env))
    outputs = []
    for p in procs:
        out, _ = p.communicate(timeout=300)
        outputs.append(out)
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outputs)

    weights = [torch.load(dump / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert weights[0].keys() == weights[1].keys()
    for name in weights[0]:
        assert torch.equal(weights[0][name], weights[1][name]), name
    # c10d assigns node ranks by arrival: whichever node got global rank 0 wrote its run, the other wrote nothing
    written = [r for r in runs if r.parent.exists()]
    assert len(written) == 1, [sorted(str(p) for p in r.parent.rglob("*")) for r in runs]
    ckpt = load_checkpoint(written[0] / "checkpoint_final.pt")
    assert ckpt["iteration"] > 2
    assert '"world_size": 2' in (written[0] / "config.json").read_text()
    for name, value in ckpt["model"].items():
        assert torch.equal(value, weights[0][name]), name
