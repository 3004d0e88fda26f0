"""Models: one input stem per modality, a backbone from :data:`MODELS`, heads from :data:`HEADS`; every model
kind in :data:`MODEL_KINDS` and rebuilt by :func:`build_from_config`."""

from __future__ import annotations

from mosaicseg.models.amalgamation import KA2ERNet  # registers the model kind "ka2er"
from mosaicseg.models.baselines import DynamicHeadNet, MultiDecoderNet, PromptNet  # register their kinds
from mosaicseg.models.factory import (
    HEADS,
    MODEL_KINDS,
    MODELS,
    UniversalNet,
    build_from_config,
    build_model,
    modality_parameter_names,
    parameter_parts,
    task_parameter_names,
    use_device_layout,
)
from mosaicseg.models.priors import HermesNet  # registers the model kind "hermes"

__all__ = [
    "HEADS",
    "MODELS",
    "MODEL_KINDS",
    "DynamicHeadNet",
    "HermesNet",
    "KA2ERNet",
    "MultiDecoderNet",
    "PromptNet",
    "UniversalNet",
    "build_from_config",
    "build_model",
    "modality_parameter_names",
    "parameter_parts",
    "task_parameter_names",
    "use_device_layout",
]
