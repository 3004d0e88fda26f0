"""The work-folder reader: JSON errors that name file, problem and fix; plans, vocabulary, collection, cases;
and the package's import graph (no circles, workdir.py below every stage)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest

import mosaicseg
from mosaicseg.data.fingerprint import plan
from mosaicseg.data.preprocess import load_case, preprocess
from mosaicseg.data.workdir import (
    case_paths,
    dataset_plans_hash,
    is_case_done,
    list_cases,
    load_case_meta,
    load_collection_config,
    load_plans,
    load_vocabulary,
    planned_collection,
    read_json,
)
from mosaicseg.errors import MosaicSegError


@pytest.fixture()
def planned(make_dataset, tmp_path: Path) -> Path:
    """A one-dataset work folder (T1, three 8³ cases), planned but not preprocessed."""
    folder = make_dataset("Dataset001_Tiny", 3, channels=("T1",))
    work = tmp_path / "work"
    plan(folder, work, workers=1, progress=False)
    return work


# --------------------------------------------------------------------------------------------- read_json
@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (None, "not found"),
        (b'{"a": 1,}', "not valid JSON"),
        (b"[1, 2]", "holds a JSON list, not an object"),
        (b'{"a": "\xff"}', "not UTF-8"),
    ],
)
def test_read_json_names_file_problem_and_fix(tmp_path: Path, content: bytes | None, problem: str) -> None:
    path = tmp_path / "thing.json"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(MosaicSegError) as err:
        read_json(path, "repair it", missing_fix="make it first")
    message = str(err.value)
    assert message.startswith(f"{path}: ") and problem in message
    assert message.endswith("Fix: make it first." if content is None else "Fix: repair it.")


def test_read_json_reads_objects_and_optionally_other_values(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    path.write_text('{"x": [1, 2.5, null]}')
    assert read_json(path, "fix") == {"x": [1, 2.5, None]}
    path.write_text("[3]")
    assert read_json(path, "fix", mapping=False) == [3]
    with pytest.raises(MosaicSegError, match="is a folder"):
        read_json(tmp_path, "fix")


# --------------------------------------------------------------------------------------------- plan files
def test_load_plans_checks_presence_keys_and_version(planned: Path, tmp_path: Path) -> None:
    with pytest.raises(MosaicSegError, match=r"plans.json: not found. Fix: run mosaicseg plan"):
        load_plans(tmp_path / "empty")
    plans = load_plans(planned)
    assert list(plans["datasets"]) == ["Dataset001_Tiny"]
    path = planned / "plans.json"
    path.write_text(json.dumps({k: v for k, v in plans.items() if k != "network"}))
    with pytest.raises(MosaicSegError, match=r"lack \['network'\].*--overwrite"):
        load_plans(planned)
    path.write_text(json.dumps({**plans, "version": 99}))
    with pytest.raises(MosaicSegError, match="version 99 is not supported"):
        load_plans(planned)
    path.write_text(json.dumps({**plans, "datasets": {}}))
    with pytest.raises(MosaicSegError, match="'datasets' must map"):
        load_plans(planned)


def test_load_vocabulary_round_trips_and_reports_damage(planned: Path) -> None:
    vocab = load_vocabulary(planned)
    assert vocab.datasets == ("Dataset001_Tiny",) and [t.name for t in vocab.tasks] == ["Dataset001_Tiny/Organ"]
    path = planned / "vocabulary.json"
    path.write_text(json.dumps({"tasks": []}))
    with pytest.raises(MosaicSegError, match=r"vocabulary.json: not a MosaicSeg vocabulary.*--overwrite"):
        load_vocabulary(planned)
    path.unlink()
    with pytest.raises(MosaicSegError, match=r"vocabulary\.json: not found"):
        load_vocabulary(planned)


def test_collection_json_carries_edits_while_preprocessing_reads_the_planned_copy(planned: Path) -> None:
    path = planned / "collection.json"
    edited = {**json.loads(path.read_text()), "folds": 2}
    path.write_text(json.dumps(edited))
    assert load_collection_config(planned).folds == 2
    assert planned_collection(planned).folds == 5  # plans.json keeps the collection as planned
    assert planned_collection(planned).datasets == load_collection_config(planned).datasets
    path.write_text(json.dumps({**edited, "folds": 1}))
    with pytest.raises(MosaicSegError, match="folds"):
        load_collection_config(planned)


# --------------------------------------------------------------------------------------------- cached cases
def test_case_meta_and_done_marker(planned: Path) -> None:
    dataset = "Dataset001_Tiny"
    with pytest.raises(MosaicSegError, match=r"case0.json: not found. Fix: case 'case0' .* mosaicseg preprocess"):
        load_case_meta(planned, dataset, "case0")
    preprocess(planned, workers=1, progress=False)
    phash = dataset_plans_hash(load_plans(planned), dataset)
    assert load_case_meta(planned, dataset, "case0")["plans_hash"] == phash
    assert is_case_done(planned, dataset, "case0", phash) and not is_case_done(planned, dataset, "case0", "other")
    paths = case_paths(planned, dataset, "case1")
    paths.fg.unlink()  # an array file lost: not done, although the meta is there
    assert not is_case_done(planned, dataset, "case1", phash)
    case_paths(planned, dataset, "case2").meta.write_text("{damaged")
    assert not is_case_done(planned, dataset, "case2", phash)  # a damaged meta is redone, not fatal here
    with pytest.raises(MosaicSegError, match=r"case2.json: not valid JSON .*Fix: delete it and re-run"):
        load_case(planned, dataset, "case2")
    assert list_cases(planned) == {dataset: ["case0"]}
    assert preprocess(planned, workers=1, progress=False)["n_done"] == 2


def test_changed_normalisation_redoes_the_cache(make_dataset, tmp_path: Path) -> None:
    """A re-plan with another scheme changes the dataset's plan hash: every case is preprocessed again, now
    with the new normalisation (here: the MR percentile clip turned on)."""
    outlier = np.random.default_rng(0).uniform(0, 100, size=(8, 8, 8)).astype(np.float32)
    outlier[0, 0, 0] = 1e5  # the percentile clip changes every normalised voxel
    folder = make_dataset("Dataset002_Mr", ["c0"], channels=("T1",), images={"c0": [outlier]})
    work = tmp_path / "work"
    plan(folder, work, workers=1, progress=False)
    preprocess(work, workers=1, progress=False)
    before = np.asarray(load_case(work, "Dataset002_Mr", "c0").image).copy()
    plan(folder, work, mr_clip_percentiles=(2, 98), overwrite=True, workers=1, progress=False)
    assert list_cases(work) == {"Dataset002_Mr": []}
    assert preprocess(work, workers=1, progress=False)["n_done"] == 1
    after = np.asarray(load_case(work, "Dataset002_Mr", "c0").image)
    assert before.max() > 10 and after.max() < 3  # the outlier dominated the plain z-score only
    assert load_plans(work)["datasets"]["Dataset002_Mr"]["normalization"][0]["percentiles"] == [2.0, 98.0]


# --------------------------------------------------------------------------------------------- import graph
def _import_graph() -> dict[str, set[str]]:
    """Module → the package modules it imports, counting imports inside functions too."""
    root = Path(mosaicseg.__file__).parent
    modules = {}
    for path in root.rglob("*.py"):
        parts = ("mosaicseg", *path.relative_to(root).with_suffix("").parts)
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            else:
                continue
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    todo = list(graph[start])
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(graph[module])
    return seen


def test_no_module_imports_itself_through_others() -> None:
    graph = _import_graph()
    circles = sorted(name for name in graph if name in _reachable(graph, name))
    assert not circles, f"modules in import circles: {circles}"
    # the one reader of a work folder sits below every stage that reads one
    below = _reachable(graph, "mosaicseg.data.workdir")
    assert below <= {
        "mosaicseg.config",
        "mosaicseg.errors",
        "mosaicseg.atomic",
        "mosaicseg.data.vocabulary",
        "mosaicseg.data.laterality",
        "mosaicseg.data.manifest",
        "mosaicseg.data.io",
    }, below
