"""The universal-paradigm methods Hermes compares against, as model kinds on the same stems and backbone:

- ``dodnet`` (Zhang et al., CVPR 2021): a controller reads [GAP(bottleneck), one-hot task] and generates the
  weights of a dynamic head, three 1×1 convolutions 8 → 8 → 8 → 1 on the decoder's full-resolution features
  (first reduced to 8 channels by GroupNorm + ReLU + 1×1 conv, as DoDNet's ``precls_conv``);
- ``clip`` (Liu et al., ICCV 2023, the CLIP-driven universal model): the same controller and head, the task
  given by a text embedding per task that the user supplies (a linear layer + ReLU maps it to the bottleneck
  width first, as its ``text_to_vision``);
- ``uniseg`` (Ye et al., MICCAI 2023): one learnable prompt per dataset, a map of the bottleneck's shape, joined to
  the bottleneck features (concatenation + 1×1 conv) before the decoder, which then gives that dataset's tasks, as
  UniSeg's own code does (its "task" is a dataset's segmentation task: one prompt for liver and liver tumour); or,
  as an option, one prompt per global task, the decoder then giving that task's one output;
- ``multidecoder``: the shared encoder, one decoder and task head per dataset.

DoDNet and CLIP evaluate the head once per (sample, asked task). The encoder and decoder do not depend on the
task, so they run once per sample and the task heads are batched; the result is the one-task-per-forward one
(tested). UniSeg's decoder does depend on the prompt: it runs once per (sample, asked dataset) pair, or (sample,
asked task) pair with per-task prompts, folded into the batch axis, which is its real cost. Every kind returns
``(B, K, *S)`` logits with :data:`NOT_ASKED` where a sample did not ask a task, and has
``set_output_prior(π (K,))`` for the recipes' ``head_prior``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mosaicseg.errors import MosaicSegError
from mosaicseg.models.backbones import _ConvDecoder
from mosaicseg.models.factory import (
    MODEL_KINDS,
    _instance_norm_as_group_norm,
    asked_tasks,
    build_body,
    check_input,
    model_config,
    rebuild,
)
from mosaicseg.models.heads import TaskHead
from mosaicseg.models.priors import NOT_ASKED, scatter_tasks, select_tasks
from mosaicseg.types import ModelOutput

DYNAMIC = 8  # channels of DoDNet's dynamic head
# generated parameters per task: two 8→8 convs (weights + biases) and one 8→1
DYNAMIC_PARAMS = 2 * (DYNAMIC * DYNAMIC + DYNAMIC) + DYNAMIC + 1


def _logit(prior: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.log(prior / (1 - prior)), dtype=torch.float32)


def _conv_backbone(architecture: str, kind: str) -> None:
    if architecture not in ("unet", "resenc_unet"):
        raise MosaicSegError(
            f"the {kind} model needs a conv encoder-decoder; architecture '{architecture}' is not one. Fix: use "
            "--network unet or resenc_unet."
        )


def _levels(deep_supervision: bool, deep_supervision_levels: int | None, available: int) -> int:
    return (deep_supervision_levels or max(1, available - 1)) if deep_supervision else 1


def task_owners(kind: str, dataset_tasks: Sequence[Sequence[int]], num_tasks: int) -> dict[int, int]:
    """Global task → the dataset (index into ``dataset_tasks``) whose decoder or prompt gives it: a task annotated
    by several datasets belongs to the first. Every task must have one."""
    owner: dict[int, int] = {}
    for d, ks in enumerate(dataset_tasks):
        for k in ks:
            owner.setdefault(int(k), d)
    if sorted(owner) != list(range(num_tasks)):
        raise MosaicSegError(
            f"{kind}: the datasets' tasks {sorted(owner)} do not cover the {num_tasks} tasks. Fix: build it from the "
            "vocabulary (the recipe does)."
        )
    return owner


class DynamicHeadNet(nn.Module):
    """DoDNet (``task_embeddings=None``: one-hot tasks) or the CLIP-driven model (``task_embeddings`` ``(K, E)``).

    ``forward(image (B, C_max, *S), modality (B,), tasks (B, K) bool | None)`` → ``logits [(B, K, *S)]`` (one level:
    neither method supervises coarser ones). The embeddings are a buffer (saved in the state dict); the config
    records only their shape.
    """

    # fine-tuning's head (models.parameter_parts): the task-conditioned part
    HEAD_PATTERNS: ClassVar[tuple[str, ...]] = (r"precls\.", r"controller\.", r"text_to_vision\.", r"embeddings$")

    def __init__(
        self,
        network_plan: Mapping[str, Any],
        modality_channels: Mapping[str, int],
        num_tasks: int,
        architecture: str = "unet",
        options: Mapping[str, Any] | None = None,
        embedding_shape: Sequence[int] | None = None,
        deep_supervision: bool = True,
        deep_supervision_levels: int | None = None,
    ) -> None:
        super().__init__()
        _conv_backbone(architecture, "dodnet/clip")
        body = build_body(network_plan, modality_channels, architecture, options)
        topology, resolved, self.stems, self.backbone = body
        self.spatial_dims = topology.spatial_dims
        self.num_tasks = int(num_tasks)
        self.ds_scales: list[tuple[int, ...]] = [self.backbone.scales[0]]
        conv = (nn.Conv2d, nn.Conv3d)[self.spatial_dims - 2]
        c0, cb = self.backbone.out_channels[0], self.backbone.skip_channels[-1]
        groups = next(g for g in range(min(16, c0), 0, -1) if c0 % g == 0)  # DoDNet: GroupNorm(16, 32)
        self.precls = nn.Sequential(nn.GroupNorm(groups, c0), nn.ReLU(), conv(c0, DYNAMIC, 1))
        if embedding_shape is None:
            self.embeddings = None
            self.text_to_vision = None
            task_width = self.num_tasks
        else:
            rows, width = (int(v) for v in embedding_shape)
            if rows != self.num_tasks:
                raise MosaicSegError(
                    f"{rows} task embeddings for {self.num_tasks} tasks. Fix: give one embedding row per task, in "
                    "the vocabulary's task order (mosaicseg info WORKDIR lists it)."
                )
            self.register_buffer("embeddings", torch.zeros(rows, width))
            self.text_to_vision = nn.Sequential(nn.Linear(width, cb), nn.ReLU())
            task_width = cb
        self.controller = nn.Linear(cb + task_width, DYNAMIC_PARAMS)
        _instance_norm_as_group_norm(self.backbone)
        _instance_norm_as_group_norm(self.stems)
        kind = "dodnet" if embedding_shape is None else "clip"
        shape = None if embedding_shape is None else [int(v) for v in embedding_shape]
        self._config = model_config(
            kind, topology, modality_channels, num_tasks, architecture, resolved, deep_supervision, 1,
            embedding_shape=shape,
        )  # fmt: skip

    modalities = property(lambda self: self.stems.modalities)
    config = property(lambda self: copy.deepcopy(self._config))

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> DynamicHeadNet:
        return rebuild(cls, config)

    def prediction_note(self, n_tasks: int) -> str:
        """How a forward evaluates ``n_tasks`` asked tasks (the predictor's progress bar says it): DoDNet's paper
        runs one forward per task; here the backbone runs once and the tasks' dynamic heads run batched, which
        gives the per-task forward's output (tests/test_model_kinds.py checks it)."""
        kind = self._config["kind"]
        return f"{kind}: {n_tasks} task(s), one dynamic head each, batched (equals one forward per task)"

    def set_task_embeddings(self, embeddings: torch.Tensor) -> None:
        """Copy the user's ``(K, E)`` text embeddings in (shape checked by the recipe against the config)."""
        if self.embeddings is None:
            raise ValueError("a dodnet model has no task embeddings")
        with torch.no_grad():
            self.embeddings.copy_(embeddings)

    def set_output_prior(self, prior: np.ndarray) -> None:
        """Start each task's logit near ``log(π_k / (1 − π_k))``: the generated last bias is the controller's bias
        plus, for one-hot tasks, the task's weight column (the mean prior for embeddings)."""
        logits = _logit(prior)
        with torch.no_grad():
            if self.embeddings is None:
                cb = self.controller.in_features - self.num_tasks
                self.controller.weight[-1, cb:] = logits
                self.controller.bias[-1] = 0.0
            else:
                self.controller.bias[-1] = logits.mean()

    def task_code(self, index: torch.Tensor) -> torch.Tensor:
        """``(B, T)`` task indices (K: padding) → ``(B, T, width)`` task encodings."""
        safe = index.clamp(max=self.num_tasks - 1)
        if self.embeddings is None or self.text_to_vision is None:
            return F.one_hot(safe, self.num_tasks).float()
        return self.text_to_vision(self.embeddings[safe])

    def heads(self, features: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """The dynamic heads: ``features (B, 8, *S)`` and generated ``params (B, T, DYNAMIC_PARAMS)`` →
        ``(B, T, *S)``, head ``(b, t)`` applied to sample b's features."""
        c = DYNAMIC
        sizes = [c * c, c, c * c, c, c, 1]
        w1, b1, w2, b2, w3, b3 = torch.split(params.to(features.dtype), sizes, dim=-1)
        b, t = params.shape[:2]
        tail = [1] * self.spatial_dims
        h = torch.einsum("btoc,bc...->bto...", w1.reshape(b, t, c, c), features)
        h = F.relu(h + b1.reshape(b, t, c, *tail))
        h = torch.einsum("btoc,btc...->bto...", w2.reshape(b, t, c, c), h)
        h = F.relu(h + b2.reshape(b, t, c, *tail))
        out = torch.einsum("btc,btc...->bt...", w3.reshape(b, t, c), h)
        return out + b3.reshape(b, t, *tail)

    def forward(
        self,
        image: torch.Tensor,
        modality: torch.Tensor,
        tasks: torch.Tensor | None = None,
        dataset: torch.Tensor | None = None,
        prompts: Any = None,
    ) -> ModelOutput:
        check_input(image, self.spatial_dims, self.backbone.divisor)
        tasks = asked_tasks(tasks, image, self.num_tasks)
        skips = self.backbone.encode(self.stems(image, modality))
        features = self.precls(self.backbone.decode(skips)[0])
        index, _ = select_tasks(tasks.bool())
        pooled = skips[-1].float().mean(dim=tuple(range(2, skips[-1].ndim)))  # (B, C_b)
        code = self.task_code(index)
        condition = torch.cat([pooled[:, None].expand(-1, index.shape[1], -1), code.to(pooled.dtype)], dim=-1)
        asked = self.heads(features, self.controller(condition))
        return ModelOutput([scatter_tasks(asked, index, self.num_tasks)], {})


MODEL_KINDS.register("dodnet")(DynamicHeadNet)
MODEL_KINDS.register("clip")(DynamicHeadNet)


@MODEL_KINDS.register("uniseg")
class PromptNet(nn.Module):
    """UniSeg: a learnable prompt ``(C_b, *S_b)`` (the bottleneck's shape at the planned patch) per dataset, or per
    task without ``dataset_tasks``, joined to the bottleneck (concatenation, 1×1 conv, norm, activation); the
    decoder and the head then run per (sample, asked dataset) pair, the head giving every task and each task's logit
    taken from its dataset's pair (per task: a one-output head per (sample, asked task) pair). ``dataset_tasks[d]``:
    the global tasks of dataset d (a task annotated by several belongs to the first). ``logits``:
    ``[(B, K, *S_level)]`` per deep-supervision level."""

    # fine-tuning's head (models.parameter_parts): the prompts and the output layer; the join is the bottleneck's
    HEAD_PATTERNS: ClassVar[tuple[str, ...]] = (r"prompts$", r"head\.", r"task_bias$")
    OTHER_PART: ClassVar[str] = "encoder"

    def __init__(
        self,
        network_plan: Mapping[str, Any],
        modality_channels: Mapping[str, int],
        num_tasks: int,
        architecture: str = "unet",
        deep_supervision: bool = True,
        deep_supervision_levels: int | None = None,
        options: Mapping[str, Any] | None = None,
        dataset_tasks: Sequence[Sequence[int]] | None = None,
    ) -> None:
        super().__init__()
        _conv_backbone(architecture, "uniseg")
        body = build_body(network_plan, modality_channels, architecture, options)
        topology, resolved, self.stems, self.backbone = body
        self.spatial_dims = topology.spatial_dims
        self.num_tasks = int(num_tasks)
        self.deep_supervision = bool(deep_supervision)
        cb = self.backbone.skip_channels[-1]
        self.prompt_shape = [p // d for p, d in zip(topology.patch_size, self.backbone.divisor, strict=True)]
        self.per_dataset = dataset_tasks is not None
        if dataset_tasks is not None:
            owner = task_owners("uniseg", dataset_tasks, self.num_tasks)
            groups = len(dataset_tasks)
            # (K,) the prompt each task's logit comes from; not in the state dict (the config rebuilds it)
            self.register_buffer(
                "task_group", torch.tensor([owner[k] for k in range(self.num_tasks)]), persistent=False
            )
            # the prompts are a dataset's, not a task's: init_from maps only the head's rows and the biases by task
            self.task_parameters: tuple[str, ...] = ("task_bias",)
        else:
            groups = self.num_tasks
            self.task_parameters = ("prompts", "task_bias")
        self.prompts = nn.Parameter(torch.randn(groups, cb, *self.prompt_shape) * 0.02)
        conv = (nn.Conv2d, nn.Conv3d)[self.spatial_dims - 2]
        self.join = nn.Sequential(conv(2 * cb, cb, 1), nn.GroupNorm(cb, cb), nn.LeakyReLU(0.01))
        levels = _levels(deep_supervision, deep_supervision_levels, len(self.backbone.out_channels))
        outputs = self.num_tasks if self.per_dataset else 1
        self.head = TaskHead(
            self.backbone.out_channels, outputs, self.spatial_dims, levels, global_rows=self.per_dataset
        )
        self.task_bias = nn.Parameter(torch.zeros(self.num_tasks))
        self.ds_scales: list[tuple[int, ...]] = list(self.backbone.scales[:levels])
        _instance_norm_as_group_norm(self.backbone)
        _instance_norm_as_group_norm(self.stems)
        extra = {"dataset_tasks": [[int(k) for k in ks] for ks in dataset_tasks]} if dataset_tasks is not None else {}
        self._config = model_config(
            "uniseg", topology, modality_channels, num_tasks, architecture, resolved, deep_supervision, levels, **extra
        )

    modalities = property(lambda self: self.stems.modalities)
    config = property(lambda self: copy.deepcopy(self._config))

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> PromptNet:
        return rebuild(cls, config)

    def is_task_parameter(self, name: str) -> bool:
        return name in self.task_parameters

    def prediction_note(self, n_tasks: int) -> str:
        """The decoder runs once per asked dataset, or task (its prompt changes the bottleneck): the cost grows
        with them."""
        if self.per_dataset:
            return "uniseg: the decoder runs once per tile for each dataset whose tasks are asked"
        return f"uniseg: the decoder runs {n_tasks} time(s) per tile, once per task"

    def set_output_prior(self, prior: np.ndarray) -> None:
        with torch.no_grad():
            self.task_bias.copy_(_logit(prior))
            for out in self.head.convs:
                out.conv.conv.bias.zero_()

    def forward(
        self,
        image: torch.Tensor,
        modality: torch.Tensor,
        tasks: torch.Tensor | None = None,
        dataset: torch.Tensor | None = None,
        prompts: Any = None,
    ) -> ModelOutput:
        check_input(image, self.spatial_dims, self.backbone.divisor)
        tasks = asked_tasks(tasks, image, self.num_tasks)
        skips = self.backbone.encode(self.stems(image, modality))
        bottleneck = skips[-1]
        if list(bottleneck.shape[2:]) != self.prompt_shape:
            raise MosaicSegError(
                f"uniseg's task prompts are {self.prompt_shape} at the bottleneck, the input gives "
                f"{list(bottleneck.shape[2:])}. Fix: feed patches of the planned patch size (prediction does)."
            )
        if self.per_dataset:
            return self._per_dataset(tasks, skips, bottleneck)
        index, _ = select_tasks(tasks.bool())
        b, t = index.shape
        pairs = torch.arange(b, device=image.device).repeat_interleave(t)  # sample of each (sample, task) pair
        task_prompts = self.prompts[index.clamp(max=self.num_tasks - 1).reshape(-1)].to(bottleneck.dtype)
        joined = self.join(torch.cat([bottleneck[pairs], task_prompts], dim=1))
        maps = self.backbone.decode([s[pairs] for s in skips[:-1]] + [joined])
        levels = len(self.head.convs) if self.training and self.deep_supervision else 1
        bias = self.task_bias[index.clamp(max=self.num_tasks - 1)]  # (B, T)
        logits = []
        for out in self.head(maps, levels=levels):  # (B·T, 1, *S_level)
            asked = out.reshape(b, t, *out.shape[2:])
            asked = asked + bias.to(asked.dtype).view(b, t, *([1] * self.spatial_dims))
            logits.append(scatter_tasks(asked, index, self.num_tasks))
        return ModelOutput(logits, {})

    def _per_dataset(self, tasks: torch.Tensor, skips: list[torch.Tensor], bottleneck: torch.Tensor) -> ModelOutput:
        """The decoder once per (sample, asked dataset) pair; task k's logit ``(B, K, *S)`` from the pair of
        ``task_group[k]``, vectorised over the batch (a sample asking the tasks of several datasets has one pair
        each)."""
        b = tasks.shape[0]
        groups = self.prompts.shape[0]
        member = self.task_group[None, :] == torch.arange(groups, device=tasks.device)[:, None]  # (G, K)
        asked_groups = (tasks[:, None, :] & member[None]).any(-1)  # (B, G)
        index, _ = select_tasks(asked_groups)  # (B, T), padding = G
        t = index.shape[1]
        pairs = torch.arange(b, device=tasks.device).repeat_interleave(t)
        group_prompts = self.prompts[index.clamp(max=groups - 1).reshape(-1)].to(bottleneck.dtype)
        joined = self.join(torch.cat([bottleneck[pairs], group_prompts], dim=1))
        maps = self.backbone.decode([s[pairs] for s in skips[:-1]] + [joined])
        levels = len(self.head.convs) if self.training and self.deep_supervision else 1
        # (B, K): the slot of each task's dataset among the sample's pairs (0 where the task is not asked)
        slot = (index[:, :, None] == self.task_group[None, None, :]).to(torch.uint8).argmax(1)
        shape = (1,) * self.spatial_dims
        bias = self.task_bias.view(1, -1, *shape)
        logits = []
        for out in self.head(maps, levels=levels):  # (B·T, K, *S_level)
            per_pair = out.reshape(b, t, *out.shape[1:])
            where = slot.view(b, 1, -1, *shape).expand(b, 1, *per_pair.shape[2:])
            chosen = per_pair.gather(1, where).squeeze(1) + bias.to(out.dtype)
            asked = tasks.view(b, -1, *shape)
            logits.append(torch.where(asked, chosen, torch.full_like(chosen, NOT_ASKED)))
        return ModelOutput(logits, {})


@MODEL_KINDS.register("multidecoder")
class MultiDecoderNet(nn.Module):
    """The shared encoder with one decoder and task head per dataset. ``dataset_tasks[d]``: the global tasks of
    dataset d; a task annotated by several datasets is produced by the first one's decoder. A sample runs the
    decoders of the tasks it asks. ``logits``: ``[(B, K, *S_level)]`` per deep-supervision level."""

    # fine-tuning's head (models.parameter_parts); the per-dataset decoders are decoder
    HEAD_PATTERNS: ClassVar[tuple[str, ...]] = (r"heads\.",)

    def __init__(
        self,
        network_plan: Mapping[str, Any],
        modality_channels: Mapping[str, int],
        num_tasks: int,
        dataset_tasks: Sequence[Sequence[int]],
        architecture: str = "unet",
        deep_supervision: bool = True,
        deep_supervision_levels: int | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        _conv_backbone(architecture, "multidecoder")
        body = build_body(network_plan, modality_channels, architecture, options)
        topology, resolved, self.stems, self.backbone = body
        self.backbone.decoder = None  # each dataset has its own (below)
        self.spatial_dims = topology.spatial_dims
        self.num_tasks = int(num_tasks)
        self.deep_supervision = bool(deep_supervision)
        owner = task_owners("multidecoder", dataset_tasks, self.num_tasks)
        self.owned = [sorted(k for k, o in owner.items() if o == d) for d in range(len(dataset_tasks))]
        levels = _levels(deep_supervision, deep_supervision_levels, len(self.backbone.out_channels))
        self.decoders = nn.ModuleList(_ConvDecoder(topology) if ks else nn.Identity() for ks in self.owned)
        self.heads = nn.ModuleList(
            TaskHead(self.backbone.out_channels, len(ks), self.spatial_dims, levels, global_rows=False)
            if ks
            else nn.Identity()
            for ks in self.owned
        )
        self.ds_scales: list[tuple[int, ...]] = list(self.backbone.scales[:levels])
        _instance_norm_as_group_norm(self)
        self._config = model_config(
            "multidecoder", topology, modality_channels, num_tasks, architecture, resolved, deep_supervision, levels,
            dataset_tasks=[[int(k) for k in ks] for ks in dataset_tasks],
        )  # fmt: skip

    modalities = property(lambda self: self.stems.modalities)
    config = property(lambda self: copy.deepcopy(self._config))

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> MultiDecoderNet:
        return rebuild(cls, config)

    def set_output_prior(self, prior: np.ndarray) -> None:
        logits = _logit(prior)
        with torch.no_grad():
            for ks, head in zip(self.owned, self.heads, strict=True):
                if ks:
                    for conv in head.convs:
                        conv.conv.conv.bias.copy_(logits[ks])

    def forward(
        self,
        image: torch.Tensor,
        modality: torch.Tensor,
        tasks: torch.Tensor | None = None,
        dataset: torch.Tensor | None = None,
        prompts: Any = None,
    ) -> ModelOutput:
        check_input(image, self.spatial_dims, self.backbone.divisor)
        b = image.shape[0]
        tasks = asked_tasks(tasks, image, self.num_tasks)
        skips = self.backbone.encode(self.stems(image, modality))
        levels = self.heads_levels()
        logits: list[torch.Tensor | None] = [None] * levels
        for ks, decoder, head in zip(self.owned, self.decoders, self.heads, strict=True):
            if not ks:
                continue
            need = tasks[:, ks].any(1)
            if not bool(need.any()):
                continue
            rows = need.nonzero().squeeze(1)
            outs = head(decoder([s[rows] for s in skips]), levels=levels)
            for level, out in enumerate(outs):
                if logits[level] is None:
                    logits[level] = out.new_full((b, self.num_tasks, *out.shape[2:]), NOT_ASKED)
                full = logits[level]
                assert full is not None
                cols = torch.as_tensor(ks, device=out.device)
                full[rows[:, None], cols[None, :]] = out
        result = []
        for full in logits:
            if full is None:  # nothing asked at all
                raise MosaicSegError("multidecoder: no task was asked. Fix: ask at least one task.")
            mask = tasks.view(*tasks.shape, *([1] * self.spatial_dims))
            result.append(torch.where(mask, full, torch.full_like(full, NOT_ASKED)))
        return ModelOutput(result, {})

    def heads_levels(self) -> int:
        first = next(h for h in self.heads if isinstance(h, TaskHead))
        return first.levels if self.training and self.deep_supervision else 1
