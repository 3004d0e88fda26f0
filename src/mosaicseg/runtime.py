"""Runtime plumbing shared by every pipeline stage: device, CPU flags, precision, checkpoint read/write.

Lives outside the stages (data → models → training → inference → evaluation) so that prediction can load a
checkpoint without importing the training loop.

Checkpoints are plain dicts of tensors and primitives written atomically with :func:`torch.save` and read with
``weights_only=True``: loading never executes code.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mosaicseg.atomic import atomic_write
from mosaicseg.errors import MosaicSegError

CHECKPOINT_FORMAT = "mosaicseg/checkpoint"
CHECKPOINT_VERSION = 1
# what a model checkpoint holds for prediction and init_from
MODEL_KEYS = ("model", "model_config", "vocabulary", "plans", "patch_size")


def resolve_device(name: str) -> torch.device:
    """``auto`` → this rank's CUDA device where CUDA is available, else the CPU; other names are checked."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MosaicSegError(f"device '{name}' requested but CUDA is not available. Fix: use --device cpu.")
    if name == "mps" and not torch.backends.mps.is_available():
        raise MosaicSegError("device 'mps' requested but MPS is not available. Fix: use --device cpu.")
    return torch.device(name)


def cpu_flags() -> set[str]:
    """The instruction-set flags this CPU reports (``/proc/cpuinfo``); empty where that is unreadable."""
    try:
        line = next(x for x in Path("/proc/cpuinfo").read_text().splitlines() if x.startswith("flags"))
    except (OSError, StopIteration):
        return set()
    return set(line.split(":", 1)[1].split())


def native_bf16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (AVX512-BF16 or AMX). Without it oneDNN emulates bf16
    convolutions, which is slower than float32; where the flags are unreadable: False."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` (tensors and primitives) atomically, tagged with the checkpoint format and version."""
    path = Path(path)
    state = {**state, "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION}
    atomic_write(path, lambda f: torch.save(state, f))
    return path


def load_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu", require: Sequence[str] = ()
) -> dict[str, Any]:
    """A MosaicSeg checkpoint, loaded without executing code (``weights_only=True``); ``require``: keys the
    caller reads, whose absence is reported as a damaged checkpoint rather than a KeyError."""
    path = Path(path)
    if path.is_dir():
        raise MosaicSegError(
            f"{path}: is a folder, not a checkpoint file. Fix: pass a checkpoint_*.pt file inside it (mosaicseg "
            "predict -m also takes the run folder)."
        )
    if not path.is_file():
        raise MosaicSegError(f"{path}: checkpoint not found. Fix: check the run folder (train first).")
    if path.stat().st_size == 0:  # torch.load's EOFError for this has an empty message
        raise MosaicSegError(
            f"{path}: is empty (0 bytes), e.g. a copy that was interrupted. Fix: copy the checkpoint again or use "
            "the run's checkpoint_latest.pt."
        )
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # pickle refusals and corrupt files surface as many types
        first = next((line for line in str(exc).splitlines() if line.strip()), "no message")
        raise MosaicSegError(
            f"{path}: not a loadable MosaicSeg checkpoint ({type(exc).__name__}: {first[:200]}). Fix: use a "
            "checkpoint written by mosaicseg train (a truncated file needs the run's checkpoint_latest.pt or a "
            "new training run); files from untrusted sources are refused."
        ) from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise MosaicSegError(
            f"{path}: not a MosaicSeg checkpoint. Fix: pass a run folder or a checkpoint_*.pt "
            "written by mosaicseg train."
        )
    version = ckpt.get("version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise MosaicSegError(
            f"{path}: the checkpoint has no valid version ({version!r}; damaged). Fix: use a checkpoint_*.pt "
            "written by mosaicseg train."
        )
    if version > CHECKPOINT_VERSION:
        raise MosaicSegError(
            f"{path}: checkpoint version {version!r} is newer than this mosaicseg reads ({CHECKPOINT_VERSION}). "
            "Fix: upgrade mosaicseg."
        )
    missing = [k for k in require if k not in ckpt]
    if missing:
        raise MosaicSegError(
            f"{path}: the checkpoint lacks {missing} (damaged, or written for another purpose). Fix: use a "
            "checkpoint_*.pt written by mosaicseg train."
        )
    return ckpt


def find_checkpoints(run: str | Path, folds: Sequence[str] | None = None, name: str = "final") -> list[Path]:
    """Checkpoint files of a run: a ``.pt`` file, a fold folder, or a run folder with ``fold_*`` folders."""
    run = Path(run)
    if run.is_file():
        return [run]
    if not run.is_dir():
        raise MosaicSegError(f"{run}: no such run folder or checkpoint. Fix: pass the folder mosaicseg train wrote.")
    if (run / f"checkpoint_{name}.pt").is_file():
        return [run / f"checkpoint_{name}.pt"]
    fold_dirs = sorted(p for p in run.glob("fold_*") if p.is_dir())
    if folds:
        fold_dirs = [run / f"fold_{f}" for f in folds]
    if not fold_dirs:
        raise MosaicSegError(
            f"{run}: holds neither checkpoint_{name}.pt nor fold_* folders. Fix: pass a run folder "
            "written by mosaicseg train (training may not have finished: try --checkpoint latest)."
        )
    missing = [str(d) for d in fold_dirs if not (d / f"checkpoint_{name}.pt").is_file()]
    if missing:
        raise MosaicSegError(
            f"checkpoint_{name}.pt is missing in {missing}. Fix: finish training those folds, "
            "choose --folds, or use --checkpoint latest."
        )
    return [d / f"checkpoint_{name}.pt" for d in fold_dirs]


def load_one_model(source: str | Path, use: str) -> dict[str, Any]:
    """The one model checkpoint behind ``source`` (a ``.pt``, a fold folder, or a run folder with exactly one
    fold); ``use`` names what needs one model in the error (e.g. ``init_from starts from``)."""
    paths = find_checkpoints(source)
    if len(paths) != 1:
        raise MosaicSegError(
            f"{source}: holds {len(paths)} folds; {use} one model. Fix: pass one fold folder or one checkpoint_*.pt."
        )
    return load_checkpoint(paths[0], require=MODEL_KEYS)
