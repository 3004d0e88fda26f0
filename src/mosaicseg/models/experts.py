"""Frozen experts for KA²ER: a MosaicSeg run or an nnU-Net v2 trained model folder, read-only.

An expert is not a module of the student: it lives outside the student's state dict, optimiser and DDP, in
eval mode, without gradients. Called on a batch of the student's patches ``(B, C, *P)`` (normalised by the
student's plan, in MosaicSeg's canonical axes, at the student's spacing), it sees the same physical region
under its own plan: the intensities mapped from the student's normalisation to its own (:func:`renormalize`),
the axes permuted and flipped into its own (an nnU-Net network works in the file's orientation, transposed by
its plan; MosaicSeg's in the canonical one), resampled to its spacing and padded to its network's divisor. It
returns its encoder features at ``level`` (default: the bottleneck, -1), resampled to the student's feature
grid, and its probabilities of its dataset's labels on the student's patch grid (for the KL term).

nnU-Net experts need the optional ``nnunetv2`` package (``pip install nnunetv2 -c
benchmarks/constraints-cpu.txt`` keeps the CPU torch); their checkpoints hold numpy scalars, which are
allow-listed for ``torch.load(weights_only=True)``, so loading still executes no code.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mosaicseg.errors import MosaicSegError

# per-image z-score schemes (MosaicSeg's, and what nnU-Net's ZScoreNormalization does): the same mapping on both
# sides whatever the plan, so a patch passes unchanged
PER_IMAGE = ("mr", "zscore", "rgb")


def _per_image(scheme: dict[str, Any]) -> bool:
    kind = scheme.get("scheme")
    return kind in PER_IMAGE or (kind == "ct_fixed" and scheme.get("mean") is None)


def renormalize(x: torch.Tensor, student: Sequence[dict[str, Any]], expert: Sequence[dict[str, Any]]) -> torch.Tensor:
    """``x (B, C, *S)`` normalised by the ``student`` schemes (plans ``normalization`` entries) → normalised as the
    ``expert``'s. Per-image z-scores map to themselves (an MR clipped to percentiles counts as one: the clip moves
    only the tails); ``ct`` (dataset statistics) is undone to HU and redone with the expert's clip and
    statistics. Other pairs cannot be mapped from a normalised patch and raise."""
    if len(expert) > x.shape[1] or len(student) < len(expert):
        raise MosaicSegError(
            f"the expert reads {len(expert)} channel(s), the student's images have {len(student)}. Fix: map the "
            "expert to a sub-task whose images have its channels."
        )
    out = []
    for c, (s, e) in enumerate(zip(student, expert, strict=False)):
        xc = x[:, c]
        if _per_image(s) and _per_image(e):
            out.append(xc)
        elif s.get("scheme") == "ct" and e.get("scheme") == "ct":
            hu = xc * float(s["std"]) + float(s["mean"])
            lo, hi = e["clip"]
            out.append((hu.clamp(float(lo), float(hi)) - float(e["mean"])) / max(float(e["std"]), 1e-8))
        else:
            raise MosaicSegError(
                f"channel {c}: the student's normalisation {s.get('scheme')!r} cannot be mapped to the expert's "
                f"{e.get('scheme')!r}. Fix: use an expert trained with the same kind of normalisation (per-image "
                "z-score, or CT with dataset statistics)."
            )
    return torch.stack(out, dim=1)


def orientation_of(image: Path) -> str:
    """The stored orientation letters of an image file (e.g. ``PSR``), from its header."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(image))
    reader.ReadImageInformation()
    return sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(reader.GetDirection())


def nnunet_axes(stored: str, transpose_forward: Sequence[int], canonical: str = "LPS") -> list[tuple[int, bool]]:
    """For each axis of an nnU-Net network's input, the canonical axis it reads and whether it runs the other way.

    nnU-Net reads a file's array in reversed index order (SimpleITK's ``z, y, x``) of the stored orientation and
    applies ``transpose_forward``; MosaicSeg's arrays are in index order of the canonical orientation."""
    pairs = ("LR", "PA", "SI")
    pair_of = {letter: p for p in pairs for letter in p}
    nd = len(stored)
    out = []
    for b in range(nd):
        letter = stored[nd - 1 - int(transpose_forward[b])]
        c = next(i for i, x in enumerate(canonical) if pair_of[x] == pair_of[letter])
        out.append((c, canonical[c] != letter))
    return out


