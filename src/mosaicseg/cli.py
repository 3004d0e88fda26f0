"""``mosaicseg`` command line: thin typed wrappers around the public functions.

User errors (:class:`~mosaicseg.errors.MosaicSegError`) print their message and exit with code 2, with
no traceback unless ``--debug`` is given.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from mosaicseg.atomic import write_json_atomic
from mosaicseg.errors import MosaicSegError

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="MosaicSeg: one segmentation model from many partially labelled datasets.")
_state = {"debug": False}
F = TypeVar("F", bound=Callable[..., Any])


def _user_errors(fn: F) -> F:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except MosaicSegError as exc:
            if _state["debug"]:
                raise
            typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
            raise typer.Exit(code=2) from None
        except KeyboardInterrupt:
            typer.secho("interrupted", err=True)
            raise typer.Exit(code=130) from None

    return wrapper  # type: ignore[return-value]


@app.callback()
def _main(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for user errors.")] = False) -> None:
    _state["debug"] = debug


@app.command()
@_user_errors
def check(
    collection: Annotated[Path, typer.Argument(help="collection.yaml or a dataset folder")],
    folds: Annotated[
        int | None, typer.Option(help="Folds to check dataset sizes against (default: the collection's)")
    ] = None,
    workers: Annotated[int, typer.Option(help="Parallel readers")] = 2,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the problems as JSON here")] = None,
) -> None:
    """Verify every dataset of a collection and list all problems at once (exit 1 on errors)."""
    from mosaicseg.data.checks import check_collection, render_report

    t0 = time.perf_counter()
    report = check_collection(collection, folds=folds, workers=workers, progress=sys.stderr.isatty())
    typer.echo(render_report(report))
    typer.echo(f"checked in {time.perf_counter() - t0:.1f} s")
    if json_out:
        write_json_atomic(json_out, {"problems": [
            {"severity": p.severity, "code": p.code, "path": str(p.path), "message": p.message, "fix": p.fix}
            for p in report.problems]})
    if not report.ok:
        raise typer.Exit(code=1)


@app.command()
@_user_errors
def plan(
    collection: Annotated[Path, typer.Argument(help="collection.yaml or a dataset folder")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Work folder for plans and the cache")],
    device: Annotated[str, typer.Option(help="cpu or cuda: picks the network/patch/batch preset")] = "cpu",
    memory_budget_gb: Annotated[float | None, typer.Option(help="Override the preset's memory budget")] = None,
    common_spacing: Annotated[float | None, typer.Option(help="Resample every dataset to this spacing (mm)")] = None,
    ct_normalization: Annotated[str, typer.Option(help="percentile (nnU-Net) or fixed ([-990, 500] HU, Hermes)")] = (
        "percentile"
    ),
    workers: Annotated[int, typer.Option(help="Parallel workers")] = 2,
    preprocess: Annotated[bool, typer.Option("--preprocess/--no-preprocess", help="Also preprocess")] = True,
    overwrite: Annotated[bool, typer.Option(help="Replace existing plans that differ")] = False,
) -> None:
    """Fingerprint the datasets, write editable plans (JSON) and, unless told not to, preprocess."""
    from mosaicseg.data.fingerprint import plan as make_plan
    from mosaicseg.data.preprocess import preprocess as run_preprocess
    from mosaicseg.data.vocabulary import Vocabulary

    if ct_normalization not in ("percentile", "fixed"):
        raise MosaicSegError(f"--ct-normalization {ct_normalization!r} is unknown. Fix: use percentile or fixed.")
    if device not in ("cpu", "cuda"):
        raise MosaicSegError(f"--device {device!r} is unknown. Fix: use cpu or cuda.")
    t0 = time.perf_counter()
    plans = make_plan(collection, output, device=device, memory_budget_gb=memory_budget_gb,
                      common_spacing=common_spacing, ct_normalization=ct_normalization, workers=workers,
                      overwrite=overwrite, progress=True)
    vocab = Vocabulary.from_dict(json.loads((output / "vocabulary.json").read_text()))
    typer.echo(vocab.describe())
    typer.echo(_describe_plans(plans))
    typer.echo(f"planned in {time.perf_counter() - t0:.1f} s → {output / 'plans.json'}")
    if preprocess:
        stats = run_preprocess(output, workers=workers, progress=True)
        typer.echo(f"preprocessed {stats['n_done']} case(s), skipped {stats['n_skipped']} done before, "
                   f"{stats['seconds']:.1f} s")


@app.command()
@_user_errors
def preprocess(
    workdir: Annotated[Path, typer.Argument(help="Work folder written by `mosaicseg plan`")],
    workers: Annotated[int, typer.Option(help="Parallel workers")] = 2,
    dataset: Annotated[list[str] | None, typer.Option(help="Only these datasets (repeatable)")] = None,
) -> None:
    """Resample, crop, normalise and cache every case (resumable: finished cases are skipped)."""
    from mosaicseg.data.preprocess import preprocess as run_preprocess

    stats = run_preprocess(workdir, workers=workers, progress=True, datasets=dataset or None)
    typer.echo(f"preprocessed {stats['n_done']} case(s), skipped {stats['n_skipped']} done before, "
               f"{stats['seconds']:.1f} s")


@app.command()
@_user_errors
def synth(
    output: Annotated[Path, typer.Argument(help="Folder to write the synthetic collection into")],
    dim: Annotated[int, typer.Option(help="2 or 3")] = 3,
    seed: Annotated[int, typer.Option(help="Random seed")] = 0,
) -> None:
    """Generate the seeded synthetic partial-label collection (nnU-Net raw format + collection.yaml)."""
    from mosaicseg.data.synthetic import generate_collection

    if dim not in (2, 3):
        raise MosaicSegError(f"--dim {dim} is not supported. Fix: use 2 or 3.")
    path = generate_collection(output, dim=dim, seed=seed)
    typer.echo(f"wrote {path}")


def _describe_plans(plans: dict[str, Any]) -> str:
    net = plans["network"]
    lines = [f"{plans['dim']}D collection plan for {plans['device']}: patch {net['patch_size']}, batch "
             f"{net['batch_size']}, {net['num_stages']} stages, features {net['features']}, estimated "
             f"{net['memory_estimate_gb']:.2f} GB of {net['memory_budget_gb']:.2f} GB"]
    for name, d in plans["datasets"].items():
        norm = ", ".join(f"{n['channel']}:{n['scheme']}" for n in d["normalization"])
        sep = f", separate axis {d['separate_axis']}" if d.get("separate_axis") is not None else ""
        lines.append(f"  {name}: spacing {[round(s, 3) for s in d['target_spacing']]}, median shape "
                     f"{d['median_shape']}{sep}; {norm}")
    return "\n".join(lines)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
