"""``python -m benchmarks transfer``: is a pre-trained universal model a better start than random weights?

(a) MultiTalent's Table 2 in miniature: ``universal`` pre-trained on ``collections/mri5.yaml`` (Dataset002–005
    and 007: no hippocampus crops at 1 mm, no left atrium), then ``mosaicseg finetune`` on Dataset001_Hippocampus
    and, separately, on Dataset008_LeftAtrium (planned with ``--network-from`` the pre-trained run), against
    ``mosaicseg train`` from scratch with the same iterations, seeds 0–2; final validation pseudo-Dice on every
    held-out case of fold 0; mean ± sd and a one-sided paired t-test (fine-tuned > scratch, pairs by seed).
(b) Hermes' Table 3 in miniature: ``hermes`` pre-trained on the same collection (without Dataset008), then on
    1, 8, 32 and all training cases of Dataset008 (``--cases``, drawn with the seed): scratch (``train --recipe
    hermes``) vs ``finetune`` vs ``extend``, draws 0–2, the same iterations each.
(c) The cost: the first validation of each (a) fine-tuning run at or above the same seed's scratch model's final
    Dice (iterations and minutes), from the validations every ``VAL_EVERY`` epochs.

Fine-tuning uses MultiTalent's schedule at the study's scale: the paper trains the heads alone for 10 and warms
the rest up over 50 of 1,000 epochs (1 % and 5 % of training); here an epoch is 1 % of the run's iterations, so
``--head-epochs 1 --warmup-epochs 5`` are the same shares. Every finished run is reused and an interrupted one
resumed (``--resume``); every finished step (an (a) pair, a (b) trio) is recorded in the study's ledger
(``benchmarks/results/ledger/transfer.json``, committed), so the study spans sittings and fresh clones (a sitting
pre-trains again only if it has a step left to measure). ``MOSAICSEG_BENCH_QUICK=1`` checks the plumbing with a
few iterations.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from functools import cache, partial
from pathlib import Path
from typing import Any

from benchmarks.common import QUICK, ROOT, SHARED, WORK, Ledger, finished, last_metrics, optimizer_setting, run_cli
from benchmarks.common import mean_sd as _ms
from mosaicseg.config import recipe_optimizer

MRI5 = ROOT / "collections" / "mri5.yaml"
TARGETS = ("Dataset001_Hippocampus", "Dataset008_LeftAtrium")
HERMES_TARGET = "Dataset008_LeftAtrium"
SEEDS = (0, 1, 2)
SIZES: tuple[int | None, ...] = (1, 8, 32, None)  # training cases of the target (None: all of fold 0's)
PRE_ITERATIONS = 3000  # pre-training, each recipe
A_ITERATIONS = 600  # (a): every fine-tuning and scratch run
B_ITERATIONS = 300  # (b): every run
EPOCHS = 100  # epochs per run: an epoch is 1 % of it (MultiTalent's schedule in shares, see the docstring)
HEAD_EPOCHS, WARMUP_EPOCHS = 1, 5
VAL_EVERY = 10  # epochs between validations of (a): ten points per curve for (c)


def _area() -> Path:
    return WORK / "transfer"


def _run(args: list[str], run: Path, iterations: int, log: str) -> None:
    """``mosaicseg ARGS -o RUN`` unless RUN finished; resumed where it stopped."""
    if finished(run, iterations):
        return
    resume = ["--resume"] if (run / "checkpoint_latest.pt").is_file() else []
    run_cli([*args, "-o", str(run), *resume], _area() / "logs" / f"{log}.log")


def _common(iterations: int, seed: int, val_every: int) -> list[str]:
    per_epoch = max(1, iterations // EPOCHS)
    return ["--iterations", str(iterations), "--iterations-per-epoch", str(per_epoch), "--seed", str(seed),
            "--fold", "0", "--device", "cpu", "--val-every", str(val_every), "--val-max-cases", "0",
            "--val-mode", "cases"]  # fmt: skip


def pretrain(recipe: str, iterations: int) -> Path:
    """The pre-trained ``recipe`` model on mri5 (its fold folder), trained once."""
    workdir = _area() / "mri5"
    if not (workdir / "plans.json").is_file():
        # --anisotropy keep: ACDC at its own 10 mm slices, as the sources every step was measured from
        run_cli(["plan", str(MRI5), "-o", str(workdir), "--anisotropy", "keep"], _area() / "logs" / "mri5_plan.log")
    run = workdir / "runs" / f"{recipe}_pre"
    args = ["train", str(workdir), "--recipe", recipe, "--iterations", str(iterations), "--iterations-per-epoch",
            str(max(1, iterations // 20)), "--seed", "0", "--fold", "0", "--device", "cpu",
            "--val-every", "100000"]  # fmt: skip
    _run(args, run, iterations, f"pre_{recipe}")
    return run


def target_workdir(dataset: str, source: Path) -> Path:
    """``dataset`` planned on ``source``'s network and preprocessed (once)."""
    workdir = _area() / dataset.split("_")[0]
    if not (workdir / "plans.json").is_file():
        run_cli(["plan", str(SHARED / dataset), "-o", str(workdir), "--network-from", str(source)],
                _area() / "logs" / f"plan_{dataset}.log")  # fmt: skip
    return workdir


