"""Shared test helpers. ``make_dataset`` writes tiny nnU-Net v2 raw datasets (NIfTI or PNG) into tmp_path."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image


class DatasetFactory:
    """``make_dataset(name, cases, ...)`` → dataset folder; ``make_dataset.write(path, array)`` writes one file.

    Arrays are in numpy order: ``(Z, Y, X)`` or ``(Y, X)`` for NIfTI (a ``(1, Y, X)`` array is a single-slice
    2D NIfTI), ``(H, W)`` or ``(H, W, 3)`` for PNG. Defaults: non-constant images (CT channels in HU, others
    in 0..1000) and a label with a foreground cube of value 1, on an 8x8x8 grid of 1 mm.
    """

    def __init__(self, root: Path) -> None:
        self.root = root

    @staticmethod
    def write(
        path: Path, array: np.ndarray, spacing: Sequence[float] | None = None, origin: Sequence[float] | None = None
    ) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.name.endswith(".png"):
            Image.fromarray(np.ascontiguousarray(array)).save(path)
            return path
        # a 4D array is a 4D image here, not a 3D image of 4-vectors
        image = sitk.GetImageFromArray(np.ascontiguousarray(array), isVector=False)
        if spacing is not None:
            image.SetSpacing([float(s) for s in spacing])
        if origin is not None:
            image.SetOrigin([float(o) for o in origin])
        sitk.WriteImage(image, str(path))
        return path

    def default_image(self, channel: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        if channel.strip().upper() == "CT":
            return rng.integers(-1000, 400, size=shape).astype(np.int16)
        return rng.uniform(0, 1000, size=shape).astype(np.float32)

    @staticmethod
    def default_label(shape: tuple[int, ...]) -> np.ndarray:
        label = np.zeros(shape, dtype=np.uint8)
        label[tuple(slice(s // 4, max(s // 4 + 1, 3 * s // 4)) for s in shape)] = 1
        return label

    def __call__(
        self,
        name: str = "Dataset001_Tiny",
        cases: int | Sequence[str] = 2,
        *,
        channels: Sequence[str] = ("CT",),
        labels: dict[str, Any] | None = None,
        ending: str = ".nii.gz",
        shape: tuple[int, ...] = (8, 8, 8),
        spacing: Sequence[float] | None = None,
        images: dict[str, list[np.ndarray]] | None = None,
        label_maps: dict[str, np.ndarray] | None = None,
        dataset_json: dict[str, Any] | None = None,
        root: Path | None = None,
    ) -> Path:
        folder = (root or self.root) / name
        case_ids = [f"case{i}" for i in range(cases)] if isinstance(cases, int) else list(cases)
        images, label_maps = images or {}, label_maps or {}
        rgb_png = ending == ".png" and [c.upper() for c in channels] == ["R", "G", "B"]
        for i, case in enumerate(case_ids):
            if case in images:
                arrays = images[case]
            elif rgb_png:
                arrays = [np.random.default_rng(i).integers(0, 256, size=(*shape, 3)).astype(np.uint8)]
            else:
                arrays = [self.default_image(ch, shape, 100 * i + c) for c, ch in enumerate(channels)]
                if ending == ".png":
                    arrays = [np.clip(a, 0, 255).astype(np.uint8) for a in arrays]
            for c, arr in enumerate(arrays):
                self.write(folder / "imagesTr" / f"{case}_{c:04d}{ending}", arr, spacing)
            label = label_maps.get(case)
            if label is None:
                label = self.default_label(shape)
            self.write(folder / "labelsTr" / f"{case}{ending}", label, spacing)
        meta: dict[str, Any] = {
            "channel_names": {str(i): ch for i, ch in enumerate(channels)},
            "labels": labels or {"background": 0, "Organ": 1},
            "numTraining": len(case_ids),
            "file_ending": ending,
        }
        meta.update(dataset_json or {})
        (folder / "dataset.json").write_text(json.dumps(meta, indent=2))
        return folder


@pytest.fixture
def make_dataset(tmp_path: Path) -> DatasetFactory:
    """Factory writing tiny nnU-Net v2 raw datasets under ``tmp_path`` (see :class:`DatasetFactory`)."""
    return DatasetFactory(tmp_path)


def _tiny_network(workdir: Path, patch: list[int], features: list[int]) -> None:
    """Shrink the planned network (plans.json is meant to be edited) so tests train in seconds."""
    plans_path = workdir / "plans.json"
    plans = json.loads(plans_path.read_text())
    n = len(features)
    nd = len(patch)
    plans["network"].update(
        {
            "patch_size": patch,
            "features": features,
            "num_stages": n,
            "batch_size": 2,
            "kernel_sizes": [[3] * nd for _ in range(n)],
            "strides": [[1] * nd] + [[2] * nd for _ in range(n - 1)],
        }
    )
    plans_path.write_text(json.dumps(plans, indent=2))
    collection_path = workdir / "collection.json"
    collection = json.loads(collection_path.read_text())
    collection["folds"] = 2  # a few cases per dataset: two folds keep a held-out patient in each
    collection_path.write_text(json.dumps(collection, indent=2))


def _tiny_workdir(root: Path, dim: int, cases: int, patch: list[int], features: list[int]) -> Path:
    from mosaicseg.data.fingerprint import plan
    from mosaicseg.data.preprocess import preprocess
    from mosaicseg.data.synthetic import generate_collection

    collection = generate_collection(root / "data", dim=dim, seed=0, cases_per_dataset=cases)
    workdir = root / "work"
    plan(collection, workdir, workers=1, progress=False)
    _tiny_network(workdir, patch, features)
    preprocess(workdir, workers=1, progress=False)
    return workdir


@pytest.fixture(scope="session")
def tiny_workdir_2d(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic 2D collection (4 cases per dataset), planned with a tiny network and preprocessed."""
    return _tiny_workdir(tmp_path_factory.mktemp("tiny2d"), 2, 4, [32, 32], [4, 8, 16])


@pytest.fixture(scope="session")
def tiny_workdir_3d(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic 3D collection (3 cases per dataset), planned with a tiny network and preprocessed."""
    return _tiny_workdir(tmp_path_factory.mktemp("tiny3d"), 3, 3, [16, 16, 16], [4, 8])


class StopAt:
    """A training hook that requests a stop (as Ctrl-C does) once the trainer reaches ``iteration``."""

    def __init__(self, iteration: int) -> None:
        self.iteration = iteration

    def on_step_end(self, trainer, batch, outputs, losses) -> None:
        if trainer.iteration == self.iteration:
            trainer.request_stop()


@pytest.fixture(scope="session")
def tiny_run_3d(tiny_workdir_3d: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder (``fold_0`` inside) of 2 universal AdamW iterations on the tiny 3D collection; read-only."""
    from mosaicseg.config import TrainConfig
    from mosaicseg.training.loop import Trainer

    run = tmp_path_factory.mktemp("tiny_run_3d")
    cfg = TrainConfig(
        recipe="universal", optimizer="adamw", iterations=2, iterations_per_epoch=2, device="cpu", val_max_cases=1
    )
    Trainer(tiny_workdir_3d, cfg, run / "fold_0", progress=False).fit()
    return run
