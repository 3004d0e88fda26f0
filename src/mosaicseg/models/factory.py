"""``build_model``: plan + modalities + task count → :class:`UniversalNet` (stems + backbone + task head), and
:func:`build_from_config`, which rebuilds a model of any registered kind.

One network serves every dataset of a collection: a stem per modality maps each channel signature to the
first feature width, a backbone from :data:`MODELS` produces decoder maps, and a head from :data:`HEADS` gives
one sigmoid logit per global task.

Every model kind (in :data:`MODEL_KINDS`: ``universal`` here; recipes register theirs) follows one contract:

- ``forward(image (B, C_max, *S), modality (B,) long, tasks=None, dataset=None, prompts=None)`` →
  :class:`~mosaicseg.types.ModelOutput`; ``tasks`` is ``(B, K)`` bool (the tasks each sample asks for: its
  dataset's annotated tasks in training, the requested tasks in prediction; ``None``: all), ``dataset`` is
  ``(B,)`` long, ``prompts`` whatever the kind documents (e.g. boxes). A kind ignores what it does not need.
- ``config``: a JSON-ready dict with ``kind`` and everything that rebuilds the architecture, so a checkpoint
  stores it next to the weights and :func:`build_from_config` restores it for the predictor and for resume;
- ``modalities`` (the modality vocabulary the ``modality`` index points into) and ``spatial_dims``;
- optionally ``HEAD_PATTERNS`` (regular expressions over parameter names; default: ``head.``): the parameters
  :func:`parameter_parts` calls the head, which fine-tuning trains first and ``--freeze`` never freezes.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from mosaicseg.errors import MosaicSegError
from mosaicseg.models.backbones import MODELS, Topology, resolve_options
from mosaicseg.models.heads import HEADS
from mosaicseg.models.stems import ModalityStems
from mosaicseg.registry import Registry
from mosaicseg.types import ModelOutput

CONFIG_VERSION = 2  # 2: ``kind`` and ``head`` in the config; version 1 configs are universal task-head models

MODEL_KINDS: Registry[Any] = Registry("model kind")  # name → class with ``from_config(config)``


def build_body(
    network_plan: Mapping[str, Any],
    modality_channels: Mapping[str, int],
    architecture: str,
    options: Mapping[str, Any] | None,
) -> tuple[Topology, dict[str, Any], ModalityStems, nn.Module]:
    """The part every model kind shares: the plan's topology, the architecture's resolved options, one stem per
    modality and the backbone (see :mod:`mosaicseg.models.backbones`)."""
    topology = Topology.from_plan(network_plan)
    resolved = resolve_options(architecture, dict(options or {}))
    stems = ModalityStems(
        modality_channels, topology.features[0], topology.spatial_dims, kernel_size=topology.kernel_sizes[0]
    )
    return topology, resolved, stems, MODELS.get(architecture)(topology, topology.features[0], **resolved)


def rebuild(cls: Any, config: Mapping[str, Any]) -> Any:
    """``cls(**config)`` without the ``version`` and ``kind`` keys; a malformed config raises a user error."""
    version = config.get("version")
    if version not in (1, CONFIG_VERSION):
        raise MosaicSegError(
            f"model config version {version!r} is not supported (expected {CONFIG_VERSION}). "
            "Fix: use a checkpoint written by this version of mosaicseg."
        )
    kwargs = {k: v for k, v in config.items() if k not in ("version", "kind")}
    try:
        return cls(**copy.deepcopy(kwargs))
    except TypeError as err:
        raise MosaicSegError(f"model config is malformed ({err}). Fix: use a config from the model's .config.") from err


def model_config(
    kind: str,
    topology: Topology,
    modality_channels: Mapping[str, int],
    num_tasks: int,
    architecture: str,
    resolved: Mapping[str, Any],
    deep_supervision: bool,
    levels: int | None,
    **extra: Any,
) -> dict[str, Any]:
    """The JSON-ready config every model kind stores (``extra``: its own constructor arguments)."""
    return {
        "version": CONFIG_VERSION,
        "kind": kind,
        "network_plan": topology.to_plan(),
        "modality_channels": dict(modality_channels),
        "num_tasks": int(num_tasks),
        "architecture": architecture,
        "deep_supervision": bool(deep_supervision),
        "deep_supervision_levels": levels if deep_supervision else None,
        "options": copy.deepcopy(dict(resolved)),
        **copy.deepcopy(extra),
    }


def asked_tasks(tasks: torch.Tensor | None, image: torch.Tensor, num_tasks: int) -> torch.Tensor:
    """``tasks`` as ``(B, K)`` bool; None asks every task."""
    if tasks is None:
        return torch.ones(image.shape[0], num_tasks, dtype=torch.bool, device=image.device)
    return tasks.bool()


def check_input(image: torch.Tensor, spatial_dims: int, divisor: tuple[int, ...]) -> None:
    """Refuse an input a model of ``spatial_dims`` whose backbone needs multiples of ``divisor`` cannot take."""
    if image.ndim != spatial_dims + 2:
        raise MosaicSegError(
            f"image has shape {tuple(image.shape)} but the model is {spatial_dims}D. "
            f"Fix: pass a (B, C, {', '.join('XYZ'[:spatial_dims])}) tensor."
        )
    spatial = tuple(image.shape[2:])
    if any(s % d for s, d in zip(spatial, divisor, strict=True)):
        raise MosaicSegError(
            f"input spatial shape {list(spatial)} is not divisible by {list(divisor)}. "
            "Fix: feed patches of the planned patch size (sliding-window inference does this)."
        )


@MODEL_KINDS.register("universal")
class UniversalNet(nn.Module):
    """Stems + backbone + task head (MultiTalent; kind ``universal``).

    ``forward(image (B, C_max, *S), modality (B,) long, ...)`` returns a :class:`ModelOutput` whose ``logits``
    are

    - in ``train()`` mode with deep supervision: full resolution first,
      ``[(B, K, *S), (B, K, *S / ds_scales[1]), ...]``. By default it covers every decoder level except the
      coarsest one (nnU-Net v2 gives that level zero loss weight), i.e. ``num_stages - 2`` levels for the
      U-Nets (at least 1) and 4 for SwinUNETR; ``deep_supervision_levels`` overrides this;
    - otherwise one tensor ``[(B, K, *S)]``.

    Every task is computed for every sample (a 1x1 conv gives them all at once), so ``tasks``, ``dataset``
    and ``prompts`` are accepted and unused.

    Build it with :func:`build_model` or :meth:`from_config`.
    """

    def __init__(
        self,
        network_plan: Mapping[str, Any],
        modality_channels: Mapping[str, int],
        num_tasks: int,
        architecture: str = "unet",
        deep_supervision: bool = True,
        deep_supervision_levels: int | None = None,
        options: Mapping[str, Any] | None = None,
        head: str = "task",
        task_blocks: list[int] | None = None,
    ) -> None:
        super().__init__()
        body = build_body(network_plan, modality_channels, architecture, options)
        topology, resolved, self.stems, self.backbone = body
        self.spatial_dims = topology.spatial_dims
        self.num_tasks = int(num_tasks)
        self.deep_supervision = bool(deep_supervision)
        available = len(self.backbone.out_channels)
        default_levels = max(1, available - 1)
        levels = (deep_supervision_levels or default_levels) if deep_supervision else 1
        self.head = HEADS.get(head)(self.backbone.out_channels, self.num_tasks, self.spatial_dims, levels)
        self.ds_scales: list[tuple[int, ...]] = list(self.backbone.scales[:levels])
        _instance_norm_as_group_norm(self)
        self.channels_last = False
        self._config = model_config(
            "universal", topology, modality_channels, num_tasks, architecture, resolved, deep_supervision, levels,
            head=head,
        )  # fmt: skip
        self.set_task_blocks(task_blocks)

    def set_task_blocks(self, blocks: list[int] | None) -> None:
        """The head's output blocks (``TaskHead.set_task_blocks``; ``extend`` adds one), kept in :attr:`config`."""
        self.head.set_task_blocks(blocks)  # type: ignore[operator]
        if blocks is not None and len(blocks) > 1:
            self._config["task_blocks"] = [int(b) for b in blocks]
        else:
            self._config.pop("task_blocks", None)

    def set_channels_last(self, enabled: bool) -> UniversalNet:
        """Keep conv weights and activations ``torch.channels_last_3d`` (``enabled``) or contiguous.

        A layout choice, not architecture: it is not part of :attr:`config` and changes results only by float
        rounding. On CPU (oneDNN) a channels-last 3D training step ran ~20 % faster here (BENCHMARKS.md, speed
        study). 3D only: with torch 2.13 on CPU a 2D channels-last 1x1 strided convolution returned a wrong
        weight gradient and a 2D 1x1 backward hung (found by tests/test_models.py; oneDNN's AVX2 1x1
        backward-weights kernel for nhwc with fewer input channels than its block, uxlfoundation/oneDNN#6035),
        and 2D was never slow.
        """
        if enabled and self.spatial_dims != 3:
            raise ValueError("channels-last is only used for 3D models (see the docstring)")
        self.channels_last = bool(enabled)
        fmt = torch.channels_last_3d if enabled else torch.contiguous_format
        for module in self.modules():
            for param in module.parameters(recurse=False):
                if param.ndim == 5:
                    param.data = param.data.contiguous(memory_format=fmt)
        return self

    def set_output_prior(self, prior: np.ndarray) -> None:
        """Start task k's output at probability ``prior[k]``: every level's bias ``log(π_k / (1 − π_k))``."""
        logits = torch.as_tensor(np.log(prior / (1 - prior)), dtype=torch.float32)
        with torch.no_grad():
            for name, param in self.head.named_parameters():
                if name.endswith("bias"):
                    param.copy_(logits.to(param.dtype))

    @property
    def modalities(self) -> tuple[str, ...]:
        """Modality names; a sample's ``modality`` index points into this tuple."""
        return self.stems.modalities

    @property
    def config(self) -> dict[str, Any]:
        """JSON-ready arguments that rebuild this architecture (a copy; editing it changes nothing)."""
        return copy.deepcopy(self._config)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> UniversalNet:
        """Rebuild the (untrained) architecture described by :attr:`config`, e.g. from a checkpoint."""
        return rebuild(cls, config)

    def encode(self, image: torch.Tensor, modality: torch.Tensor) -> list[torch.Tensor]:
        """Stem + encoder: skips ``[(B, backbone.skip_channels[i], *S / backbone.skip_scales[i]), ...]``, full
        resolution first, bottleneck last."""
        check_input(image, self.spatial_dims, self.backbone.divisor)
        if self.channels_last:
            image = image.contiguous(memory_format=torch.channels_last_3d)
        return self.backbone.encode(self.stems(image, modality))

    def decode(self, skips: list[torch.Tensor]) -> list[torch.Tensor]:
        """Skips → decoder maps ``[(B, backbone.out_channels[i], *S / backbone.scales[i]), ...]``."""
        return self.backbone.decode(skips)

    def features(self, image: torch.Tensor, modality: torch.Tensor) -> list[torch.Tensor]:
        """Decoder maps ``[(B, c_i, *S / backbone.scales[i]), ...]``, full resolution first."""
        return self.decode(self.encode(image, modality))

    def forward(
        self,
        image: torch.Tensor,
        modality: torch.Tensor,
        tasks: torch.Tensor | None = None,
        dataset: torch.Tensor | None = None,
        prompts: Any = None,
    ) -> ModelOutput:
        """``(B, C_max, *S)``, ``(B,)`` → logits ``[(B, K, *S)]`` or, when training with deep supervision, one
        per level of :attr:`ds_scales`."""
        feats = self.features(image, modality)
        levels = None if self.training and self.deep_supervision else 1
        return ModelOutput(self.head(feats, levels=levels), {})


