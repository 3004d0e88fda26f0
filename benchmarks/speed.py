"""``python -m benchmarks speed``: how close a training step comes to this CPU's convolution peak, and where the
rest of the time goes.

- **peak**: the best FLOP/s of large 3D convolutions (channels-last, 64-256 channels; forward, and forward +
  backward), the ceiling a U-Net step can approach;
- **step**: a full training step as the Trainer runs it (forward, MultiTalent loss with deep supervision,
  backward, gradient clipping, optimiser step) on random data, FLOPs counted by
  ``torch.utils.flop_counter``; for two networks (the brain4 CPU plan and nnU-Net's Dataset001 plan) and two
  layouts: *before* (instance norm, contiguous tensors) and *now* (instance norm as ``GroupNorm(C, C)``,
  channels-last, as :func:`mosaicseg.models.use_device_layout` sets on CPU);
- **profile**: the operators that dominate the *now* step (torch profiler, self CPU time);
- **inference forward**: one tile's forward at prediction time, in milliseconds: nnU-Net's own network as its
  predictor runs it (in nnU-Net's environment, if installed), MosaicSeg's eager model (channels-last,
  ``no_grad``), the same under bf16 autocast (``--precision mixed``, what ``mosaicseg predict`` runs on CPUs
  with native bf16) and its frozen graph (:class:`mosaicseg.inference.sliding_window.FrozenForward`, what it runs in
  float32 where faster), the frozen graph on the 8 mirrors of TTA in one batch (per tile), and ``torch.compile``
  (inductor) with its compile time;
- **data**: the training data pipeline as a run uses it (the Trainer's loader on brain4's preprocessed real data:
  case sampling, patch cropping, augmentation, targets, collate; in the training process, as ``--workers 0``),
  seconds per batch against the step, and where its time goes (cProfile, cumulative).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from benchmarks.common import plain_network

# (name, network plan, tasks, optimizer); the nnU-Net plan is its Dataset001 3d_fullres in MosaicSeg axes
NETWORKS: list[tuple[str, dict[str, Any], int, str]] = [
    (
        "brain4 CPU plan",
        {"patch_size": [48, 48, 48], "features": [16, 32, 64, 128], "batch_size": 2},
        21,
        "adamw",
    ),
    (
        "nnU-Net Dataset001 plan",
        {"patch_size": [40, 56, 40], "features": [32, 64, 128, 256], "batch_size": 7},
        2,
        "sgd",
    ),
]


# inference forward only: a training step of this network takes about a minute, a tile's forward ~5 s; nnU-Net's
# Dataset003 (IXI, 2 mm) 3d_fullres network, whose one tile covers a whole head
INFERENCE_ONLY: list[tuple[str, dict[str, Any], int, str]] = [
    (
        "nnU-Net Dataset003 plan",
        {"patch_size": [96, 128, 128], "features": [32, 64, 128, 256, 320, 320], "batch_size": 2},
        4,
        "sgd",
    ),
]


def _timed(fn: Any, repeats: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def _best(fn: Any, repeats: int) -> float:
    """Fastest of ``repeats`` calls after two warm-up calls (a TorchScript graph specialises on its first runs)."""
    fn()
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def inference_forward(
    networks: list[tuple[str, dict[str, Any], int, str]], repeats: int, compile_too: bool, mirrors_too: bool = True
) -> dict[str, Any]:
    """Per network: ms of one tile's forward (see the module docstring) and the seconds that building the
    frozen graph costs once per prediction process and tile shape beyond the eager forwards it replaces
    (tracing, optimising, the graph's run when it is checked against eager), and which of the two ``mosaicseg
    predict`` runs (:class:`FrozenForward`'s rules: eager beyond ``MAX_EAGER_S`` per call or when the graph is
    less than ``MIN_SPEEDUP`` times faster); ``compile_too``: also ``torch.compile`` (inductor), the alternative
    PyTorch recommends, and its compile time; ``mirrors_too``: also the 8 mirrors of TTA in one batch."""
    import json
    import subprocess

    from benchmarks.common import ROOT
    from mosaicseg.inference.predictor import resolve_precision
    from mosaicseg.inference.sliding_window import MAX_EAGER_S, MIN_SPEEDUP, FrozenForward, TileModel
    from mosaicseg.models import build_model, use_device_layout

    try:
        from benchmarks.nnunet import default_nnunet_python

        nnunet_python: str | None = default_nnunet_python()
    except SystemExit:  # nnunetv2 is an optional extra: its column stays empty
        nnunet_python = None
    rows: dict[str, Any] = {}
    for name, network, tasks, _ in networks:
        torch.manual_seed(0)
        net = build_model(plain_network(network), {"T1": 1}, tasks).eval()
        use_device_layout(net, torch.device("cpu"))
        model = TileModel(net, torch.ones(tasks, dtype=torch.bool), 0).eval()  # what predict freezes and runs
        patch = network["patch_size"]
        x1, m1 = torch.randn(1, 1, *patch), torch.zeros(1, dtype=torch.long)
        with torch.no_grad():
            eager = _best(lambda model=model, x1=x1, m1=m1: model(x1, m1), repeats)
            with torch.autocast("cpu", dtype=torch.bfloat16):  # predict's --precision mixed on CPU
                mixed = _best(lambda model=model, x1=x1, m1=m1: model(x1, m1), repeats)
        # the graph is timed whatever its speed or the model's size (predict_runs below applies predict's rules)
        frozen = FrozenForward(model, build_after=1, min_speedup=None, max_eager_s=None)
        t0 = time.perf_counter()
        frozen(x1, m1)  # traced (its eager result returned)
        frozen(x1, m1)  # checked against an eager forward
        build_s = time.perf_counter() - t0 - 2 * eager  # what the two calls cost beyond two eager forwards
        checked = frozen.num_graphs == 1  # else the graph differed from eager: the timings below are eager's
        frozen_s = _best(lambda frozen=frozen, x1=x1, m1=m1: frozen(x1, m1), repeats)
        mirrors = None
        if mirrors_too:
            x8, m8 = torch.randn(8, 1, *patch), torch.zeros(8, dtype=torch.long)
            mirrors = _best(lambda frozen=frozen, x8=x8, m8=m8: frozen(x8, m8), max(1, repeats // 2)) / 8
        compiled_ms = compile_s = compile_error = None
        if compile_too:
            try:
                compiled = torch.compile(model)
                with torch.no_grad():
                    t0 = time.perf_counter()
                    compiled(x1, m1)
                    compile_s = time.perf_counter() - t0
                    compiled_ms = 1e3 * _best(lambda compiled=compiled, x1=x1, m1=m1: compiled(x1, m1), repeats)
            except Exception as err:  # a missing C++ compiler is a finding, not a crash of the study
                compile_error = f"{type(err).__name__}: {str(err)[:200]}"
        nnunet_ms = None
        if nnunet_python is not None:
            args = [json.dumps(network["features"]), json.dumps(patch), str(tasks + 1), str(repeats)]
            out = subprocess.run(
                [nnunet_python, str(ROOT / "benchmarks" / "nnunet_runner.py"), "forward", *args],
                capture_output=True,
                text=True,
                check=True,
            )
            nnunet_ms = json.loads(out.stdout.strip().splitlines()[-1])["ms"]
        rows[name] = {
            "patch_size": patch,
            "features": network["features"],
            "nnunet_ms": nnunet_ms,
            "eager_ms": 1e3 * eager,
            "frozen_ms": 1e3 * frozen_s,
            "frozen_8_mirrors_ms_per_tile": None if mirrors is None else 1e3 * mirrors,
            "mixed_ms": 1e3 * mixed,
            "frozen_checked": checked,
            "predict_runs": (
                "mixed"
                if resolve_precision("auto", torch.device("cpu"))
                else "frozen"
                if checked and eager <= MAX_EAGER_S and eager >= MIN_SPEEDUP * frozen_s
                else "eager"
            ),
            "frozen_build_s": build_s,
            "compiled_ms": compiled_ms,
            "compile_s": compile_s,
            "compile_error": compile_error,
        }
    return rows


def peak_conv(repeats: int) -> dict[str, Any]:
    from torch.utils.flop_counter import FlopCounterMode

    rows = []
    for channels, size in ((64, 32), (128, 24), (256, 12)):
        conv = torch.nn.Conv3d(channels, channels, 3, padding=1).to(memory_format=torch.channels_last_3d)
        x = torch.randn(2, channels, size, size, size).to(memory_format=torch.channels_last_3d).requires_grad_()
        for mode in ("forward", "forward+backward"):

            def run(conv: torch.nn.Module = conv, x: torch.Tensor = x, mode: str = mode) -> None:
                y = conv(x)
                if mode != "forward":
                    y.sum().backward()

            with FlopCounterMode(display=False) as counter:
                run()
            seconds = _timed(run, repeats)
            rows.append(
                {
                    "channels": channels,
                    "size": size,
                    "mode": mode,
                    "gflop_per_s": counter.get_total_flops() / seconds / 1e9,
                }
            )
    return {
        "rows": rows,
        "peak_forward_gflop_per_s": max(r["gflop_per_s"] for r in rows if r["mode"] == "forward"),
        "peak_forward_backward_gflop_per_s": max(r["gflop_per_s"] for r in rows if r["mode"] != "forward"),
    }


def _as_instance_norm(model: torch.nn.Module) -> None:
    """Undo the GroupNorm(C, C) swap (the *before* layout) — the same function, PyTorch's instance norm op."""
    for name, child in model.named_children():
        if isinstance(child, torch.nn.GroupNorm) and child.num_groups == child.num_channels:
            norm = torch.nn.InstanceNorm3d(child.num_channels, eps=child.eps, affine=child.affine)
            setattr(model, name, norm)
        else:
            _as_instance_norm(child)


# candidate speed-ups measured for MosaicSeg's CPU plan and any *now* step below the target: the model under
# torch.compile (inductor fuses each norm and activation with its neighbours, backward included), and the *before*
# layout under bf16 autocast (only on CPUs with native bf16; a reduced-precision step, so its FLOP/s are not the
# float32 peak's kind)
CANDIDATES = ("now+compile", "before+bf16")


def training_step(
    network: dict[str, Any], tasks: int, optimizer: str, layout: str, repeats: int, gflop: float | None = None
) -> dict[str, Any]:
    """Seconds of one training step (forward, deep-supervision loss, backward, clipping, optimiser) in ``layout``:
    ``before`` | ``now``, optionally ``+compile`` or ``+bf16`` (:data:`CANDIDATES`). ``gflop``: the step's count
    from an eager layout, reused for the candidates (the FLOP counter does not see into compiled graphs); the
    compiled step's first call, its compile time, is reported apart."""
    from torch.utils.flop_counter import FlopCounterMode

    from mosaicseg.models import build_model
    from mosaicseg.training.losses import deep_supervision_loss

    base, _, variant = layout.partition("+")
    torch.manual_seed(0)
    model = build_model(plain_network(network), {"T1": 1}, tasks)
    if base == "before":
        _as_instance_norm(model)
    else:
        model.set_channels_last(True)
    forward = torch.compile(model) if variant == "compile" else model
    model.train()
    b, patch = network["batch_size"], network["patch_size"]
    image = torch.randn(b, 1, *patch)
    modality = torch.zeros(b, dtype=torch.long)
    target = (torch.rand(b, tasks, *patch) > 0.9).float()
    label_mask = torch.ones(b, tasks, dtype=torch.bool)
    opt = (
        torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.99, nesterov=True)
        if optimizer == "sgd"
        else torch.optim.AdamW(model.parameters(), lr=1e-3)
    )

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=variant == "bf16"):
            outputs = forward(image, modality).logits
        # the loss in float32 (the partial-label loss casts its inputs to float32 in any case)
        outputs = [o.float() for o in outputs]
        loss = deep_supervision_loss(outputs, target, label_mask)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 12.0)
        opt.step()

    first = time.perf_counter()
    step()
    first_s = time.perf_counter() - first
    if gflop is None:
        with FlopCounterMode(display=False) as counter:
            step()
        gflop = counter.get_total_flops() / 1e9
    else:
        step()
    seconds = _timed(step, repeats)
    out = {"seconds": seconds, "gflop": gflop, "gflop_per_s": gflop / seconds, "_step": step}
    return out | ({"compile_s": first_s} if variant == "compile" else {})


