"""Gaussian-weighted sliding-window prediction with optional mirroring, on top of MONAI's inferer.

Logits of overlapping tiles are blended with a Gaussian importance map (nnU-Net, ``sigma = 1/8`` of the
tile); mirrored predictions are averaged in logit space, then the sigmoid turns them into per-task
probabilities (every task is an independent sigmoid output, MultiTalent).

On the CPU in float32, tiles can run through traced TorchScript graphs with oneDNN-prepacked weights
(:class:`FrozenForward`).

Why: ``torch.jit.optimize_for_inference`` freezes the weights into the graph and lets oneDNN keep them in its
blocked layout, so a convolution no longer reorders its weights on every call. Measured on this project's 2-core
CPU (one tile, 2 threads; BENCHMARKS.md, speed study): 16–128 network on 48³ 128 ms eager, 84 ms frozen;
nnU-Net's 32–256 network on 40×56×40 248 → 221 ms; its 32–320 IXI network on 96×128×128 4988 → 7064 ms (slower).
Where the CPU computes bf16 in hardware, ``mosaicseg predict`` runs autocast instead, which is faster still.

Tracing records one path through the model's Python: the input stem chosen for the modality, the tile shape,
anything computed from tensor values. So :class:`FrozenForward` keeps one graph per (tile shape, dtype,
modalities of the batch), and trusts a graph only after it reproduced the eager model on a later batch than
the one it was traced on: a graph that differs is dropped with a warning and the eager model serves that key.
Building costs about one forward plus the optimiser, so a key gets its graph only once it has been called
``build_after`` times: a process that predicts a few tiles never pays for a graph it would hardly use. And a
graph is kept only if it is faster: oneDNN's prepacked kernels win where reordering the weights dominates a
forward (small networks, small tiles) and lose where converting large activations does (measured: a 96×128×128
tile of nnU-Net's 6-stage IXI network, 7 s eager, 10.5 s frozen); after the check, ``PROBE`` graph calls are
timed against the eager calls and a graph less than ``min_speedup`` times faster is dropped for the eager model.
Building, checking and probing cost about five eager calls, which a large network never wins back: a key whose
fastest eager call took longer than ``max_eager_s`` gets no graph at all (measured: 4.9 s per 96×128×128 tile of
nnU-Net's IXI network eager; trace, check and probes added 18–30 s to a 4-case prediction, 2 tiles a case).
A frozen graph holds a copy of the weights of the moment it was built: freeze a trained model for prediction,
never one that is still training.
"""

from __future__ import annotations

