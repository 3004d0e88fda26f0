"""The seeded synthetic partial-label collection: the package's demo default and test fixture.

:func:`generate_collection` writes nnU-Net v2 raw datasets and a ``collection.yaml`` that exercise what
real collections do to a universal model:

* **Partial labels.** Structures appear in datasets that do not annotate them: the CT shows kidneys that
  only the MR annotates, the MR shows the liver lesions that only the CT annotates.
* **One name, two definitions.** The CT's ``Liver`` includes the lesion (nnU-Net regions), the MR's
  ``Liver`` excludes it, so the vocabulary keeps them as two tasks.
* **Overlap.** CT ``Liver`` = label values {1, 2} and ``Tumor`` = {2}: a lesion voxel is positive for both.
* **nnU-Net's ignore label** on corrupted slices of some MR cases; **several images per patient** in the MR
  (``synmr_p003_tp1``/``_tp2``, grouped by ``patient_regex``); **varying shapes, spacings (one anisotropic
  dataset) and orientations** (flipped and permuted axes), so resampling and reorientation are exercised.
* **A real problem.** Every target has distractors of similar intensity that differ in texture, shape or
  context (striated muscle vs. smooth liver, vessels and scalp vs. an enhancing lesion, the dark dermoscope
  vignette vs. a pigmented lesion), plus noise, bias fields and per-case intensity scales, so no intensity
  threshold segments it, while every cue stays within a ~20-voxel neighbourhood for a small CNN.

Anatomy is drawn in patient-centred world coordinates (mm) from a per-patient generator and sampled onto
each case's own grid, so the two time points of one MR patient show the same anatomy on different grids.
Arrays are built in ``(X, Y, Z)`` order on the canonical ``LPS`` grid (identity direction) and reoriented
to the dataset's file orientation on writing; :func:`mosaicseg.data.io.read_image` undoes that exactly.
2D datasets are single slices through the same anatomy (NIfTI of shape ``(X, Y, 1)``) plus one RGB PNG
dermoscopy-like dataset.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from PIL import Image

from mosaicseg.atomic import atomic_path
from mosaicseg.errors import MosaicSegError

GENERATOR_VERSION = 1
DEFAULT_CASES = 12
MR_PATIENT_REGEX = r"^(?P<patient>synmr_p\d+)_tp\d+$"

Coords = tuple[np.ndarray, np.ndarray, np.ndarray]  # open grid: (X,1,1), (1,Y,1), (1,1,Z) world mm


@dataclass(frozen=True)
class _Spec:
    """One synthetic dataset: what ``dataset.json`` declares and how its cases are drawn."""

    number: int
    short: str  # folder name is f"Dataset{number:03d}_{short}"
    kind: str  # renderer: "ct" | "mr" | "multi" | "derm"
    channel_names: tuple[str, ...]
    labels: dict[str, Any]
    file_ending: str
    orientation: str  # file orientation code written (arrays are generated in LPS)
    what: str  # description of the content
    regions_class_order: tuple[int, ...] | None = None

    @property
    def folder(self) -> str:
        return f"Dataset{self.number:03d}_{self.short}"


_CT_LABELS = {"background": 0, "Liver": [1, 2], "Tumor": [2]}
_MR_LABELS = {"background": 0, "Liver": 1, "Kidney": 2, "ignore": 3}
_MULTI_LABELS = {"background": 0, "Edema": 1, "Lesion": 2}
_CT_WHAT = (
    "CT-like abdomen in HU: Liver (region of values 1 and 2) includes the Tumor (value 2); kidneys, "
    "spine, bowel and striated muscle are visible but not annotated"
)
_MR_WHAT = (
    "T1-like abdomen with bias field, two time points per patient: Liver excludes the lesion, Kidney; "
    "lesions visible but not annotated; corrupted slices carry the ignore label"
)
_MULTI_WHAT = (
    "two-channel brain-like FLAIR + T1c: enhancing Lesion and surrounding Edema; vessels, white-matter "
    "hyperintensities and scalp are visible but not annotated"
)
_SPECS: dict[int, tuple[_Spec, ...]] = {
    3: (
        _Spec(901, "SynthCT", "ct", ("CT",), _CT_LABELS, ".nii.gz", "RAS", _CT_WHAT, (1, 2)),
        _Spec(902, "SynthMR", "mr", ("T1",), _MR_LABELS, ".nii.gz", "LPI", _MR_WHAT),
        _Spec(903, "SynthMulti", "multi", ("FLAIR", "T1c"), _MULTI_LABELS, ".nii.gz", "PIR", _MULTI_WHAT),
    ),
    2: (
        _Spec(
            911,
            "SynthDerm",
            "derm",
            ("R", "G", "B"),
            {"background": 0, "Lesion": 1},
            ".png",
            "",
            "RGB dermoscopy-like: pigmented Lesion with reticular texture; hairs and the dark vignette of the "
            "dermoscope are not lesion",
        ),
        _Spec(912, "SynthCT", "ct", ("CT",), _CT_LABELS, ".nii.gz", "RAS", _CT_WHAT + " (single slices)", (1, 2)),
        _Spec(913, "SynthMR", "mr", ("T1",), _MR_LABELS, ".nii.gz", "LPS", _MR_WHAT + " (single slices)"),
        _Spec(
            914,
            "SynthMulti",
            "multi",
            ("FLAIR", "T1c"),
            _MULTI_LABELS,
            ".nii.gz",
            "RAS",
            _MULTI_WHAT + " (single slices)",
        ),
    ),
}

SYNTHETIC_DATASETS: dict[int, tuple[str, ...]] = {dim: tuple(s.folder for s in specs) for dim, specs in _SPECS.items()}
"""Dataset folder names that :func:`generate_collection` writes, per dimensionality."""


# --------------------------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class _Waves:
    """A smooth random field: a sum of plane waves in world coordinates, independent of any voxel grid."""

    k: np.ndarray  # (n, 3) angular wave vectors, rad/mm
    phase: np.ndarray  # (n,)
    amp: np.ndarray  # (n,)

    @classmethod
    def draw(
        cls, rng: np.random.Generator, n: int, wavelength: float, amplitude: float, planar: bool = False
    ) -> _Waves:
        d = rng.normal(size=(n, 3))
        if planar:  # in-plane waves, so that 2D slices show the same pattern as 3D volumes
            d[:, 2] *= 0.15
        d /= np.linalg.norm(d, axis=1, keepdims=True)
        k = d * (2 * np.pi / (wavelength * rng.uniform(0.75, 1.35, n)))[:, None]
        amp = amplitude * rng.uniform(0.6, 1.0, n) * np.sqrt(2.0 / n)
        return cls(k, rng.uniform(0, 2 * np.pi, n), amp)

    def __call__(self, c: Coords) -> np.ndarray:
        """Field sampled on the open grid ``c``: ``(X, Y, Z)`` float64."""
        out = np.zeros(np.broadcast_shapes(*(a.shape for a in c)))
        for k, p, a in zip(self.k, self.phase, self.amp, strict=True):
            out += a * np.sin(k[0] * c[0] + k[1] * c[1] + k[2] * c[2] + p)
        return out


@dataclass(frozen=True)
class _Blob:
    """A deformed ellipsoid: inside where the normalised radius plus a smooth deformation is below 1."""

    centre: tuple[float, float, float]
    axes: tuple[float, float, float]  # semi-axes, mm
    deform: _Waves

    def radius(self, c: Coords) -> np.ndarray:
        """Normalised radius ``(X, Y, Z)``: 0 at the centre, 1 on the (deformed) surface."""
        r2 = sum(((c[i] - self.centre[i]) / self.axes[i]) ** 2 for i in range(3))
        return np.sqrt(r2) + self.deform(c)

    def mask(self, c: Coords) -> np.ndarray:
        return self.radius(c) < 1.0


def _blob(rng: np.random.Generator, centre: Any, axes: Any, bumpiness: float, wavelength: float) -> _Blob:
    return _Blob(
        tuple(float(v) for v in centre),
        tuple(float(v) for v in axes),  # type: ignore[arg-type]
        _Waves.draw(rng, 5, wavelength, bumpiness),
    )


def _tube(c: Coords, points: np.ndarray, radius: float) -> np.ndarray:
    """``(X, Y, Z)`` bool: within ``radius`` mm of the polyline through ``points`` ``(P, 3)``."""
    dist2 = np.full(np.broadcast_shapes(*(a.shape for a in c)), np.inf)
    for p, q in itertools.pairwise(points):
        seg = q - p
        t = sum((c[i] - p[i]) * seg[i] for i in range(3)) / max(float(seg @ seg), 1e-9)
        t = np.clip(t, 0.0, 1.0)
        d2 = sum((c[i] - (p[i] + t * seg[i])) ** 2 for i in range(3))
        np.minimum(dist2, d2, out=dist2)
    return dist2 < radius**2


def _curve(rng: np.random.Generator, start: np.ndarray, length: float, z_drift: float) -> np.ndarray:
    """A smooth random walk of ``length`` mm from ``start``: ``(P, 3)`` points, mostly in the XY plane."""
    n = 12
    heading = rng.uniform(0, 2 * np.pi)
    turns = np.cumsum(rng.normal(0, 0.35, n))
    steps = np.stack([np.cos(heading + turns), np.sin(heading + turns), rng.normal(0, z_drift, n)], axis=1)
    return start + np.vstack([np.zeros(3), np.cumsum(steps * (length / n), axis=0)])


@dataclass(frozen=True)
class _Grid:
    """A case's voxel grid: ``shape`` ``(X, Y, Z)``, ``spacing`` mm, grid centre at ``centre`` (world mm)."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    centre: tuple[float, float, float]

    def coords(self) -> Coords:
        axes = []
        for i, (n, s, o) in enumerate(zip(self.shape, self.spacing, self.centre, strict=True)):
            shape = [1, 1, 1]
            shape[i] = n
            axes.append(((np.arange(n) - (n - 1) / 2) * s + o).reshape(shape))
        return axes[0], axes[1], axes[2]