def data_pipeline(batches: int = 30) -> dict[str, Any] | None:
    """Seconds per batch of the Trainer's loader on brain4's preprocessed data (``None`` before the paradigms
    study has planned it), after ``batches`` warm-up batches; and its cProfile (top functions, cumulative)."""
    import cProfile
    import pstats
    import tempfile
    from pathlib import Path

    from benchmarks.common import WORK
    from mosaicseg.config import TrainConfig
    from mosaicseg.training.loop import Trainer

    workdir = WORK / "brain4"
    if not (workdir / "plans.json").is_file():
        return None
    config = TrainConfig(recipe="universal", fold=0, iterations=3 * batches, device="cpu", seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(workdir, config, Path(tmp) / "run", progress=False)
        batch_iter = iter(trainer._loader())
        for _ in range(batches):  # warm-up: first reads of the memory-mapped cases
            next(batch_iter)
        t0 = time.perf_counter()
        for _ in range(batches):
            next(batch_iter)
        seconds = (time.perf_counter() - t0) / batches
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(batches):
            next(batch_iter)
        prof.disable()
    stats = pstats.Stats(prof)
    total = sum(v[2] for v in stats.stats.values())  # type: ignore[attr-defined]

    def name(file: str, line: int, fn: str) -> str:
        return fn if file == "~" else f"{Path(file).name}:{line} {fn}"

    # stages: MosaicSeg's own functions by cumulative time; hot spots: any function by its own time
    stages = sorted(((k, v) for k, v in stats.stats.items() if "mosaicseg" in k[0]), key=lambda kv: -kv[1][3])  # type: ignore[attr-defined]
    hot = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])  # type: ignore[attr-defined]
    top_stages = [
        {"function": name(*k), "ms_per_batch": v[3] * 1e3 / batches, "share": v[3] / total} for k, v in stages[:10]
    ]
    top_self = [{"function": name(*k), "ms_per_batch": v[2] * 1e3 / batches, "share": v[2] / total} for k, v in hot[:8]]
    return {
        "workdir": "brain4 (Dataset001-004, universal recipe)",
        "batch_size": trainer.batch_size,
        "patch_size": list(trainer.patch_size),
        "seconds_per_batch": seconds,
        "stages_cumulative": top_stages,
        "hot_spots_self": top_self,
    }


