"""``python -m benchmarks.diagnose WORKDIR [--batches N] [--recipe R --dataset D]``: what the
partial-label loss asks of each task at initialisation.

For N seeded training batches of the recipe's model (as ``mosaicseg train`` would draw them, augmentation
included), per task annotated in the batch: its BCE and (1 − Dice) terms at the full-resolution output, the
norm of each term's gradient with respect to that task's logits, the mean foreground probability inside and
outside the structure, and the structure's share of the patch voxels. Printed as a table and written as JSON
next to the work folder's runs (``WORKDIR/diagnose_init.json``). It trains nothing.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


def task_terms(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> dict[str, float]:
    """One task's loss terms and gradient norms: ``logits``, ``target``, ``valid`` are ``(B, *S)`` (valid: the
    sample annotates the task and the voxel is not ignored). Mirrors :func:`partial_label_loss` for one task."""
    x = logits.detach().float().requires_grad_(True)
    t, v = target.float(), valid.float()
    n = v.sum().clamp_min(1.0)
    bce = (F.binary_cross_entropy_with_logits(x, t, reduction="none") * v).sum() / n
    p = torch.sigmoid(x) * v
    dice = 1.0 - (2 * (p * t * v).sum() + 1e-5) / (p.sum() + (t * v).sum() + 1e-5)
    g_bce = torch.autograd.grad(bce, x, retain_graph=True)[0]
    g_dice = torch.autograd.grad(dice, x)[0]
    fg = (t * v).bool()
    bg = ((1 - t) * v).bool()
    prob = torch.sigmoid(x.detach())
    return {
        "bce": float(bce),
        "dice_loss": float(dice),
        "grad_bce": float(g_bce.norm()),
        "grad_dice": float(g_dice.norm()),
        "grad_bce_on_fg": float(g_bce[fg].norm()) if fg.any() else 0.0,
        "grad_dice_on_fg": float(g_dice[fg].norm()) if fg.any() else 0.0,
        "p_fg": float(prob[fg].mean()) if fg.any() else float("nan"),
        "p_bg": float(prob[bg].mean()) if bg.any() else float("nan"),
        "fg_share": float(fg.sum() / n),
    }


def diagnose(workdir: Path, batches: int, recipe: str, dataset: str | None, seed: int) -> dict[str, Any]:
    from mosaicseg.config import TrainConfig
    from mosaicseg.training.loop import Trainer

    cfg = TrainConfig(recipe=recipe, dataset=dataset, iterations=batches, optimizer="adamw", device="cpu", seed=seed)
    trainer = Trainer(workdir, cfg, workdir / "runs" / "_diagnose", overwrite=True, progress=False)
    trainer.model.train()
    rows: dict[str, list[dict[str, float]]] = defaultdict(list)
    for i, batch in enumerate(trainer._loader()):
        if i == batches:
            break
        with torch.no_grad():
            logits = trainer.model(batch["image"], batch["modality"], **trainer.recipe.inputs(batch)).logits[0]
        mask = batch["label_mask"].reshape(*batch["label_mask"].shape, *[1] * (logits.ndim - 2))
        valid = mask & ~batch["ignore"][:, None]
        for k in torch.nonzero(batch["label_mask"].any(0)).flatten().tolist():
            terms = task_terms(logits[:, k], batch["target"][:, k], valid[:, k].expand_as(logits[:, k]))
            rows[trainer.vocabulary.tasks[k].name].append(terms)
    summary = {
        name: {key: float(np.nanmean([r[key] for r in values])) for key in values[0]} | {"batches": len(values)}
        for name, values in sorted(rows.items())
    }
    return {"workdir": str(workdir), "recipe": recipe, "batches": batches, "seed": seed, "tasks": summary}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--recipe", default="universal")
    parser.add_argument("--dataset", default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    result = diagnose(args.workdir, args.batches, args.recipe, args.dataset, args.seed)
    (args.workdir / "diagnose_init.json").write_text(json.dumps(result, indent=2))
    print(f"{'task':42s} {'batches':>7s} {'fg %':>7s} {'BCE':>7s} {'1-Dice':>7s} {'|gBCE|':>9s} {'|gDice|':>9s}"
          f" {'|gBCE| fg':>9s} {'|gDice| fg':>10s} {'p fg':>6s} {'p bg':>6s}")  # fmt: skip
    for name, s in result["tasks"].items():
        print(
            f"{name:42s} {s['batches']:7d} {100 * s['fg_share']:7.3f} {s['bce']:7.4f} {s['dice_loss']:7.4f} "
            f"{s['grad_bce']:9.2e} {s['grad_dice']:9.2e} {s['grad_bce_on_fg']:9.2e} {s['grad_dice_on_fg']:10.2e} "
            f"{s['p_fg']:6.3f} {s['p_bg']:6.3f}"
        )


if __name__ == "__main__":
    main()
