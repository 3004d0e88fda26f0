"""User intent as frozen, validated dataclasses: the collection file (``collection.yaml``).

Example::

    name: shared3d
    root: ../../shared/data          # dataset paths are relative to this (itself relative to this file)
    folds: 5
    sampling: inv_sqrt               # inv_sqrt (MultiTalent) | uniform | weights
    datasets:
      - path: Dataset007_ACDC
        modality: cineMRI            # optional; default: the channel signature of dataset.json
        weight: 1.0                  # optional; used with sampling: weights
        patient_regex: '^(patient\\d+)_frame\\d+$'   # group 1 (or group 'patient') is the patient id
    shared_labels:                   # labels that share one definition become one task
      - [Dataset002_A/Liver, Dataset005_B/liver]
    synthetic: {dim: 3, seed: 0}     # optional: generate the synthetic collection into root if absent
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from mosaicseg.errors import MosaicSegError, Problem, raise_if_errors

SamplingScheme = Literal["inv_sqrt", "uniform", "weights"]
SAMPLING_SCHEMES: tuple[str, ...] = ("inv_sqrt", "uniform", "weights")
_DATASET_KEYS = {"path", "modality", "weight", "patient_regex", "name"}
_COLLECTION_KEYS = {"name", "root", "folds", "sampling", "datasets", "shared_labels", "synthetic", "seed"}


@dataclass(frozen=True)
class DatasetEntry:
    """One dataset of a collection, as the user declared it."""

    path: Path
    modality: str | None = None
    weight: float = 1.0
    patient_regex: str | None = None

    @property
    def name(self) -> str:
        return self.path.name


@dataclass(frozen=True)
class SyntheticSpec:
    """Generate the synthetic collection into the collection root when it is absent."""

    dim: int = 3
    seed: int = 0


@dataclass(frozen=True)
class CollectionConfig:
    """A validated ``collection.yaml``."""

    name: str
    source: Path | None
    datasets: tuple[DatasetEntry, ...]
    folds: int = 5
    sampling: SamplingScheme = "inv_sqrt"
    shared_labels: tuple[tuple[str, ...], ...] = ()
    synthetic: SyntheticSpec | None = None
    seed: int = 12345
    root: Path | None = field(default=None)

    def entry(self, name: str) -> DatasetEntry:
        for d in self.datasets:
            if d.name == name:
                return d
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "root": str(self.root) if self.root else None,
            "folds": self.folds,
            "sampling": self.sampling,
            "seed": self.seed,
            "datasets": [
                {"path": str(d.path), "modality": d.modality, "weight": d.weight, "patient_regex": d.patient_regex}
                for d in self.datasets
            ],
            "shared_labels": [list(s) for s in self.shared_labels],
            "synthetic": {"dim": self.synthetic.dim, "seed": self.synthetic.seed} if self.synthetic else None,
        }


def _err(path: Path | str, message: str, fix: str, code: str = "collection") -> Problem:
    return Problem("error", code, path, message, fix)


def parse_collection(data: Any, source: Path | None = None, base: Path | None = None) -> CollectionConfig:
    """Validate a parsed collection mapping; ``base`` resolves relative paths (default: the file's folder)."""
    where: Path | str = source or "<collection>"
    problems: list[Problem] = []
    if not isinstance(data, dict):
        raise MosaicSegError(
            f"{where}: a collection must be a mapping with a 'datasets' list. Fix: see collections/*.yaml for examples."
        )
    unknown = sorted(set(map(str, data)) - _COLLECTION_KEYS)
    if unknown:
        problems.append(_err(where, f"unknown key(s) {unknown}", f"use only {sorted(_COLLECTION_KEYS)}"))
    base = base or (source.parent if source else Path.cwd())
    root_raw = data.get("root")
    if root_raw is not None and not isinstance(root_raw, str):
        problems.append(_err(where, "'root' must be a path string", "write root: path/to/datasets"))
        root_raw = None
    root = (base / root_raw).resolve() if root_raw else base.resolve()

    folds = data.get("folds", 5)
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        problems.append(_err(where, f"'folds' must be an integer ≥ 2, got {folds!r}", "write folds: 5"))
        folds = 5
    sampling = data.get("sampling", "inv_sqrt")
    if sampling not in SAMPLING_SCHEMES:
        problems.append(_err(where, f"'sampling' is {sampling!r}", f"use one of {', '.join(SAMPLING_SCHEMES)}"))
        sampling = "inv_sqrt"
    seed = data.get("seed", 12345)
    if isinstance(seed, bool) or not isinstance(seed, int):
        problems.append(_err(where, f"'seed' must be an integer, got {seed!r}", "write seed: 12345"))
        seed = 12345

    synthetic = None
    if data.get("synthetic") is not None:
        s = data["synthetic"]
        if not isinstance(s, dict) or s.get("dim", 3) not in (2, 3) or not isinstance(s.get("seed", 0), int):
            problems.append(
                _err(where, "'synthetic' must be {dim: 2|3, seed: int}", "write synthetic: {dim: 3, seed: 0}")
            )
        else:
            synthetic = SyntheticSpec(dim=int(s.get("dim", 3)), seed=int(s.get("seed", 0)))

    raw_datasets = data.get("datasets")
    entries: list[DatasetEntry] = []
    if not isinstance(raw_datasets, list) or not raw_datasets:
        problems.append(_err(where, "'datasets' must be a non-empty list", "list the dataset folders"))
        raw_datasets = []
    for i, item in enumerate(raw_datasets):
        if isinstance(item, str):
            item = {"path": item}
        if not isinstance(item, dict) or not isinstance(item.get("path"), str):
            problems.append(_err(where, f"datasets[{i}] needs a 'path' string", "write - path: Dataset001_X"))
            continue
        bad = sorted(set(map(str, item)) - _DATASET_KEYS)
        if bad:
            problems.append(_err(where, f"datasets[{i}] has unknown key(s) {bad}", f"use only {sorted(_DATASET_KEYS)}"))
        modality = item.get("modality")
        if modality is not None and (not isinstance(modality, str) or not modality.strip()):
            problems.append(_err(where, f"datasets[{i}].modality must be a non-empty string", "write modality: CT"))
            modality = None
        weight = item.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
            problems.append(
                _err(where, f"datasets[{i}].weight must be a positive number, got {weight!r}", "write weight: 1.0")
            )
            weight = 1.0
        regex = item.get("patient_regex")
        if regex is not None:
            try:
                compiled = re.compile(regex)
                if compiled.groups < 1:
                    raise re.error("needs a capturing group for the patient id")
            except (re.error, TypeError) as exc:
                problems.append(
                    _err(
                        where,
                        f"datasets[{i}].patient_regex {regex!r} is invalid ({exc})",
                        "give a regular expression whose first group is the patient id",
                    )
                )
                regex = None
        path = Path(item["path"])
        entries.append(
            DatasetEntry(
                path=path if path.is_absolute() else root / path,
                modality=modality,
                weight=float(weight),
                patient_regex=regex,
            )
        )
    names = [e.name for e in entries]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        problems.append(_err(where, f"dataset(s) listed twice: {dupes}", "list each dataset once"))

    shared: list[tuple[str, ...]] = []
    raw_shared = data.get("shared_labels") or []
    if not isinstance(raw_shared, list):
        problems.append(
            _err(
                where,
                "'shared_labels' must be a list of lists",
                "write shared_labels: [[DatasetA/Liver, DatasetB/liver]]",
            )
        )
        raw_shared = []
    for group in raw_shared:
        if not isinstance(group, list) or len(group) < 2 or not all(isinstance(s, str) and "/" in s for s in group):
            problems.append(
                _err(
                    where,
                    f"shared_labels entry {group!r} must list ≥ 2 'Dataset/label' names",
                    "write - [DatasetA/Liver, DatasetB/liver]",
                )
            )
            continue
        shared.append(tuple(group))
    raise_if_errors(problems, f"collection {where}")
    return CollectionConfig(
        name=str(data.get("name") or (source.stem if source else "collection")),
        source=source,
        datasets=tuple(entries),
        folds=folds,
        sampling=sampling,  # type: ignore[arg-type]
        shared_labels=tuple(shared),
        synthetic=synthetic,
        seed=seed,
        root=root,
    )


def load_collection(path: str | Path) -> CollectionConfig:
    """Read ``collection.yaml``; a dataset folder (with ``dataset.json``) is a one-dataset collection."""
    path = Path(path)
    if path.is_dir():
        if (path / "dataset.json").is_file():
            return parse_collection({"name": path.name, "datasets": [{"path": str(path.resolve())}]}, None, path)
        if (path / "collection.yaml").is_file():
            path = path / "collection.yaml"
        else:
            raise MosaicSegError(
                f"{path}: neither a dataset folder (dataset.json) nor a folder with collection.yaml. "
                "Fix: pass a collection.yaml or a dataset folder."
            )
    if not path.is_file():
        raise MosaicSegError(f"{path}: collection file not found. Fix: check the path (see collections/).")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise MosaicSegError(f"{path}: not UTF-8 text. Fix: save it as UTF-8.") from exc
    except yaml.YAMLError as exc:
        raise MosaicSegError(f"{path}: invalid YAML ({exc}). Fix: correct the syntax.") from exc
    except OSError as exc:
        raise MosaicSegError(f"{path}: cannot read ({exc.strerror}). Fix: check the file's permissions.") from exc
    return parse_collection(data, path.resolve())


# --------------------------------------------------------------------------------------------- training
# named bundles of settings, applied under what the user types: ``mosaicseg plan --preset NAME`` and ``mosaicseg
# train --preset NAME``. hermes: the paper's preprocessing (1.5 mm isotropic; CT clipped to [-990, 500] HU then
# z-scored per image; MR/PET clipped to each image's 2nd-98th percentiles then z-scored) and training (LAMB 2e-3
# with exponential decay, datasets drawn uniformly into mixed batches)
PLAN_PRESETS: dict[str, dict[str, Any]] = {
    "hermes": {"common_spacing": 1.5, "ct_normalization": "fixed", "mr_clip_percentiles": (2.0, 98.0)},
}
TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    "hermes": {"optimizer": "lamb", "lr": 2e-3, "schedule": "exp", "sampling": "uniform"},
}


