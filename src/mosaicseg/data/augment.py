"""Spatial and intensity augmentation with explicit random generators.

Spatial augmentation is fused with patch extraction as in nnU-Net/batchgenerators: a patch-sized grid
of coordinates is rotated, scaled and (optionally) elastically deformed around the patch centre and
sampled from the whole case, so no border artefacts appear inside the patch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from mosaicseg.data.laterality import LATERAL_AXIS


@dataclass(frozen=True)
class AugmentConfig:
    """Probabilities and ranges (nnU-Net's defaults where it has them)."""

    p_rotate: float = 0.2
    rotation_deg: float = 30.0
    p_scale: float = 0.2
    scale: tuple[float, float] = (0.7, 1.4)
    p_elastic: float = 0.0  # optional: costly on CPU, off by default as in nnU-Net v2
    elastic_alpha: float = 8.0  # displacement magnitude in voxels
    elastic_sigma: float = 6.0  # smoothness in voxels
    mirror_axes: tuple[int, ...] | None = None  # None: every spatial axis
    p_mirror: float = 0.5
    p_brightness: float = 0.15
    brightness: tuple[float, float] = (0.75, 1.25)
    p_contrast: float = 0.15
    contrast: tuple[float, float] = (0.75, 1.25)
    p_gamma: float = 0.3
    gamma: tuple[float, float] = (0.7, 1.5)
    p_noise: float = 0.1
    noise_variance: tuple[float, float] = (0.0, 0.1)
    image_order: int = 3
    in_plane_only_axis: int | None = None  # anisotropic data: rotate only around this (low-resolution) axis

    @classmethod
    def off(cls) -> AugmentConfig:
        return cls(p_rotate=0, p_scale=0, p_elastic=0, p_mirror=0, p_brightness=0, p_contrast=0, p_gamma=0, p_noise=0)


def _rotation_matrix(angles: np.ndarray, ndim: int) -> np.ndarray:
    if ndim == 2:
        c, s = np.cos(angles[0]), np.sin(angles[0])
        return np.array([[c, -s], [s, c]])
    mats = []
    for axis, a in enumerate(angles):
        c, s = np.cos(a), np.sin(a)
        i, j = [k for k in range(3) if k != axis]
        m = np.eye(3)
        m[i, i], m[i, j], m[j, i], m[j, j] = c, -s, s, c
        mats.append(m)
    return mats[0] @ mats[1] @ mats[2]


def spatial_params(cfg: AugmentConfig, ndim: int, rng: np.random.Generator) -> tuple[np.ndarray | None, bool]:
    """Draw the affine part of the spatial transform: a ``(ndim, ndim)`` matrix or None, and whether to
    deform elastically. The draw order is fixed so a seeded generator gives reproducible patches."""
    matrix = np.eye(ndim)
    changed = False
    if rng.random() < cfg.p_rotate:
        max_a = np.deg2rad(cfg.rotation_deg)
        n_angles = 1 if ndim == 2 else 3
        angles = rng.uniform(-max_a, max_a, size=n_angles)
        if ndim == 3 and cfg.in_plane_only_axis is not None:
            keep = np.zeros(3)
            keep[cfg.in_plane_only_axis] = 1
            angles = angles * keep
        matrix = _rotation_matrix(angles, ndim) @ matrix
        changed = True
    if rng.random() < cfg.p_scale:
        # zooming in (factor < 1 samples a smaller region) and out, isotropically like nnU-Net
        matrix = matrix * rng.uniform(*cfg.scale)
        changed = True
    elastic = bool(rng.random() < cfg.p_elastic)
    return (matrix if changed else None), elastic


def sample_patch(
    image: np.ndarray,
    seg: np.ndarray,
    center: np.ndarray,
    patch_size: tuple[int, ...],
    cfg: AugmentConfig,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Extract an (optionally spatially augmented) patch centred at ``center``.

    ``image`` ``(C, *S)`` float32, ``seg`` ``(*S)`` int → ``(C, *P)`` float32 and ``(*P)`` int16.
    Outside the case the image is 0 and the labels are background.
    """
    ndim = len(patch_size)
    matrix, elastic = spatial_params(cfg, ndim, rng)
    if matrix is None and not elastic:
        return _crop(image, seg, center, patch_size)
    grid = np.stack(np.meshgrid(*[np.arange(p, dtype=np.float32) - (p - 1) / 2 for p in patch_size], indexing="ij"))
    coords = grid.reshape(ndim, -1)
    if matrix is not None:
        coords = matrix.astype(np.float32) @ coords
    coords = coords.reshape(grid.shape)
    if elastic:
        for d in range(ndim):
            noise = rng.uniform(-1, 1, size=patch_size).astype(np.float32)
            coords[d] += ndimage.gaussian_filter(noise, cfg.elastic_sigma, mode="constant") * cfg.elastic_alpha
    coords += np.asarray(center, dtype=np.float32).reshape(ndim, *([1] * ndim))
    out = np.empty((image.shape[0], *patch_size), dtype=np.float32)
    for c in range(image.shape[0]):
        out[c] = ndimage.map_coordinates(image[c], coords, order=cfg.image_order, mode="constant", cval=0.0)
    seg_out = ndimage.map_coordinates(seg, coords, order=0, mode="constant", cval=0).astype(np.int16)
    return out, seg_out


def _crop(image: np.ndarray, seg: np.ndarray, center: np.ndarray, patch_size: tuple[int, ...]):
    """Plain crop with zero padding where the patch leaves the case."""
    shape = image.shape[1:]
    lo = [int(np.floor(c - (p - 1) / 2 + 0.5)) for c, p in zip(center, patch_size, strict=True)]
    out = np.zeros((image.shape[0], *patch_size), dtype=np.float32)
    seg_out = np.zeros(patch_size, dtype=np.int16)
    src, dst = [], []
    for start, p, s in zip(lo, patch_size, shape, strict=True):
        a, b = max(start, 0), min(start + p, s)
        if b <= a:
            return out, seg_out
        src.append(slice(a, b))
        dst.append(slice(a - start, b - start))
    out[(slice(None), *dst)] = image[(slice(None), *src)]
    seg_out[tuple(dst)] = seg[tuple(src)]
    return out, seg_out


def augment_intensity_and_mirror(
    image: np.ndarray,
    seg: np.ndarray,
    cfg: AugmentConfig,
    rng: np.random.Generator,
    lateral_lut: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Mirroring (image and labels) then per-sample brightness, contrast, gamma and Gaussian noise (image only).

    ``image`` ``(C, *P)``, ``seg`` ``(*P)``; returns new arrays. ``lateral_lut`` (label value → value,
    :meth:`~mosaicseg.data.vocabulary.Vocabulary.lateral_lut`) relabels left/right pairs when the
    left-right axis (:data:`~mosaicseg.data.laterality.LATERAL_AXIS`) is mirrored.
    """
    ndim = seg.ndim
    axes = range(ndim) if cfg.mirror_axes is None else cfg.mirror_axes
    for axis in axes:
        if rng.random() < cfg.p_mirror:
            image = np.flip(image, axis=axis + 1)
            seg = np.flip(seg, axis=axis)
            if axis == LATERAL_AXIS and lateral_lut is not None:
                seg = lateral_lut[seg].astype(seg.dtype, copy=False)
    image = np.ascontiguousarray(image, dtype=np.float32)
    seg = np.ascontiguousarray(seg)
    if rng.random() < cfg.p_noise:
        variance = rng.uniform(*cfg.noise_variance)
        image = image + rng.normal(0.0, np.sqrt(variance), size=image.shape).astype(np.float32)
    if rng.random() < cfg.p_brightness:
        image = image * np.float32(rng.uniform(*cfg.brightness))
    if rng.random() < cfg.p_contrast:
        factor = np.float32(rng.uniform(*cfg.contrast))
        for c in range(image.shape[0]):
            mean, lo, hi = image[c].mean(), image[c].min(), image[c].max()
            image[c] = np.clip((image[c] - mean) * factor + mean, lo, hi)
    if rng.random() < cfg.p_gamma:
        g = rng.uniform(*cfg.gamma)
        for c in range(image.shape[0]):
            lo, hi = image[c].min(), image[c].max()
            span = max(float(hi - lo), 1e-7)
            mean, std = image[c].mean(), image[c].std()
            image[c] = np.power((image[c] - lo) / span, g) * span + lo
            # keep the channel's statistics so normalised intensities stay comparable (nnU-Net retain_stats)
            new_std = image[c].std()
            if new_std > 1e-7:
                image[c] = (image[c] - image[c].mean()) / new_std * std + mean
    return image.astype(np.float32, copy=False), seg