def _draw_grid(
    rng: np.random.Generator,
    dim: int,
    in_plane: tuple[float, float],
    slice_spacing: tuple[float, float],
    fov: tuple[tuple[float, float], ...],
    slice_z: float,
) -> _Grid:
    """Random spacing (in-plane and between slices) and field of view ``fov`` (mm, per axis); 2D grids are
    one slice at ``slice_z`` (``fov[2]`` is then unused)."""
    sp = [float(rng.uniform(*in_plane))] * 2
    sp[1] *= float(rng.uniform(0.95, 1.05))  # slightly non-square pixels, as scanners often give
    sp.append(float(rng.uniform(*slice_spacing)))
    shape = [round(float(rng.uniform(*fov[i])) / sp[i]) for i in range(dim)] + [1] * (3 - dim)
    shift = rng.normal(0, 1.5, 3)  # the patient is never exactly centred
    if dim == 2:
        shift[2] = 0.0
    return _Grid(
        (shape[0], shape[1], shape[2]),
        (sp[0], sp[1], sp[2]),
        (float(shift[0]), float(shift[1]), float(shift[2] + slice_z)),
    )


# --------------------------------------------------------------------------------------------- renderers


@dataclass
class _Case:
    """One rendered case, in canonical ``LPS`` orientation.

    ``image`` ``(C, X, Y, Z)`` in the file's dtype (``(X, Y, 3)`` uint8 for RGB PNG); ``label`` ``(X, Y, Z)``
    (``(X, Y)`` for PNG) uint8 as stored; ``structures`` every drawn structure, annotated or not, as bool
    masks of the label's shape (tests use them to check partial labels).
    """

    case_id: str
    image: np.ndarray
    label: np.ndarray
    spacing: tuple[float, ...]
    structures: dict[str, np.ndarray]