def apply_preset(
    presets: dict[str, dict[str, Any]], name: str | None, given: dict[str, Any], flag: str
) -> dict[str, Any]:
    """``given`` (option → value, None where the user typed nothing) with preset ``name``'s values filled into the
    untyped ones; an unknown name raises, listing the presets."""
    if name is None:
        return dict(given)
    if name not in presets:
        raise MosaicSegError(f"{flag} {name!r} is unknown. Fix: use one of {', '.join(sorted(presets))}.")
    return {k: (presets[name].get(k) if v is None else v) for k, v in given.items()}


# network width presets (the model-scaling study): every stage's feature count of the plan × this factor
WIDTHS: dict[str, float] = {"small": 0.5, "base": 1.0, "large": 2.0}

OPTIMIZERS: tuple[str, ...] = ("sgd", "adamw", "lamb")
SCHEDULES: tuple[str, ...] = ("poly", "exp", "constant")
FREEZE: tuple[str, ...] = ("none", "encoder", "backbone")  # TrainConfig.freeze
VAL_MODES: tuple[str, ...] = ("patches", "cases")  # TrainConfig.val_mode
# nnU-Net: SGD-Nesterov 1e-2 with poly decay; AdamW 3e-3 with poly decay: the CPU convergence study's best
# (BENCHMARKS.md, convergence: with 48³ patches, 0.72/0.21/0.65 IXI held-out Dice in 10 minutes against
# 0.43/0.00/0.54 for 1e-3 and 64³); Hermes: LAMB 2e-3, exponential.
_OPT_DEFAULTS = {"sgd": (1e-2, 3e-5, "poly"), "adamw": (3e-3, 1e-4, "poly"), "lamb": (2e-3, 1e-5, "exp")}
# a recipe's optimiser when none is given (else AdamW). Hermes trains with its paper's LAMB: under AdamW its
# token stream (prior + fusion updates) grew to ~200x the prior tokens' norm, so the tasks' posterior prototypes
# became one (ixi3, 1000 iterations: left/right prototypes at cosine 0.99-1.00, logit correlation up to 1.0;
# validation Dice on 3 held-out cases per set 0.13/0.00/0.36). With LAMB's per-tensor trust ratio the stream
# stayed at ~5-8 and the pairs apart: 0.47/0.00/0.52. The universal net is the other way round (LAMB 0.01/0.00/
# 0.49, AdamW 0.57/0.29/0.59), so it keeps AdamW. dodnet's one-hot-conditioned heads also stay alike under AdamW
# (left/right logit correlation 0.84-0.998, Dice 0.15/0.08/0.33) but SGD 1e-2 (DoDNet's) learned nothing in the same
# 1000 iterations (0.00/0.00/0.00), so it keeps AdamW too; uniseg 0.52/0.17/0.58 and clip 0.36/0.07/0.28 train under it.
RECIPE_OPTIMIZERS: dict[str, str] = {"hermes": "lamb"}


