"""One-file models: ``mosaicseg export RUN -o model.mosaic`` and what reads it back.

A bundle is **one safetensors file** (https://github.com/huggingface/safetensors): an 8-byte header length, a
JSON header and the raw tensor bytes, nothing else, so loading it never unpickles anything. It holds

- the weights of every fold, as tensors named ``fold_NAME/PARAMETER`` (``NAME``: ``0``, ``1``, ..., ``all``);
- in the header's ``__metadata__`` (string → string): ``format`` (``mosaicseg/bundle``), ``version`` and
  ``mosaicseg``, the JSON model card: plans, vocabulary, patch size, per fold the model config
  (:func:`~mosaicseg.models.factory.build_from_config` rebuilds any model kind from it), training settings and
  split, the datasets with their licences and checksums, and the versions of mosaicseg, torch and Python.

Any safetensors reader opens it (``safetensors.torch.load_file``); the model card is
``json.loads(safe_open(path, "pt").metadata()["mosaicseg"])``.

Data checksums (``provenance.datasets[].checksums``), cheap enough for every export and stable across copies:
``dataset_json_sha256`` is the SHA-256 of the raw dataset's ``dataset.json`` bytes; ``manifest_sha256`` the
SHA-256 of the UTF-8 manifest with one line ``RELATIVE_PATH<TAB>SIZE_IN_BYTES\\n`` per file of ``imagesTr`` and
``labelsTr`` (hidden files left out, sorted by path). With ``checksums="content"`` each line also ends with the
file's own SHA-256 (``RELATIVE_PATH<TAB>SIZE<TAB>SHA256\\n``): slower (it reads every file), and it notices any
edit of a voxel. ``weights_sha256`` of a fold hashes, for each tensor in name order, its name, dtype, shape and
raw bytes; loading recomputes it, so a damaged bundle is refused instead of predicting garbage.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import platform
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import mosaicseg
from mosaicseg.atomic import atomic_path
from mosaicseg.data.splits import fold_cases
from mosaicseg.data.vocabulary import Vocabulary
from mosaicseg.data.workdir import list_cases, load_collection_config, load_plans, read_json
from mosaicseg.errors import MosaicSegError
from mosaicseg.runtime import MODEL_KEYS, find_checkpoints, load_checkpoint

BUNDLE_FORMAT = "mosaicseg/bundle"
BUNDLE_VERSION = 1
BUNDLE_SUFFIX = ".mosaic"
CHECKSUMS = ("manifest", "content")
_METADATA_KEYS = ("folds", "plans", "vocabulary", "patch_size")
_FOLD_KEYS = ("name", "model_config", "weights_sha256")
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit
_EXPORT_AGAIN = "export it again with mosaicseg export RUN -o FILE (or pass the run folder itself)"


@dataclass(frozen=True)
class BundleFold:
    """One fold of a bundle: its name, model config and weights (a state dict of CPU tensors)."""

    name: str
    model_config: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    # the run's post-processing decisions (Trainer._decide_postprocessing); None in bundles exported before them
    postprocessing: dict[str, dict[str, Any]] | None = None


@dataclass(frozen=True)
class Bundle:
    """A loaded bundle: the model card (``metadata``) and the folds to ensemble, in the bundle's order."""

    path: Path
    metadata: dict[str, Any]
    folds: tuple[BundleFold, ...]