@dataclass(frozen=True)
class _Abdomen:
    """One patient's abdominal anatomy (world mm), shared by the CT and MR renderers."""

    body: tuple[float, float]  # elliptic cylinder semi-axes along X, Y
    body_deform: _Waves
    fat: float
    muscle: float
    liver: _Blob
    liver_texture: _Waves
    lesions: tuple[_Blob, ...]
    kidneys: tuple[_Blob, _Blob]
    spine: tuple[float, float, float]  # centre x, y and radius of a cylinder along Z
    paraspinal: tuple[_Blob, _Blob]
    bowel: tuple[tuple[np.ndarray, float], ...]  # (polyline (P, 3), radius) per loop
    gas: _Waves  # where the bowel lumen holds gas
    stripes: _Waves


def _draw_abdomen(rng: np.random.Generator) -> _Abdomen:
    a, b = rng.uniform(22.0, 24.0), rng.uniform(17.0, 19.5)
    liver_c = np.array([rng.uniform(-7, -4), rng.uniform(-4, -1), rng.uniform(-2, 2)])
    liver_ax = np.array([rng.uniform(9.0, 11.0), rng.uniform(8.0, 9.5), rng.uniform(10.0, 13.0)])
    lesions = []
    for _ in range(int(rng.integers(1, 3))):
        u = rng.normal(size=3)
        u *= rng.uniform(0, 1) ** (1 / 3) / np.linalg.norm(u)
        c = liver_c + u * liver_ax * np.array([0.35, 0.35, 0.25])
        r = rng.uniform(4.5, 6.5)
        lesions.append(_blob(rng, c, (r, r, r * rng.uniform(0.9, 1.2)), 0.08, 7.0))
    kidneys = []
    for side in (-1, 1):
        c = (side * rng.uniform(10.5, 11.5), rng.uniform(2.5, 4.0), liver_c[2] + rng.uniform(-2.5, 2.5))
        kidneys.append(_blob(rng, c, (rng.uniform(4.2, 4.8), rng.uniform(3.6, 4.0), rng.uniform(7.0, 9.0)), 0.05, 12.0))
    spine = (rng.uniform(-1, 1), b - rng.uniform(8.0, 9.0), rng.uniform(3.2, 3.8))
    paraspinal = tuple(
        _blob(
            rng,
            (spine[0] + side * (spine[2] + rng.uniform(3.5, 4.5)), spine[1] + rng.uniform(0, 1), 0),
            (rng.uniform(3.5, 4.5), rng.uniform(3.0, 3.6), 200.0),
            0.04,
            15.0,
        )
        for side in (-1, 1)
    )
    # bowel loops fill the left, anterior abdomen: soft-tissue walls like the liver's, but tubular and with
    # fluid and gas inside
    bowel = []
    for _ in range(int(rng.integers(3, 5))):
        start = np.array([rng.uniform(1, 10), rng.uniform(-11, 1), liver_c[2] + rng.uniform(-6, 6)])
        bowel.append((_curve(rng, start, rng.uniform(25, 35), 0.3), rng.uniform(2.5, 3.2)))
    # one wave dominates the striation so muscle looks fibrous, not speckled
    stripe = _Waves.draw(rng, 1, rng.uniform(4.5, 5.5), 1.0, planar=True)
    return _Abdomen(
        body=(a, b),
        body_deform=_Waves.draw(rng, 4, 45.0, 0.03, planar=True),
        fat=rng.uniform(2.0, 3.0),
        muscle=rng.uniform(3.5, 4.5),
        liver=_blob(rng, liver_c, liver_ax, 0.1, 20.0),
        liver_texture=_Waves.draw(rng, 4, 10.0, 1.0),
        lesions=tuple(lesions),
        kidneys=(kidneys[0], kidneys[1]),
        spine=spine,
        paraspinal=(paraspinal[0], paraspinal[1]),
        bowel=tuple(bowel),
        gas=_Waves.draw(rng, 4, 6.0, 1.0),
        stripes=_Waves(stripe.k, stripe.phase, np.ones(1)),
    )