import itertools
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

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
    forward: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
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
    """Sliding-window logits of one image: the one tile path of validation and prediction.

    Args:
        forward: ``forward(tiles (N, C, *P)) -> (N, K, *P)`` logits, a closure in which the caller has bound
            the model (eval mode, or a :class:`FrozenForward`) and what it needs besides the image: modality,
            tasks, dataset, prompts (see :meth:`mosaicseg.inference.predictor.Predictor.tile_forward`).
        image: ``(C, *S)`` float tensor (any device; tiles are moved to ``device``).
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
    # a forward with ``wants_window`` (prompted prediction) also gets each tile's place in the (mirrored) image
    windowed = bool(getattr(forward, "wants_window", False))
    shape = tuple(int(n) for n in image.shape[1:])
    offset = [max(int(p) - n, 0) // 2 for p, n in zip(patch_size, shape, strict=True)]  # MONAI pads both sides
    flip: tuple[int, ...] = ()

    def tiles(x: torch.Tensor, coords: Any = None) -> torch.Tensor:
        # autocast's own dtype per device: bfloat16 on the CPU, float16 on CUDA
        with torch.autocast(device.type, enabled=amp and device.type in ("cpu", "cuda")):
            if windowed:
                windows = [
                    [(int(sl.start) - o, int(sl.stop) - o) for sl, o in zip(c[2:], offset, strict=True)] for c in coords
                ]
                out = forward(x.float(), windows, flip, shape)  # type: ignore[call-arg]
            else:
                out = forward(x.float())
        out = out.index_select(1, select) if select is not None else out
        return out.to(accumulate)

    # MONAI blends in the input's dtype: a half input gives half output buffers (tiles are cast back above)
    x = image.unsqueeze(0).to(accumulate)
    total: torch.Tensor | None = None
    flips = mirror_combinations(tuple(mirror_axes))
    for flip in flips:  # tiles() reads the current mirroring
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
            with_coord=windowed,
        )
        out = torch.flip(out, dims) if dims else out
        total = out if total is None else total.add_(out)
    assert total is not None  # at least the identity flip
    if len(flips) > 1:
        total /= len(flips)
    return total[0]


class TileModel(torch.nn.Module):
    """``model`` with the tasks and dataset of one prediction bound: ``(image (N, C, *P), modality (N,)) ->
    logits (N, K, *P)`` (the first, full-resolution level of the model's :class:`~mosaicseg.types.ModelOutput`).

    The two-argument form is what :class:`FrozenForward` traces; ``tasks`` ``(K,)`` bool and ``dataset`` are
    constants of the graph, so a frozen graph is built per binding.
    """

    def __init__(self, model: torch.nn.Module, tasks: torch.Tensor, dataset: int) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("tasks", tasks.bool().reshape(1, -1), persistent=False)
        self.dataset = int(dataset)

    @classmethod
    def asking(cls, model: torch.nn.Module, num_tasks: int, tasks: Sequence[int], dataset: int) -> TileModel:
        """``model`` asked for the global task indices ``tasks`` of ``num_tasks`` (the mask on the model's device)."""
        device = next(model.parameters()).device
        wanted = torch.zeros(num_tasks, dtype=torch.bool, device=device)
        wanted[list(tasks)] = True
        return cls(model, wanted, dataset)

    def forward(self, image: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        n = image.shape[0]
        dataset = torch.full((n,), self.dataset, dtype=torch.long, device=image.device)
        return self.model(image, modality, tasks=self.tasks.expand(n, -1), dataset=dataset).logits[0]


def bind_modality(
    model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], modality: int
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``model(tiles, modality)`` (a :class:`TileModel` or a :class:`FrozenForward` of one) as the one-argument
    tile forward :func:`predict_logits` calls, every tile of the image having ``modality``."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        return model(x, torch.full((x.shape[0],), modality, dtype=torch.long, device=x.device))

    return forward


# largest |frozen - eager| allowed, relative to max(1, max |eager|): oneDNN's blocked kernels only reorder
# float32 sums (~1e-6 relative), a wrong graph is off by O(1)
TOLERANCE = 1e-3
# calls of a key before its graph is built (the build, ~1 forward + optimisation, then pays off within a few calls)
BUILD_AFTER = 4
# graph calls timed after the check before the graph is kept or dropped, and the speed-up it must show
PROBE = 2
MIN_SPEEDUP = 1.1
# eager seconds per call above which a key is never frozen: measured gains were at ~0.19 s per call (16–128
# network, 1.7x), none at ~0.4 s (32–256) and a loss at ~7 s (32–320); the probes bound the cost of a wrong guess
MAX_EAGER_S = 0.3

_Key = tuple[tuple[int, ...], torch.dtype, tuple[int, ...]]


@dataclass
class _Entry:
    calls: int = 0
    graph: Callable[..., torch.Tensor] | None = None
    verified: bool = False
    failed: bool = False
    eager_s: float = float("inf")  # fastest eager call of this key
    graph_s: float = float("inf")  # fastest timed graph call
    probes: int = 0  # graph calls timed so far


class _Capture(torch.nn.Module):
    """Keeps the output of the traced run: tracing computes the eager result anyway, so it is not recomputed."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.output: torch.Tensor | None = None

    def forward(self, image: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        out = self.model(image, modality)
        self.output = out
        return out


class FrozenForward:
    """``model(image, modality)`` through a per-key frozen graph; same signature and result as the model.

    Args:
        model: ``model(image (N, C, *P), modality (N,) long) -> (N, K, *P)``, in eval mode, on the CPU.
        build_after: calls of a key (tile shape, dtype, modalities) served eagerly before its graph is built;
            the next call checks the graph against the eager model, later calls run the graph alone.
        min_speedup: eager seconds / graph seconds (fastest of each) below which a checked graph is dropped
            after ``PROBE`` timed calls; ``None`` keeps every checked graph.
        max_eager_s: a key whose fastest eager call took longer stays eager (no trace, no check); ``None``:
            every key is frozen once called ``build_after`` times.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        build_after: int = BUILD_AFTER,
        min_speedup: float | None = MIN_SPEEDUP,
        max_eager_s: float | None = MAX_EAGER_S,
    ) -> None:
        if model.training:
            raise ValueError("freeze a model in eval mode: a frozen graph keeps the weights of the moment")
        if build_after < 1:
            raise ValueError(f"build_after must be at least 1, got {build_after}")
        self.model = model
        self.build_after = int(build_after)
        self.min_speedup = min_speedup
        self.max_eager_s = max_eager_s
        self._entries: dict[_Key, _Entry] = {}

    @property
    def num_graphs(self) -> int:
        """How many keys run through a checked frozen graph (kept, or still being timed)."""
        return sum(e.verified for e in self._entries.values())

    @torch.no_grad()
    def __call__(self, image: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        """``(N, C, *P)``, ``(N,)`` → ``(N, K, *P)`` logits."""
        key = (tuple(image.shape), image.dtype, tuple(int(m) for m in modality.tolist()))
        entry = self._entries.setdefault(key, _Entry())
        if entry.verified:
            assert entry.graph is not None
            if self.min_speedup is None or entry.probes >= PROBE:
                return entry.graph(image, modality)
            return self._probe(entry, image, modality)
        if entry.failed:
            return self.model(image, modality)
        if entry.graph is not None:
            return self._check(entry, key, image, modality)
        entry.calls += 1
        if entry.calls < self.build_after:
            return self._eager(entry, image, modality)
        if self.max_eager_s is not None and self.max_eager_s < entry.eager_s < float("inf"):
            entry.failed = True  # too large to gain: a speed decision, not a fault, so no warning
            return self.model(image, modality)
        return self._trace(entry, key, image, modality)

    def _eager(self, entry: _Entry, image: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        out = self.model(image, modality)
        entry.eager_s = min(entry.eager_s, time.perf_counter() - t0)
        return out

    def _probe(self, entry: _Entry, image: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        assert entry.graph is not None and self.min_speedup is not None
        t0 = time.perf_counter()
        out = entry.graph(image, modality)
        entry.graph_s = min(entry.graph_s, time.perf_counter() - t0)
        entry.probes += 1
        if entry.probes >= PROBE and entry.eager_s < self.min_speedup * entry.graph_s:
            # slower or barely faster: a speed decision, not a fault, so no warning
            entry.verified, entry.failed, entry.graph = False, True, None
        return out

    def _warn(self, entry: _Entry, key: _Key, why: str) -> None:
        entry.failed, entry.graph = True, None
        warnings.warn(
            f"{type(self.model).__name__}: {why} for tiles {list(key[0])}; predicting with the eager model "
            "(slower, same result).",
            RuntimeWarning,
            stacklevel=4,
        )

    def _trace(self, entry: _Entry, key: _Key, image: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        capture = _Capture(self.model)
        try:
            with warnings.catch_warnings():
                # the tracer warns about every Python-side decision it records (per key these are constants,
                # and the check on the next call catches those that are not). TorchScript is deprecated in
                # favour of torch.compile, which on CPU needs a C++ compiler at run time and compiles for longer
                # than a prediction takes (speed study: 28 s for the 16–128 network; nnU-Net's 32–256 network
                # failed to lower); should a later torch drop TorchScript, the except below keeps prediction
                # working, eagerly
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                warnings.simplefilter("ignore", DeprecationWarning)
                traced = torch.jit.trace(capture, (image, modality), check_trace=False)
                output = capture.output
                entry.graph = torch.jit.optimize_for_inference(traced)
        # any failure of tracing or of the optimiser only costs speed: the eager model is always right
        except Exception as err:
            self._warn(entry, key, f"could not freeze the forward ({type(err).__name__}: {str(err)[:200]})")
            return self.model(image, modality)
        assert output is not None  # the traced run went through _Capture.forward
        return output

    def _check(self, entry: _Entry, key: _Key, image: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        reference = self._eager(entry, image, modality)
        assert entry.graph is not None
        try:
            got = entry.graph(image, modality)
        except Exception as err:  # e.g. a shape check the trace baked in
            self._warn(entry, key, f"the frozen graph failed ({type(err).__name__}: {str(err)[:200]})")
            return reference
        same = got.shape == reference.shape
        error = float((got.float() - reference.float()).abs().max()) if same else float("inf")
        allowed = TOLERANCE * max(1.0, float(reference.abs().max()))
        if not error <= allowed:  # also catches NaN
            self._warn(
                entry,
                key,
                f"the frozen graph differs from the eager model by {error:.3g} (allowed {allowed:.3g}): the "
                "forward depends on something tracing cannot see, or a deep network amplifies the graph's rounding",
            )
        else:
            entry.verified = True
        return reference
