"""Multi-process training through torchrun on CPU (gloo): the DDP path of the Trainer runs end to end."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from mosaicseg.runtime import load_checkpoint


def test_torchrun_two_processes_gloo(tiny_workdir_2d, tmp_path):
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
