"""What a model learned per task and per modality, as cosine-similarity matrices (Hermes Fig. 4 and 5).

A task's vector is the concatenation of its rows in every per-task parameter of the model (those whose first
axis indexes the tasks, :func:`~mosaicseg.models.factory.task_parameter_names`) that holds more than one number
per task: Hermes' task tokens of every fused scale; the universal model's output convolutions of every
deep-supervision level; UniSeg's prompts. One number per task (a bias) says nothing about similarity and is
left out. A modality's vector is its prior tokens (Hermes) averaged over the ``l`` tokens, concatenated over the
scales; other model kinds have no modality matrix.

``mosaicseg priors RUN -o DIR`` writes ``task_priors.csv`` / ``.png`` and, where present,
``modality_priors.csv`` / ``.png``: one row and column per task (``Dataset/label``, in the vocabulary's order,
which groups the tasks by dataset) or modality.
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mosaicseg.atomic import atomic_path, atomic_write
from mosaicseg.errors import MosaicSegError
from mosaicseg.models import task_parameter_names

TASK_FILE, MODALITY_FILE = "task_priors", "modality_priors"


@dataclass(frozen=True)
class PriorVectors:
    """``tasks (K, D)`` with ``task_names``, ``modalities (M, D')`` with ``modality_names`` (None: the model
    kind has no modality prior), and the parameters they were read from."""

    tasks: np.ndarray
    task_names: list[str]
    modalities: np.ndarray | None
    modality_names: list[str]
    sources: list[str]


def prior_vectors(model: torch.nn.Module, task_names: list[str], modality_names: list[str]) -> PriorVectors:
    """The per-task and per-modality vectors of ``model`` (see the module docstring)."""
    k = len(task_names)
    state = model.state_dict()
    sources, rows = [], []
    for name in sorted(task_parameter_names(model)):
        value = state[name]
        if value.ndim < 2 or value.shape[0] < k:
            continue
        sources.append(name)
        rows.append(value[:k].reshape(k, -1).float())  # Hermes pools end with the null token: not a task
    if not rows:
        kind = (getattr(model, "config", None) or {}).get("kind", type(model).__name__)
        raise MosaicSegError(
            f"model kind '{kind}' has no per-task vectors to compare (its tasks are asked through a generated or "
            "per-dataset head). Fix: use a universal, hermes or uniseg run."
        )
    modal = [n for n in sorted(state) if n.endswith("pool.modality")]
    modalities = None
    if modal:
        modalities = torch.cat([state[n].float().mean(1) for n in modal], dim=1).numpy()  # (M, l, C) → (M, ΣC)
        sources += modal
    return PriorVectors(torch.cat(rows, dim=1).numpy(), list(task_names), modalities, list(modality_names), sources)


def cosine_matrix(vectors: np.ndarray) -> np.ndarray:
    """``(N, D)`` → ``(N, N)`` cosine similarities (a zero vector is similar to nothing, itself included)."""
    v = np.asarray(vectors, dtype=np.float64)
    norm = np.linalg.norm(v, axis=1, keepdims=True)
    unit = np.divide(v, norm, out=np.zeros_like(v), where=norm > 0)
    return np.clip(unit @ unit.T, -1.0, 1.0)


def _short(name: str) -> str:
    """``Dataset003_IXILimbic/Amygdala_L`` → ``IXILimbic/Amygdala_L``."""
    return re.sub(r"^Dataset\d+_", "", name)


def _write_csv(path: Path, names: list[str], matrix: np.ndarray) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["", *names])
    for name, row in zip(names, matrix, strict=True):
        writer.writerow([name, *(f"{x:.6f}" for x in row)])
    atomic_write(path, lambda f: f.write(buf.getvalue()), mode="w")


def _heatmap(path: Path, names: list[str], matrix: np.ndarray, title: str) -> None:
    """A labelled heatmap that stays readable at 30+ rows: the figure grows with the rows, the font shrinks to
    fit, and white lines separate the datasets."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(names)
    side = max(5.0, 0.26 * n + 2.5)
    font = max(5.0, min(10.0, 240 / max(n, 1)))
    fig, ax = plt.subplots(figsize=(side + 1.2, side), dpi=120)
    image = ax.imshow(matrix, cmap="RdBu_r", vmin=-1, vmax=1)
    labels = [_short(x) for x in names]
    ax.set_xticks(range(n), labels, rotation=90, fontsize=font)
    ax.set_yticks(range(n), labels, fontsize=font)
    groups = [x.split("/", 1)[0] for x in names]
    for i in range(1, n):
        if groups[i] != groups[i - 1]:
            ax.axhline(i - 0.5, color="white", linewidth=2)
            ax.axvline(i - 0.5, color="white", linewidth=2)
    if n <= 20:  # the values themselves, where they fit
        for i in range(n):
            for j in range(n):
                ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=font * 0.8, color="black")
    ax.set_title(title, fontsize=11)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="cosine similarity")
    fig.tight_layout()
    with atomic_path(path, ".png") as tmp:
        fig.savefig(tmp)
    plt.close(fig)