def _abdomen_masks(p: _Abdomen, c: Coords) -> dict[str, np.ndarray]:
    """Tissue masks ``(X, Y, Z)`` bool. Organs are clipped to the body's interior and to each other (kidney,
    then spine and paraspinal muscle, then liver, then bowel), so shapes that overlap never share a voxel;
    ``lesion`` lies within ``liver``, ``bowel_gas`` within ``bowel_lumen``, everything within ``body``."""
    r = np.sqrt((c[0] / p.body[0]) ** 2 + (c[1] / p.body[1]) ** 2) + p.body_deform(c)
    mean_axis = (p.body[0] + p.body[1]) / 2
    body = np.broadcast_to(r < 1.0, np.broadcast_shapes(*(a.shape for a in c))).copy()
    inner = r < 1.0 - (p.fat + p.muscle) / mean_axis
    interior = body & inner
    m = {"body": body, "fat": body & (r >= 1.0 - p.fat / mean_axis)}
    m["muscle"] = body & ~m["fat"] & ~inner
    spine = (c[0] - p.spine[0]) ** 2 + (c[1] - p.spine[1]) ** 2 < p.spine[2] ** 2
    m["spine"] = np.broadcast_to(spine, body.shape) & body & ~m["fat"]
    m["muscle"] &= ~m["spine"]
    kidney = (p.kidneys[0].mask(c) | p.kidneys[1].mask(c)) & interior & ~m["spine"]
    paraspinal = (p.paraspinal[0].mask(c) | p.paraspinal[1].mask(c)) & interior & ~m["spine"] & ~kidney
    m["muscle"] |= paraspinal
    liver = p.liver.mask(c) & interior & ~kidney & ~m["spine"] & ~paraspinal
    lesion = np.zeros_like(body)
    for blob in p.lesions:
        lesion |= blob.mask(c)
    bowel = np.zeros_like(body)
    lumen = np.zeros_like(body)
    for points, radius in p.bowel:
        bowel |= _tube(c, points, radius)
        lumen |= _tube(c, points, radius - 1.2)
    taken = kidney | liver | m["spine"] | paraspinal
    m["bowel_wall"] = bowel & ~lumen & interior & ~taken
    m["bowel_lumen"] = lumen & interior & ~taken
    m["bowel_gas"] = m["bowel_lumen"] & (p.gas(c) > 0.5)
    m["kidney"], m["liver"], m["lesion"] = kidney, liver, lesion & liver  # a lesion lies inside the liver
    m["interior_fat"] = interior & ~taken & ~bowel
    return m


def _kidney_cortex(p: _Abdomen, c: Coords) -> np.ndarray:
    """``(X, Y, Z)`` bool: the outer shell of the kidneys (bright cortex around a darker medulla)."""
    return np.minimum(p.kidneys[0].radius(c), p.kidneys[1].radius(c)) > 0.55


