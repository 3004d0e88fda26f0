"""``python -m benchmarks fewshot``: few-shot adaptation with auxiliary datasets (ASAP against finetune, GMS, MTL
and DAL), every strategy with the same number of turns, each setting over seeded folds of the shots.

(a) 3D: source ``universal`` pre-trained on Dataset002–005 and 007 (the transfer study's pre-trained model);
    target Dataset001_Hippocampus, 3 shots, a fixed 40-case evaluation subset; pool Dataset002–005, 007, 008
    split by label (one arm per dataset × label); all five strategies; also 1 and 5 shots for asap and finetune;
(b) 3D, a modality the source never saw: target Dataset008_LeftAtrium (LGE), 3 shots, a fixed 20-case
    evaluation subset, the same source, the pool without the target;
(c) 2D: target Dataset010_DRIVE, 3 shots, a fixed 20-case subset; pool Dataset011_PH2, Dataset012 and the
    synthetic 2D sets (by label); source ``none`` and a 2D ``universal`` model pre-trained on that pool;
(d) the arm choices of (a)'s ASAP runs: which arms (dataset/label) the bandit pulled, by thirds of the run
    (``arms.png`` of fold 0 copied next to the results), and whether it came to prefer the IXI limbic
    hippocampus arms: their share of the last third's pulls against an even share of the arms.

Every ``mosaicseg adapt`` call reuses its finished folds, so the study resumes where it stopped; every finished
setting is recorded in the study's ledger (``benchmarks/results/ledger/fewshot.json``, committed), so the study
spans sittings and fresh clones (a sitting pre-trains a source only if a setting that needs it is left).
``MOSAICSEG_BENCH_QUICK=1``: one fold, a few turns.
"""

from __future__ import annotations

import json
import math
import shutil
from collections import Counter
from collections.abc import Callable
from functools import cache, partial
from pathlib import Path
from typing import Any

from benchmarks.common import QUICK, RESULTS, SHARED, WORK, Ledger, run_cli
from benchmarks.common import mean_sd as _ms

STRATEGIES = ("finetune", "gms", "mtl", "dal", "asap")
TURNS = 300
FOLDS = 3
POOL_3D = ("Dataset002_IXIDeepGrey", "Dataset003_IXILimbic", "Dataset004_IXIVentricles", "Dataset005_BraTS",
           "Dataset007_ACDC", "Dataset008_LeftAtrium")  # fmt: skip
LIMBIC = "Dataset003_IXILimbic"  # its hippocampus arms are the ones closest to the target of (a)
POOL_2D_SHARED = ("Dataset011_PH2", "Dataset012_LIDCNoduleSlices")
PRE_2D_ITERATIONS = 2000
PRE_3D_ITERATIONS = 3000  # the transfer study's pre-training (the same run when both studies share a work folder)
# (d)'s setting: (a)'s ASAP runs with 3 shots
ARMS = ("a001", "asap", 3)
# each setting's fixed evaluation subset (cases of the target outside the shots)
EVAL_CASES = {"a": 40, "b": 20, "c": 20}
# the cost sitting: (a) with 3 shots, one fold, every strategy back to back (the settings' runs span sittings,
# whose hosts differ in speed)
COST_TURNS = 3 if QUICK else 30


def _area() -> Path:
    return WORK / "fewshot"


def _adapt_args(tag: str, target: str, model: Path | None, pool: list[Path], shots: int, strategy: str,
                eval_cases: int, turns: int, folds: int, out: Path) -> list[str]:  # fmt: skip
    args = ["adapt", "--target", str(SHARED / target), "--shots", str(shots), "--strategy", strategy,
            "--turns", str(turns), "--folds", str(folds), "--eval-cases", str(eval_cases), "--aux-split-by-label",
            "--source", str(model) if model else "none", "-w", str(_area() / tag / "work"), "-o", str(out),
            "--device", "cpu"]  # fmt: skip
    for p in pool:
        args += ["--aux", str(p)]
    return args


