"""Multi-process training on CPU (gloo): the DDP path of the Trainer runs end to end through torchrun, and the
partial-label loss with ``distributed=True`` gives every rank the loss and DDP the gradient of the global batch."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from mosaicseg.runtime import load_checkpoint
from mosaicseg.training.losses import deep_supervision_loss, partial_label_loss

WORLD = 2


@pytest.mark.parametrize("recipe", ["universal", "hermes", "multidecoder"])
def test_torchrun_two_processes_gloo(recipe, tiny_workdir_2d, tmp_path):
    """Every model kind whose parameters a step may leave unused (multidecoder: the decoders of datasets not in
    the batch) or whose inputs differ per sample (hermes: tokens) trains under DDP."""
    run = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--standalone",
        "-m",
        "mosaicseg.cli",
        "train",
        str(tiny_workdir_2d),
        "--recipe",
        recipe,
        "--iterations",
        "3",
        "--iterations-per-epoch",
        "3",
        "--optimizer",
        "adamw",
        "--device",
        "cpu",
        "--batch-size",
        "1",
        "--val-max-cases",
        "1",
        "-o",
        str(run),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ckpt = load_checkpoint(run / "checkpoint_final.pt")
    assert ckpt["iteration"] == 3
    config = (run / "config.json").read_text()
    assert '"world_size": 2' in config
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


# ------------------------------------------------------------------------------ loss across ranks
# The global batch: 4 samples, 3 tasks, 8x8. Rank 0 holds samples 0-1, rank 1 samples 2-3. Task 2 is annotated
# only by rank 1's samples; voxels under the ignore label are scattered over every sample.
LABEL_MASKS = {
    "partial": [[1, 1, 0], [1, 0, 0], [0, 1, 1], [1, 0, 1]],
    # rank 0's samples annotate nothing: it must still take part in every collective
    "rank0-unannotated": [[0, 0, 0], [0, 0, 0], [0, 1, 1], [1, 0, 1]],
    "none": [[0, 0, 0]] * 4,
}


def _global_batch(case: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """image ``(4, 2, 8, 8)``, target ``(4, 3, 8, 8)`` uint8, label_mask ``(4, 3)`` bool, ignore ``(4, 8, 8)``."""
    g = torch.Generator().manual_seed(0)
    image = torch.randn(4, 2, 8, 8, generator=g)
    target = (torch.rand(4, 3, 8, 8, generator=g) > 0.6).to(torch.uint8)
    ignore = torch.rand(4, 8, 8, generator=g) > 0.85
    return image, target, torch.tensor(LABEL_MASKS[case], dtype=torch.bool), ignore


class _Net(torch.nn.Module):
    """Two deep-supervision levels ``[(B, 3, 8, 8), (B, 3, 4, 4)]`` from a ``(B, 2, 8, 8)`` image."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.conv = torch.nn.Conv2d(2, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        y = self.conv(x)
        return [y, F.avg_pool2d(y, 2)]


def _loss(case: str, rows: slice, model: torch.nn.Module, distributed: bool) -> dict[str, torch.Tensor]:
    """The deep-supervision loss of ``rows`` of the global batch (``distributed``: this rank's share of it), the
    partial-label loss of its level 0, and after backward the gradients of the :class:`_Net` (``model`` or the one
    it wraps in DDP)."""
    image, target, mask, ignore = (t[rows] for t in _global_batch(case))
    outputs = model(image)
    level0 = partial_label_loss(outputs[0].detach(), target, mask, ignore, distributed=distributed)
    loss = deep_supervision_loss(outputs, target, mask, ignore, distributed=distributed)
    loss.backward()
    net = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    return {"loss": loss.detach(), "level0": level0, **{n: p.grad.clone() for n, p in net.named_parameters()}}


def _rank(rank: int, folder: str) -> None:
    """One rank: its half of each case's global batch, results in ``folder/rank{rank}.pt``."""
    torch.set_num_threads(1)
    # a bounded wait: ranks that disagree on a collective fail the test instead of hanging it
    dist.init_process_group(
        "gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60)
    )
    try:
        rows = slice(2 * rank, 2 * rank + 2)
        out = {}
        for case in LABEL_MASKS:
            # DDP averages the gradients over the ranks, as in training
            out[case] = _loss(case, rows, torch.nn.parallel.DistributedDataParallel(_Net()), distributed=True)
            out[case]["local"] = _loss(case, rows, _Net(), distributed=False)["loss"]  # without the option
        torch.save(out, Path(folder) / f"rank{rank}.pt")
        # both ranks leave together: a rank that tears its sockets down while the other still reads from them can
        # make gloo's reader thread throw, and the process abort (seen once in a fresh-clone CI run, rank 0 SIGABRT)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_distributed_loss_and_ddp_gradient_equal_the_single_process_ones_on_the_global_batch(tmp_path):
    torch.multiprocessing.spawn(_rank, args=(str(tmp_path),), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    for case in LABEL_MASKS:
        whole = _loss(case, slice(None), _Net(), distributed=False)
        for r, got in enumerate(ranks):
            where = f"{case}, rank {r}"
            assert got[case]["loss"].item() == pytest.approx(whole["loss"].item(), abs=1e-6), where
            assert got[case]["level0"].item() == pytest.approx(whole["level0"].item(), abs=1e-6), where
            for name in ("conv.weight", "conv.bias"):
                torch.testing.assert_close(got[case][name], whole[name], rtol=1e-5, atol=1e-6, msg=where)
    # without the option a rank's loss is its half's (so the comparisons above can fail): both halves differ from
    # the whole; a rank whose samples annotate nothing has 0
    whole = _loss("partial", slice(None), _Net(), distributed=False)["loss"].item()
    assert whole > 0 and all(abs(got["partial"]["local"].item() - whole) > 1e-2 for got in ranks)
    assert ranks[0]["rank0-unannotated"]["local"].item() == 0 < ranks[1]["rank0-unannotated"]["loss"].item()
    assert ranks[0]["none"]["loss"].item() == 0.0
