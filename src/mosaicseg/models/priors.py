"""Hermes (Gao et al., CVPR 2024): learned task and modality context priors fused into the encoder, and
posterior prototypes as the per-task classifiers (model kind ``hermes``).

- **Prior pools** (:class:`PriorPool`): one learnable token per global task (plus a null token that pads
  samples asking fewer tasks than others in the batch) and ``modality_tokens`` (l = 10) tokens per modality.
  A sample's tokens are its asked tasks' tokens followed by its modality's: ``p = [p_tasks, p_modality]``.
- **Fusion** (:class:`FusionBlock`, Hermes eq. 1): two-way cross-attention between the tokens and the image
  features of one encoder stage: tokens attend to the features, then (``two_way``) the features attend to the
  tokens, each followed by an MLP, pre-norm and residual. The fused map replaces the stage's output, so it
  feeds the deeper stages and the skip connection. One pool and ``fusion_depth`` blocks per fused scale
  (default: the plan's 4×, 8× and 16× stages), as in the authors' code, since the scales differ in width.
  The authors' code (not the paper) fuses the decoder too, at the encoder's scales but the deepest: the option
  ``decoder_scales`` (off by default; ``None`` for that layout), each fusion again with its own pool.
- **SwinUNETR** (:class:`PriorKeyValueAttention`): the prior tokens of a fused scale join the keys and values of
  every window attention of the Swin layer working at it (``layers2``/``3``/``4`` at 4×/8×/16×, through the
  attention's own key/value projection, without position bias, visible from every window, shifted or not):
  that is the image ← tokens way. The tokens ← image way is the fusion layer's token update on the layer's
  output. ``two_way=False`` leaves MONAI's attention as it is.
- **Prototypes** (eq. 2): each fusion's posterior task tokens go through an MLP, the scales are concatenated
  and a second MLP gives one prototype per task; a linear map per deep-supervision level matches the
  decoder's width there. Logit of task k = ``⟨prototype_k, decoder feature⟩ + b_k``.
- **Modality head**: the posterior modality tokens of every fusion, concatenated, averaged over the l tokens
  (GAP) and a linear layer → modality logits (``extras["modality_logits"]``), for the auxiliary loss.

Choices the paper leaves open (options of the recipe, stored in the model config): ``max(1, C // head_dim)``
attention heads (``head_dim`` 32, as the authors' code); token/image MLP ratio 4; ``prototype_dim`` 64;
``mlp_depth`` 1 hidden layer in the per-scale and prototype MLPs. The token width C is each fused stage's
feature width (no projection, as the authors' code). Two additions,
both documented deviations: the per-task bias ``b_k`` (the authors' logits have none; here it carries the
recipe's ``head_prior``, without which this project's CPU runs collapsed to empty outputs, BENCHMARKS.md,
convergence) and deep supervision (the authors' ResUNet has none; the loop supervises every level).

Padding is vectorised: every sample's asked tasks are gathered to the front of a ``(B, T)`` index (T = the
most tasks any sample asks), the rest point at the null token and are masked out as attention keys, so a
sample's result does not depend on what else is in the batch (tested against one sample at a time).
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mosaicseg.errors import MosaicSegError
from mosaicseg.models.factory import (
    MODEL_KINDS,
    _instance_norm_as_group_norm,
    asked_tasks,
    build_body,
    check_input,
    model_config,
    rebuild,
)
from mosaicseg.types import ModelOutput

# logit of a task the sample did not ask for: σ ≈ 2e-9, "absent" for thresholds and argmax alike
NOT_ASKED = -20.0
# Hermes' options (the recipe's, stored in the config) and their defaults; see the module docstring
HERMES_OPTIONS: dict[str, Any] = {
    "scales": None,  # down-sampling factors of the fused encoder stages; None: those of 4, 8, 16 the plan has
    # down-sampling factors of the fused decoder levels (conv backbones only); the authors' code fuses the decoder at
    # 8× and 4× besides the paper's encoder scales. None: the fused encoder scales but the deepest, that layout. Off
    # by default, as the paper describes Hermes: on mri5 (600 iterations, seed 0) it changed validation Dice by
    # -0.015 to +0.05 per dataset (IXIDeepGrey 0.046 → 0.031, BraTS 0.228 → 0.277), not the slow start it was tried for
    "decoder_scales": [],
    "fusion_depth": 2,
    "head_dim": 32,
    "modality_tokens": 10,
    "prototype_dim": 64,
    "mlp_depth": 1,  # hidden layers of the per-scale and prototype MLPs
    "two_way": True,
    "modality_prior": True,
    # the task tokens' initial values: None, Xavier-uniform over the (K + 1, C) pool (the authors' code); a number,
    # normal with that standard deviation. N(0, 1) starts the tasks' prototypes further apart (mean cosine 0.36 vs
    # 0.89 on the mri5 network) but did not train faster: mri5, 600 iterations, seed 0, validation Dice lower on all
    # five sets (e.g. IXIVentricles 0.056 vs 0.224), so the authors' initialisation stays the default
    "task_token_std": None,
}
DEFAULT_SCALES = (4, 8, 16)


def select_tasks(tasks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, K)`` bool → ``index (B, T)`` long and ``valid (B, T)`` bool, T = the most tasks one sample asks.

    Row b holds sample b's asked task indices in increasing order, then ``K`` (the null token) where
    ``valid`` is False."""
    num_tasks = tasks.shape[1]
    width = max(int(tasks.sum(1).max()), 1)
    # a stable sort of "not asked" puts the asked tasks first, in index order
    order = torch.argsort((~tasks).to(torch.uint8), dim=1, stable=True)[:, :width]
    valid = torch.gather(tasks, 1, order)
    return torch.where(valid, order, torch.full_like(order, num_tasks)), valid


