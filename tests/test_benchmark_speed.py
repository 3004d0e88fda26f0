"""The speed study's training step: candidate layouts run and reuse the FLOP count they are given."""

from __future__ import annotations

import pytest

speed = pytest.importorskip("benchmarks.speed", reason="run from the repository root (python -m pytest)")


def test_speed_candidate_step_reuses_the_given_flop_count_and_runs_under_bf16() -> None:
    network = {"patch_size": [16, 16, 16], "features": [4, 8], "batch_size": 1}
    eager = speed.training_step(network, 2, "adamw", "now", 1)
    assert eager["gflop"] > 0 and eager["seconds"] > 0
    # a count no FLOP counter would produce: the candidate must report the one it was given
    cand = speed.training_step(network, 2, "adamw", "before+bf16", 1, gflop=123.0)
    assert cand["gflop"] == 123.0 and cand["gflop_per_s"] == pytest.approx(123.0 / cand["seconds"])
    assert "compile_s" not in cand