def _curve(run: Path, dataset: str) -> list[tuple[int, float, float]]:
    """``(iteration, elapsed s, validation Dice of dataset)`` of every validated epoch of ``run``."""
    out = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if dataset in (record.get("val_dice") or {}):
            out.append((int(record["iteration"]), float(record["elapsed_s"]), float(record["val_dice"][dataset])))
    return out


def study_a(source: Callable[[], Path], iterations: int, seeds: tuple[int, ...], ledger: Ledger) -> dict[str, Any]:
    """(a): per target and seed, a scratch and a fine-tuned run, one ledger step (``source``: the pre-trained run,
    trained on first call: a clone whose ledger holds every step needs none)."""
    runs: dict[str, Any] = {}
    for dataset in TARGETS:
        short = dataset.split("_")[0]
        for seed in seeds:
            setting = {"iterations": iterations, "seed": seed, "schedule": [HEAD_EPOCHS, WARMUP_EPOCHS, EPOCHS],
                       "val_every": VAL_EVERY, "source": _source_setting()}  # fmt: skip
            pair = ledger.step(f"a/{short}/s{seed}", setting, partial(_pair_a, source, dataset, iterations, seed))
            runs.update({f"{short}/{mode}/s{seed}": entry for mode, entry in pair.items()})
    return runs


def _pair_a(source: Callable[[], Path], dataset: str, iterations: int, seed: int) -> dict[str, Any]:
    workdir = target_workdir(dataset, source())
    short = dataset.split("_")[0]
    common = _common(iterations, seed, VAL_EVERY)
    scratch = workdir / "runs" / f"scratch_s{seed}"
    _run(["train", str(workdir), "--recipe", "universal", *common], scratch, iterations, f"a_{short}_scratch_s{seed}")
    tuned = workdir / "runs" / f"finetune_s{seed}"
    _run(["finetune", str(source()), "--dataset", str(workdir), *common, "--head-epochs", str(HEAD_EPOCHS),
          "--warmup-epochs", str(WARMUP_EPOCHS)], tuned, iterations, f"a_{short}_finetune_s{seed}")  # fmt: skip
    out = {}
    for mode, run in (("scratch", scratch), ("finetune", tuned)):
        out[mode] = {
            "dataset": dataset, "mode": mode, "seed": seed, "run": str(run), "curve": _curve(run, dataset),
            "init_report": json.loads((run / "init_report.json").read_text()) if mode == "finetune" else None,
        }  # fmt: skip
    return out


def study_b(
    source: Callable[[], Path], iterations: int, seeds: tuple[int, ...], sizes: tuple[int | None, ...], ledger: Ledger
) -> dict[str, Any]:
    """(b): per number of training cases and draw, scratch, finetune and extend, one ledger step."""
    runs: dict[str, Any] = {}
    for size in sizes:
        for seed in seeds:
            tag = f"n{size or 'all'}_s{seed}"
            setting = {"iterations": iterations, "seed": seed, "cases": size, "source": _source_setting("hermes")}
            trio = ledger.step(f"b/{tag}", setting, partial(_trio_b, source, iterations, seed, size))
            runs.update({f"{mode}/{tag}": entry for mode, entry in trio.items()})
    return runs