def scatter_tasks(asked: torch.Tensor, index: torch.Tensor, num_tasks: int) -> torch.Tensor:
    """Logits of the asked tasks ``(B, T, *S)`` at :func:`select_tasks`' ``index`` → ``(B, K, *S)``, the tasks not
    asked holding :data:`NOT_ASKED` (padding slots, which point at column K, are dropped)."""
    full = asked.new_full((asked.shape[0], num_tasks + 1, *asked.shape[2:]), NOT_ASKED)
    where = index.view(*index.shape, *([1] * (asked.ndim - 2))).expand_as(asked)
    return full.scatter(1, where, asked)[:, :num_tasks]


class PriorPool(nn.Module):
    """Task tokens ``(K + 1, C)`` (the last one the null token) and modality tokens ``(M, l, C)``."""

    def __init__(
        self, num_tasks: int, num_modalities: int, length: int, dim: int, modality_prior: bool,
        task_std: float | None = None,
    ) -> None:  # fmt: skip
        super().__init__()
        tokens = torch.empty(num_tasks + 1, dim)
        self.task = nn.Parameter(
            nn.init.xavier_uniform_(tokens) if task_std is None else nn.init.normal_(tokens, 0, task_std)
        )
        self.modality = (
            nn.Parameter(nn.init.xavier_uniform_(torch.empty(num_modalities, length, dim))) if modality_prior else None
        )

    def forward(self, index: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        """``index (B, T)``, ``modality (B,)`` → tokens ``(B, T [+ l], C)``."""
        tokens = self.task[index]
        if self.modality is None:
            return tokens
        return torch.cat([tokens, self.modality[modality]], dim=1)


class CrossAttention(nn.Module):
    """Multi-head attention of ``x (B, N, C)`` over ``context (B, P, C)`` (keys masked by ``keep (B, P)``)."""

    def __init__(self, dim: int, head_dim: int) -> None:
        super().__init__()
        heads = max(1, dim // head_dim)  # a stage narrower than head_dim gets one head of its width
        if dim % heads:
            raise MosaicSegError(
                f"feature width {dim} does not split into {heads} heads of head_dim {head_dim}. Fix: set the recipe "
                "option head_dim to a divisor of every fused stage's width (e.g. 16 or 8)."
            )
        self.heads, self.head_dim = heads, dim // heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * dim, bias=False)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        b, n, c = x.shape
        q = self.q(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(context).view(b, -1, 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        mask = None if keep is None else keep[:, None, None, :]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(y.transpose(1, 2).reshape(b, n, c))


def _mlp(dim_in: int, hidden: int, dim_out: int, depth: int = 1) -> nn.Sequential:
    """``depth`` hidden layers of width ``hidden`` with GELU."""
    layers: list[nn.Module] = [nn.Linear(dim_in, hidden), nn.GELU()]
    for _ in range(depth - 1):
        layers += [nn.Linear(hidden, hidden), nn.GELU()]
    return nn.Sequential(*layers, nn.Linear(hidden, dim_out))


class FusionBlock(nn.Module):
    """One bidirectional fusion step (pre-norm, residual): tokens ← image, token MLP, then with ``two_way``
    image ← tokens and image MLP. ``image (B, N, C)``, ``tokens (B, P, C)``, ``keep (B, P)`` bool."""

    def __init__(self, dim: int, head_dim: int, two_way: bool) -> None:
        super().__init__()
        self.two_way = two_way
        self.norm_tokens, self.norm_image = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.tokens_from_image = CrossAttention(dim, head_dim)
        self.norm_token_mlp = nn.LayerNorm(dim)
        self.token_mlp = _mlp(dim, 4 * dim, dim)
        if two_way:
            self.norm_image_q, self.norm_tokens_kv = nn.LayerNorm(dim), nn.LayerNorm(dim)
            self.image_from_tokens = CrossAttention(dim, head_dim)
            self.norm_image_mlp = nn.LayerNorm(dim)
            self.image_mlp = _mlp(dim, 4 * dim, dim)

    def forward(
        self, image: torch.Tensor, tokens: torch.Tensor, keep: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = tokens + self.tokens_from_image(self.norm_tokens(tokens), self.norm_image(image))
        tokens = tokens + self.token_mlp(self.norm_token_mlp(tokens))
        if self.two_way:
            image = image + self.image_from_tokens(self.norm_image_q(image), self.norm_tokens_kv(tokens), keep)
            image = image + self.image_mlp(self.norm_image_mlp(image))
        return image, tokens


class FusionLayer(nn.Module):
    """A prior pool and ``depth`` fusion blocks at one encoder stage: ``(B, C, *S)`` → the fused map and the
    posterior tokens ``(B, T [+ l], C)``."""

    def __init__(self, pool: PriorPool, dim: int, depth: int, head_dim: int, two_way: bool) -> None:
        super().__init__()
        self.pool = pool
        self.blocks = nn.ModuleList(FusionBlock(dim, head_dim, two_way) for _ in range(depth))

    def prior(
        self, index: torch.Tensor, valid: torch.Tensor, modality: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The samples' prior tokens ``(B, P, C)`` and which of them are attention keys ``(B, P)`` bool."""
        tokens = self.pool(index, modality).to(dtype)
        keep = valid
        if tokens.shape[1] > valid.shape[1]:  # modality tokens are always keys
            keep = torch.cat([valid, valid.new_ones(valid.shape[0], tokens.shape[1] - valid.shape[1])], dim=1)
        # a sample asking nothing (possible only without modality tokens) keeps its first (null) token as key
        keep = keep.clone()
        keep[:, 0] |= ~keep.any(1)
        return tokens, keep

    def forward(
        self, x: torch.Tensor, index: torch.Tensor, valid: torch.Tensor, modality: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        tokens, keep = self.prior(index, valid, modality, x.dtype)
        b, c, *spatial = x.shape
        image = x.reshape(b, c, -1).transpose(1, 2)
        for block in self.blocks:
            image, tokens = block(image, tokens, keep)
        return image.transpose(1, 2).reshape(b, c, *spatial), tokens


class PriorKeyValueAttention(nn.Module):
    """MONAI's Swin window attention whose keys and values also hold the window's sample's prior tokens (the
    image ← tokens way of the fusion for SwinUNETR): the tokens go through the attention's own key/value
    projection, carry no relative-position bias and are visible from every window, shifted or not; tokens a
    sample did not ask are masked. Without a context (set by :class:`HermesNet` for one forward) it is the
    wrapped attention unchanged.

    ``forward(x (B·nW, N, C), mask (nW, N, N) | None)``; context: tokens ``(B, P, C)``, keep ``(B, P)`` bool.
    """

    def __init__(self, attention: nn.Module) -> None:
        super().__init__()
        self.attention = attention
        self.context: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if self.context is None:
            return self.attention(x, mask)
        tokens, keep = self.context
        a = self.attention
        b, n, c = x.shape
        batch, p = tokens.shape[:2]
        windows = b // batch  # MONAI partitions sample by sample: window w belongs to sample w // windows
        heads = a.num_heads
        q, k, v = a.qkv(x).reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        bias = None if a.qkv.bias is None else a.qkv.bias[c:]
        kv = F.linear(tokens.to(x.dtype), a.qkv.weight[c:], bias).reshape(batch, p, 2, heads, c // heads)
        kv = kv.permute(2, 0, 3, 1, 4).repeat_interleave(windows, dim=1)  # (2, B·nW, heads, P, C/heads)
        k, v = torch.cat([k, kv[0]], dim=2), torch.cat([v, kv[1]], dim=2)
        position = a.relative_position_bias_table[a.relative_position_index.clone()[:n, :n].reshape(-1)]
        image_bias = position.reshape(n, n, heads).permute(2, 0, 1).unsqueeze(0).expand(b, heads, n, n)
        if mask is not None:  # the shifted windows' mask, between image keys only
            nw = mask.shape[0]
            image_bias = (image_bias.reshape(b // nw, nw, heads, n, n) + mask.reshape(1, nw, 1, n, n)).reshape(
                b, heads, n, n
            )
        token_bias = torch.zeros(batch, p, dtype=image_bias.dtype, device=x.device).masked_fill(~keep, float("-inf"))
        token_bias = token_bias.repeat_interleave(windows, dim=0)[:, None, None, :].expand(b, heads, n, p)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=torch.cat([image_bias, token_bias], dim=-1).to(q.dtype), scale=a.scale
        )
        return a.proj_drop(a.proj(y.transpose(1, 2).reshape(b, n, c)))


class _Capture(nn.Module):
    """A module run as before, keeping its last output (``(B, *S, C)`` for a Swin block) for the token update."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module
        self.output: torch.Tensor | None = None

    def forward(self, *args: Any) -> torch.Tensor:
        self.output = self.module(*args)
        return self.output


def _swin_layers(backbone: nn.Module) -> dict[int, tuple[nn.Module, int]]:
    """Down-sampling factor → (MONAI Swin layer whose attention works at it, its width) of a SwinUNETR backbone:
    ``layers1`` at 2× (``feature_size`` wide), ``layers2`` at 4× (2×), ``layers3`` at 8×, ``layers4`` at 16×."""
    vit = backbone.net.swinViT
    return {2**i: (getattr(vit, f"layers{i}")[0], int(vit.embed_dim) * 2 ** (i - 1)) for i in range(1, 5)}


@MODEL_KINDS.register("hermes")
class HermesNet(nn.Module):
    """Stems + a conv backbone with prior fusion at several encoder stages + prototype classifiers (kind
    ``hermes``; see the module docstring).

    ``forward(image (B, C_max, *S), modality (B,) long, tasks (B, K) bool | None)`` → :class:`ModelOutput`
    with ``logits`` ``[(B, K, *S_level)]`` per deep-supervision level (training) or ``[(B, K, *S)]``; tasks a
    sample did not ask hold :data:`NOT_ASKED`. ``extras["modality_logits"]``: ``(B, M)`` with the modality
    prior, else absent. ``tasks=None`` asks every task.
    """

    # rows of the task pools and biases belong to tasks (the last row, the null token, to none)
    task_parameters: ClassVar[tuple[str, ...]] = ("pool.task", "task_bias")
    # fine-tuning's "head" (models.parameter_parts): the priors and everything from posterior tokens to logits;
    # the fusion blocks belong to the half they work in (own_part)
    HEAD_PATTERNS: ClassVar[tuple[str, ...]] = (
        r"fusion\.\d+\.pool\.", r"scale_mlps\.", r"prototype_", r"task_bias$", r"modality_",
    )  # fmt: skip
    # one row per modality: init_from maps them by modality name
    MODALITY_PARAMETERS: ClassVar[tuple[str, ...]] = ("pool.modality", "modality_head.weight", "modality_head.bias")

    def __init__(
        self,
        network_plan: Mapping[str, Any],
        modality_channels: Mapping[str, int],
        num_tasks: int,
        architecture: str = "unet",
        deep_supervision: bool = True,
        deep_supervision_levels: int | None = None,
        options: Mapping[str, Any] | None = None,
        hermes: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        settings = {**HERMES_OPTIONS, **dict(hermes or {})}
        unknown = sorted(set(settings) - set(HERMES_OPTIONS))
        if unknown:
            raise MosaicSegError(f"hermes has no option {unknown}. Fix: use only {sorted(HERMES_OPTIONS)}.")
        body = build_body(network_plan, modality_channels, architecture, options)
        topology, resolved, self.stems, self.backbone = body
        self.spatial_dims = topology.spatial_dims
        self.num_tasks = int(num_tasks)
        self.deep_supervision = bool(deep_supervision)
        # SwinUNETR: the priors join the keys/values of the Swin attention at each fused scale (image ← tokens),
        # and the fusion layers update the tokens from that scale's features (tokens ← image)
        self.swin = architecture == "swinunetr"
        swin_layers = _swin_layers(self.backbone) if self.swin else {}
        have = sorted(swin_layers) if self.swin else sorted({max(s) for s in self.backbone.skip_scales})
        settings["scales"] = self._fused_stages(settings["scales"], have)
        settings["decoder_scales"] = self._decoder_scales(settings["decoder_scales"], settings["scales"])
        if self.swin:
            self.fused_stages = [int(math.log2(s)) for s in settings["scales"]]
            widths = [swin_layers[s][1] for s in settings["scales"]]
        else:
            stage_of = {max(s): i for i, s in enumerate(self.backbone.skip_scales)}
            self.fused_stages = [stage_of[s] for s in settings["scales"]]
            widths = [self.backbone.skip_channels[i] for i in self.fused_stages]
        level_of = {max(s): i for i, s in enumerate(self.backbone.scales)}
        self.fused_levels = [level_of[s] for s in settings["decoder_scales"]]  # decoder order: coarse first
        widths += [self.backbone.out_channels[i] for i in self.fused_levels]
        n_mod = len(self.stems.modalities)
        length, head_dim = int(settings["modality_tokens"]), int(settings["head_dim"])
        two_way = bool(settings["two_way"])
        token_std = settings["task_token_std"]
        if token_std is not None and not (
            isinstance(token_std, int | float) and not isinstance(token_std, bool) and token_std > 0
        ):
            raise MosaicSegError(
                f"hermes option task_token_std={token_std!r} must be positive. Fix: e.g. 1.0, or null."
            )
        self.fusion = nn.ModuleList(
            FusionLayer(
                PriorPool(self.num_tasks, n_mod, length, w, bool(settings["modality_prior"]), token_std),
                w,
                int(settings["fusion_depth"]),
                head_dim,
                two_way and not self.swin,  # in Swin the image reads the tokens inside its own attention
            )
            for w in widths
        )
        # per fused scale: the wrapped attentions (if two-way) and the capture of the layer's last block
        self._swin_attention: list[list[PriorKeyValueAttention]] = []
        self._swin_capture: list[_Capture] = []
        for s in settings["scales"] if self.swin else []:
            layer = swin_layers[s][0]
            wrapped = []
            for block in layer.blocks if two_way else []:
                block.attn = PriorKeyValueAttention(block.attn)
                wrapped.append(block.attn)
            self._swin_attention.append(wrapped)
            layer.blocks[-1] = _Capture(layer.blocks[-1])
            self._swin_capture.append(layer.blocks[-1])
        hidden = int(settings["prototype_dim"])
        depth = int(settings["mlp_depth"])
        if depth < 1:
            raise MosaicSegError(f"recipe option mlp_depth={depth} must be at least 1. Fix: e.g. 1 or 2.")
        self.scale_mlps = nn.ModuleList(_mlp(w, w, hidden, depth) for w in widths)
        joined = hidden * len(widths)
        self.prototype_mlp = nn.Sequential(nn.LayerNorm(joined), _mlp(joined, hidden, hidden, depth))
        available = len(self.backbone.out_channels)
        levels = (deep_supervision_levels or max(1, available - 1)) if deep_supervision else 1
        self.prototype_out = nn.ModuleList(nn.Linear(hidden, self.backbone.out_channels[i]) for i in range(levels))
        self.task_bias = nn.Parameter(torch.zeros(self.num_tasks + 1))
        self.modality_norm = nn.LayerNorm(sum(widths)) if settings["modality_prior"] else None
        self.modality_head = nn.Linear(sum(widths), n_mod) if settings["modality_prior"] else None
        self.ds_scales: list[tuple[int, ...]] = list(self.backbone.scales[:levels])
        _instance_norm_as_group_norm(self.backbone)
        _instance_norm_as_group_norm(self.stems)
        self._config = model_config(
            "hermes", topology, modality_channels, num_tasks, architecture, resolved, deep_supervision, levels,
            hermes=settings,
        )  # fmt: skip

    def _fused_stages(self, scales: Sequence[int] | None, have: list[int]) -> list[int]:
        """The fused down-sampling factors: ``scales`` checked against the encoder's (``have``), or the default
        ones it has."""
        if scales is None:
            chosen = [s for s in DEFAULT_SCALES if s in have]
            if not chosen:
                raise MosaicSegError(
                    f"the plan's encoder has no stage at 4x, 8x or 16x down-sampling (it has {have}). Fix: set "
                    "the recipe option scales, e.g. [2]."
                )
            return chosen
        bad = [s for s in scales if s not in have]
        if bad or not scales or len(set(scales)) != len(scales):
            raise MosaicSegError(
                f"recipe option scales={list(scales)} must name distinct down-sampling factors the encoder has "
                f"({have}). Fix: e.g. scales=[{have[-1]}] for one scale."
            )
        return sorted(int(s) for s in scales)

    def _decoder_scales(self, scales: Sequence[int] | None, encoder: list[int]) -> list[int]:
        """The fused decoder levels' down-sampling factors, coarse first: ``scales`` checked against the decoder's
        maps, or (None) the fused ``encoder`` scales but the deepest."""
        have = sorted({max(s) for s in self.backbone.scales}) if not self.swin else []
        if scales is None:
            return sorted((s for s in encoder[:-1] if s in have), reverse=True)
        if not isinstance(scales, list | tuple) or not all(type(s) is int for s in scales):
            raise MosaicSegError(
                f"recipe option decoder_scales={scales!r} must be a list of down-sampling factors. Fix: e.g. "
                "decoder_scales=[8, 4], [] for none, or null for the authors' layout."
            )
        if self.swin and scales:
            raise MosaicSegError(
                f"recipe option decoder_scales={list(scales)}: SwinUNETR's decoder is not fused (its priors join the "
                "encoder's attention). Fix: leave decoder_scales unset or [] with --network swinunetr."
            )
        bad = [s for s in scales if s not in have]
        if bad or len(set(scales)) != len(scales):
            raise MosaicSegError(
                f"recipe option decoder_scales={list(scales)} must name distinct down-sampling factors of the "
                f"decoder's maps ({have}). Fix: e.g. decoder_scales=[{have[-1]}], or [] for none."
            )
        return sorted((int(s) for s in scales), reverse=True)

    @property
    def modalities(self) -> tuple[str, ...]:
        return self.stems.modalities

    @property
    def config(self) -> dict[str, Any]:
        return copy.deepcopy(self._config)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> HermesNet:
        return rebuild(cls, config)  # a config saved before decoder_scales existed gets its default: none

    def set_output_prior(self, prior: np.ndarray) -> None:
        """Start task k's output at probability ``prior[k]`` (its bias; the null token's stays 0)."""
        with torch.no_grad():
            self.task_bias[: len(prior)] = torch.as_tensor(np.log(prior / (1 - prior)), dtype=torch.float32)

    def own_part(self, name: str) -> str:
        """``models.parameter_parts``' part of a parameter outside the backbone and head: a fusion block works in the
        encoder or (``fusion.j`` with j past the encoder's fusions) in the decoder."""
        fusion = re.match(r"fusion\.(\d+)\.", name)
        return "decoder" if fusion and int(fusion.group(1)) >= len(self.fused_stages) else "encoder"

    def is_task_parameter(self, name: str) -> bool:
        return name == "task_bias" or name.endswith("pool.task")

    def forward(
        self,
        image: torch.Tensor,
        modality: torch.Tensor,
        tasks: torch.Tensor | None = None,
        dataset: torch.Tensor | None = None,
        prompts: Any = None,
    ) -> ModelOutput:
        check_input(image, self.spatial_dims, self.backbone.divisor)
        index, valid = select_tasks(asked_tasks(tasks, image, self.num_tasks))
        posterior: dict[int, torch.Tensor] = {}

        def fusing(at: list[int], first: int) -> Callable[[int, torch.Tensor], torch.Tensor]:
            """The hook fusing the maps of stages (or levels) ``at`` with ``self.fusion[first:]``, in that order."""

            def fuse(i: int, x: torch.Tensor) -> torch.Tensor:
                if i not in at:
                    return x
                j = first + at.index(i)
                x, posterior[j] = self.fusion[j](x, index, valid, modality)
                return x

            return fuse

        if self.swin:
            maps = self._swin_forward(self.stems(image, modality), index, valid, modality, posterior)
        else:
            skips = self.backbone.encode(self.stems(image, modality), after_stage=fusing(self.fused_stages, 0))
            decoder_hook = fusing(self.fused_levels, len(self.fused_stages)) if self.fused_levels else None
            maps = self.backbone.decode(skips, after_level=decoder_hook)
        t = index.shape[1]
        per_scale = [mlp(posterior[j][:, :t]) for j, mlp in enumerate(self.scale_mlps)]
        prototypes = self.prototype_mlp(torch.cat(per_scale, dim=-1))  # (B, T, hidden)
        bias = self.task_bias[index]  # (B, T)
        levels = len(self.prototype_out) if self.training and self.deep_supervision else 1
        logits = []
        for level in range(levels):
            feats = maps[level]
            proto = self.prototype_out[level](prototypes).to(feats.dtype)  # (B, T, c_level)
            asked = torch.einsum("btc,bc...->bt...", proto, feats)
            asked = asked + bias.to(asked.dtype).view(*bias.shape, *([1] * self.spatial_dims))
            logits.append(scatter_tasks(asked, index, self.num_tasks))
        extras: dict[str, torch.Tensor] = {}
        if self.modality_head is not None and self.modality_norm is not None:
            mod_tokens = torch.cat([posterior[j][:, t:] for j in range(len(self.fusion))], dim=-1)  # (B, l, ΣC)
            extras["modality_logits"] = self.modality_head(self.modality_norm(mod_tokens).mean(1))
        return ModelOutput(logits, extras)

    def _swin_forward(
        self,
        x: torch.Tensor,
        index: torch.Tensor,
        valid: torch.Tensor,
        modality: torch.Tensor,
        posterior: dict[int, torch.Tensor],
    ) -> list[torch.Tensor]:
        """SwinUNETR's encoder with each fused layer's prior tokens among its attention's keys/values, then the
        tokens updated from that layer's output ``(B, *S, C)``; fills ``posterior``, returns the decoder maps."""
        priors = [layer.prior(index, valid, modality, x.dtype) for layer in self.fusion]
        for wrapped, context in zip(self._swin_attention, priors, strict=True):
            for attention in wrapped:
                attention.context = context
        try:
            skips = self.backbone.encode(x)
        finally:
            for wrapped in self._swin_attention:
                for attention in wrapped:
                    attention.context = None
        for j, (layer, capture) in enumerate(zip(self.fusion, self._swin_capture, strict=True)):
            features, capture.output = capture.output, None
            assert features is not None  # the encoder ran the layer
            _, posterior[j] = layer(features.movedim(-1, 1), index, valid, modality)
        return self.backbone.decode(skips)