def write_priors(
    model: str | Path, output: str | Path, *, fold: str | None = None, overwrite: bool = False
) -> dict[str, str]:
    """Read ``model`` (a run folder, checkpoint or bundle; ``fold``: which fold, default the first) and write the
    matrices into ``output``; returns what was written (name → path)."""
    from mosaicseg.inference.predictor import Predictor

    output = Path(output)
    targets = [output / f"{stem}{ext}" for stem in (TASK_FILE, MODALITY_FILE) for ext in (".csv", ".png")]
    existing = [p for p in targets if p.exists()]
    if existing and not overwrite:
        raise MosaicSegError(f"{existing[0]}: exists already. Fix: --overwrite to replace it, or -o another folder.")
    predictor = Predictor.from_checkpoint(model, folds=[fold] if fold else None, jit=False, precision="fp32")
    vocab = predictor.vocabulary
    vectors = prior_vectors(predictor.models[0], [t.name for t in vocab.tasks], list(vocab.modalities))
    output.mkdir(parents=True, exist_ok=True)
    written: dict[str, str] = {}
    tasks = cosine_matrix(vectors.tasks)
    _write_csv(output / f"{TASK_FILE}.csv", vectors.task_names, tasks)
    _heatmap(output / f"{TASK_FILE}.png", vectors.task_names, tasks, "task priors: cosine similarity")
    written.update(tasks_csv=str(output / f"{TASK_FILE}.csv"), tasks_png=str(output / f"{TASK_FILE}.png"))
    if vectors.modalities is not None:
        modalities = cosine_matrix(vectors.modalities)
        _write_csv(output / f"{MODALITY_FILE}.csv", vectors.modality_names, modalities)
        _heatmap(output / f"{MODALITY_FILE}.png", vectors.modality_names, modalities, "modality priors")
        written.update(
            modalities_csv=str(output / f"{MODALITY_FILE}.csv"), modalities_png=str(output / f"{MODALITY_FILE}.png")
        )
    return written


def read_matrix(path: str | Path) -> tuple[list[str], np.ndarray]:
    """A matrix CSV written here → its row names and values ``(N, N)``."""
    with Path(path).open(newline="") as f:
        rows = list(csv.reader(f))
    return [r[0] for r in rows[1:]], np.array([[float(x) for x in r[1:]] for r in rows[1:]])


_SIDE = re.compile(r"^(?P<stem>.+?)[_\- ]?(?P<side>L|R|Left|Right)$")


def mirror_pairs(names: list[str]) -> list[tuple[int, int]]:
    """Index pairs ``(i, j)`` of the tasks of one dataset whose labels differ only by a left/right suffix
    (``Caudate_L`` / ``Caudate_R``, ``AmygdalaLeft`` / ``AmygdalaRight``)."""
    keys: dict[tuple[str, str], dict[str, int]] = {}
    for i, name in enumerate(names):
        dataset, _, label = name.rpartition("/")
        m = _SIDE.match(label)
        if m:
            side = m["side"][0].upper()
            keys.setdefault((dataset, m["stem"].lower()), {})[side] = i
    return sorted((min(v["L"], v["R"]), max(v["L"], v["R"])) for v in keys.values() if len(v) == 2)


