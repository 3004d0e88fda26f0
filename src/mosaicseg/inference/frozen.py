"""CPU inference through traced TorchScript graphs with oneDNN-prepacked weights.

Why: ``torch.jit.optimize_for_inference`` freezes the weights into the graph and lets oneDNN keep them in its
blocked layout, so a convolution no longer reorders its weights on every call. Measured on this project's 2-core
CPU (BENCHMARKS.md, forward micro-benchmark, one 40×56×40 tile, 2 threads): the 16–128 CPU plan 208 → 97 ms
per forward, nnU-Net's 32–256 plan 370 → 356 ms.

Tracing records one path through the model's Python: the input stem chosen for the modality, the tile shape.
So :class:`FrozenForward` builds one graph per (tile shape, dtype, modalities of the batch) and compares it with
the eager model on the batch that built it; a graph that differs is discarded with a warning and the eager model
serves that key from then on. A frozen graph holds a copy of the weights of the moment it was built: freeze a
trained model for prediction, never one that is still training.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

# largest |frozen - eager| allowed, relative to max(1, max |eager|): oneDNN's blocked kernels only reorder
# float32 sums (measured ~1e-6 relative), a wrong graph is off by O(1)
TOLERANCE = 1e-3

_Key = tuple[tuple[int, ...], torch.dtype, tuple[int, ...]]


class FrozenForward:
    """``model(image, modality)`` through a per-key frozen graph; same signature and result as the model.

    Args:
        model: ``model(image (N, C, *P), modality (N,) long) -> (N, K, *P)``, in eval mode, on the CPU.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        if model.training:
            raise ValueError("freeze a model in eval mode: a frozen graph keeps the weights of the moment")
        self.model = model
        # None: the graph for this key failed its check (or could not be built) and the eager model serves it
        self._graphs: dict[_Key, Callable[..., torch.Tensor] | None] = {}

    @property
    def num_graphs(self) -> int:
        """How many keys run through a frozen graph (the others, if any, run eagerly)."""
        return sum(g is not None for g in self._graphs.values())

    @torch.no_grad()
    def __call__(self, image: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        """``(N, C, *P)``, ``(N,)`` → ``(N, K, *P)`` logits."""
        key = (tuple(image.shape), image.dtype, tuple(int(m) for m in modality.tolist()))
        if key not in self._graphs:
            return self._build(key, image, modality)
        graph = self._graphs[key]
        return graph(image, modality) if graph is not None else self.model(image, modality)

    def _build(self, key: _Key, image: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        reference = self.model(image, modality)
        try:
            with warnings.catch_warnings():
                # the tracer warns about every Python-side decision it records: per key these are constants.
                # TorchScript is deprecated in favour of torch.compile, which on CPU needs a C++ compiler at run
                # time and compiles for far longer than a prediction takes (BENCHMARKS.md, speed study); should
                # a later torch drop TorchScript, the except below keeps prediction working, eagerly
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                warnings.simplefilter("ignore", DeprecationWarning)
                traced = torch.jit.trace(self.model, (image, modality), check_trace=False)
                graph = torch.jit.optimize_for_inference(traced)
            got = graph(image, modality)
        # any failure of tracing or of the optimiser only costs speed: the eager model is always right
        except Exception as err:
            self._graphs[key] = None
            warnings.warn(
                f"{type(self.model).__name__}: could not freeze the forward for tiles {list(key[0])} "
                f"({type(err).__name__}: {str(err)[:200]}); predicting with the eager model (slower, same result).",
                RuntimeWarning,
                stacklevel=3,
            )
            return reference
        error = float((got.float() - reference.float()).abs().max()) if got.shape == reference.shape else float("inf")
        scale = max(1.0, float(reference.abs().max()))
        if not error <= TOLERANCE * scale:  # also catches NaN
            self._graphs[key] = None
            warnings.warn(
                f"{type(self.model).__name__}: the frozen graph for tiles {list(key[0])} differs from the eager "
                f"model by {error:.3g} (allowed {TOLERANCE * scale:.3g}); predicting with the eager model "
                "(slower, same result). The model's forward probably depends on something tracing cannot see.",
                RuntimeWarning,
                stacklevel=3,
            )
            return reference
        self._graphs[key] = graph
        return reference
