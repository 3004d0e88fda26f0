"""Box prompts (SAM/MedSAM style) and the light mask decoder of KA²ER's student, 2D and 3D.

A box is two corners in the patch's normalised coordinates ``[0, 1]^d`` (low corner, high corner). The
encoder maps each corner to a random-Fourier positional encoding (a fixed Gaussian matrix, SAM's
``PositionEmbeddingRandom``) plus a learned embedding of which corner it is; a missing box (none given, or
dropped in training) is a learned "no box" pair. ``load_sam_prompt_encoder`` copies a SAM/MedSAM prompt
encoder's Gaussian matrix and corner embeddings from a local state-dict file (2D, width-matched).

The mask decoder gives one mask per (sample, asked task): a token ``q = task embedding + mean(corner
embeddings)`` reads the decoder's coarsest kept map through cross-attention (keys carry the dense positional
encoding, so the token learns where its box is), then the full-resolution decoder map plus the token's
projection and the positional encoding, normalised per voxel (LayerNorm over channels), is scored by a
dot product with ``MLP(q)``: logit ``= ⟨MLP(q), LN(F + W q + W' PE)⟩ + b_k`` (computed from the norm's moments,
without writing the normalised ``(B, T, N, c0)`` tensor).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from mosaicseg.errors import MosaicSegError


class FourierPositions(nn.Module):
    """``(…, d)`` coordinates in ``[0, 1]`` → ``(…, width)`` features ``[sin 2πBx̃, cos 2πBx̃]``, ``x̃ = 2x − 1``,
    ``B`` a fixed ``(d, width / 2)`` Gaussian matrix (a buffer: saved, not trained)."""

    def __init__(self, dims: int, width: int, scale: float = 1.0) -> None:
        super().__init__()
        if width % 2:
            raise ValueError("the positional width must be even")
        self.register_buffer("gaussian", scale * torch.randn(dims, width // 2))

    def forward(self, coords: torch.Tensor) -> torch.Tensor:
        projected = 2 * math.pi * ((2 * coords - 1) @ self.gaussian.to(coords.dtype))
        return torch.cat([projected.sin(), projected.cos()], dim=-1)

    def grid(self, size: tuple[int, ...]) -> torch.Tensor:
        """The encoding of every voxel centre of a ``size`` grid: ``(width, *size)``."""
        axes = [(torch.arange(n, device=self.gaussian.device, dtype=torch.float32) + 0.5) / n for n in size]
        coords = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)
        return self(coords).movedim(-1, 0)


class BoxPromptEncoder(nn.Module):
    """Boxes ``(B, T, 2, d)`` (corner coordinates in ``[0, 1]``) and ``valid (B, T)`` → corner embeddings
    ``(B, T, 2, width)``."""

    def __init__(self, dims: int, width: int) -> None:
        super().__init__()
        self.dims, self.width = dims, width
        self.positions = FourierPositions(dims, width)
        self.corners = nn.Parameter(torch.randn(2, width) * 0.02)  # low corner, high corner
        self.no_box = nn.Parameter(torch.randn(2, width) * 0.02)

    def forward(self, boxes: torch.Tensor | None, valid: torch.Tensor | None, shape: tuple[int, int]) -> torch.Tensor:
        b, t = shape
        empty = self.no_box.view(1, 1, 2, -1).expand(b, t, 2, self.width)
        if boxes is None or valid is None:
            return empty
        embedded = self.positions(boxes.to(self.corners.dtype)) + self.corners
        return torch.where(valid.view(b, t, 1, 1), embedded, empty)


def load_sam_prompt_encoder(encoder: BoxPromptEncoder, path: str | Path) -> list[str]:
    """Copy a SAM/MedSAM prompt encoder's positional Gaussian and box-corner embeddings from the local state-dict
    file ``path`` (keys ``…pe_layer.positional_encoding_gaussian_matrix`` and ``…point_embeddings.2/3.weight``,
    SAM's box corners; ``…not_a_point_embed.weight`` for the missing box); returns what was copied. SAM is 2D:
    only a 2D encoder of SAM's width takes them."""
    path = Path(path)
    if not path.is_file():
        raise MosaicSegError(f"{path}: SAM/MedSAM weights not found. Fix: give a local file (nothing is downloaded).")
    try:  # weights_only: a checkpoint from elsewhere executes no code
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several kinds for a foreign or damaged file
        raise MosaicSegError(
            f"{path}: cannot read it as a PyTorch state dict ({exc}). Fix: pass a SAM or MedSAM checkpoint (.pth)."
        ) from exc
    state = state.get("model", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise MosaicSegError(f"{path}: holds a {type(state).__name__}, not a state dict. Fix: pass a SAM checkpoint.")

    def find(suffix: str) -> torch.Tensor | None:
        return next((v for k, v in state.items() if str(k).endswith(suffix) and isinstance(v, torch.Tensor)), None)

    gaussian = find("pe_layer.positional_encoding_gaussian_matrix")
    low, high = find("point_embeddings.2.weight"), find("point_embeddings.3.weight")
    missing = find("not_a_point_embed.weight")
    if gaussian is None or low is None or high is None:
        raise MosaicSegError(
            f"{path}: no SAM prompt-encoder weights in this file. Fix: pass a SAM or MedSAM checkpoint."
        )
    if encoder.dims != 2 or tuple(gaussian.shape) != tuple(encoder.positions.gaussian.shape):
        raise MosaicSegError(
            f"{path}: SAM's prompt encoder is 2D with width {2 * gaussian.shape[-1]}; this one is {encoder.dims}D with "
            f"width {encoder.width}. Fix: set the recipe option prompt_width={2 * gaussian.shape[-1]} on a 2D student."
        )
    width = encoder.width
    for name, tensor in (("point_embeddings.2/3", low), ("point_embeddings.2/3", high), ("not_a_point_embed", missing)):
        if tensor is not None and tuple(tensor.shape) != (1, width):
            raise MosaicSegError(
                f"{path}: SAM's {name} weight is {tuple(tensor.shape)}, not (1, {width}) as its Gaussian matrix "
                "implies. Fix: pass an unmodified SAM or MedSAM checkpoint."
            )
    copied = ["gaussian", "corners"]
    with torch.no_grad():
        encoder.positions.gaussian.copy_(gaussian)
        encoder.corners.copy_(torch.cat([low, high]))
        if missing is not None:
            encoder.no_box.copy_(missing.expand(2, -1))
            copied.append("no_box")
    return copied


class MaskDecoder(nn.Module):
    """One mask per (sample, asked task) from the decoder maps and the prompt tokens (see the module docstring).

    ``forward(full (B, c0, *S), coarse (B, c1, *s), corners (B, T, 2, w), index (B, T))`` → ``(B, T, *S)``.
    """

    def __init__(self, dims: int, full_channels: int, coarse_channels: int, width: int, num_tasks: int) -> None:
        super().__init__()
        self.tasks = nn.Parameter(torch.randn(num_tasks + 1, width) * 0.02)  # the last row pads
        self.task_bias = nn.Parameter(torch.zeros(num_tasks + 1))
        self.positions = FourierPositions(dims, width)
        heads = max(1, width // 32)
        self.key = nn.Linear(coarse_channels, width)
        self.read = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm_token = nn.LayerNorm(width)
        self.to_map = nn.Linear(width, full_channels)
        self.position_to_map = nn.Conv1d(width, full_channels, 1)
        self.norm_map = nn.LayerNorm(full_channels)
        self.score = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, full_channels))

    def forward(
        self, full: torch.Tensor, coarse: torch.Tensor, corners: torch.Tensor, index: torch.Tensor
    ) -> torch.Tensor:
        b, t = index.shape
        token = self.tasks[index] + corners.mean(2)  # (B, T, w)
        keys = self.key(coarse.flatten(2).transpose(1, 2))  # (B, N, w)
        keys = keys + self.positions.grid(tuple(coarse.shape[2:])).flatten(1).t().to(keys.dtype)
        read, _ = self.read(token, keys, keys, need_weights=False)
        token = self.norm_token(token + read)
        size = tuple(full.shape[2:])
        pe = self.position_to_map(self.positions.grid(size).flatten(1).unsqueeze(0).to(full.dtype))  # (1, c0, N)
        with torch.autocast(full.device.type, enabled=False):  # a variance from sums: kept in float32
            base = (full.flatten(2) + pe).float().transpose(1, 2)  # (B, N, c0)
            logits = self._score(base, self.to_map(token).float(), self.score(token).float())
        logits = logits + self.task_bias[index].unsqueeze(-1)
        return logits.view(b, t, *size)

    def _score(self, base: torch.Tensor, shift: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
        """``⟨score_t, LN(base + shift_t)⟩`` for every (sample, task): ``base (B, N, c0)``, ``shift`` and ``score``
        ``(B, T, c0)`` → ``(B, T, N)``.

        Centred, ``base + shift`` has mean 0 and variance ``var(base) + 2·mean(base·shift) + var(shift)`` per voxel,
        so the norm and the score need only two products of ``base`` with a ``c0``-vector per task, not the
        ``(B, T, N, c0)`` tensor a LayerNorm of the sum would write (at a 64³ tile and 5 tasks, half the student's
        prediction time). One matmul per (sample, task), not a batched one: the result of one does not depend on
        how many others are in the batch (a batched matmul's blocking does, by float rounding)."""
        c0 = base.shape[-1]
        base = base - base.mean(-1, keepdim=True)
        shift = shift - shift.mean(-1, keepdim=True)
        weight = self.norm_map.weight.float() * score  # (B, T, c0): γ ⊙ score
        vectors = torch.stack([weight, shift / c0], -1)  # (B, T, c0, 2)
        b, t = shift.shape[:2]
        products = torch.stack([base[i] @ vectors[i, j] for i in range(b) for j in range(t)]).view(b, t, -1, 2)
        variance = base.pow(2).mean(-1).unsqueeze(1) + 2 * products[..., 1] + shift.pow(2).mean(-1, keepdim=True)
        centred = products[..., 0] + (weight * shift).sum(-1, keepdim=True)  # Σ γ score (base + shift), centred
        offset = (self.norm_map.bias.float() * score).sum(-1, keepdim=True)  # Σ β score
        return centred * torch.rsqrt(variance.clamp_min(0) + self.norm_map.eps) + offset  # rounding may dip below 0