def build_from_config(config: Mapping[str, Any]) -> nn.Module:
    """Rebuild the (untrained) model a ``config`` describes, whatever its kind (``universal`` when a version-1
    config has none)."""
    if not isinstance(config, Mapping):
        raise MosaicSegError("model config is not a mapping. Fix: use a checkpoint written by mosaicseg train.")
    return MODEL_KINDS.get(str(config.get("kind", "universal"))).from_config(config)


def task_parameter_names(model: nn.Module) -> set[str]:
    """Names (in ``model.state_dict()``) of the parameters whose first axis has one row per task: the rows that
    ``init_from`` maps task by task. A module declares them with ``is_task_parameter(name)``."""
    out: set[str] = set()
    for prefix, module in model.named_modules():
        check = getattr(module, "is_task_parameter", None)
        if check is None:
            continue
        for name, _ in module.named_parameters():
            if check(name):
                out.add(f"{prefix}.{name}" if prefix else name)
    return out


PARTS = ("encoder", "decoder", "head")


def parameter_parts(model: nn.Module) -> dict[str, str]:
    """Parameter name → ``encoder``, ``decoder`` or ``head``: what fine-tuning's schedule and ``--freeze`` act on.

    A name matching one of the model's ``HEAD_PATTERNS`` (regular expressions, default ``head.``) is head; the
    stems and the backbone's ``ENCODER_PREFIXES`` are encoder; the rest of the backbone is decoder. A parameter
    none of these claims (a kind's own modules, e.g. Hermes' fusion blocks) takes what the model's ``own_part(name)``
    says, if it has one, else its ``OTHER_PART`` (default ``decoder``)."""
    heads = [re.compile(p) for p in getattr(model, "HEAD_PATTERNS", (r"head\.",))]
    backbone = getattr(model, "backbone", None)
    encoder = tuple(getattr(backbone, "ENCODER_PREFIXES", ()))
    other = getattr(model, "OTHER_PART", "decoder")
    own_part = getattr(model, "own_part", None)
    out: dict[str, str] = {}
    for name, _ in model.named_parameters():
        if any(p.match(name) for p in heads):
            out[name] = "head"
        elif name.startswith("stems."):
            out[name] = "encoder"
        elif name.startswith("backbone."):
            out[name] = "encoder" if name[len("backbone.") :].startswith(encoder) else "decoder"
        else:
            out[name] = own_part(name) if callable(own_part) else other
    return out