def _adapt(tag: str, target: str, source: Callable[[], Path | None], pool: list[Path], shots: int, strategy: str,
           eval_cases: int, turns: int, folds: int) -> dict[str, Any]:  # fmt: skip
    """One ``mosaicseg adapt`` setting (all its folds) run, or reused, and summed up; ``source``: the pre-trained
    model (trained on first call), or None."""
    out = _area() / tag / f"{strategy}_k{shots}"
    if (
        not (out / "summary.json").is_file()
        or json.loads((out / "summary.json").read_text())["settings"]["folds"] != folds
    ):
        args = _adapt_args(tag, target, source(), pool, shots, strategy, eval_cases, turns, folds, out)
        run_cli(args, _area() / "logs" / f"{tag}_{strategy}_k{shots}.log")
    summary = json.loads((out / "summary.json").read_text())
    summary["output"] = str(out)
    if (tag, strategy, shots) == ARMS:  # (d) reads the arm logs, which live only as long as the work folder
        summary["arm_choices"] = _arm_choices(summary)
    return summary


def _source_3d(iterations: int) -> Path:
    from benchmarks.transfer import pretrain

    return pretrain("universal", iterations)


def _pool_2d() -> list[Path]:
    synthetic = _area() / "synthetic2d"
    if not (synthetic / "collection.yaml").is_file():
        run_cli(["synth", str(synthetic), "--dim", "2"], _area() / "logs" / "synth2d.log")
    names = sorted(p.name for p in synthetic.iterdir() if p.is_dir() and p.name.startswith("Dataset"))
    return [SHARED / d for d in POOL_2D_SHARED] + [synthetic / n for n in names]