def study_speed(repeats: int = 4) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.common import QUICK
    from benchmarks.report import STEP_PEAK_TARGET
    from mosaicseg.runtime import native_bf16

    # quick: one timed repeat, the small network only (the nnU-Net plan's step takes ~10 s)
    repeats, networks = (1, NETWORKS[:1]) if QUICK else (repeats, NETWORKS)
    peak = peak_conv(repeats)
    steps: dict[str, Any] = {}
    failed: dict[str, str] = {}
    profiles: dict[str, Any] = {}
    for name, network, tasks, optimizer in networks:
        for layout in ("before", "now"):
            result = training_step(network, tasks, optimizer, layout, repeats)
            step = result.pop("_step")
            result["fraction_of_forward_peak"] = result["gflop_per_s"] / peak["peak_forward_gflop_per_s"]
            steps[f"{name} / {layout}"] = result
            if layout == "now":
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    step()
                events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
                total = sum(e.self_cpu_time_total for e in events)
                profiles[name] = [
                    {"op": e.key, "self_cpu_ms": e.self_cpu_time_total / 1e3, "share": e.self_cpu_time_total / total}
                    for e in events[:10]
                ]
                # MosaicSeg's own CPU plan (the first network), where non-convolution work weighs most, and any
                # step below the target
                below = result["fraction_of_forward_peak"] < STEP_PEAK_TARGET
                if (below or name == NETWORKS[0][0]) and not QUICK:
                    for candidate in CANDIDATES:
                        if candidate.endswith("bf16") and not native_bf16():
                            continue  # emulated bf16 is slower than float32: no candidate there
                        try:
                            cand = training_step(network, tasks, optimizer, candidate, repeats, gflop=result["gflop"])
                        except Exception as exc:  # e.g. an inductor lowering error: one failed row, not the study
                            failed[f"{name} / {candidate}"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                            continue
                        cand.pop("_step")
                        cand["fraction_of_forward_peak"] = cand["gflop_per_s"] / peak["peak_forward_gflop_per_s"]
                        steps[f"{name} / {candidate}"] = cand
    forward = inference_forward(networks, 2 if QUICK else 5, compile_too=not QUICK)
    if not QUICK:
        forward |= inference_forward(INFERENCE_ONLY, 2, compile_too=False, mirrors_too=False)
    data = data_pipeline(5 if QUICK else 30)
    if data is not None:
        data["share_of_step"] = data["seconds_per_batch"] / (
            data["seconds_per_batch"] + steps[f"{NETWORKS[0][0]} / now"]["seconds"]
        )
    return {
        "data": data,
        "setting": f"random data, torch threads {torch.get_num_threads()}, {repeats} timed steps after 2 warm-up "
        "steps; FLOPs by torch.utils.flop_counter (convolutions and matmuls)",
        "networks": {n: {**net, "tasks": t, "optimizer": o} for n, net, t, o in networks},
        "peak": peak,
        "steps": steps,
        "failed_candidates": failed,
        "profiles": profiles,
        "inference_forward": forward,
    }
