"""Which case, which patch: batch policies, the draw sampler, foreground-aware patch sampling, the dataset.

MultiTalent draws each case with probability ∝ 1/√n_k for its dataset k of n_k cases, so a dataset is
drawn ∝ √n_k: large datasets are seen more, but not in proportion to their size.

The draw happens in the main process: :class:`DrawSampler` asks a **batch policy** (:class:`BatchPolicy`:
:class:`CaseSampler` by default, :class:`SteeredPolicy` when a recipe steers) which case sample ``i`` comes
from and yields a :class:`Draw` ``(index, dataset, case, label, state)``; the loader's workers only cut and
augment the patch. Sample ``i`` uses ``np.random.default_rng((seed, i))``: the policy draws from it first and
the patch continues the same stream (``state``), so a sample is a pure function of ``(seed, i)`` and of the
policy's choice — with the default policy exactly the samples earlier versions drew. Results therefore do not
depend on the number of loader workers, and a resumed run continues with exactly the samples the uninterrupted
run would have drawn.

A steered policy is told, between steps, which dataset (or dataset × label) the next samples come from. The
loader draws ahead of training by its prefetch (``num_workers × 2`` batches with workers, none without), so a
recipe that steers batch by batch trains with ``num_workers=0``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from mosaicseg.config import SAMPLING_SCHEMES
from mosaicseg.data.augment import AugmentConfig, augment_intensity_and_mirror, sample_patch
from mosaicseg.data.laterality import LATERAL_AXIS
from mosaicseg.data.vocabulary import Vocabulary
from mosaicseg.errors import MosaicSegError
from mosaicseg.types import Batch, Sample


@dataclass(frozen=True)
class CaseSampler:
    """Probabilities over ``cases`` (``(dataset, case_id)`` pairs).

    ``scheme``: ``inv_sqrt`` (case ∝ 1/√n_k, MultiTalent), ``uniform`` (every case alike, dataset ∝ n_k)
    or ``weights`` (dataset ∝ ``weights[dataset]``, uniform within it).
    """

    cases: tuple[tuple[str, str], ...]
    probabilities: np.ndarray  # (N,) float64, sums to 1

    @classmethod
    def build(
        cls, cases: Sequence[tuple[str, str]], scheme: str = "inv_sqrt", weights: dict[str, float] | None = None
    ) -> CaseSampler:
        if scheme not in SAMPLING_SCHEMES:
            raise MosaicSegError(f"unknown sampling scheme '{scheme}'. Fix: use one of {', '.join(SAMPLING_SCHEMES)}.")
        if not cases:
            raise MosaicSegError(
                "no training cases to sample from. Fix: check the fold split and that `mosaicseg preprocess` finished."
            )
        cases = tuple(cases)
        counts: dict[str, int] = {}
        for d, _ in cases:
            counts[d] = counts.get(d, 0) + 1
        if scheme == "inv_sqrt":
            w = np.array([1.0 / np.sqrt(counts[d]) for d, _ in cases])
        elif scheme == "uniform":
            w = np.ones(len(cases))
        else:
            weights = weights or {}
            missing = sorted(set(counts) - set(weights))
            if missing:
                raise MosaicSegError(
                    f"sampling: weights has no weight for {missing}. Fix: give every dataset a "
                    "weight in the collection file."
                )
            w = np.array([weights[d] / counts[d] for d, _ in cases])
        return cls(cases, w / w.sum())

    def dataset_probabilities(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for (d, _), p in zip(self.cases, self.probabilities, strict=True):
            out[d] = out.get(d, 0.0) + float(p)
        return out

    def draw(self, rng: np.random.Generator) -> tuple[str, str]:
        return self.cases[int(rng.choice(len(self.cases), p=self.probabilities))]

    def choose(self, index: int, rng: np.random.Generator) -> tuple[str, str, str | None]:
        """:class:`BatchPolicy`: the case of sample ``index`` by the fixed probabilities, no forced label."""
        dataset, case = self.draw(rng)
        return dataset, case, None


class BatchPolicy(Protocol):
    """Chooses the case of each training sample, in the main process (see the module docstring).

    ``choose(index, rng)`` → ``(dataset, case_id, label)``: ``label`` (a label name of that dataset, or None)
    forces the patch onto that label's foreground where the case has some. It draws only from ``rng`` (the
    sample's own stream), so a policy whose choices depend only on ``index`` and its state reproduces.
    """

    def choose(self, index: int, rng: np.random.Generator) -> tuple[str, str, str | None]: ...


class SteeredPolicy:
    """A policy a recipe steers: ``select(dataset, label)`` makes the following samples come from ``dataset``
    (uniform over its training cases; patches forced onto ``label``'s foreground where present);
    ``select(None)`` returns to ``base``. Its selection is its state (``state_dict``), so it survives resume."""

    def __init__(self, cases: Sequence[tuple[str, str]], base: BatchPolicy) -> None:
        self.base = base
        self.by_dataset: dict[str, list[str]] = {}
        for d, c in cases:
            self.by_dataset.setdefault(d, []).append(c)
        self.dataset: str | None = None
        self.label: str | None = None

    def select(self, dataset: str | None, label: str | None = None) -> None:
        if dataset is not None and dataset not in self.by_dataset:
            raise MosaicSegError(
                f"cannot steer sampling to '{dataset}': it has no training cases. Fix: choose one of "
                f"{sorted(self.by_dataset)}."
            )
        if dataset is None and label is not None:
            raise ValueError("a label needs its dataset")
        self.dataset, self.label = dataset, label

    def choose(self, index: int, rng: np.random.Generator) -> tuple[str, str, str | None]:
        if self.dataset is None:
            return self.base.choose(index, rng)
        cases = self.by_dataset[self.dataset]
        return self.dataset, cases[int(rng.integers(len(cases)))], self.label

    def state_dict(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "label": self.label}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.select(state.get("dataset"), state.get("label"))


@dataclass(frozen=True)
class Draw:
    """The policy's choice for sample ``index`` and the sample stream's generator state after it."""

    index: int
    dataset: str
    case: str
    label: str | None
    state: dict[str, Any]  # np.random.Generator bit_generator.state, to continue the stream in a worker


def draw_sample(policy: BatchPolicy, seed: int, index: int) -> Draw:
    """Sample ``index``'s case by ``policy`` from the stream ``default_rng((seed, index))``."""
    rng = np.random.default_rng((int(seed), int(index)))
    dataset, case, label = policy.choose(int(index), rng)
    return Draw(int(index), dataset, case, label, rng.bit_generator.state)


class DrawSampler(Sampler[Draw]):
    """This rank's draws of sample indices ``[start, stop)``: of each global batch of ``batch × world``
    samples, rank ``r`` takes ``[r·batch, (r+1)·batch)``, so the union over ranks is the same sample stream
    whatever the number of processes. The policy is asked when a draw is taken, not before."""

    def __init__(
        self, policy: BatchPolicy, seed: int, start: int, stop: int, batch: int, rank: int = 0, world: int = 1
    ) -> None:
        self.policy, self.seed = policy, int(seed)
        self.start, self.stop, self.batch, self.rank, self.world = start, stop, batch, rank, world

    def __iter__(self) -> Iterator[Draw]:
        step = self.batch * self.world
        for base in range(self.start, self.stop, step):
            for i in range(base + self.rank * self.batch, base + (self.rank + 1) * self.batch):
                yield draw_sample(self.policy, self.seed, i)

    def __len__(self) -> int:
        return (self.stop - self.start) // self.world


def choose_center(
    shape: tuple[int, ...],
    patch_size: tuple[int, ...],
    fg_locations: dict[str, np.ndarray],
    force_foreground: bool,
    rng: np.random.Generator,
    label: str | None = None,
) -> np.ndarray:
    """Patch centre ``(ndim,)`` float: a random voxel of a randomly chosen annotated label when
    ``force_foreground`` and any label has voxels in this case, else uniform so that the patch stays
    within the case where it fits (nnU-Net). ``label``: a policy's forced label, whose voxels are used
    whenever the case has some (whatever ``force_foreground``)."""
    if label is not None and len(fg_locations.get(label, ())):
        locs = fg_locations[label]
        return locs[int(rng.integers(len(locs)))].astype(np.float64)
    available = sorted(k for k, v in fg_locations.items() if len(v))
    if force_foreground and available:
        locs = fg_locations[available[int(rng.integers(len(available)))]]
        return locs[int(rng.integers(len(locs)))].astype(np.float64)
    center = []
    for s, p in zip(shape, patch_size, strict=True):
        half = (p - 1) / 2
        lo, hi = (half, s - 1 - half) if s >= p else ((s - 1) / 2, (s - 1) / 2)
        center.append(rng.uniform(lo, hi))
    return np.asarray(center)


class PatchDataset(Dataset):
    """Map-style dataset of ``length`` random training patches (each a :class:`~mosaicseg.types.Sample`).

    Indexed by a :class:`Draw` (from :class:`DrawSampler`) or by a sample index, which ``policy`` then draws.
    ``load`` is called as ``load(dataset, case_id)`` and returns an object with ``image`` ``(C, *S)``,
    ``seg`` ``(*S)`` and ``fg_locations`` (``label name → (N, ndim)``), e.g.
    :func:`mosaicseg.data.preprocess.load_case` bound to a work folder.
    """

    def __init__(
        self,
        load: Any,
        sampler: BatchPolicy,
        vocabulary: Vocabulary,
        patch_size: Sequence[int],
        seed: int,
        length: int,
        augment: AugmentConfig | None = None,
        oversample_foreground: float = 1 / 3,
    ) -> None:
        self.load = load
        self.sampler = sampler
        self.vocabulary = vocabulary
        self.patch_size = tuple(int(p) for p in patch_size)
        self.seed = int(seed)
        self.length = int(length)
        self.augment = augment or AugmentConfig()
        self.oversample_foreground = oversample_foreground
        self._mirror_cache: dict[str, tuple[AugmentConfig, np.ndarray | None]] = {}

    def __len__(self) -> int:
        return self.length

    def _mirroring(self, dataset: str) -> tuple[AugmentConfig, np.ndarray | None]:
        """The augmentation for ``dataset`` and its left/right label swap: a dataset whose lateral labels
        cannot be swapped is never mirrored along the left-right axis."""
        if dataset not in self._mirror_cache:
            lut = self.vocabulary.lateral_lut(dataset)
            augment = self.augment
            if lut is None:
                ndim = len(self.patch_size)
                axes = range(ndim) if augment.mirror_axes is None else augment.mirror_axes
                augment = replace(augment, mirror_axes=tuple(a for a in axes if a != LATERAL_AXIS))
            elif np.array_equal(lut, np.arange(len(lut))):
                lut = None
            self._mirror_cache[dataset] = (augment, lut)
        return self._mirror_cache[dataset]

    def __getitem__(self, item: int | Draw) -> Sample:
        draw = item if isinstance(item, Draw) else draw_sample(self.sampler, self.seed, item)
        index, dataset, case_id = draw.index, draw.dataset, draw.case
        rng = np.random.default_rng()
        rng.bit_generator.state = draw.state
        case = self.load(dataset, case_id)
        force_fg = bool(rng.random() < self.oversample_foreground)
        center = choose_center(
            tuple(case.seg.shape), self.patch_size, case.fg_locations, force_fg, rng, label=draw.label
        )
        image, seg = sample_patch(
            np.asarray(case.image), np.asarray(case.seg), center, self.patch_size, self.augment, rng
        )
        augment, lut = self._mirroring(dataset)
        image, seg = augment_intensity_and_mirror(image, seg, augment, rng, lateral_lut=lut)
        return make_sample(
            self.vocabulary,
            dataset,
            image,
            seg,
            {"case_id": case_id, "dataset": dataset, "center": center.tolist(), "index": int(index)},
        )


def make_sample(
    vocabulary: Vocabulary, dataset: str, image: np.ndarray, seg: np.ndarray, meta: dict[str, Any]
) -> Sample:
    """Local label map → the global :class:`Sample` (multi-hot target, label mask, ignore mask)."""
    return Sample(
        image=image.astype(np.float32, copy=False),
        target=vocabulary.to_target(dataset, seg),
        label_mask=vocabulary.label_mask(dataset),
        ignore=vocabulary.ignore_mask(dataset, seg),
        modality=vocabulary.modality_index(dataset),
        dataset=vocabulary.dataset_index(dataset),
        meta=meta,
    )


def collate(samples: list[Sample], channels: int | None = None) -> Batch:
    """Stack samples; images are zero-padded to ``channels`` (default: the largest in the batch)."""
    c_max = channels or max(s["image"].shape[0] for s in samples)
    images = np.zeros((len(samples), c_max, *samples[0]["image"].shape[1:]), dtype=np.float32)
    for i, s in enumerate(samples):
        images[i, : s["image"].shape[0]] = s["image"]
    return Batch(
        image=torch.from_numpy(images),
        target=torch.from_numpy(np.stack([s["target"] for s in samples])),
        label_mask=torch.from_numpy(np.stack([s["label_mask"] for s in samples])),
        ignore=torch.from_numpy(np.stack([s["ignore"] for s in samples])),
        modality=torch.tensor([s["modality"] for s in samples], dtype=torch.long),
        dataset=torch.tensor([s["dataset"] for s in samples], dtype=torch.long),
        meta=[s["meta"] for s in samples],
    )


def cached_loader(workdir: str | Path, cache_size: int = 64) -> Any:
    """``load(dataset, case_id)`` over the preprocessed cache, memory-mapped, with a small LRU."""
    from functools import lru_cache

    from mosaicseg.data.preprocess import load_case

    @lru_cache(maxsize=cache_size)
    def load(dataset: str, case_id: str) -> Any:
        return load_case(workdir, dataset, case_id, mmap=True)

    return load