def _source_2d(pool: list[Path], iterations: int) -> Path:
    """A 2D universal model on the 2D pool (its own plan), trained once."""
    import yaml

    workdir = _area() / "pre2d"
    run = workdir / "runs" / "universal_pre"
    if not (run / "checkpoint_final.pt").is_file():
        collection = _area() / "pool2d.yaml"
        entries = [{"path": str(p)} for p in pool]
        for e in entries:
            if "LIDC" in e["path"]:
                e["patient_regex"] = r"^(?P<patient>lidc_\d+)_"
        collection.write_text(yaml.safe_dump({"name": "pool2d", "folds": 5, "datasets": entries}))
        if not (workdir / "plans.json").is_file():
            run_cli(["plan", str(collection), "-o", str(workdir)], _area() / "logs" / "pre2d_plan.log")
        resume = ["--resume"] if (run / "checkpoint_latest.pt").is_file() else []
        run_cli(["train", str(workdir), "--iterations", str(iterations), "--iterations-per-epoch",
                 str(max(1, iterations // 20)), "--val-every", "100000", "--device", "cpu", "-o", str(run), *resume],
                _area() / "logs" / "pre2d_train.log")  # fmt: skip
    return run


def study_fewshot() -> dict[str, Any]:
    turns, folds = (3, 1) if QUICK else (TURNS, FOLDS)
    strategies = ("finetune", "asap") if QUICK else STRATEGIES
    evals = {part: 2 if QUICK else n for part, n in EVAL_CASES.items()}
    pre_3d, pre_2d = (4, 4) if QUICK else (PRE_3D_ITERATIONS, PRE_2D_ITERATIONS)
    source = cache(partial(_source_3d, pre_3d))
    pool3d = [SHARED / d for d in POOL_3D]
    pool2d = _pool_2d()
    source2d = cache(partial(_source_2d, pool2d, pre_2d))
    ledger = Ledger("fewshot")
    settings: list[tuple[str, str, str, Callable[[], Path | None], list[Path], int, str, int]] = []
    for strategy in strategies:
        settings.append(("a", "a001", "Dataset001_Hippocampus", source, pool3d, 3, strategy, evals["a"]))
    for shots in () if QUICK else (1, 5):
        for strategy in ("finetune", "asap"):
            settings.append(("a", "a001", "Dataset001_Hippocampus", source, pool3d, shots, strategy, evals["a"]))
    pool_b = [p for p in pool3d if p.name != "Dataset008_LeftAtrium"]
    for strategy in strategies:
        settings.append(("b", "b008", "Dataset008_LeftAtrium", source, pool_b, 3, strategy, evals["b"]))
    for name, src in (("none", lambda: None), ("universal2d", source2d)):
        for strategy in strategies:
            settings.append((f"c-{name}", f"c010_{name}", "Dataset010_DRIVE", src, pool2d, 3, strategy, evals["c"]))
    runs: dict[str, Any] = {}
    for part, tag, target, src, pool, shots, strategy, n_eval in settings:
        key = f"{part}/{strategy}/{shots}"
        setting = {
            "target": target, "pool": [p.name for p in pool], "shots": shots, "strategy": strategy,
            "eval_cases": n_eval, "turns": turns, "folds": folds,
            "source": None if part == "c-none" else {"c-universal2d": pre_2d}.get(part, {"universal_mri5": pre_3d}),
        }  # fmt: skip
        step = partial(_adapt, tag, target, src, pool, shots, strategy, n_eval, turns, folds)
        runs[key] = ledger.step(key, setting, step)
    cost_setting = {"strategies": list(strategies), "turns": COST_TURNS, "shots": 3, "folds": 1}
    # last: the strategies' cost from one sitting (a study cut short measures it when it comes back)
    cost = ledger.step("cost", cost_setting, partial(cost_sitting, source, pool3d, list(strategies)))
    return {
        "cost": cost,
        "setting": {
            "turns": turns,
            "folds": folds,
            "eval_cases": evals,
            "source_3d": f"universal on collections/mri5.yaml, {pre_3d} iterations (the transfer study's)",
            "source_2d": f"universal on the 2D pool, {pre_2d} iterations",
            "pool_3d": list(POOL_3D),
            "pool_2d": [p.name for p in pool2d],
        },
        "runs": runs,
        "arms_a": runs.get("a/asap/3", {}).get("arm_choices", {}),
        "commits": ledger.commits(),
        "hosts": ledger.hosts(),
    }


def cost_sitting(source: Callable[[], Path | None], pool: list[Path], strategies: list[str]) -> dict[str, Any]:
    """(a)'s setting with 3 shots, :data:`COST_TURNS` turns, one fold and one evaluation case, every strategy in
    turn: each one's training seconds (ASAP's and GMS's first pass over the arms included) and peak RSS, and the
    host they ran on."""
    from benchmarks.common import host

    model, out = source(), {}
    for strategy in strategies:
        run = _area() / "cost" / strategy
        shutil.rmtree(run, ignore_errors=True)  # a measurement of this sitting, not a reused one
        args = _adapt_args("a001", "Dataset001_Hippocampus", model, pool, 3, strategy, 1, COST_TURNS, 1, run)
        done = run_cli(args, _area() / "logs" / f"cost_{strategy}.log")
        summary = json.loads((run / "summary.json").read_text())
        out[strategy] = {"train_s": summary["train_s"]["mean"], "peak_rss_mb": done.peak_rss_mb}
    return {"strategies": out, "host": host()}


def cost_lines(cost: dict[str, Any] | None) -> list[str]:
    """The one-sitting cost table (:func:`cost_sitting`), with ratios to ``finetune``."""
    if not cost:
        return []
    host, per = cost["host"], cost["strategies"]
    base = per.get("finetune")
    lines = [f"Cost, every strategy back to back in one sitting ({host['cpu']}, {host['cores']} cores): (a) with 3 "
             f"shots, {COST_TURNS} turns, one fold (the tables' min/fold come from sittings on hosts of different "
             "speed):", "", "| strategy | training s | × finetune | peak RSS MiB |", "|---|---|---|---|"]  # fmt: skip
    for name, c in per.items():
        ratio = f"{c['train_s'] / base['train_s']:.2f}" if base else "–"
        lines.append(f"| {name} | {c['train_s']:.0f} | {ratio} | {c['peak_rss_mb']:,.0f} |")
    return [*lines, ""]


def _arm_choices(summary: dict[str, Any]) -> dict[str, Any]:
    """Pulls per arm (``dataset/label``, or the dataset when the pool was not split by label) over the folds of
    an ASAP setting's ``summary``, by thirds of the run, with every arm of the pool (pulled or not), and fold 0's
    plot copied to the results."""
    thirds: list[Counter[str]] = [Counter(), Counter(), Counter()]
    turns = summary["settings"]["turns"]
    for fold in summary["folds"]:
        path = fold.get("arms_log")
        for line in Path(path).read_text().splitlines() if path else []:
            row = json.loads(line)
            if row.get("arm_name"):
                thirds[min(2, 3 * (row["turn"] - 1) // turns)][row["arm_name"]] += 1
    plot = Path(summary["output"]) / "fold_0" / "arms.png"
    if plot.is_file():
        RESULTS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(plot, RESULTS / "fewshot-arms-a.png")
    return {"arms": list(summary["settings"]["arms"]), "by_third": [dict(c) for c in thirds]}


def _hippocampus_arm(name: str) -> bool:
    """An IXI limbic arm of a hippocampus label (Dataset003's other labels are the amygdalae)."""
    dataset, _, label = name.partition("/")
    return dataset == LIMBIC and "hippocamp" in label.lower()


def _arms_section(arms: dict[str, Any]) -> list[str]:
    """(d): pulls per arm by third, and the IXI limbic hippocampus arms' share of the last third against the
    share they would get if every arm were pulled as often."""
    names = list(arms["arms"])
    names += sorted({n for c in arms["by_third"] for n in c} - set(names))  # logs of arms left out of the list
    lines = ["(d) ASAP's pulls in (a), per arm (dataset/label) and third of the run (all folds):", "",
             "| arm | first third | second | last |", "|---|---|---|---|"]  # fmt: skip
    for n in names:
        lines.append(f"| {n} | " + " | ".join(str(c.get(n, 0)) for c in arms["by_third"]) + " |")
    hippocampus = [n for n in names if _hippocampus_arm(n)]
    last = arms["by_third"][-1]
    total = sum(last.values())
    lines.append("")
    if not hippocampus:
        lines.append(
            "The pool has no IXI limbic hippocampus arm of its own (not split by label, or without Dataset003): "
            "whether the bandit preferred the hippocampus labels cannot be read off these pulls."
        )
    elif total == 0:
        lines.append("No pulls were logged in the last third: the run is too short to say what the bandit preferred.")
    else:
        pulls = sum(last.get(n, 0) for n in hippocampus)
        even = len(hippocampus) / len(names)
        # a preference has to stand out from what choosing arms uniformly at random would give (binomial, 2 sd):
        # UCB's exploration term can keep every arm's count close to the even share whatever R̂ says
        expected, band = total * even, 2 * math.sqrt(total * even * (1 - even))
        if pulls > expected + band:
            verdict = "above what uniform choice gives: it came to prefer them"
        elif pulls < expected - band:
            verdict = "below what uniform choice gives: it came to avoid them"
        else:
            verdict = "within what uniform choice gives: it showed no preference for them"
        counts = [last.get(n, 0) for n in names]
        most = names[counts.index(max(counts))]
        lines.append(
            f"In the last third the bandit pulled the IXI limbic hippocampus arms ({', '.join(hippocampus)}) "
            f"{pulls} of {total} times ({pulls / total:.0%}), against an even share of {expected:.1f} ({even:.0%}: "
            f"{len(hippocampus)} of {len(names)} arms) ± {band:.1f} (2 sd of uniform choice), {verdict}. "
            f"Pulls per arm in that third ranged from {min(counts)} to {max(counts)} (most: {most})."
        )
    return [*lines, "", "![arms](benchmarks/results/fewshot-arms-a.png)", ""]


def _row(r: dict[str, Any]) -> str:
    dice = [f["dice"] for f in r["folds"]]
    iou = [f["iou"] for f in r["folds"]]
    rss = r.get("peak_rss_mb")  # results written before it was reported: a dash
    return f"{_ms(dice)} | {_ms(iou)} | {r['train_s']['mean'] / 60:.1f} | {f'{rss:,.0f}' if rss else '–'}"


def report(r: dict[str, Any]) -> list[str]:
    s, runs = r["setting"], r["runs"]
    lines = [
        "## Few-shot adaptation with auxiliary datasets (ASAP and its baselines)",
        "",
        f"`python -m benchmarks fewshot` — `mosaicseg adapt`, {s['turns']} turns for every strategy, {s['folds']} "
        "seeded folds of the shots, fixed evaluation subsets, auxiliary pools split by label (≤ 30 cases per "
        "dataset); Dice and IoU by the evaluator in the original geometry (mean ± sd over folds); minutes: "
        "training per fold; peak RSS: the highest fold's, training and prediction.",
        "",
    ]
    n = s.get("eval_cases", EVAL_CASES)  # results written before the count was recorded used EVAL_CASES
    titles = {
        "a": f"(a) 3D, target Dataset001_Hippocampus ({n['a']} evaluation cases), source universal on "
        "Dataset002–005, 007",
        "b": f"(b) 3D, target Dataset008_LeftAtrium (LGE, a modality the source never saw; {n['b']} evaluation cases)",
        "c-none": f"(c) 2D, target Dataset010_DRIVE ({n['c']} evaluation cases), from scratch",
        "c-universal2d": f"(c) 2D, target Dataset010_DRIVE ({n['c']} evaluation cases), source a 2D universal "
        "model on the pool",
    }
    for part, title in titles.items():
        keys = [k for k in runs if k.split("/")[0] == part]
        if not keys:
            continue
        lines += [f"**{title}**", "", "| strategy | shots | Dice | IoU | min/fold | peak RSS MiB |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for k in keys:
            _, strategy, shots = k.split("/")
            lines.append(f"| {strategy} | {shots} | {_row(runs[k])} |")
        lines += ["", _claim(runs, part), ""]
    lines += cost_lines(r.get("cost"))
    arms = r.get("arms_a") or {}
    if arms.get("by_third") and "arms" in arms:  # results counted per dataset (no arm list) are not re-read here
        lines += _arms_section(arms)
    return lines


def _claim(runs: dict[str, Any], part: str) -> str:
    """ASAP's claim on one setting: asap ≥ finetune + 3 Dice points and ≥ gms, mtl and dal."""
    mean = {k.split("/")[1]: runs[k]["dice"]["mean"] for k in runs if k.startswith(f"{part}/") and k.endswith("/3")}
    if "asap" not in mean or "finetune" not in mean:
        return "ASAP's claim: not measured here."
    others = {k: v for k, v in mean.items() if k not in ("asap", "finetune")}
    gain = mean["asap"] - mean["finetune"]
    beaten = [k for k, v in others.items() if v > mean["asap"]]
    holds = gain >= 0.03 and not beaten
    why = []
    if gain < 0.03:
        why.append(f"asap − finetune = {gain:+.3f}, short of +0.030")
    if beaten:
        why.append(f"{', '.join(beaten)} scored higher")
    return f"ASAP's claim (≥ finetune + 3 points, ≥ gms, mtl, dal): **{'holds' if holds else 'fails'}**" + (
        f" ({'; '.join(why)})." if why else "."
    )