class Expert:
    """A frozen expert (see the module docstring). Subclasses set the attributes and ``_run``."""

    name: str
    dataset: str  # the dataset of the student whose images it reads
    labels: list[str]  # its output's label names, in order
    spacing: tuple[float, ...]  # in canonical axes
    normalization: list[dict[str, Any]]
    feature_channels: int
    spatial_dims: int
    axes: list[tuple[int, bool]] | None = None  # nnunet_axes, None: canonical
    divisor: tuple[int, ...]  # in the expert's axes
    device: torch.device = torch.device("cpu")

    def _run(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover - abstract
        """``x`` in the expert's axes → (features at its level, probabilities ``(B, len(labels), *S)``)."""
        raise NotImplementedError

    def to(self, device: torch.device | str) -> Expert:
        self.device = torch.device(device)
        self.network.to(self.device)
        return self

    network: torch.nn.Module

    def _into(self, x: torch.Tensor) -> torch.Tensor:
        if self.axes is None:
            return x
        x = x.permute(0, 1, *[2 + c for c, _ in self.axes])
        flips = [2 + b for b, (_, f) in enumerate(self.axes) if f]
        return torch.flip(x, flips) if flips else x

    def _back(self, y: torch.Tensor) -> torch.Tensor:
        if self.axes is None:
            return y
        flips = [2 + b for b, (_, f) in enumerate(self.axes) if f]
        y = torch.flip(y, flips) if flips else y
        inverse = [0] * len(self.axes)
        for b, (c, _) in enumerate(self.axes):
            inverse[c] = b
        return y.permute(0, 1, *[2 + b for b in inverse])

    @torch.no_grad()
    def __call__(
        self,
        x: torch.Tensor,
        student_spacing: Sequence[float],
        student_normalization: Sequence[dict[str, Any]],
        feature_size: Sequence[int],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``x (B, C, *P)`` student patches → features ``(B, feature_channels, *feature_size)`` and probabilities
        ``(B, len(labels), *P)``, both in the student's canonical axes and grids."""
        if x.ndim - 2 != self.spatial_dims:
            raise MosaicSegError(
                f"expert {self.name} is {self.spatial_dims}D, the student's patches are {x.ndim - 2}D. Fix: map only "
                "experts of the student's dimensionality."
            )
        x = renormalize(x.to(self.device, torch.float32), student_normalization, self.normalization)
        patch = list(x.shape[2:])
        x = self._into(x)
        order = [c for c, _ in self.axes] if self.axes is not None else list(range(self.spatial_dims))
        spacing_s = [float(student_spacing[c]) for c in order]
        spacing_e = [float(self.spacing[c]) for c in order]
        size_own = list(x.shape[2:])
        size = [max(1, round(n * s / e)) for n, s, e in zip(size_own, spacing_s, spacing_e, strict=True)]
        mode = "trilinear" if self.spatial_dims == 3 else "bilinear"
        if size != size_own:
            x = F.interpolate(x, size=size, mode=mode, align_corners=False)
        padded = [int(np.ceil(n / d) * d) for n, d in zip(size, self.divisor, strict=True)]
        pad = [p for n, t in zip(reversed(size), reversed(padded), strict=True) for p in (0, t - n)]
        x = F.pad(x, pad) if any(pad) else x
        features, probabilities = self._run(x)
        probabilities = probabilities[(slice(None), slice(None), *[slice(0, n) for n in size])]
        probabilities = F.interpolate(probabilities, size=size_own, mode=mode, align_corners=False)
        probabilities = self._back(probabilities)
        features = F.interpolate(self._back(features), size=list(feature_size), mode=mode, align_corners=False)
        assert list(probabilities.shape[2:]) == patch
        return features, probabilities


def read_run(source: str | Path) -> dict[str, Any]:
    """The one checkpoint of a MosaicSeg run, fold folder or ``.pt`` that serves as an expert."""
    from mosaicseg.runtime import load_one_model

    return load_one_model(source, "an expert is")


def _readable(expert: Expert, channels: int, normalization: Sequence[dict[str, Any]]) -> bool:
    """Whether ``expert`` can read images of ``channels`` channels normalised by ``normalization``."""
    if len(expert.normalization) != channels:
        return False
    try:
        renormalize(torch.zeros(1, channels, 1), normalization, expert.normalization)
    except MosaicSegError:
        return False
    return True


class MosaicSegExpert(Expert):
    """A MosaicSeg run (a ``universal`` or ``single`` model) reading ``dataset``'s images (``ckpt``: the run's
    checkpoint, already read)."""

    def __init__(self, source: str | Path, dataset: str, level: int = -1, ckpt: dict[str, Any] | None = None) -> None:
        from mosaicseg.data.vocabulary import Vocabulary
        from mosaicseg.models.factory import build_from_config

        ckpt = ckpt if ckpt is not None else read_run(source)
        model = build_from_config(ckpt["model_config"])
        if not hasattr(model, "encode") or not hasattr(model, "head"):
            raise MosaicSegError(
                f"{source}: a {ckpt['model_config'].get('kind')} model cannot serve as an expert (no encoder features "
                "and task head). Fix: use a universal or single run."
            )
        model.load_state_dict(ckpt["model"])
        self.network = model.eval().requires_grad_(False)
        vocabulary = Vocabulary.from_dict(ckpt["vocabulary"])
        if dataset not in vocabulary.datasets:
            raise MosaicSegError(
                f"{source}: the expert was not trained on {dataset} (it knows {list(vocabulary.datasets)}). Fix: "
                "map it to a sub-task of one of those datasets."
            )
        rows = vocabulary.dataset_tasks(dataset)
        self.name, self.dataset, self.level = str(source), dataset, int(level)
        self.labels = [label for _, label, _ in rows]
        self.task_index = [k for k, _, _ in rows]
        self.modality = vocabulary.modality_index(dataset)
        plan = ckpt["plans"]["datasets"][dataset]
        self.spacing = tuple(float(s) for s in plan["target_spacing"])
        self.normalization = list(plan["normalization"])
        self.spatial_dims = int(model.spatial_dims)
        self.divisor = tuple(int(d) for d in model.backbone.divisor)
        skips = model.backbone.skip_channels
        self.feature_channels = int(skips[self.level])

    def _run(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        model = self.network
        modality = torch.full((x.shape[0],), self.modality, dtype=torch.long, device=x.device)
        skips = model.encode(x, modality)
        logits = model.head(model.decode(skips), levels=1)[0]
        return skips[self.level], logits[:, self.task_index].sigmoid()


class NnUNetExpert(Expert):
    """An nnU-Net v2 trained model folder (``.../Trainer__Plans__configuration``, with ``plans.json``,
    ``dataset.json`` and ``fold_F/checkpoint_final.pth``) reading ``dataset``'s images, whose stored orientation
    is read from ``image`` (one of them)."""

    def __init__(
        self, folder: str | Path, dataset: str, image: str | Path, fold: int | str = 0, level: int = -1
    ) -> None:
        # the folder first: a wrong path is the likelier mistake, and its error does not depend on nnunetv2
        folder = Path(folder)
        checkpoint = folder / f"fold_{fold}" / "checkpoint_final.pth"
        for needed in (folder / "plans.json", folder / "dataset.json", checkpoint):
            if not needed.is_file():
                raise MosaicSegError(
                    f"{needed}: missing, so {folder} is no usable nnU-Net model folder. Fix: pass the folder "
                    "nnUNetv2_train wrote (…/Trainer__Plans__configuration) with a finished fold."
                )
        try:
            from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
            from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
        except ImportError:
            raise MosaicSegError(
                f"{folder}: nnU-Net experts need the optional nnunetv2 package, which is not installed. Fix: `pip "
                "install nnunetv2 -c benchmarks/constraints-cpu.txt` (the constraints keep the CPU torch), or use a "
                "MosaicSeg run as the expert."
            ) from None
        plans = json.loads((folder / "plans.json").read_text())
        dataset_json = json.loads((folder / "dataset.json").read_text())
        ckpt = _load_nnunet_checkpoint(checkpoint)
        configuration = (ckpt.get("init_args") or {}).get("configuration") or folder.name.split("__")[-1]
        manager = PlansManager(plans)
        config = manager.get_configuration(configuration)
        labels = manager.get_label_manager(dataset_json)
        if labels.has_regions:
            raise MosaicSegError(
                f"{folder}: region-based nnU-Net models are not supported as experts. Fix: use another."
            )
        n_channels = len(dataset_json.get("channel_names") or dataset_json.get("modality") or {})
        network = get_network_from_plans(
            config.network_arch_class_name,
            config.network_arch_init_kwargs,
            config.network_arch_init_kwargs_req_import,
            n_channels,
            labels.num_segmentation_heads,
            allow_init=False,
            deep_supervision=False,
        )
        network.load_state_dict(ckpt["network_weights"])
        self.network = network.eval().requires_grad_(False)
        self.name, self.dataset, self.level = str(folder), dataset, int(level)
        self.spatial_dims = len(config.spacing)
        if self.spatial_dims != 3:
            raise MosaicSegError(f"{folder}: a {self.spatial_dims}D nnU-Net model; experts from nnU-Net must be 3D.")
        self.axes = nnunet_axes(orientation_of(Path(image)), manager.transpose_forward)
        spacing = [0.0] * 3
        for b, (c, _) in enumerate(self.axes):
            spacing[c] = float(config.spacing[b])
        self.spacing = tuple(spacing)
        self.normalization = _nnunet_normalization(config.normalization_schemes, manager, folder)
        strides = np.asarray(config.network_arch_init_kwargs["strides"]).reshape(-1, 3)
        self.divisor = tuple(int(d) for d in np.prod(strides, axis=0))
        values = {name: v for name, v in dataset_json["labels"].items() if name != "background"}
        self.labels = list(values)
        self.channels = [int(values[name]) for name in self.labels]
        self.feature_channels = int(config.network_arch_init_kwargs["features_per_stage"][self.level])

    def _run(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        skips = self.network.encoder(x)
        logits = self.network.decoder(skips)
        return skips[self.level], torch.softmax(logits.float(), 1)[:, self.channels]


def _load_nnunet_checkpoint(path: Path) -> dict[str, Any]:
    """nnU-Net's checkpoint with ``weights_only=True``: numpy scalars and dtypes allow-listed, nothing else."""
    import numpy.core.multiarray as multiarray  # numpy's scalar reconstructor, as nnU-Net pickles it

    allowed = [multiarray.scalar, np.dtype, *{type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32")}]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several kinds for a foreign or damaged pickle
        raise MosaicSegError(f"{path}: cannot read the nnU-Net checkpoint ({exc}). Fix: pass a finished fold.") from exc


def _nnunet_normalization(schemes: Sequence[str], manager: Any, folder: Path) -> list[dict[str, Any]]:
    out = []
    for c, name in enumerate(schemes):
        if name == "ZScoreNormalization":
            out.append({"scheme": "mr"})
        elif name == "CTNormalization":
            props = manager.foreground_intensity_properties_per_channel[str(c)]
            out.append({"scheme": "ct", "clip": [props["percentile_00_5"], props["percentile_99_5"]],
                        "mean": props["mean"], "std": props["std"]})  # fmt: skip
        else:
            raise MosaicSegError(
                f"{folder}: channel {c} uses nnU-Net's {name}, which a normalised patch cannot be mapped to. Fix: "
                "use an expert with ZScoreNormalization or CTNormalization."
            )
    return out


class ExternalExpert:
    """The task-agnostic expert: a MosaicSeg run on other datasets (or an nnU-Net folder) reading every student
    dataset it can. For each student dataset it reads images as one of its own datasets: the one of the same
    modality name, else the first whose channels and normalisation fit; a student dataset none fits is skipped
    (:meth:`for_dataset` returns None; those samples get no external tokens)."""

    def __init__(self, entry: dict[str, Any], level: int = -1, image: Path | None = None) -> None:
        self.entry, self.level, self.image = entry, level, image
        self.name = str(entry.get("run") or entry.get("nnunet"))
        self._ckpt = read_run(entry["run"]) if "run" in entry else None
        self._cache: dict[str, Expert | None] = {}
        first = self._build(entry.get("dataset") or (self._datasets()[0] if self._ckpt is not None else "external"))
        self.feature_channels = first.feature_channels
        self.spatial_dims = first.spatial_dims
        self.device = torch.device("cpu")

    def _datasets(self) -> list[str]:
        assert self._ckpt is not None
        return list(self._ckpt["vocabulary"]["datasets"])

    def _build(self, dataset: str) -> Expert:
        if self._ckpt is not None:
            return MosaicSegExpert(self.entry["run"], dataset, self.level, ckpt=self._ckpt)
        if self.image is None:
            raise MosaicSegError(
                f"{self.name}: an nnU-Net external expert needs one image of its training data to read its "
                "orientation. Fix: give image: PATH in its entry."
            )
        return NnUNetExpert(self.entry["nnunet"], dataset, self.image, self.entry.get("fold", 0), self.level)

    def for_dataset(
        self, dataset: str, modality: str, channels: int, normalization: Sequence[dict[str, Any]]
    ) -> Expert | None:
        """The expert reading ``dataset``'s images (modality name, channel count, student normalisation)."""
        if dataset not in self._cache:
            chosen = None
            if self._ckpt is None:
                candidates = [self.entry.get("dataset") or "external"]
            elif self.entry.get("dataset"):
                candidates = [self.entry["dataset"]]
            else:
                vocab = self._ckpt["vocabulary"]
                candidates = sorted(self._datasets(), key=lambda d: vocab["dataset_modality"][d] != modality)
            for d in candidates:
                expert = self._build(d)
                if _readable(expert, channels, normalization):
                    chosen = expert.to(self.device)
                    break
            self._cache[dataset] = chosen
        return self._cache[dataset]

    def to(self, device: torch.device | str) -> ExternalExpert:
        self.device = torch.device(device)
        for expert in self._cache.values():
            if expert is not None:
                expert.to(self.device)
        return self