def _render_ct(p: _Abdomen, grid: _Grid, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Image ``(1, X, Y, Z)`` int16 HU and the tissue masks."""
    c = grid.coords()
    m = _abdomen_masks(p, c)
    hu = np.full(grid.shape, -1000.0)
    hu[m["fat"]] = -100.0
    hu[m["interior_fat"]] = -85.0
    # striated muscle has the liver's mean attenuation: only its texture tells them apart
    liver_mean = rng.uniform(52, 68)
    stripes = p.stripes(c)
    hu[m["muscle"]] = (liver_mean - 5 + 38 * stripes)[m["muscle"]]
    hu[m["spine"]] = (330 + 120 * p.liver_texture(c))[m["spine"]]
    hu[m["bowel_wall"]] = liver_mean
    hu[m["bowel_lumen"]] = rng.uniform(5, 25)
    hu[m["bowel_gas"]] = -700
    hu[m["liver"]] = (liver_mean + 6 * p.liver_texture(c))[m["liver"]]
    hu[m["lesion"]] = liver_mean - rng.uniform(45, 60)
    cortex = _kidney_cortex(p, c)
    hu[m["kidney"] & cortex] = liver_mean + 18
    hu[m["kidney"] & ~cortex] = liver_mean - 22
    hu += rng.normal(0, rng.uniform(10, 16), grid.shape)
    return np.clip(np.rint(hu), -1024, 3071).astype(np.int16)[None], m


def _render_mr(p: _Abdomen, grid: _Grid, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Image ``(1, X, Y, Z)`` float32 in arbitrary T1-like units, with bias field, and the tissue masks."""
    c = grid.coords()
    m = _abdomen_masks(p, c)
    s = np.zeros(grid.shape)
    s[m["fat"]] = 900.0
    s[m["interior_fat"]] = 780.0
    s[m["muscle"]] = (300 + 90 * p.stripes(c))[m["muscle"]]
    s[m["spine"]] = 620.0
    s[m["bowel_wall"]] = 400.0
    s[m["bowel_lumen"]] = 160.0
    s[m["bowel_gas"]] = 20.0
    s[m["liver"]] = (430 + 25 * p.liver_texture(c))[m["liver"]]
    s[m["lesion"]] = 210.0
    cortex = _kidney_cortex(p, c)
    s[m["kidney"] & cortex] = 520.0
    s[m["kidney"] & ~cortex] = 200.0
    bias = np.exp(_Waves.draw(rng, 3, 70.0, 0.3)(c))
    scale = rng.uniform(0.6, 1.6)
    sigma = 22.0
    # magnitude images: Rician noise, so the background is not zero-mean
    s = np.hypot(s * bias + rng.normal(0, sigma, grid.shape), rng.normal(0, sigma, grid.shape)) * scale
    return _quantise(s)[None], m


def _quantise(a: np.ndarray) -> np.ndarray:
    """float32 rounded to 1/8: scanner-like precision, and files compress to a fraction of their size."""
    return (np.rint(a * 8) / 8).astype(np.float32)


def _corrupt_slab(image: np.ndarray, label: np.ndarray, rng: np.random.Generator, dim: int) -> np.ndarray:
    """Ghost and noise a slab (2 slices in 3D, a band of rows in 2D); returns its ``(X, Y, Z)`` bool mask."""
    slab = np.zeros(label.shape, dtype=bool)
    axis, width = (2, 2) if dim == 3 else (0, max(3, label.shape[0] // 16))
    n = label.shape[axis]
    start = int(rng.integers(n // 4, 3 * n // 4 - width + 1))
    index = [slice(None)] * 3
    index[axis] = slice(start, start + width)
    slab[tuple(index)] = True
    ghost = np.roll(image[0], label.shape[1] // 3, axis=1)  # motion ghost along the phase-encoding axis
    noisy = image[0] * 0.7 + 0.6 * ghost + np.abs(rng.normal(0, 60, image.shape[1:]))
    image[0][slab] = _quantise(noisy)[slab]
    return slab


@dataclass(frozen=True)
class _Head:
    """One patient's brain-like anatomy (world mm)."""

    head: _Blob
    scalp: float
    skull: float
    csf: float
    ventricles: tuple[_Blob, _Blob]
    lesion: _Blob
    necrosis: float  # normalised radius of a necrotic core (0: none)
    edema: _Blob
    vessels: tuple[tuple[np.ndarray, float], ...]
    wmh: tuple[_Blob, ...]
    texture: _Waves


def _draw_head(rng: np.random.Generator, dim: int) -> _Head:
    axes = np.array([rng.uniform(19, 21), rng.uniform(21, 23.5), rng.uniform(18, 20)])
    brain_ax = axes - 7.0
    ventricles = tuple(
        _blob(
            rng,
            (side * rng.uniform(3.0, 4.0), rng.uniform(-2, 0), rng.uniform(0, 3)),
            (rng.uniform(1.8, 2.6), rng.uniform(6, 8), rng.uniform(3, 5)),
            0.06,
            10.0,
        )
        for side in (-1, 1)
    )
    # the lesion sits lateral to the ventricles, well inside the brain; in 2D the slice passes through it
    side = rng.choice([-1.0, 1.0])
    lc = np.array([side * rng.uniform(6.0, 7.5), rng.uniform(-7, 5), rng.uniform(-3, 3) if dim == 3 else 0.0])
    r = rng.uniform(5.0, 6.8)
    lesion = _blob(rng, lc, (r, r * rng.uniform(0.85, 1.15), r * rng.uniform(0.85, 1.15)), 0.1, 8.0)
    er = r + rng.uniform(3.0, 5.5)
    edema = _blob(rng, lc, (er, er * rng.uniform(0.9, 1.2), er * rng.uniform(0.9, 1.2)), 0.15, 10.0)
    z_span = 0.0 if dim == 2 else 6.0
    vessels = []
    for _ in range(int(rng.integers(3, 5))):
        start = rng.uniform(-1, 1, 3) * brain_ax * np.array([0.7, 0.7, 0.0]) + np.array(
            [0, 0, rng.uniform(-z_span, z_span)]
        )
        vessels.append((_curve(rng, start, rng.uniform(22, 34), 0.15 if dim == 3 else 0.0), rng.uniform(1.2, 1.7)))
    wmh = []
    for _ in range(int(rng.integers(3, 6))):
        wc = rng.uniform(-1, 1, 3) * brain_ax * np.array([0.75, 0.75, 0.6 if dim == 3 else 0.0])
        wr = rng.uniform(1.8, 3.0)
        wmh.append(_blob(rng, wc, (wr, wr * rng.uniform(0.8, 1.3), wr), 0.08, 6.0))
    return _Head(
        head=_blob(rng, (0, 0, 0), axes, 0.03, 40.0),
        scalp=rng.uniform(2.2, 2.8),
        skull=rng.uniform(2.2, 2.8),
        csf=rng.uniform(1.2, 1.8),
        ventricles=(ventricles[0], ventricles[1]),
        lesion=lesion,
        necrosis=rng.uniform(0.35, 0.5) if rng.random() < 0.5 else 0.0,
        edema=edema,
        vessels=tuple(vessels),
        wmh=tuple(wmh),
        texture=_Waves.draw(rng, 5, 9.0, 1.0),
    )


def _render_multi(h: _Head, grid: _Grid, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Image ``(2, X, Y, Z)`` float32 (FLAIR, T1c) and the tissue masks."""
    c = grid.coords()
    r = h.head.radius(c)
    mean_axis = float(np.mean(h.head.axes))
    head = r < 1.0
    depth = (1.0 - r) * mean_axis  # approximate distance below the surface, mm
    m = {"head": head, "scalp": head & (depth < h.scalp)}
    m["skull"] = head & (depth >= h.scalp) & (depth < h.scalp + h.skull)
    m["csf"] = head & (depth >= h.scalp + h.skull) & (depth < h.scalp + h.skull + h.csf)
    brain = head & (depth >= h.scalp + h.skull + h.csf)
    m["ventricles"] = brain & (h.ventricles[0].mask(c) | h.ventricles[1].mask(c))
    vessels = np.zeros_like(head)
    for points, radius in h.vessels:
        vessels |= _tube(c, points, radius)
    m["vessels"] = brain & vessels & ~m["ventricles"]
    wmh = np.zeros_like(head)
    for blob in h.wmh:
        wmh |= blob.mask(c)
    lr = h.lesion.radius(c)
    m["lesion"] = brain & (lr < 1.0)
    m["necrosis"] = m["lesion"] & (lr < h.necrosis)
    m["edema"] = brain & h.edema.mask(c) & ~m["lesion"] & ~m["ventricles"]
    m["wmh"] = brain & wmh & ~m["edema"] & ~m["lesion"] & ~m["vessels"] & ~m["ventricles"]
    m["vessels"] &= ~m["lesion"] & ~m["edema"]
    m["brain"] = brain
    tex = h.texture(c)
    #                 FLAIR, T1c
    values = {
        "scalp": (520.0, 650.0),
        "skull": (40.0, 50.0),
        "csf": (80.0, 100.0),
        "ventricles": (90.0, 110.0),
        "vessels": (300.0, 720.0),
        "wmh": (560.0, 340.0),
        "edema": (560.0, 270.0),
        "lesion": (430.0, 700.0),
        "necrosis": (470.0, 330.0),
    }
    channels = []
    for ch, brain_mean in enumerate((320.0, 340.0)):
        s = np.zeros(grid.shape)
        s[brain] = (brain_mean + 25 * tex)[brain]
        for name, v in values.items():
            s[m[name]] = v[ch]
        s[m["lesion"] & ~m["necrosis"]] += (60 * tex)[m["lesion"] & ~m["necrosis"]] * (ch == 1)
        bias = np.exp(_Waves.draw(rng, 3, 80.0, 0.15)(c))
        s = np.hypot(s * bias + rng.normal(0, 18, grid.shape), rng.normal(0, 18, grid.shape))
        channels.append(_quantise(s * rng.uniform(0.7, 1.4)))
    return np.stack(channels), m


def _render_derm(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """RGB image ``(X, Y, 3)`` uint8, label ``(X, Y)`` uint8 and the structure masks ``(X, Y)`` bool."""
    nx, ny = (int(v) for v in rng.integers(64, 97, 2))
    u = (np.arange(nx) - (nx - 1) / 2)[:, None]
    v = (np.arange(ny) - (ny - 1) / 2)[None, :]
    c: Coords = (u[..., None], v[..., None], np.zeros((1, 1, 1)))
    size = min(nx, ny)
    skin = np.array([212.0, 158.0, 136.0]) * rng.uniform(0.88, 1.08, 3)
    direction = rng.normal(size=2)
    direction /= np.linalg.norm(direction)
    light = 1 + 0.12 * (direction[0] * u + direction[1] * v) / size + _Waves.draw(rng, 3, 40.0, 0.05)(c)[..., 0]
    rgb = skin * light[..., None] + 6 * _Waves.draw(rng, 4, 12.0, 1.0)(c)
    # pigmented lesion: irregular border, variegated brown with a darker reticular network
    lc = rng.normal(0, 0.07 * size, 2)
    radius = rng.uniform(0.15, 0.24) * size
    du, dv = u - lc[0], v - lc[1]
    theta = np.arctan2(dv, du)
    border = 1 + sum(rng.uniform(0, 0.1) * np.cos(k * theta + rng.uniform(0, 2 * np.pi)) for k in range(2, 6))
    lesion = np.hypot(du, dv) / radius < border
    brown = np.array([150.0, 98.0, 78.0]) * rng.uniform(0.6, 1.0)
    period = rng.uniform(4.0, 6.0)
    angle = rng.uniform(0, np.pi)
    a1 = np.cos(angle) * u + np.sin(angle) * v
    a2 = -np.sin(angle) * u + np.cos(angle) * v
    network = (np.sin(2 * np.pi * a1 / period) > 0.55) | (np.sin(2 * np.pi * a2 / period) > 0.55)
    shade = brown + 15 * _Waves.draw(rng, 3, 15.0, 1.0)(c) - 40 * network[..., None]
    rgb[lesion] = shade[lesion]
    hairs = np.zeros((nx, ny, 1), dtype=bool)
    for _ in range(int(rng.integers(2, 6))):
        start = np.array([*rng.uniform(-0.5, 0.5, 2) * size, 0.0])
        hairs |= _tube(c, _curve(rng, start, rng.uniform(0.6, 1.2) * size, 0.0), rng.uniform(0.7, 1.2))
    hairs = hairs[..., 0]
    rgb[hairs] = np.array([55.0, 40.0, 35.0]) * rng.uniform(0.8, 1.2)
    # the dermoscope's circular field: dark outside, with a soft edge
    field = rng.uniform(0.42, 0.48) * size
    rad = np.hypot(u, v)
    falloff = np.clip((rad - field) / 4.0, 0.0, 1.0)
    rgb = rgb * (1 - 0.85 * falloff[..., None])
    rgb += rng.normal(0, 5, rgb.shape)
    image = np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
    structures = {"lesion": lesion, "hairs": hairs, "vignette": falloff > 0}
    return image, lesion.astype(np.uint8), structures


def _case_ids(spec: _Spec, n: int) -> list[str]:
    if spec.kind == "mr":
        return [f"synmr_p{i // 2:03d}_tp{i % 2 + 1}" for i in range(n)]
    return [f"syn{spec.kind}_{i:03d}" for i in range(n)]


def _render_case(spec: _Spec, dim: int, seed: int, index: int) -> _Case:
    """Render case ``index`` of ``spec`` deterministically from ``(seed, dataset number, index)``."""
    case_id = _case_ids(spec, index + 1)[index]
    if spec.kind == "derm":
        image, label, structures = _render_derm(np.random.default_rng([seed, spec.number, index]))
        return _Case(case_id, image, label, (1.0, 1.0), structures)
    if spec.kind == "mr":
        patient, tp = index // 2, index % 2 + 1
    else:
        patient, tp = index, 1
    anatomy = np.random.default_rng([seed, spec.number, patient, 0])
    acq = np.random.default_rng([seed, spec.number, patient, tp])
    if spec.kind == "multi":
        head = _draw_head(anatomy, dim)
        in_plane, between = ((1.1, 1.3), (1.1, 1.3)) if dim == 3 else ((0.6, 0.72), (3.0, 3.0))
        grid = _draw_grid(acq, dim, in_plane, between, ((46, 52), (50, 56), (42, 48)), head.lesion.centre[2])
        image, m = _render_multi(head, grid, acq)
        label = np.zeros(grid.shape, dtype=np.uint8)
        label[m["edema"]] = 1
        label[m["lesion"]] = 2
        return _Case(case_id, image, label, grid.spacing, m)
    p = _draw_abdomen(anatomy)
    if tp == 2:  # follow-up: the lesions grew
        grown = tuple(
            _Blob(b.centre, (b.axes[0] * 1.15, b.axes[1] * 1.15, b.axes[2] * 1.15), b.deform) for b in p.lesions
        )
        p = replace(p, lesions=grown)
    slice_z = p.lesions[0].centre[2] + float(acq.uniform(-1, 1))
    if spec.kind == "ct":
        in_plane, between = ((0.95, 1.25), (1.0, 1.5)) if dim == 3 else ((0.55, 0.7), (2.0, 3.0))
        grid = _draw_grid(acq, dim, in_plane, between, ((48, 54), (38, 46), (34, 42)), slice_z)
        image, m = _render_ct(p, grid, acq)
        label = np.zeros(grid.shape, dtype=np.uint8)
        label[m["liver"]] = 1
        label[m["lesion"]] = 2
        return _Case(case_id, image, label, grid.spacing, m)
    # MR: anisotropic slices in 3D (1 x 1 x 2.5 mm)
    in_plane, between = ((1.0, 1.15), (2.5, 2.5)) if dim == 3 else ((0.6, 0.72), (5.0, 5.0))
    grid = _draw_grid(acq, dim, in_plane, between, ((48, 54), (38, 46), (36, 44)), slice_z)
    image, m = _render_mr(p, grid, acq)
    label = np.zeros(grid.shape, dtype=np.uint8)
    label[m["liver"] & ~m["lesion"]] = 1  # this protocol's liver excludes the lesion
    label[m["kidney"]] = 2
    if index % 2 == 1 or acq.random() < 0.3:
        slab = _corrupt_slab(image, label, acq, dim)
        label[slab] = 3
        m["ignore"] = slab
    return _Case(case_id, image, label, grid.spacing, m)


# --------------------------------------------------------------------------------------------- writing


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    with atomic_path(path, ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix) as tmp:
        write(tmp)


def _write_nifti(path: Path, array: np.ndarray, spacing: tuple[float, ...], orientation: str) -> None:
    """``array`` ``(X, Y, Z)`` on the canonical LPS grid → file in ``orientation`` (same world content)."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(array)))
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetOrigin(tuple(-(n - 1) / 2 * s for n, s in zip(array.shape, spacing, strict=True)))
    if orientation and orientation != "LPS":
        image = sitk.DICOMOrient(image, orientation)
    _atomic_write(path, lambda tmp: sitk.WriteImage(image, str(tmp), useCompression=True))


def _write_png(path: Path, array: np.ndarray) -> None:
    """``array`` ``(X, Y)`` or ``(X, Y, 3)`` uint8; rows are X, as :func:`mosaicseg.data.io.read_image` reads."""
    _atomic_write(path, lambda tmp: Image.fromarray(np.ascontiguousarray(array)).save(tmp, format="PNG"))


def _dataset_json(spec: _Spec, dim: int, seed: int, n: int) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": spec.short,
        "description": f"{spec.what}. Generated by mosaicseg.data.synthetic v{GENERATOR_VERSION} "
        f"(dim {dim}, seed {seed}); synthetic, CC0.",
        "licence": "CC0-1.0",
        "channel_names": {str(i): name for i, name in enumerate(spec.channel_names)},
        "labels": spec.labels,
        "numTraining": n,
        "file_ending": spec.file_ending,
    }
    if spec.regions_class_order is not None:
        data["regions_class_order"] = list(spec.regions_class_order)
    return data


def _expected_files(spec: _Spec, n: int) -> list[Path]:
    files = []
    for case_id in _case_ids(spec, n):
        channels = 1 if spec.file_ending == ".png" else len(spec.channel_names)
        files += [Path("imagesTr") / f"{case_id}_{c:04d}{spec.file_ending}" for c in range(channels)]
        files.append(Path("labelsTr") / f"{case_id}{spec.file_ending}")
    return files


def _write_dataset(root: Path, spec: _Spec, dim: int, seed: int, n: int) -> None:
    folder = root / spec.folder
    meta = _dataset_json(spec, dim, seed, n)
    json_path = folder / "dataset.json"
    expected = _expected_files(spec, n)
    if json_path.is_file():
        try:
            same = json.loads(json_path.read_text(encoding="utf-8")) == meta
        except (OSError, ValueError):
            same = False
        if same and all((folder / f).is_file() for f in expected):
            return
        # dataset.json goes last, so a folder without it is recognisably incomplete if we are interrupted
        json_path.unlink()
    for sub in ("imagesTr", "labelsTr"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    keep = {folder / f for f in expected}
    prefix = _case_ids(spec, 1)[0].split("_")[0]
    for sub in ("imagesTr", "labelsTr"):
        for old in (folder / sub).iterdir():
            # only our own leftovers (another seed's or count's cases, interrupted temporaries) are removed
            if old.is_file() and old not in keep and old.name.lstrip(".").startswith(prefix):
                old.unlink()
    for index in range(n):
        case = _render_case(spec, dim, seed, index)
        if spec.file_ending == ".png":
            _write_png(folder / "imagesTr" / f"{case.case_id}_0000.png", case.image)
            _write_png(folder / "labelsTr" / f"{case.case_id}.png", case.label)
            continue
        for ch, channel in enumerate(case.image):
            _write_nifti(
                folder / "imagesTr" / f"{case.case_id}_{ch:04d}.nii.gz", channel, case.spacing, spec.orientation
            )
        _write_nifti(folder / "labelsTr" / f"{case.case_id}.nii.gz", case.label, case.spacing, spec.orientation)
    text = json.dumps(meta, indent=2) + "\n"
    _atomic_write(json_path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _collection_yaml(dim: int, seed: int) -> str:
    lines = [
        "# Synthetic partial-label collection (synthetic, CC0), written by mosaicseg.data.synthetic.",
        f"# Regenerate with: mosaicseg synth <folder> --dim {dim} --seed {seed}",
        f"name: synthetic{dim}d",
        "root: .",
        f"synthetic: {{dim: {dim}, seed: {seed}}}",
        "datasets:",
    ]
    for spec in _SPECS[dim]:
        lines.append(f"  - path: {spec.folder}")
        if spec.kind == "mr":
            lines.append(f"    patient_regex: '{MR_PATIENT_REGEX}'")
    return "\n".join(lines) + "\n"


def generate_collection(
    out_dir: str | Path,
    dim: int = 3,
    seed: int = 0,
    write_collection: bool = True,
    cases_per_dataset: int | None = None,
) -> Path:
    """Write the synthetic datasets (nnU-Net v2 raw format) into ``out_dir`` and, if ``write_collection``,
    ``out_dir/collection.yaml``.

    Deterministic for a given ``(dim, seed, cases_per_dataset)``; datasets whose ``dataset.json`` and files
    already match are left untouched. Returns the path of ``collection.yaml`` (``out_dir`` if not written).
    """
    if dim not in _SPECS:
        raise MosaicSegError(f"synthetic collections exist for dim 2 and 3, not {dim}. Fix: use dim 2 or 3.")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise MosaicSegError(f"synthetic seed must be a non-negative integer, got {seed!r}. Fix: use e.g. seed 0.")
    n = DEFAULT_CASES if cases_per_dataset is None else cases_per_dataset
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise MosaicSegError(f"cases_per_dataset must be a positive integer, got {n!r}. Fix: use e.g. 12.")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise MosaicSegError(f"{out}: is a file, not a folder. Fix: choose an output folder.")
    out.mkdir(parents=True, exist_ok=True)
    for spec in _SPECS[dim]:
        _write_dataset(out, spec, dim, seed, n)
    if not write_collection:
        return out
    path = out / "collection.yaml"
    text = _collection_yaml(dim, seed)
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        _atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return path