def _trio_b(source: Callable[[], Path], iterations: int, seed: int, size: int | None) -> dict[str, Any]:
    workdir = target_workdir(HERMES_TARGET, source())
    common = _common(iterations, seed, 100000)
    subset = ["--cases", str(size)] if size is not None else []
    tag = f"n{size or 'all'}_s{seed}"
    jobs = {
        "scratch": ["train", str(workdir), "--recipe", "hermes", *common, *subset],
        "finetune": ["finetune", str(source()), "--dataset", str(workdir), *common, *subset,
                     "--head-epochs", str(HEAD_EPOCHS), "--warmup-epochs", str(WARMUP_EPOCHS)],
        "extend": ["extend", str(source()), "--dataset", str(workdir), *common, *subset],
    }  # fmt: skip
    out = {}
    for mode, args in jobs.items():
        run = workdir / "runs" / f"hermes_{mode}_{tag}"
        _run(args, run, iterations, f"b_{mode}_{tag}")
        trained = json.loads((run / "train_cases.json").read_text())
        out[mode] = {
            "mode": mode, "cases": size, "seed": seed, "run": str(run),
            "dice": last_metrics(run)["val_dice"][HERMES_TARGET], "train_cases": len(trained),
        }  # fmt: skip
    return out


def _source_record(pretrained: Callable[[], Path]) -> dict[str, Any]:
    """The pre-trained model's own final validation pseudo-Dice per pre-training dataset: how good a start it is."""
    last = last_metrics(pretrained())
    return {"iteration": last["iteration"], "val_dice": last["val_dice"], "val_mean": last["val_mean"]}


def _pre_iterations() -> int:
    return 4 if QUICK else PRE_ITERATIONS


def _source_setting(recipe: str = "universal") -> dict[str, Any]:
    """What a pre-trained model is made from: a step measured on another one is measured again."""
    return {"recipe": recipe, "collection": MRI5.name, "iterations": _pre_iterations(), "seed": 0,
            **optimizer_setting(recipe)}  # fmt: skip


def study_transfer() -> dict[str, Any]:
    """See the module docstring."""
    pre_its = _pre_iterations()
    a_its, b_its = (4, 4) if QUICK else (A_ITERATIONS, B_ITERATIONS)
    seeds = SEEDS[:1] if QUICK else SEEDS
    sizes = (1, None) if QUICK else SIZES
    ledger = Ledger("transfer")
    universal = cache(partial(pretrain, "universal", pre_its))
    hermes = cache(partial(pretrain, "hermes", pre_its))
    a = study_a(universal, a_its, seeds, ledger)
    b = study_b(hermes, b_its, seeds, sizes, ledger)
    # after the steps that use them: a pre-trained model is trained (again) only if a step needs it
    sources = {
        recipe: ledger.step(f"pre/{recipe}", _source_setting(recipe), partial(_source_record, fn), counted=False)
        for recipe, fn in (("universal", universal), ("hermes", hermes))
    }
    mri5 = _area() / "mri5"
    if not (mri5 / "plans.json").is_file():  # every step from the ledger: the plan alone, for the report
        run_cli(["plan", str(MRI5), "-o", str(mri5), "--no-preprocess", "--anisotropy", "keep"],
                _area() / "logs" / "mri5_plan.log")  # fmt: skip
    plans = json.loads((mri5 / "plans.json").read_text())
    return {
        "setting": {
            "pretraining": f"collections/mri5.yaml ({', '.join(plans['datasets'])}), {pre_its} iterations, seed 0",
            "network": {k: plans["network"][k] for k in ("patch_size", "batch_size", "features")},
            "a_iterations": a_its,
            "b_iterations": b_its,
            "schedule": f"--head-epochs {HEAD_EPOCHS} --warmup-epochs {WARMUP_EPOCHS} of {EPOCHS} epochs",
            "seeds": list(seeds),
            "sizes": [s for s in sizes],
            "training": "the train defaults (AdamW 3e-3 poly; hermes LAMB 2e-3 exponential, its recipe's "
            "default; bf16 where native, head prior auto), fold 0",
            "hermes_optimizer": recipe_optimizer("hermes"),
        },
        "a": a,
        "b": b,
        "sources": sources,
        "commits": ledger.commits(),
        "hosts": ledger.hosts(),
    }


