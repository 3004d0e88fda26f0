"""The studies' ledger: a finished step is measured once, kept across invocations (and clones: it is a file under
benchmarks/results), measured again under another setting with the old record kept, and --steps stops a sitting
before a step it was not asked to measure."""

from __future__ import annotations

import json

import pytest

common = pytest.importorskip("benchmarks.common", reason="run from the repository root (python -m pytest)")


@pytest.fixture
def results(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setattr(common.Ledger, "limit", None)
    return tmp_path


def test_a_step_is_measured_once_and_kept_across_invocations(results):
    calls = []

    def measure():
        calls.append(1)
        return {"dice": 0.5}

    assert common.Ledger("study").step("a", {"iterations": 10}, measure) == {"dice": 0.5}
    # a new invocation (a fresh process, a fresh clone with the committed file) reads the record back
    again = common.Ledger("study")
    assert again.step("a", {"iterations": 10}, measure) == {"dice": 0.5}
    assert len(calls) == 1
    stored = json.loads((results / "ledger" / "study.json").read_text())
    assert stored["steps"]["a"]["setting"] == {"iterations": 10}
    assert again.commits() == [stored["steps"]["a"]["commit"]]
    # the sitting's host, since speed figures of steps from different sittings are not comparable without it
    assert stored["steps"]["a"]["host"] == common.host()


def test_tuples_in_a_setting_match_the_lists_they_are_stored_as(results):
    common.Ledger("study").step("a", {"patch": (4, 4)}, lambda: {"x": 1})
    assert common.Ledger("study").get("a", {"patch": [4, 4]}) == {"x": 1}


def test_another_setting_measures_again_and_keeps_the_old_record(results):
    common.Ledger("study").step("a", {"iterations": 10}, lambda: {"dice": 0.5})
    ledger = common.Ledger("study")
    assert ledger.step("a", {"iterations": 20}, lambda: {"dice": 0.7}) == {"dice": 0.7}
    stored = json.loads((results / "ledger" / "study.json").read_text())
    assert stored["steps"]["a"]["record"] == {"dice": 0.7}
    assert [(s["key"], s["record"]) for s in stored["superseded"]] == [("a", {"dice": 0.5})]


def test_a_ledgered_study_with_results_still_measures_a_step_whose_setting_changed(results):
    """Found: with results/transfer.json present, `python -m benchmarks transfer` said "finished before" and kept
    hermes' (b) figures measured under AdamW although its steps now asked for LAMB."""

    def study(optimizer):
        return lambda: {"a": common.Ledger("study").step("a", {"optimizer": optimizer}, lambda: {"opt": optimizer})}

    assert common.run_study("study", study("adamw"))["a"] == {"opt": "adamw"}
    # the old behaviour, kept for a study without a ledger
    assert common.run_study("study", study("lamb"))["a"] == {"opt": "adamw"}
    assert common.run_study("study", study("lamb"), ledgered=True)["a"] == {"opt": "lamb"}
    assert json.loads((results / "study.json").read_text())["a"] == {"opt": "lamb"}

    # a finished step is read back, not measured again
    def again():
        return {"a": common.Ledger("study").step("a", {"optimizer": "lamb"}, lambda: pytest.fail("measured again"))}

    assert common.run_study("study", again, ledgered=True)["a"] == {"opt": "lamb"}


def test_steps_limit_stops_before_the_next_new_step(results, monkeypatch):
    common.Ledger("study").step("done", {}, lambda: {"v": 0})
    monkeypatch.setattr(common.Ledger, "limit", 1)
    ledger = common.Ledger("study")
    assert ledger.step("done", {}, lambda: {"v": 9}) == {"v": 0}  # recorded steps do not count
    assert ledger.step("b", {}, lambda: {"v": 1}) == {"v": 1}
    # a score of b's checkpoint belongs to b: measured past the limit, and does not count
    assert ledger.step("b_score", {}, lambda: {"v": 2}, counted=False) == {"v": 2}
    assert ledger.measured == 1
    with pytest.raises(SystemExit, match=r"--steps 1.*the next is c"):
        ledger.step("c", {}, lambda: pytest.fail("measured past the limit"))
    assert set(json.loads((results / "ledger" / "study.json").read_text())["steps"]) == {"done", "b", "b_score"}


def test_hosts_count_each_steps_host_and_the_footer_warns_when_times_mix_hosts(results, monkeypatch):
    ledger = common.Ledger("study")
    ledger.step("a", {}, lambda: {"v": 1})
    ledger.data["steps"]["old"] = {"setting": {}, "commit": "abc", "date": "d", "record": {}}  # before hosts
    here = common.host_label(ledger.data["steps"]["a"]["host"])
    assert ledger.hosts() == {here: 1, "unrecorded": 1}
    assert ledger.hosts(["a"]) == {here: 1}
    amx = {"cpu": "Xeon", "cpu_flags": ["avx2", "amx_bf16"], "cores": 2, "threads": 2}
    assert common.host_label(amx) == "Xeon with AMX, 2 threads"
    assert common.host_label({**amx, "cpu_flags": ["avx2"]}) == "Xeon, 2 threads"

    from benchmarks import report

    result = {"machine": {"commit": "abc", "date": "d"}, "wall_s": 1.0, "commits": ["abc"]}
    assert "hosts" not in report._stamp("s", {**result, "hosts": {here: 3}})
    footer = report._stamp("s", {**result, "hosts": {"Xeon with AMX, 2 threads": 2, "unrecorded": 1}})
    assert "steps measured on 2 hosts, Xeon with AMX, 2 threads (2), unrecorded (1): their times are not" in footer
    # the last invocation's seconds are not the study's (its steps came from the ledger): said so
    assert "commit abc, d, assembled from its ledger in 1 s" in footer
    assert report._stamp("s", {"machine": {"commit": "abc", "date": "d"}, "wall_s": 61.0}).endswith(", 61 s</sub>")
