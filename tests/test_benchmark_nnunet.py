"""The nnU-Net study's step cache: finished steps are reused only for the setting they were made with."""

from __future__ import annotations

import json

import pytest

nnunet = pytest.importorskip("benchmarks.nnunet", reason="run from the repository root (python -m pytest)")


def test_steps_of_another_setting_are_superseded_not_reused(tmp_path, capsys):
    path = tmp_path / "steps.json"
    old = {"A/nnunet_plan_s": 30.0, "A/nnunet_train_iter": {"iterations": 100}, "B/nnunet_train_iter": {"x": 1}}
    path.write_text(json.dumps(old))
    steps = nnunet.Steps(path)
    setting = {"iterations": 250, "schedule": "s"}
    # steps cached before settings were recorded count as another setting
    assert steps.require("A", setting) is True
    assert "A's setting changed" in capsys.readouterr().out
    saved = json.loads(path.read_text())
    assert saved["superseded"] == [{"A/nnunet_train_iter": {"iterations": 100}}]
    assert saved["A/nnunet_plan_s"] == 30.0  # the plan does not depend on the setting
    assert "A/nnunet_train_iter" not in saved and saved["B/nnunet_train_iter"] == {"x": 1}
    assert saved["A/setting"] == setting
    # the same setting keeps its steps; a changed one moves them again
    steps.data["A/nnunet_train_iter"] = {"iterations": 250}
    assert nnunet.Steps(path).require("A", setting) is False
    steps.save()
    again = nnunet.Steps(path)
    assert again.require("A", {"iterations": 20, "schedule": "s"}) is True
    assert again.data["superseded"][-1] == {"A/nnunet_train_iter": {"iterations": 250}, "A/setting": setting}