def recipe_optimizer(recipe: str) -> str:
    """The optimiser ``recipe`` trains with when none is given."""
    return RECIPE_OPTIMIZERS.get(recipe, "adamw")


@dataclass(frozen=True)
class TrainConfig:
    """Run settings of ``mosaicseg train`` (saved into the run folder and every checkpoint).

    The budget is ``iterations``, or ``epochs`` × ``iterations_per_epoch``, and/or ``time_budget_s`` (wall
    clock, not reproducible); training stops at whichever comes first. ``None`` for ``lr``, ``weight_decay``,
    ``schedule``, ``batch_size`` and ``patch_size`` means: the optimiser's default / the collection plan.
    """

    recipe: str = "universal"
    architecture: str = "unet"
    width: str = "base"  # a WIDTHS preset: the plan's features × 0.5 / 1 / 2
    dataset: str | None = None  # the one dataset of the ``single`` recipe
    datasets: tuple[str, ...] | None = None  # subset of the collection's datasets (universal)
    fold: int | str = 0
    iterations: int | None = None
    epochs: int | None = None
    iterations_per_epoch: int = 50
    time_budget_s: float | None = None
    optimizer: str | None = None  # None: recipe_optimizer(recipe) (AdamW, or Hermes' LAMB); set in __post_init__
    lr: float | None = None
    weight_decay: float | None = None
    schedule: str | None = None
    final_lr_ratio: float = 0.01  # exponential schedule: lr decays to this fraction of lr at the end
    momentum: float = 0.99
    batch_size: int | None = None
    patch_size: tuple[int, ...] | None = None
    seed: int = 0
    val_every: int = 1  # epochs
    val_max_cases: int | None = 8  # per dataset; None: every held-out case
    # "patches": nnU-Net's online pseudo-Dice on val_patches fixed, seeded patches per held-out case (cost ~ the
    # number of cases, whatever their size); "cases": sliding-window prediction of each whole held-out case
    val_mode: str = "patches"
    val_patches: int = 2  # per case: every other one centred on a foreground voxel, the rest uniform
    # time-budget runs: an epoch's validation runs only if, with its predicted cost, validation stays within this
    # share of the elapsed time; the final validation's predicted cost is kept free at the end of the budget.
    # None: validate every val_every epochs
    val_share: float | None = 0.1
    deep_supervision: bool = True
    grad_clip: float = 12.0
    amp: bool | None = None  # mixed precision (fp16 on CUDA, bf16 on CPU); None: on for CUDA and native-bf16 CPUs
    device: str = "auto"
    num_workers: int = 0
    checkpoint_every: int | None = None  # iterations; None: at every epoch end
    augment: bool = True
    oversample_foreground: float = 1 / 3
    sampling: str | None = None  # None: the collection's
    # "ignore" (MultiTalent: a task contributes only where its dataset annotates it) or "background" (the naive
    # baseline that trains every un-annotated task as absent; for ablations, it hurts overlapping tasks)
    missing_labels: str = "ignore"
    model_options: dict[str, Any] = field(default_factory=dict)
    # the recipe's own options (validated against the options the recipe declares; unknown names are an error)
    recipe_options: dict[str, Any] = field(default_factory=dict)
    # a checkpoint (.pt), fold folder or run folder whose matching weights start this run (tasks matched by
    # name: new tasks get new head rows; init_report.json lists what was loaded, new and dropped)
    init_from: str | None = None
    # fine-tuning (MultiTalent's schedule): the head alone for head_epochs, its learning rate rising linearly, then
    # every trained part with a linear warm-up over warmup_epochs, then the normal schedule (0, 0: no phases)
    head_epochs: int = 0
    warmup_epochs: int = 0
    freeze: str = "none"  # parts that never train: none, encoder (stems + encoder) or backbone (all but the head)
    # Hermes' incremental learning: init_from's model grows this work folder's datasets as new tasks; only their
    # rows (task tokens or head channels, and a new modality's stem and tokens) train, old outputs stay identical
    extend: bool = False
    # train on exactly these cases (dataset → case ids; datasets left out: none), e.g. few-shot adaptation's
    # shots and auxiliary cases; the fold's held-out cases among them are not validated on
    train_case_ids: dict[str, list[str]] | None = None
    cases: int | None = None  # train on this many of each dataset's training cases, drawn with ``seed``
    fraction: float | None = None  # or on this share of them (at least one case each)

    def __post_init__(self) -> None:
        problems = []

        def bad(what: str, fix: str) -> None:
            problems.append(Problem("error", "train-config", "training settings", what, fix))

        if self.optimizer is None:  # frozen: the resolved name is what the run folder and checkpoints record
            object.__setattr__(self, "optimizer", recipe_optimizer(self.recipe))
        if self.width not in WIDTHS:
            bad(f"width '{self.width}' is unknown", f"use one of {', '.join(WIDTHS)}")
        if self.optimizer not in OPTIMIZERS:
            bad(f"optimizer '{self.optimizer}' is unknown", f"use one of {', '.join(OPTIMIZERS)}")
        if self.schedule is not None and self.schedule not in SCHEDULES:
            bad(f"schedule '{self.schedule}' is unknown", f"use one of {', '.join(SCHEDULES)}")
        if self.sampling is not None and self.sampling not in SAMPLING_SCHEMES:
            bad(f"sampling '{self.sampling}' is unknown", f"use one of {', '.join(SAMPLING_SCHEMES)}")
        if self.missing_labels not in ("ignore", "background"):
            bad(f"missing_labels '{self.missing_labels}' is unknown", "use ignore or background")
        if self.iterations is None and self.epochs is None and self.time_budget_s is None:
            bad("no training budget", "give --iterations, --epochs or --time-budget")
        for name in (
            "iterations",
            "epochs",
            "iterations_per_epoch",
            "batch_size",
            "val_every",
            "val_max_cases",
            "val_patches",
            "checkpoint_every",
            "cases",
        ):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                bad(f"{name} must be a positive integer, got {v!r}", f"give {name} >= 1")
        for name in ("time_budget_s", "lr", "grad_clip"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                bad(f"{name} must be positive, got {v!r}", f"give {name} > 0")
        if not (isinstance(self.fold, int) and self.fold >= 0) and self.fold != "all":
            bad(f"fold {self.fold!r} is not a fold", "use 0, 1, ... or 'all'")
        if self.device not in ("auto", "cpu", "cuda", "mps") and not str(self.device).startswith("cuda:"):
            bad(f"device '{self.device}' is unknown", "use auto, cpu, cuda or mps")
        for name in ("head_epochs", "warmup_epochs"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                bad(f"{name} must be a non-negative integer, got {v!r}", f"give {name} >= 0")
        if self.freeze not in FREEZE:
            bad(f"freeze '{self.freeze}' is unknown", f"use one of {', '.join(FREEZE)}")
        if self.extend and self.init_from is None:
            bad("extend needs the model to extend", "give init_from (mosaicseg extend RUN ...)")
        if self.extend and self.freeze != "none":
            bad("extend already freezes everything but the new tasks' rows", "leave freeze at none")
        if self.train_case_ids is not None and (
            not isinstance(self.train_case_ids, dict)
            or not all(isinstance(v, list) and all(isinstance(c, str) for c in v) for v in self.train_case_ids.values())
        ):
            bad(f"train_case_ids must map datasets to lists of case ids, got {self.train_case_ids!r}", "fix it")
        if self.cases is not None and self.fraction is not None:
            bad("both cases and fraction are given", "give one of them")
        if self.fraction is not None and not 0 < self.fraction <= 1:
            bad(f"fraction must be in (0, 1], got {self.fraction!r}", "use e.g. 0.1 (a tenth of the cases)")
        if self.val_mode not in VAL_MODES:
            bad(f"val_mode '{self.val_mode}' is unknown", f"use one of {', '.join(VAL_MODES)}")
        if self.val_share is not None and not 0 < self.val_share <= 1:
            bad(f"val_share must be in (0, 1], got {self.val_share!r}", "use e.g. 0.1 (a tenth of the time)")
        if not 0 <= self.oversample_foreground <= 1:
            bad("oversample_foreground must be in [0, 1]", "use e.g. 0.33")
        if self.patch_size is not None and any(int(p) < 1 for p in self.patch_size):
            bad(f"patch_size {self.patch_size} has a non-positive size", "give positive sizes")
        for name in ("model_options", "recipe_options"):
            v = getattr(self, name)
            if not isinstance(v, dict) or not all(isinstance(k, str) for k in v):
                bad(f"{name} must map option names to values, got {v!r}", f"give {name} as a JSON object")
        raise_if_errors(problems, "invalid training settings")

    @property
    def resolved_lr(self) -> float:
        return self.lr if self.lr is not None else _OPT_DEFAULTS[self.optimizer][0]

    @property
    def resolved_weight_decay(self) -> float:
        return self.weight_decay if self.weight_decay is not None else _OPT_DEFAULTS[self.optimizer][1]

    @property
    def resolved_schedule(self) -> str:
        return self.schedule or _OPT_DEFAULTS[self.optimizer][2]

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        d = asdict(self)
        d["datasets"] = list(self.datasets) if self.datasets is not None else None
        d["patch_size"] = list(self.patch_size) if self.patch_size is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        d = dict(d)
        d.setdefault("recipe_options", {})  # runs written before recipes had options
        d.setdefault("init_from", None)
        d.setdefault("val_share", None)
        d.setdefault("val_mode", "cases")  # runs written before patch validation validated whole cases
        d.setdefault("val_patches", 2)
        for key in ("datasets", "patch_size"):
            if d.get(key) is not None:
                d[key] = tuple(d[key])
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise MosaicSegError(f"training settings: unknown key(s) {sorted(unknown)}. Fix: remove them.")
        return cls(**d)