def modality_parameter_names(model: nn.Module) -> set[str]:
    """Names of the parameters whose first axis has one row per modality (Hermes' modality tokens and modality
    classifier), which ``init_from`` maps modality by modality; a model lists them in ``MODALITY_PARAMETERS``."""
    names = set(getattr(model, "MODALITY_PARAMETERS", ()))
    return {n for n, _ in model.named_parameters() if any(n == m or n.endswith("." + m) for m in names)}


def use_device_layout(model: nn.Module, device: torch.device, *, mixed_precision: bool = False) -> None:
    """Channels-last for every 3D :class:`UniversalNet` in ``model`` on CPU in float32, contiguous otherwise
    (measured on CPU only; see :meth:`UniversalNet.set_channels_last`). ``mixed_precision``: the model trains
    under bf16 autocast, whose CPU training step is faster contiguous (measured with native bf16, brain4's CPU plan:
    0.397 s contiguous, 0.634 s channels-last, 0.646 s in float32 channels-last)."""
    for module in model.modules():
        if isinstance(module, UniversalNet):
            module.set_channels_last(device.type == "cpu" and module.spatial_dims == 3 and not mixed_precision)


def _instance_norm_as_group_norm(module: nn.Module) -> None:
    """Replace every ``InstanceNorm{1,2,3}d`` below ``module`` by ``GroupNorm(C, C)`` in place.

    One group per channel normalises each channel of each sample over its spatial axes: the same function,
    eps and ``weight``/``bias`` names (checkpoints load either way). The reason is speed: PyTorch's instance
    norm returns a contiguous tensor, which makes every following convolution reorder a channels-last input,
    while group norm keeps the layout (measured: training step 1.48 → 1.18 s, 2 threads, see BENCHMARKS.md).
    """
    for name, child in module.named_children():
        if isinstance(child, nn.modules.instancenorm._InstanceNorm):
            if child.track_running_stats:
                raise MosaicSegError(
                    f"{name}: instance norm with running statistics cannot become group norm. "
                    "Fix: build the block with track_running_stats=False (nnU-Net's default)."
                )
            norm = nn.GroupNorm(child.num_features, child.num_features, eps=child.eps, affine=child.affine)
            setattr(module, name, norm)
        else:
            _instance_norm_as_group_norm(child)


def build_model(
    network_plan: Mapping[str, Any],
    modality_channels: Mapping[str, int],
    num_tasks: int,
    architecture: str = "unet",
    deep_supervision: bool = True,
    deep_supervision_levels: int | None = None,
    head: str = "task",
    **options: Any,
) -> UniversalNet:
    """Build the universal network.

    - ``network_plan``: plans.json ``network`` (``patch_size``, ``features``, ``kernel_sizes``, ``strides``;
      other keys such as ``batch_size`` are ignored). ``spatial_dims`` is ``len(patch_size)``.
    - ``modality_channels``: modality name → channel count, in modality-vocabulary order.
    - ``num_tasks``: K, the number of global tasks (one sigmoid output each).
    - ``architecture``: a name in :data:`MODELS` (``unet``, ``resenc_unet``, ``swinunetr``).
    - ``head``: a name in :data:`HEADS`.
    - ``options``: architecture options (e.g. ``blocks_per_stage``, ``feature_size``); unknown names raise.
    """
    return UniversalNet(
        network_plan,
        modality_channels,
        num_tasks,
        architecture=architecture,
        deep_supervision=deep_supervision,
        deep_supervision_levels=deep_supervision_levels,
        options=options,
        head=head,
    )