def paired_greater(x: list[float], y: list[float]) -> float | None:
    """One-sided paired t-test p-value of mean(x − y) > 0 (None with fewer than 2 pairs or no spread)."""
    from scipy import stats

    if len(x) < 2 or len(x) != len(y) or statistics.pstdev([a - b for a, b in zip(x, y, strict=True)]) == 0:
        return None
    return float(stats.ttest_rel(x, y, alternative="greater").pvalue)


def reach(curve: list[tuple[int, float, float]], level: float) -> tuple[int, float] | None:
    """The first ``(iteration, elapsed s)`` of ``curve`` whose Dice is at least ``level`` (None: never)."""
    return next(((it, s) for it, s, d in curve if d >= level), None)


def _source_line(r: dict[str, Any], recipe: str) -> list[str]:
    """The pre-trained ``recipe`` model's own validation Dice per dataset (results from before it was recorded:
    nothing)."""
    source = r.get("sources", {}).get(recipe)
    if not source:
        return []
    dice = ", ".join(f"{d.split('_', 1)[-1]} {v:.3f}" for d, v in source["val_dice"].items())
    return ["", f"The pre-trained `{recipe}` model's own validation pseudo-Dice after {source['iteration']:,} "
            f"iterations (held-out cases of its datasets): {dice}; mean {source['val_mean']:.3f}."]  # fmt: skip


def report(r: dict[str, Any]) -> list[str]:
    s, a, b = r["setting"], r["a"], r["b"]
    lines = [
        "## Pre-train, then adapt: fine-tuning against training from scratch (transfer)",
        "",
        f"`python -m benchmarks transfer` — pre-training: {s['pretraining']} (patch {s['network']['patch_size']}, "
        f"features {s['network']['features']}, batch {s['network']['batch_size']}); targets planned on that network "
        f"(`plan --network-from`); {s['training']}; fine-tuning schedule {s['schedule']} (MultiTalent's shares); "
        "Dice: final validation pseudo-Dice on every held-out case.",
        "",
        f"**(a) MultiTalent Table 2 in miniature** — `universal` pre-trained, `finetune` vs scratch, "
        f"{s['a_iterations']} iterations each, seeds {s['seeds']}:",
        "",
        "| target | scratch | finetune | Δ | one-sided paired p | finetune reaches scratch's final Dice at |",
        "|---|---|---|---|---|---|",
    ]
    for dataset in dict.fromkeys(v["dataset"] for v in a.values()):
        final = {m: {} for m in ("scratch", "finetune")}
        curves = {}
        for v in a.values():
            if v["dataset"] == dataset and v["curve"]:
                final[v["mode"]][v["seed"]] = v["curve"][-1][2]
                curves[(v["mode"], v["seed"])] = v["curve"]
        seeds = sorted(set(final["scratch"]) & set(final["finetune"]))
        x = [final["finetune"][i] for i in seeds]
        y = [final["scratch"][i] for i in seeds]
        p = paired_greater(x, y)
        hits = [reach(curves[("finetune", i)], final["scratch"][i]) for i in seeds]
        cost = "; ".join(
            f"s{i}: {'never' if h is None else f'{h[0]} its ({h[1] / 60:.1f} min)'}"
            for i, h in zip(seeds, hits, strict=True)
        )
        delta = statistics.mean(x) - statistics.mean(y) if seeds else float("nan")
        lines.append(
            f"| {dataset} | {_ms(y)} | {_ms(x)} | {delta:+.3f} | {'–' if p is None else f'{p:.3f}'} | {cost} |"
        )
    lines += _source_line(r, "universal")
    lines += [
        "",
        f"**(b) Hermes Table 3 in miniature** — `hermes` pre-trained without {HERMES_TARGET}; on n of its training "
        f"cases (drawn per seed), {s['b_iterations']} iterations each, draws {s['seeds']}:",
        "",
        "| training cases | scratch | finetune | extend | finetune − scratch (p) | extend − scratch (p) |",
        "|---|---|---|---|---|---|",
    ]
    # per number of cases, each mode's Dice by draw
    by_size = {size: {m: {v["seed"]: v["dice"] for v in b.values() if v["mode"] == m and v["cases"] == size}
                      for m in ("scratch", "finetune", "extend")} for size in s["sizes"]}  # fmt: skip
    for size, by_mode in by_size.items():
        cells = [_ms(list(d.values())) for d in by_mode.values()]
        for mode in ("finetune", "extend"):
            cells.append(_paired_delta(by_mode[mode], by_mode["scratch"]))
        n = next((v["train_cases"] for v in b.values() if v["cases"] == size), size)
        lines.append(f"| {n if size is None else size}{' (all)' if size is None else ''} | " + " | ".join(cells) + " |")
    lines += ["", "Differences paired by draw (the same cases for the three modes); p: one-sided paired t-test that "
              "the mode beats scratch."]  # fmt: skip
    lines += ["", _b_claim(by_size)]
    if s.get("hermes_optimizer", "adamw") == "adamw":  # results from before hermes trained with LAMB by default
        lines += ["", "**Void as a test of Hermes**: (b)'s source and runs trained under AdamW, under which "
                  "Hermes' task prototypes collapse into one another (left/right pairs at cosine 1.0; "
                  "`RECIPE_OPTIMIZERS` in `config.py`). hermes trains with LAMB by default since; (b) is measured "
                  "again under it."]  # fmt: skip
    return [*lines, *_source_line(r, "hermes"), ""]