# --------------------------------------------------------------------------------------------- helpers
def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def weights_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor of ``state_dict`` in name order: name, dtype, shape and raw bytes."""
    h = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key].detach().cpu().contiguous()
        h.update(f"{key}|{str(t.dtype).removeprefix('torch.')}|{list(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _finite(value: Any) -> Any:
    """``value`` with non-finite floats as None (a run's best score starts at -inf; JSON has no infinity)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def data_checksums(folder: Path, mode: str = "manifest") -> dict[str, Any]:
    """Checksums of a raw nnU-Net dataset ``folder`` (layout: the module docstring)."""
    if mode not in CHECKSUMS:
        raise MosaicSegError(f"--checksums {mode!r} is unknown. Fix: use one of {', '.join(CHECKSUMS)}.")
    files = sorted(
        (p.relative_to(folder).as_posix(), p)
        for sub in ("imagesTr", "labelsTr")
        if (folder / sub).is_dir()
        for p in (folder / sub).rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    lines = []
    total = 0
    for rel, p in files:
        size = p.stat().st_size
        total += size
        lines.append(f"{rel}\t{size}" + (f"\t{_sha256_file(p)}" if mode == "content" else "") + "\n")
    return {
        "method": mode,
        "dataset_json_sha256": _sha256_file(folder / "dataset.json"),
        "manifest_sha256": hashlib.sha256("".join(lines).encode("utf-8")).hexdigest(),
        "files": len(files),
        "bytes": total,
    }


def _dataset_provenance(name: str, entry: dict[str, Any] | None, checksums: str, notes: list[str]) -> dict[str, Any]:
    """What the bundle records of a raw dataset: where it was, its licence and description, checksums."""
    out: dict[str, Any] = {"name": name, "path": entry["path"] if entry else None, "licence": None}
    if entry is None:
        notes.append(f"{name}: not in the plans' collection: its licence and checksums are not recorded")
        return out
    folder = Path(entry["path"])
    if not (folder / "dataset.json").is_file():
        notes.append(f"{name}: {folder / 'dataset.json'} not found at export: licence and checksums not recorded")
        return out
    meta = read_json(folder / "dataset.json", f"fix {folder / 'dataset.json'} (mosaicseg check {folder})")
    licence = meta.get("licence", meta.get("license"))
    out["licence"] = licence
    # the dataset's own words about itself, kept apart from what the bundle says
    out["dataset_json"] = {k: meta[k] for k in ("name", "description", "reference", "release") if k in meta}
    if licence is None:
        notes.append(f"{name}: {folder / 'dataset.json'} names no licence ('licence' or 'license' key)")
    out["checksums"] = data_checksums(folder, checksums)
    return out


def find_workdir(checkpoint: Path, plans: dict[str, Any]) -> Path | None:
    """The work folder a checkpoint was trained from: the nearest folder above it holding ``plans.json`` equal
    to the checkpoint's plans (``mosaicseg train`` puts runs in ``WORKDIR/runs/NAME/fold_F``)."""
    for folder in list(checkpoint.parents)[:5]:
        if (folder / "plans.json").is_file() and (folder / "vocabulary.json").is_file():
            try:
                same = load_plans(folder) == plans
            except MosaicSegError:
                same = False
            if same:
                return folder
    return None


def _fold_split(
    fold: int | str, datasets: Sequence[str], workdir: Path | None, counts: dict[str, Any], notes: list[str], where: str
) -> dict[str, Any]:
    """The fold's training and validation case ids, recomputed the way the trainer splits (deterministic from
    the work folder's collection.json and its preprocessed cases), kept only if they agree with the counts the
    run's config.json recorded."""
    split: dict[str, Any] = {
        "fold": fold,
        "train_cases": counts.get("train_cases"),
        "val_cases": counts.get("val_cases"),
    }
    if workdir is None:
        notes.append(f"{where}: no work folder found: the split's case ids are not recorded (pass --workdir)")
        return split
    try:
        collection = load_collection_config(workdir)
        cases = {d: ids for d, ids in list_cases(workdir).items() if d in datasets}
        train, val, _ = fold_cases(collection, cases, fold)
    except MosaicSegError as exc:
        notes.append(f"{where}: the split cannot be recomputed from {workdir} ({exc})")
        return split
    recorded = (counts.get("train_cases"), counts.get("val_cases"))
    if None not in recorded and recorded != (len(train), len(val)):
        notes.append(
            f"{where}: {workdir} now gives {len(train)}/{len(val)} training/validation cases, the run recorded "
            f"{recorded[0]}/{recorded[1]}: the split's case ids are not recorded"
        )
        return split
    split.update(
        folds=collection.folds,
        seed=collection.seed,
        train_cases=len(train),
        val_cases=len(val),
        train={d: [c for dd, c in train if dd == d] for d in datasets},
        validation={d: [c for dd, c in val if dd == d] for d in datasets},
    )
    return split


# --------------------------------------------------------------------------------------------- export
def export_bundle(
    run: str | Path,
    output: str | Path,
    *,
    folds: Sequence[str] | None = None,
    checkpoint: str = "final",
    workdir: str | Path | None = None,
    checksums: str = "manifest",
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write the folds of ``run`` (a run folder with ``fold_*`` folders, a fold folder or a ``.pt`` checkpoint;
    ``folds``/``checkpoint`` as for prediction) into the single bundle file ``output``, atomically; returns its
    model card. ``workdir``: the work folder the run was trained from (default: found above the run), for the
    split's case ids. An existing ``output`` is kept unless ``overwrite``."""
    output = Path(output)
    if output.is_dir():
        raise MosaicSegError(
            f"{output}: is a folder. Fix: give the bundle file to write, e.g. -o model{BUNDLE_SUFFIX}."
        )
    if output.exists() and not overwrite:
        raise MosaicSegError(f"{output}: exists already. Fix: pass --overwrite or choose another file (-o).")
    if checksums not in CHECKSUMS:
        raise MosaicSegError(f"--checksums {checksums!r} is unknown. Fix: use one of {', '.join(CHECKSUMS)}.")
    if workdir is not None and not (Path(workdir) / "plans.json").is_file():
        raise MosaicSegError(f"{workdir}: holds no plans.json. Fix: pass the work folder the run was trained from.")
    notes: list[str] = []
    tensors: dict[str, torch.Tensor] = {}
    fold_cards: list[dict[str, Any]] = []
    first: dict[str, Any] | None = None
    found: Path | None = None
    for path in find_checkpoints(run, folds, checkpoint):
        ckpt = load_checkpoint(path, "cpu", require=MODEL_KEYS)
        if first is None:
            first = ckpt
            found = Path(workdir) if workdir is not None else find_workdir(path.resolve(), ckpt["plans"])
            if found is not None and load_plans(found) != ckpt["plans"]:
                notes.append(f"{found}: plans.json differs from the model's plans: split case ids are not recorded")
                found = None
        elif ckpt["vocabulary"] != first["vocabulary"] or ckpt["plans"] != first["plans"]:
            raise MosaicSegError(
                f"{path}: this fold was trained with other plans or tasks than the first fold. "
                "Fix: bundle only folds of one run (--folds)."
            )
        train_config = ckpt.get("train_config") or {}
        name = path.parent.name.removeprefix("fold_") if path.parent.name.startswith("fold_") else None
        name = name or str(train_config.get("fold", len(fold_cards)))
        if any(f["name"] == name for f in fold_cards):
            raise MosaicSegError(f"{path}: a second fold named {name!r}. Fix: choose distinct folds (--folds).")
        state = {k: v.detach().cpu().clone().contiguous() for k, v in ckpt["model"].items()}
        tensors.update({f"fold_{name}/{k}": v for k, v in state.items()})
        run_config = path.parent / "config.json"
        counts = read_json(run_config, f"delete or fix {run_config}") if run_config.is_file() else {}
        datasets = list(ckpt.get("datasets") or ckpt["vocabulary"]["datasets"])
        fold = train_config.get("fold", name)
        fold_cards.append(
            {
                "name": name,
                "checkpoint": path.name,
                "model_config": ckpt["model_config"],
                "weights_sha256": weights_sha256(state),
                "train_config": train_config,
                "datasets": datasets,
                "iteration": ckpt.get("iteration"),
                "epoch": ckpt.get("epoch"),
                "elapsed_s": ckpt.get("elapsed_s"),
                "best": _finite(ckpt.get("best")),
                "split": _fold_split(fold, datasets, found, counts, notes, f"fold {name}"),
                "postprocessing": _finite(ckpt.get("postprocessing")),
            }
        )
    assert first is not None  # find_checkpoints returns at least one path or raises
    vocabulary = Vocabulary.from_dict(first["vocabulary"])
    entries = {Path(d["path"]).name: d for d in first["plans"].get("collection", {}).get("datasets", [])}
    datasets = [_dataset_provenance(d, entries.get(d), checksums, notes) for d in vocabulary.datasets]
    train_config = fold_cards[0]["train_config"]
    metadata = {
        "format": BUNDLE_FORMAT,
        "version": BUNDLE_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "recipe": train_config.get("recipe"),
        "architecture": fold_cards[0]["model_config"].get("architecture"),
        "kind": fold_cards[0]["model_config"].get("kind", "universal"),
        "patch_size": list(first["patch_size"]),
        "plans": first["plans"],
        "vocabulary": first["vocabulary"],
        "folds": fold_cards,
        "versions": {
            "mosaicseg": mosaicseg.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "numpy": np.__version__,
        },
        "provenance": {
            "run": str(Path(run).resolve()),
            "workdir": str(found.resolve()) if found is not None else None,
            "datasets": datasets,
            "notes": notes,
        },
    }
    header = {"format": BUNDLE_FORMAT, "version": str(BUNDLE_VERSION), "mosaicseg": json.dumps(metadata)}
    with atomic_path(output, BUNDLE_SUFFIX) as tmp:
        save_file(tensors, str(tmp), metadata=header)
    return json.loads(header["mosaicseg"])  # as read_metadata gives it


# --------------------------------------------------------------------------------------------- reading
def is_bundle(path: str | Path) -> bool:
    """Whether ``path`` is meant as a bundle: a file ending in ``.mosaic``, or a safetensors file whose header
    declares the bundle format (only the header is read)."""
    path = Path(path)
    if not path.is_file():
        return False
    if path.name.endswith(BUNDLE_SUFFIX):
        return True
    try:
        with path.open("rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 2 <= n <= _MAX_HEADER:
                return False
            head = f.read(n)
    except OSError:
        return False
    return head.startswith(b"{") and f'"format":"{BUNDLE_FORMAT}"'.encode() in head.replace(b" ", b"")


def _open_error(path: Path, exc: Exception) -> MosaicSegError:
    first = next((line for line in str(exc).splitlines() if line.strip()), "no message")
    return MosaicSegError(
        f"{path}: not a readable MosaicSeg model bundle ({type(exc).__name__}: {first[:200]}); the file is "
        f"damaged, truncated or of another kind. Fix: copy the bundle again or {_EXPORT_AGAIN}."
    )


def _check_metadata(path: Path, header: dict[str, str] | None) -> dict[str, Any]:
    header = header or {}
    if header.get("format") != BUNDLE_FORMAT or "mosaicseg" not in header:
        raise MosaicSegError(
            f"{path}: a safetensors file, but not a MosaicSeg model bundle (no '{BUNDLE_FORMAT}' model card). "
            f"Fix: pass a file written by mosaicseg export, or {_EXPORT_AGAIN}."
        )
    try:
        version = int(header.get("version", ""))
    except ValueError:
        version = -1
    if version < 1:
        raise MosaicSegError(f"{path}: the bundle has no valid format version (damaged). Fix: {_EXPORT_AGAIN}.")
    if version > BUNDLE_VERSION:
        raise MosaicSegError(
            f"{path}: bundle format version {version} is newer than this mosaicseg reads ({BUNDLE_VERSION}). "
            "Fix: upgrade mosaicseg."
        )
    try:
        metadata = json.loads(header["mosaicseg"])
    except ValueError as exc:
        raise MosaicSegError(
            f"{path}: the bundle's model card is not valid JSON ({exc}). Fix: {_EXPORT_AGAIN}."
        ) from exc
    missing = [k for k in _METADATA_KEYS if not isinstance(metadata, dict) or k not in metadata]
    bad_folds = not missing and (
        not isinstance(metadata["folds"], list)
        or not metadata["folds"]
        or any(not isinstance(f, dict) or any(k not in f for k in _FOLD_KEYS) for f in metadata["folds"])
    )
    if missing or bad_folds:
        what = f"lacks {missing}" if missing else "has no valid fold list"
        raise MosaicSegError(f"{path}: the bundle's model card {what} (damaged or edited). Fix: {_EXPORT_AGAIN}.")
    return metadata


def _checked_path(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        raise MosaicSegError(f"{path}: is a folder, not a bundle file. Fix: pass the FILE written by mosaicseg export.")
    if not path.is_file():
        raise MosaicSegError(
            f"{path}: bundle not found. Fix: check the path (mosaicseg export RUN -o FILE writes one)."
        )
    return path


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The model card of the bundle at ``path`` (the weights are not read)."""
    path = _checked_path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata()
    except Exception as exc:  # safetensors reports damaged files as several error types
        raise _open_error(path, exc) from exc
    return _check_metadata(path, header)


def load_bundle(path: str | Path, folds: Sequence[str] | None = None) -> Bundle:
    """The model card and the weights of ``folds`` (default: all, in the bundle's order) of the bundle at
    ``path``; every fold's weights are checked against the ``weights_sha256`` recorded at export."""
    path = _checked_path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = _check_metadata(path, f.metadata())
            names = [str(fold["name"]) for fold in metadata["folds"]]
            wanted = [str(x) for x in folds] if folds else names
            unknown = [x for x in wanted if x not in names]
            if unknown:
                raise MosaicSegError(f"{path}: the bundle holds no fold {unknown}. Fix: use --folds among {names}.")
            states: dict[str, dict[str, torch.Tensor]] = {name: {} for name in wanted}
            for key in f.keys():  # noqa: SIM118 - safe_open is no mapping
                fold, sep, param = key.partition("/")
                name = fold.removeprefix("fold_")
                if sep and name in states:
                    states[name][param] = f.get_tensor(key)
    except MosaicSegError:
        raise
    except Exception as exc:
        raise _open_error(path, exc) from exc
    out = []
    for card in metadata["folds"]:
        name = str(card["name"])
        if name not in states:
            continue
        if weights_sha256(states[name]) != card["weights_sha256"]:
            raise MosaicSegError(
                f"{path}: the weights of fold {name} do not match their checksum (the file is damaged). "
                f"Fix: copy the bundle again or {_EXPORT_AGAIN}."
            )
        out.append(BundleFold(name, card["model_config"], states[name], card.get("postprocessing")))
    out.sort(key=lambda b: wanted.index(b.name))
    return Bundle(path, metadata, tuple(out))


def read_model(source: str | Path) -> dict[str, Any]:
    """The model behind ``source`` as a checkpoint dict (``MODEL_KEYS`` and ``train_config`` where known), for
    ``init_from``, ``finetune`` and ``extend``: a one-fold bundle, or what
    :func:`~mosaicseg.training.transfer.read_source` reads (a checkpoint, a fold folder, a one-fold run)."""
    from mosaicseg.training.transfer import read_source

    if not is_bundle(source):
        return read_source(source)
    bundle = load_bundle(source)
    if len(bundle.folds) != 1:
        names = [f.name for f in bundle.folds]
        raise MosaicSegError(
            f"{source}: the bundle holds {len(names)} folds ({names}); init_from starts from one model. Fix: "
            "export one fold (mosaicseg export RUN --folds N -o FILE) or pass one fold folder of the run."
        )
    fold, meta = bundle.folds[0], bundle.metadata
    card = next(c for c in meta["folds"] if str(c["name"]) == fold.name)
    return {
        "model": fold.state_dict,
        "model_config": fold.model_config,
        "vocabulary": meta["vocabulary"],
        "plans": meta["plans"],
        "patch_size": meta["patch_size"],
        "train_config": card.get("train_config"),
    }


# --------------------------------------------------------------------------------------------- model card
def _licence_text(licence: Any) -> str:
    if licence is None:
        return "licence unknown"
    return f"licence {licence if isinstance(licence, str) else json.dumps(licence)}"


def model_card(metadata: dict[str, Any], path: str | Path | None = None) -> str:
    """The bundle's model card as readable text (``mosaicseg info``)."""
    vocabulary = Vocabulary.from_dict(metadata["vocabulary"])
    plans = metadata["plans"]
    folds = metadata["folds"]
    prov = metadata.get("provenance") or {}
    by_name = {d["name"]: d for d in prov.get("datasets", [])}
    config = folds[0]["model_config"]
    lines = []
    if path is not None:
        size = Path(path).stat().st_size / 1e6 if Path(path).is_file() else float("nan")
        lines.append(f"MosaicSeg model bundle {path} ({size:.1f} MB, format version {metadata.get('version')})")
    lines += [
        f"recipe {metadata.get('recipe')}, network {metadata.get('architecture')} (model kind "
        f"{metadata.get('kind')}), {plans.get('dim', len(metadata['patch_size']))}D, patch {metadata['patch_size']}, "
        f"features {config.get('network_plan', {}).get('features')}",
        f"modalities: {', '.join(vocabulary.modalities)}",
        f"{vocabulary.num_tasks} task(s) from {len(vocabulary.datasets)} dataset(s):",
    ]
    for d in vocabulary.datasets:
        plan = plans["datasets"].get(d, {})
        spacing = [round(float(s), 4) for s in plan.get("target_spacing", [])]
        info = by_name.get(d, {})
        licence = _licence_text(info.get("licence"))
        lines.append(f"  {d}: modality {vocabulary.dataset_modality[d]}, spacing {spacing} mm, {licence}")
        tasks = ", ".join(
            f"{label} (label{'s' if len(values) > 1 else ''} {', '.join(map(str, values))})"
            + ("" if vocabulary.tasks[k].members[0][0] == d else f" = {vocabulary.tasks[k].name}")
            for k, label, values in vocabulary.dataset_tasks(d)
        )
        lines.append(f"    tasks: {tasks}")
        reference = (info.get("dataset_json") or {}).get("reference")
        if reference:
            lines.append(f"    reference: {reference}")
        if info.get("checksums"):
            c = info["checksums"]
            lines.append(
                f"    data: {c['files']} files, {c['bytes'] / 1e6:.1f} MB, dataset.json sha256 "
                f"{c['dataset_json_sha256'][:16]}…, {c['method']} sha256 {c['manifest_sha256'][:16]}…"
            )
    lines.append(f"folds: {len(folds)} (ensembled: probabilities averaged)")
    for f in folds:
        cfg = f.get("train_config") or {}
        split = f.get("split") or {}
        budget = f"iteration {f.get('iteration')}" + (f", {f['elapsed_s']:.0f} s" if f.get("elapsed_s") else "")
        best = (f.get("best") or {}).get("val_mean")
        cases = (
            f"{split.get('train_cases')} training / {split.get('val_cases')} validation cases"
            if split.get("train_cases") is not None
            else "case counts not recorded"
        )
        ids = " (case ids recorded)" if "train" in split else ""
        lines.append(
            f"  fold {f['name']} ({f.get('checkpoint')}): {cases}{ids}, {budget}, optimizer {cfg.get('optimizer')}, "
            f"seed {cfg.get('seed')}" + (f", best validation pseudo-Dice {best:.4f}" if best is not None else "")
        )
    versions = metadata.get("versions") or {}
    lines.append(
        "exported with " + ", ".join(f"{k} {v}" for k, v in versions.items()) + f" on {metadata.get('created')}"
    )
    if prov.get("run"):
        lines.append(f"from run {prov['run']}" + (f" (work folder {prov['workdir']})" if prov.get("workdir") else ""))
    for note in prov.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)
