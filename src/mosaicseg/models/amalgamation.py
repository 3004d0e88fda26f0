"""KA²ER's student (Gao et al.): a promptable network amalgamating frozen experts (model kind ``ka2er``).

Training: stems + the backbone's encoder → bottleneck tokens ``f`` → self-attention (pre-norm, residual) →
``f_s`` → cross-attention of ``f_s`` over the tokens of the experts mapped to each sample's sub-tasks (each
expert's features projected to the student's width by its own linear map; its output replaces ``f_s``, no
residual) → cross-attention over the external expert's tokens (added) → ``f_m``, which, layer-normalised, replaces
the bottleneck for the decoder (at inference ``f_s``, layer-normalised alike: the decoder never depends on a scale
that only one of them has). With ``prompts["student_path"]`` the decoder reads both in training (the batch doubled:
``logits`` from f_m, ``extras["student_logits"]`` from f_s, exactly what inference computes). The alignment loss
(eq. 1: a term per teacher, each eq. 2's ``‖f_s − f_m‖``) reads ``extras``: ``f_s`` and ``f_m`` ``(B, N, C)``, and
one row per (expert used, sample of its sub-task): ``align_rows (R,)`` the sample, ``align_groups (R,)`` the expert,
``align_targets (R, N, C)`` the tokens merged from that expert alone (:class:`Amalgamated`). The decoder's maps and
the box prompts (:mod:`mosaicseg.models.prompts`) give one mask per asked task.

Inference: the amalgamation layer is skipped (no expert runs; their files need not exist); the decoder reads
``LayerNorm(f_s)``. ``prediction_only()`` drops the layer from a loaded model, so a predictor holds only the
student, the prompt encoder and the mask decoder.

The experts' features arrive through ``prompts``: ``{"experts": [(slot, samples (n,) long, features (n, C_slot,
*s))], "external": [(samples, features (n, C_x, *s))] or None, "boxes": (B, K, 2, d) in [0, 1], "box_valid":
(B, K) bool}``, ``s`` the bottleneck's grid. Choices the paper leaves open (options, in the config): attention
``head_dim`` 32, the prompt width 32, the decoder map the mask decoder's token reads (the coarsest kept,
``coarse_level`` -1).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch
from torch import nn

from mosaicseg.errors import MosaicSegError
from mosaicseg.models.baselines import _logit
from mosaicseg.models.factory import (
    MODEL_KINDS,
    _instance_norm_as_group_norm,
    asked_tasks,
    build_body,
    check_input,
    model_config,
    rebuild,
)
from mosaicseg.models.priors import CrossAttention, scatter_tasks, select_tasks
from mosaicseg.models.prompts import BoxPromptEncoder, MaskDecoder
from mosaicseg.types import ModelOutput

KA2ER_OPTIONS: dict[str, Any] = {
    "expert_channels": [],  # the feature width of each expert slot (set by the recipe from the experts)
    "external_channels": None,  # the external expert's feature width (None: no external expert)
    "head_dim": 32,
    "prompt_width": 32,
    "coarse_level": -1,
}


class Amalgamated(NamedTuple):
    """What :class:`Amalgamation` returns: the merged tokens the decoder reads, and the alignment targets.

    - ``merged``: ``f_m (B, N, C)``, every sample's query over the tokens of all its experts, then the external's.
    - ``rows``: ``(R,)`` long, the sample of each alignment row; ``groups``: ``(R,)`` long, the expert of each
      row (its slot; ``len(expert_channels)`` for a sample only the external expert reads); ``targets``:
      ``(R, N, C)``, the merged tokens of that expert alone for that sample (eq. 1's ``f^{T_k}``).
    """

    merged: torch.Tensor
    rows: torch.Tensor
    groups: torch.Tensor
    targets: torch.Tensor


class Amalgamation(nn.Module):
    """The two cross-attentions of the hierarchical amalgamation (experts, then the external expert)."""

    def __init__(self, dim: int, expert_channels: Sequence[int], external_channels: int | None, head_dim: int) -> None:
        super().__init__()
        self.project = nn.ModuleList(nn.Linear(int(c), dim) for c in expert_channels)
        self.norm_experts, self.norm_context = nn.LayerNorm(dim), nn.LayerNorm(dim)  # query, expert tokens
        self.read_experts = CrossAttention(dim, head_dim)
        self.external = nn.Linear(int(external_channels), dim) if external_channels else None
        self.norm_external = nn.LayerNorm(dim)
        self.read_external = CrossAttention(dim, head_dim) if external_channels else None

    def forward(
        self,
        f_s: torch.Tensor,
        experts: Sequence[tuple[int, torch.Tensor, torch.Tensor]],
        external: Sequence[tuple[torch.Tensor, torch.Tensor]] | None,
    ) -> Amalgamated:
        """``f_s (B, N, C)`` → :class:`Amalgamated`; ``experts``: ``(slot, samples (n,), features (n, C_slot,
        *s))``, ``external``: ``(samples, features)``. A sample no expert covers passes that step unchanged.

        The alignment targets follow eq. 1 (a term per teacher): each expert used in the batch is aligned, on its
        samples, with the tokens the hierarchy merges from that expert alone (and the external expert). Where an
        expert is the only one covering its samples (sub-tasks by dataset or by case), that is ``f_m`` itself
        and nothing is recomputed; where several cover a sample (one dataset split by label groups), each one's
        merge is computed on its own. A sample only the external expert reads is aligned with ``f_m``."""
        blocks = [
            (slot, samples, self.project[slot](_tokens(features, f_s.dtype))) for slot, samples, features in experts
        ]
        outside: list[tuple[torch.Tensor, torch.Tensor]] = []
        if self.read_external is not None and external:
            assert self.external is not None
            outside = [(samples, self.external(_tokens(features, f_s.dtype))) for samples, features in external]
        merged = self._merge(f_s, [(samples, tokens) for _, samples, tokens in blocks], outside)
        b = f_s.shape[0]
        coverage = torch.zeros(b, dtype=torch.long)
        for _, samples, _ in blocks:
            coverage[samples.cpu()] += 1
        rows: list[torch.Tensor] = []
        groups: list[torch.Tensor] = []
        targets: list[torch.Tensor] = []
        for slot, samples, tokens in blocks:
            if bool((coverage[samples.cpu()] == 1).all()):
                target = merged[samples]  # the only expert of these samples: the joint merge is its own
            else:
                alone = torch.arange(len(samples), device=samples.device)
                target = self._merge(f_s[samples], [(alone, tokens)], _subset(outside, samples))
            rows.append(samples)
            groups.append(torch.full_like(samples, slot))
            targets.append(target)
        read_outside = torch.zeros(b, dtype=torch.bool)
        for samples, _ in outside:
            read_outside[samples.cpu()] = True
        only = (read_outside & (coverage == 0)).nonzero().flatten().to(f_s.device)
        if len(only):
            rows.append(only)
            groups.append(torch.full_like(only, len(self.project)))
            targets.append(merged[only])
        if not rows:
            empty = torch.zeros(0, dtype=torch.long, device=f_s.device)
            return Amalgamated(merged, empty, empty, f_s.new_zeros(0, *f_s.shape[1:]))
        return Amalgamated(merged, torch.cat(rows), torch.cat(groups), torch.cat(targets))

    def _merge(
        self,
        f_s: torch.Tensor,
        experts: Sequence[tuple[torch.Tensor, torch.Tensor]],
        external: Sequence[tuple[torch.Tensor, torch.Tensor]],
    ) -> torch.Tensor:
        """The hierarchy on projected tokens: ``f_s (b, N, C)`` queries the expert blocks, the result the external
        blocks (``(samples, tokens (n, P, C))``, samples indexing ``f_s``'s rows) → ``(b, N, C)``."""
        # The first read that covers a sample replaces f_s instead of adding to it. With a residual, f_m − f_s is
        # the read itself: the alignment (its target detached) cannot shrink it, f_s chasing f_m moves f_m along,
        # and the decoder, trained on f_m, meets f_s alone at inference. Measured on the synthetic collection
        # (120 iterations): the residual form's alignment term rose 115 → 378 while it fell with this one.
        read, by_experts = self._read(self.read_experts, self.norm_experts(f_s), experts, self.norm_context)
        f_e = torch.where(by_experts.view(-1, 1, 1), read, f_s)
        if self.read_external is None or not external:
            return f_e
        general, by_external = self._read(self.read_external, self.norm_external(f_e), external, None)
        # both reads are zero where they do not cover: an expert-read sample gets the experts' read plus the
        # external's, one only the external reads gets its read, and one neither reads stays f_s
        return torch.where((by_experts | by_external).view(-1, 1, 1), read + general, f_s)

    @staticmethod
    def _read(
        attention: CrossAttention,
        query: torch.Tensor,
        blocks: Sequence[tuple[torch.Tensor, torch.Tensor]],
        norm: nn.Module | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each sample's query over the tokens of the blocks that cover it (``(samples, tokens (n, P, C))``),
        padded and masked → ``(B, N, C)``, zero for a sample none covers, and ``covered (B,)`` bool."""
        b, _, c = query.shape
        counts = torch.zeros(b, dtype=torch.long)
        for samples, tokens in blocks:
            counts[samples.cpu()] += tokens.shape[1]
        width = max(int(counts.max()), 1)
        context = query.new_zeros(b, width, c)
        keep = torch.zeros(b, width, dtype=torch.bool, device=query.device)
        filled = torch.zeros(b, dtype=torch.long)
        for samples, tokens in blocks:
            p = tokens.shape[1]
            for row, sample in enumerate(samples.tolist()):
                start = int(filled[sample])
                context[sample, start : start + p] = tokens[row]
                keep[sample, start : start + p] = True
                filled[sample] += p
        covered = keep.any(1)
        keep[~covered, 0] = True  # an all-masked row would be nan; its result is zeroed below
        read = attention(query, norm(context) if norm is not None else context, keep)
        return read * covered.view(b, 1, 1).to(read.dtype), covered


def _tokens(features: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(n, C, *s)`` → ``(n, Π s, C)``."""
    return features.flatten(2).transpose(1, 2).to(dtype)


def _subset(
    blocks: Sequence[tuple[torch.Tensor, torch.Tensor]], samples: torch.Tensor
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``blocks`` (``(samples, tokens (n, P, C))`` over the batch) restricted to ``samples (m,)``, re-indexed to
    positions in ``samples``."""
    position = {s: i for i, s in enumerate(samples.tolist())}
    out = []
    for covered, tokens in blocks:
        pairs = [(position[s], r) for r, s in enumerate(covered.tolist()) if s in position]
        if pairs:
            where = torch.tensor([p for p, _ in pairs], dtype=torch.long, device=covered.device)
            out.append((where, tokens[[r for _, r in pairs]]))
    return out


class KA2ERNet(nn.Module):
    """The student (see the module docstring). ``forward(image (B, C_max, *S), modality (B,), tasks (B, K) bool,
    dataset, prompts)`` → ``logits [(B, K, *S)]`` (one level), tasks not asked at -20."""

    task_parameters: ClassVar[tuple[str, ...]] = ("mask_decoder.tasks", "mask_decoder.task_bias")
    HEAD_PATTERNS: ClassVar[tuple[str, ...]] = (r"mask_decoder\.", r"prompt_encoder\.")
    OTHER_PART: ClassVar[str] = "encoder"  # the attention and amalgamation layers work on the bottleneck

    def __init__(
        self,
        network_plan: Mapping[str, Any],
        modality_channels: Mapping[str, int],
        num_tasks: int,
        architecture: str = "unet",
        deep_supervision: bool = False,
        deep_supervision_levels: int | None = None,
        options: Mapping[str, Any] | None = None,
        ka2er: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        settings = {**KA2ER_OPTIONS, **dict(ka2er or {})}
        unknown = sorted(set(settings) - set(KA2ER_OPTIONS))
        if unknown:
            raise MosaicSegError(f"ka2er has no option {unknown}. Fix: use only {sorted(KA2ER_OPTIONS)}.")
        topology, resolved, self.stems, self.backbone = build_body(
            network_plan, modality_channels, architecture, options
        )
        self.spatial_dims = topology.spatial_dims
        self.num_tasks = int(num_tasks)
        dim = int(self.backbone.skip_channels[-1])
        head_dim = int(settings["head_dim"])
        self.norm_self = nn.LayerNorm(dim)
        self.self_attention = CrossAttention(dim, head_dim)
        # The decoder reads the tokens layer-normalised: nothing bounds the scale of f_m (the decoder's own norms
        # make it free), so on the real sub-tasks f_m's scale drifted, f_s chased it and the alignment rose to 50x
        # the segmentation loss in 150 iterations; normalised, f_m and f_s meet the decoder alike.
        self.norm_merged = nn.LayerNorm(dim)
        self.amalgamation: Amalgamation | None = Amalgamation(
            dim, settings["expert_channels"], settings["external_channels"], head_dim
        )
        width = int(settings["prompt_width"])
        self.coarse_level = int(settings["coarse_level"])
        out = self.backbone.out_channels
        self.prompt_encoder = BoxPromptEncoder(self.spatial_dims, width)
        self.mask_decoder = MaskDecoder(self.spatial_dims, out[0], out[self.coarse_level], width, self.num_tasks)
        self.deep_supervision = False  # one output, as the paper's mask decoder
        self.ds_scales: list[tuple[int, ...]] = [self.backbone.scales[0]]
        _instance_norm_as_group_norm(self.backbone)
        _instance_norm_as_group_norm(self.stems)
        self._config = model_config(
            "ka2er", topology, modality_channels, num_tasks, architecture, resolved, False, None, ka2er=settings
        )

    modalities = property(lambda self: self.stems.modalities)
    config = property(lambda self: copy.deepcopy(self._config))

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> KA2ERNet:
        return rebuild(cls, config)

    def is_task_parameter(self, name: str) -> bool:
        return name in self.task_parameters

    def set_output_prior(self, prior: np.ndarray) -> None:
        """Start task k's mask at probability ``prior[k]`` (its bias; the padding row's stays 0)."""
        with torch.no_grad():
            self.mask_decoder.task_bias[: len(prior)] = _logit(prior)

    def prediction_only(self) -> str:
        """Drop the amalgamation layer (only training reads the experts); returns its state-dict prefix."""
        self.amalgamation = None
        return "amalgamation."

    def forward(
        self,
        image: torch.Tensor,
        modality: torch.Tensor,
        tasks: torch.Tensor | None = None,
        dataset: torch.Tensor | None = None,
        prompts: Mapping[str, Any] | None = None,
    ) -> ModelOutput:
        check_input(image, self.spatial_dims, self.backbone.divisor)
        prompts = prompts or {}
        skips = self.backbone.encode(self.stems(image, modality))
        bottleneck = skips[-1]
        tokens = bottleneck.flatten(2).transpose(1, 2)
        normed = self.norm_self(tokens)
        f_s = tokens + self.self_attention(normed, normed)
        extras: dict[str, Any] = {}
        merged = f_s
        both = False
        if self.amalgamation is not None and prompts.get("experts") is not None:
            out = self.amalgamation(f_s, prompts["experts"], prompts.get("external"))
            merged = out.merged
            extras.update(f_s=f_s, f_m=merged, align_rows=out.rows, align_groups=out.groups, align_targets=out.targets)
            # The paper trains the decoder on f_m only and has it read f_s at inference, trusting the alignment to
            # make them alike. With ``student_path`` the decoder also reads f_s in training (one pass over the
            # doubled batch), so what it meets at inference is what it learnt on, and the two paths' losses show
            # what the experts add.
            both = bool(prompts.get("student_path"))
        tokens = torch.cat([merged, f_s]) if both else merged
        skips = [*(torch.cat([s, s]) if both else s for s in skips[:-1]), self._grid(tokens, bottleneck)]
        maps = self.backbone.decode(skips)
        index, valid = select_tasks(asked_tasks(tasks, image, self.num_tasks))
        boxes, box_valid = prompts.get("boxes"), prompts.get("box_valid")
        if boxes is not None and box_valid is not None:
            pad_box = torch.zeros_like(boxes[:, :1])
            boxes = torch.cat([boxes, pad_box], 1).gather(
                1, index.view(*index.shape, 1, 1).expand(-1, -1, *boxes.shape[2:])
            )
            box_valid = torch.cat([box_valid, torch.zeros_like(box_valid[:, :1])], 1).gather(1, index) & valid
        corners = self.prompt_encoder(boxes, box_valid, tuple(index.shape))
        if both:
            corners, index2 = torch.cat([corners, corners]), torch.cat([index, index])
            asked = scatter_tasks(self.mask_decoder(maps[0], maps[self.coarse_level], corners, index2), index2,
                                  self.num_tasks)  # fmt: skip
            b = image.shape[0]
            extras["student_logits"] = [asked[b:]]
            return ModelOutput([asked[:b]], extras)
        asked = self.mask_decoder(maps[0], maps[self.coarse_level], corners, index)
        return ModelOutput([scatter_tasks(asked, index, self.num_tasks)], extras)

    def _grid(self, tokens: torch.Tensor, bottleneck: torch.Tensor) -> torch.Tensor:
        """``tokens (b, N, C)`` layer-normalised and laid back on the bottleneck's grid → ``(b, C, *s)``."""
        return self.norm_merged(tokens).transpose(1, 2).reshape(tokens.shape[0], *bottleneck.shape[1:])


MODEL_KINDS.register("ka2er")(KA2ERNet)
