"""The one data contract: :class:`Sample` and its batched form :class:`Batch`.

Shapes use ``C`` channels, ``K`` global tasks (the collection's task vocabulary) and spatial axes
``(X, Y[, Z])`` in canonical orientation.
"""

from __future__ import annotations

from typing import Any, NamedTuple, TypedDict

import numpy as np
import torch


class Sample(TypedDict):
    """One training/validation example.

    - ``image``: ``(C, X, Y[, Z])`` float32, normalised, the dataset's own channels.
    - ``target``: ``(K, X, Y[, Z])`` uint8 multi-hot over the global tasks.
    - ``label_mask``: ``(K,)`` bool, the tasks this sample's dataset annotates.
    - ``ignore``: ``(X, Y[, Z])`` bool, voxels under nnU-Net's ``ignore`` label (all False if none).
    - ``modality``: index into the modality vocabulary (also selects the input stem).
    - ``dataset``: index of the source dataset.
    - ``meta``: case id, dataset name, patch origin, and what is needed to restore geometry.
    """

    image: np.ndarray
    target: np.ndarray
    label_mask: np.ndarray
    ignore: np.ndarray
    modality: int
    dataset: int
    meta: dict[str, Any]


class Batch(TypedDict):
    """Stacked samples. ``image`` is ``(B, C_max, X, Y[, Z])``: channels are zero-padded to the largest
    channel count of the collection and ``modality`` tells each sample's stem how many to use."""

    image: torch.Tensor
    target: torch.Tensor  # (B, K, X, Y[, Z]) uint8
    label_mask: torch.Tensor  # (B, K) bool
    ignore: torch.Tensor  # (B, X, Y[, Z]) bool
    modality: torch.Tensor  # (B,) long
    dataset: torch.Tensor  # (B,) long
    meta: list[dict[str, Any]]


class ModelOutput(NamedTuple):
    """What every model's ``forward(image, modality, tasks=None, dataset=None, prompts=None)`` returns.

    - ``logits``: one ``(B, K, *S_i)`` tensor per deep-supervision level, full resolution first; a single
      element in eval mode or without deep supervision. ``K`` is the model's task vocabulary.
    - ``extras``: named auxiliary tensors a recipe's loss may use (e.g. ``modality_logits`` ``(B, M)``,
      ``features`` ``(B, c, *S')``); empty for the plain universal model.

    A NamedTuple (a tuple) so that DDP finds the tensors in it.
    """

    logits: list[torch.Tensor]
    extras: dict[str, torch.Tensor]
