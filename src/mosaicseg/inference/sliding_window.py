"""Gaussian-weighted sliding-window prediction with optional mirroring, on top of MONAI's inferer.

Logits of overlapping tiles are blended with a Gaussian importance map (nnU-Net, ``sigma = 1/8`` of the
tile); mirrored predictions are averaged in logit space, then the sigmoid turns them into per-task
probabilities (every task is an independent sigmoid output, MultiTalent).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import torch
from monai.inferers import sliding_window_inference

from mosaicseg.data.laterality import LATERAL_AXIS
from mosaicseg.errors import MosaicSegError

HALF_ABOVE_BYTES = 1 << 30


def mirror_combinations(axes: Sequence[int]) -> list[tuple[int, ...]]:
    """Every subset of ``axes`` (spatial axis numbers): 2^len(axes) flips, the identity first."""
    return [c for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)]


@torch.no_grad()
def predict_logits(
    model: torch.nn.Module | Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    modality: int,
    patch_size: Sequence[int],
    *,
    overlap: float = 0.5,
    tile_batch: int = 1,
    mirror_axes: Sequence[int] = (),
    lateral_permutation: Sequence[int] | None = None,
    tasks: Sequence[int] | None = None,
    device: torch.device | str = "cpu",
    amp: bool = False,
    progress: bool = False,
    accumulate: torch.dtype | None = None,
) -> torch.Tensor:
    """Sliding-window logits of one image.

    Args:
        model: ``model(x (N, C, *P), modality (N,)) -> (N, K, *P)`` in eval mode, or a
            :class:`~mosaicseg.inference.frozen.FrozenForward` of one.
        image: ``(C, *S)`` float tensor (any device; tiles are moved to ``device``).
        modality: the image's modality index (selects the model's input stem).
        patch_size: tile size ``P``; images smaller than a tile are padded and cropped back by MONAI.
        mirror_axes: spatial axes (0-based, of ``S``) to mirror for test-time augmentation.
        lateral_permutation: ``(K,)`` output each output becomes when the left-right axis is mirrored
            (:meth:`~mosaicseg.data.vocabulary.Vocabulary.lateral_permutation`): a mirrored tile's
            ``Caudate_L`` output is the unmirrored image's ``Caudate_R``. ``None``: no left/right outputs.
        tasks: global task indices to keep (``None``: all ``K``); the rest is dropped per tile to save memory.
        accumulate: dtype of the blended output. ``None``: float32, or float16 when a float32 output of the
            kept tasks would exceed 1 GiB (nnU-Net also blends large volumes in half precision; a logit is
            then within ~1 % of the float32 blend, which moves only voxels whose probability is within ~0.25 %
            of the 0.5 threshold).

    Returns ``(len(tasks) or K, *S)`` logits on the CPU, in the ``accumulate`` dtype.
    """
    if image.ndim != len(patch_size) + 1:
        raise MosaicSegError(
            f"a {image.ndim - 1}D image for a {len(patch_size)}D model. Fix: predict with a model "
            "of the image's dimensionality."
        )
    device = torch.device(device)
    keep = torch.as_tensor(list(tasks), dtype=torch.long, device=device) if tasks is not None else None
    swapped = keep
    if lateral_permutation is not None and LATERAL_AXIS in mirror_axes:
        perm = torch.as_tensor(list(lateral_permutation), dtype=torch.long, device=device)
        swapped = perm if keep is None else perm[keep]
        if bool((swapped < 0).any()):
            raise ValueError("a kept output has no left/right partner: do not mirror the lateral axis")
    if accumulate is None:
        n_out = len(tasks) if tasks is not None else 1
        accumulate = torch.float16 if n_out * image[0].numel() * 4 > HALF_ABOVE_BYTES else torch.float32

    select = keep  # outputs to keep, in order; the left/right partners while the lateral axis is mirrored

    def tiles(x: torch.Tensor) -> torch.Tensor:
        mod = torch.full((x.shape[0],), modality, dtype=torch.long, device=x.device)
        # autocast's own dtype per device: bfloat16 on the CPU, float16 on CUDA
        with torch.autocast(device.type, enabled=amp and device.type in ("cpu", "cuda")):
            out = model(x.float(), mod)
        out = out.index_select(1, select) if select is not None else out
        return out.to(accumulate)

    # MONAI blends in the input's dtype: a half input gives half output buffers (tiles are cast back above)
    x = image.unsqueeze(0).to(accumulate)
    total: torch.Tensor | None = None
    flips = mirror_combinations(tuple(mirror_axes))
    for flip in flips:
        dims = [a + 2 for a in flip]
        select = swapped if LATERAL_AXIS in flip else keep
        xin = torch.flip(x, dims) if dims else x
        out = sliding_window_inference(
            xin,
            roi_size=tuple(int(p) for p in patch_size),
            sw_batch_size=tile_batch,
            predictor=tiles,
            overlap=overlap,
            mode="gaussian",
            sigma_scale=0.125,
            padding_mode="constant",
            cval=0.0,
            sw_device=device,
            device=torch.device("cpu"),
            progress=progress,
        )
        out = torch.flip(out, dims) if dims else out
        total = out if total is None else total.add_(out)
    assert total is not None  # at least the identity flip
    if len(flips) > 1:
        total /= len(flips)
    return total[0]