def summarise(names: list[str], matrix: np.ndarray) -> dict[str, Any]:
    """Measured structure of a task-prior cosine matrix ``(K, K)`` whose ``names`` are ``Dataset/label``.

    ``blocks``: the mean cosine of every pair of datasets (``{a: {b: mean}}``; within a dataset, over distinct
    tasks; None for a single-task dataset); ``nearest``: each task's most similar other task and the cosine;
    ``nearest_same_dataset``: the share of tasks whose nearest task is of their own dataset; ``mirror``: the mean
    cosine of left/right pairs (:func:`mirror_pairs`) against that of the other pairs within the same datasets
    (None where there is no pair or no other pair)."""
    m = np.asarray(matrix, dtype=np.float64)
    k = len(names)
    if m.shape != (k, k):
        raise ValueError(f"{k} names for a matrix of shape {m.shape}")
    datasets = [n.rpartition("/")[0] for n in names]
    order = list(dict.fromkeys(datasets))
    off = ~np.eye(k, dtype=bool)
    blocks: dict[str, dict[str, float | None]] = {}
    for a in order:
        rows = np.array([d == a for d in datasets])
        blocks[a] = {}
        for b in order:
            cols = np.array([d == b for d in datasets])
            mask = np.outer(rows, cols) & off
            blocks[a][b] = float(m[mask].mean()) if mask.any() else None
    near = np.where(off, m, -np.inf).argmax(1) if k > 1 else np.zeros(0, dtype=int)
    nearest = {names[i]: (names[int(j)], float(m[i, j])) for i, j in enumerate(near)}
    same = [datasets[i] == datasets[int(j)] for i, j in enumerate(near)]
    pairs = mirror_pairs(names)
    paired = np.zeros((k, k), dtype=bool)
    for i, j in pairs:
        paired[i, j] = paired[j, i] = True
    within = np.equal.outer(np.array(datasets, dtype=object), np.array(datasets, dtype=object)).astype(bool) & off
    involved = np.zeros(k, dtype=bool)
    involved[[i for p in pairs for i in p]] = True
    # the other pairs among the same datasets' mirrored tasks: a set's unpaired tasks (a brain stem) are left out
    others = within & ~paired & np.outer(involved, involved)
    return {
        "blocks": blocks,
        "nearest": nearest,
        "nearest_same_dataset": float(np.mean(same)) if same else None,
        "mirror": {
            "pairs": [(names[i], names[j]) for i, j in pairs],
            "pair_mean": float(np.mean([m[i, j] for i, j in pairs])) if pairs else None,
            "other_mean": float(m[others].mean()) if others.any() else None,
        },
    }


def describe(summary: dict[str, Any]) -> str:
    """One line on a :func:`summarise` result: the mean cosine within and across datasets, where the tasks'
    nearest tokens lie, and the left/right pairs against the other pairs of their datasets."""
    blocks = summary["blocks"]
    within = [row[d] for d, row in blocks.items() if row[d] is not None]
    across = [v for a, row in blocks.items() for b, v in row.items() if a != b and v is not None]
    parts = []
    if within:
        parts.append(f"mean cosine within a dataset {np.mean(within):.2f}")
    if across:
        parts.append(f"across datasets {np.mean(across):.2f}")
    if summary["nearest_same_dataset"] is not None:
        parts.append(f"{summary['nearest_same_dataset']:.0%} of the tasks nearest to a task of their own dataset")
    mirror = summary["mirror"]
    if mirror["pair_mean"] is not None:
        other = (
            f" (other pairs of those datasets {mirror['other_mean']:.2f})" if mirror["other_mean"] is not None else ""
        )
        parts.append(f"left/right pairs {mirror['pair_mean']:.2f}{other}")
    return "task priors: " + ("; ".join(parts) or "a single task")
