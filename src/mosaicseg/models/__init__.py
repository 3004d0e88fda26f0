"""Models: one input stem per modality, a backbone from :data:`MODELS`, per-task sigmoid heads."""

from __future__ import annotations

from mosaicseg.models.factory import MODELS, UniversalNet, build_model, use_device_layout

__all__ = ["MODELS", "UniversalNet", "build_model", "use_device_layout"]