def _b_claim(by_size: dict[int | None, dict[str, dict[int, float]]], alpha: float = 0.05) -> str:
    """(b) in words: per mode, at which numbers of training cases it beats scratch (paired one-sided p < ``alpha``),
    is above it without that, or is not above it; and Hermes' claim (a pre-trained model is the better start).
    ``by_size``: per number of cases (None: all), each mode's Dice by draw."""
    wording = (f"beats scratch (p < {alpha:g}) at", "is above it, not significantly, at", "is not above it at")
    parts, beats, measured = [], [], 0
    for mode in ("finetune", "extend"):
        verdicts: dict[str, list[str]] = {w: [] for w in wording}
        for size, by_mode in by_size.items():
            paired = _paired(by_mode[mode], by_mode["scratch"])
            if paired is None:
                continue
            (delta, p), n = paired, "all" if size is None else str(size)
            said = wording[0] if delta > 0 and p is not None and p < alpha else wording[1] if delta > 0 else wording[2]
            verdicts[said].append(n)
            if mode == "finetune":
                measured += 1
                beats += [n] if said == wording[0] else []
        parts.append(f"`{mode}` " + "; ".join(f"{w} n = {', '.join(ns)}" for w, ns in verdicts.items() if ns))
    if beats and len(beats) == measured:
        verdict = "**holds** at every number of cases"
    elif beats:
        verdict = f"**holds only** at n = {', '.join(beats)}"
    else:
        verdict = "**fails**: fine-tuning beats scratch at no number of cases"
    return f"{'. '.join(parts)}. Hermes' claim (a pre-trained model is a better start than random weights, its " \
           f"Table 3) {verdict}."  # fmt: skip


def _paired(x: dict[int, float], y: dict[int, float]) -> tuple[float, float | None] | None:
    """Mean of ``x − y`` over the seeds both hold and the one-sided paired p of x > y; None where none is shared."""
    seeds = sorted(set(x) & set(y))
    if not seeds:
        return None
    xs, ys = [x[i] for i in seeds], [y[i] for i in seeds]
    return statistics.mean(xs) - statistics.mean(ys), paired_greater(xs, ys)


def _paired_delta(x: dict[int, float], y: dict[int, float]) -> str:
    """:func:`_paired` as a table cell: ``+0.051 (0.015)``, ``–`` where there is no pair or no p."""
    paired = _paired(x, y)
    if paired is None:
        return "–"
    delta, p = paired
    return f"{delta:+.3f} ({'–' if p is None else f'{p:.3f}'})"
