"""Run logging: ``metrics.jsonl`` (one JSON record per epoch, appended) and ``progress.png``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from mosaicseg.atomic import atomic_path


def append_record(path: str | Path, record: dict[str, Any]) -> None:
    """Append one record as a JSON line (flushed and fsynced: a killed run keeps every finished epoch)."""
    import os

    with Path(path).open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Records of ``metrics.jsonl``; a torn last line (killed mid-write) is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def truncate_records(path: str | Path, iteration: int) -> None:
    """Keep only records up to ``iteration`` (a resumed run rewrites what came after its checkpoint)."""
    from mosaicseg.atomic import atomic_write

    records = [r for r in read_records(path) if r.get("iteration", 0) <= iteration]
    text = "".join(json.dumps(r) + "\n" for r in records)
    atomic_write(path, lambda f: f.write(text), mode="w")


def plot_progress(records: list[dict[str, Any]], path: str | Path) -> None:
    """``progress.png``: training loss, per-dataset validation pseudo-Dice, learning rate and epoch time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not records:
        return
    epochs = [r["epoch"] for r in records]
    fig, axes = plt.subplots(3, 1, figsize=(9, 10), sharex=True)
    ax = axes[0]
    ax.plot(epochs, [r.get("train_loss", math.nan) for r in records], label="train loss", color="tab:blue")
    ax.set_ylabel("loss")
    ax.legend(loc="upper left")
    dice_ax = ax.twinx()
    names = sorted({d for r in records for d in r.get("val_dice", {})})
    for name in names:
        pts = [(r["epoch"], r["val_dice"][name]) for r in records if name in r.get("val_dice", {})]
        dice_ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=name)
    if names:
        dice_ax.set_ylabel("validation pseudo-Dice")
        dice_ax.set_ylim(0, 1)
        dice_ax.legend(loc="lower right", fontsize="small")
    axes[1].plot(epochs, [r.get("lr", math.nan) for r in records], color="tab:green")
    axes[1].set_ylabel("learning rate")
    axes[2].plot(epochs, [r.get("epoch_time_s", math.nan) for r in records], color="tab:red")
    axes[2].set_ylabel("epoch time (s)")
    axes[2].set_xlabel("epoch")
    fig.tight_layout()
    with atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)
