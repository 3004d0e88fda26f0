"""End to end through the command line: synthetic 2D collection → plan → train → predict → evaluate."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from mosaicseg.cli import app


def test_demo_end_to_end_reaches_dice_0_6_on_every_held_out_synthetic_dataset(tmp_path):
    runner = CliRunner()
    out = tmp_path / "demo"
    result = runner.invoke(app, ["demo", "--dim", "2", "--iterations", "400", "-o", str(out)])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "demo_summary.json").read_text())
    dice = {d: v["mean"]["dice"] for d, v in summary["datasets"].items()}
    assert set(dice) == {"Dataset911_SynthDerm", "Dataset912_SynthCT", "Dataset913_SynthMR", "Dataset914_SynthMulti"}
    assert all(v >= 0.6 for v in dice.values()), dice
    assert "dataset-averaged" in result.output
    # not a terminal: progress as plain lines every few seconds, not one carriage-return redraw per iteration
    assert "\r" not in result.output
    assert len(result.output) < 20_000, len(result.output)
    # predictions are real files in the inputs' numbering, evaluated per dataset
    assert sorted(p.name for p in (out / "evaluation").iterdir()) == sorted(dice)
    # running again reuses everything: training is finished, predictions are kept
    again = runner.invoke(app, ["demo", "--dim", "2", "--iterations", "400", "-o", str(out)])
    assert again.exit_code == 0, again.output
    assert json.loads((out / "demo_summary.json").read_text())["datasets"] == summary["datasets"]


def test_user_errors_exit_2_without_traceback(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["train", str(tmp_path / "nowhere"), "--iterations", "1"])
    assert result.exit_code == 2
    assert "Traceback" not in result.output and "Fix:" in result.output
    result = runner.invoke(app, ["train", str(tmp_path), "--time-budget", "soon"])
    assert result.exit_code == 2 and "--time-budget 'soon'" in result.output


def test_an_interrupted_demo_says_how_to_resume_and_exits_130(tmp_path, monkeypatch):
    from mosaicseg.training.loop import Trainer

    def interrupted(self):  # as SIGINT/SIGTERM during training: the trainer stops, keeping checkpoint_latest.pt
        self.request_stop()
        return {}

    monkeypatch.setattr(Trainer, "fit", interrupted)
    result = CliRunner().invoke(app, ["demo", "--dim", "2", "--iterations", "2", "-o", str(tmp_path / "demo")])
    assert result.exit_code == 130, result.output
    assert "run the same demo command again to resume" in result.output and "interrupted" in result.output
    assert not (tmp_path / "demo" / "demo_summary.json").exists()
