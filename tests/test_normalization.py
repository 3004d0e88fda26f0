"""Per-channel normalisation schemes against hand-computed values: Hermes' fixed CT window with a per-image
z-score, nnU-Net's plain MR z-score, and the optional MR percentile clip."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from mosaicseg.cli import app
from mosaicseg.data.preprocess import check_percentiles, normalize
from mosaicseg.errors import MosaicSegError

CT_FIXED = {"channel": "CT", "scheme": "ct_fixed", "clip": [-990.0, 500.0], "mean": None, "std": None}
MR = {"channel": "T1", "scheme": "mr", "clip": None, "mean": None, "std": None, "percentiles": None}


def _image(values: list[float]) -> np.ndarray:
    """One channel, ``(1, N, 1)``."""
    return np.asarray(values, dtype=np.float32).reshape(1, -1, 1)


def test_ct_fixed_clips_to_the_hermes_window_then_z_scores_the_image() -> None:
    x = _image([-2000.0, -990.0, 0.0, 500.0, 3000.0])
    # clip(x) = [-990, -990, 0, 500, 500]: mean -196, deviations [-794, -794, 196, 696, 696],
    # variance (2·794² + 196² + 2·696²) / 5 = 453624
    clipped = np.array([-990.0, -990.0, 0.0, 500.0, 500.0])
    expected = (clipped + 196.0) / np.sqrt(453624.0)
    out = normalize(x, [CT_FIXED])
    np.testing.assert_allclose(out[0, :, 0], expected, rtol=1e-6)
    np.testing.assert_allclose(out[0, :, 0], (clipped - clipped.mean()) / clipped.std(), rtol=1e-6)
    assert out.dtype == np.float32


def test_ct_fixed_statistics_are_per_image_not_per_dataset() -> None:
    """Two scans of different intensity ranges each get mean 0 and standard deviation 1; with one set of
    dataset statistics they could not both."""
    a = _image([-800.0, -400.0, 0.0, 400.0])
    b = _image([-100.0, 0.0, 100.0, 200.0])  # a narrower range inside the window
    za, zb = normalize(a, [CT_FIXED])[0, :, 0], normalize(b, [CT_FIXED])[0, :, 0]
    # both are evenly spaced ramps of four values: their z-scores are identical, ±3/√5 and ±1/√5
    ramp = np.array([-3.0, -1.0, 1.0, 3.0]) / np.sqrt(5.0)
    np.testing.assert_allclose(za, ramp, rtol=1e-6)
    np.testing.assert_allclose(zb, ramp, rtol=1e-6)


def test_ct_fixed_entry_with_dataset_statistics_is_honoured() -> None:
    """Plans written before ct_fixed became per-image hold a mean/std; models trained on them are fed alike."""
    x = _image([-2000.0, 0.0, 50.0, 3000.0])
    out = normalize(x, [{**CT_FIXED, "mean": 0.0, "std": 10.0}])
    np.testing.assert_allclose(out[0, :, 0], [-99.0, 0.0, 5.0, 50.0])


def test_mr_default_is_a_plain_z_score_without_clipping() -> None:
    x = _image([0.0, 1.0, 2.0, 3.0, 1000.0])  # one outlier voxel
    # mean 201.2; variance (201.2² + 200.2² + 199.2² + 198.2² + 798.8²) / 5 = 159521.36
    expected = (np.array([0.0, 1.0, 2.0, 3.0, 1000.0]) - 201.2) / np.sqrt(159521.36)
    out = normalize(x, [MR])[0, :, 0]
    np.testing.assert_allclose(out, expected, rtol=1e-5)
    assert out[-1] == pytest.approx(798.8 / np.sqrt(159521.36), rel=1e-5)  # 2.0: the outlier is not clipped
    # an entry without the key (hand-written plans) is the same plain z-score
    np.testing.assert_allclose(normalize(x, [{"scheme": "mr"}])[0, :, 0], expected, rtol=1e-5)


def test_mr_with_percentiles_clips_each_image_first() -> None:
    ramp = np.arange(101, dtype=np.float32)  # its 10th and 90th percentiles are 10 and 90
    out = normalize(ramp[None], [{**MR, "percentiles": [10, 90]}])[0]
    clipped = np.clip(np.arange(101.0), 10.0, 90.0)
    np.testing.assert_allclose(out, (clipped - clipped.mean()) / clipped.std(), rtol=1e-5, atol=1e-6)
    assert out[0] == out[10] and out[90] == out[100]  # the tails were clipped
    plain = normalize(ramp[None], [MR])[0]
    assert plain[0] < out[0]


@pytest.mark.parametrize("bad", [[98, 2], [-1, 50], [5, 101], [50, 50], [1, 2, 3], "2,98", None])
def test_percentiles_are_validated(bad: object) -> None:
    with pytest.raises(MosaicSegError, match=r"0 <= lo < hi <= 100"):
        check_percentiles(bad, "--mr-clip-percentiles")
    if bad is not None:  # None in a plan entry means "no clip"
        with pytest.raises(MosaicSegError, match=r"plans\.json normalisation of channel 'T1'"):
            normalize(_image([1.0, 2.0]), [{**MR, "percentiles": bad}])
    assert check_percentiles((0, 100), "x") == (0.0, 100.0)


def test_plan_command_takes_the_mr_clip_option(make_dataset, tmp_path: Path) -> None:
    folder = make_dataset(cases=2, channels=("T1",))
    base = ["plan", str(folder), "--workers", "1", "--no-check", "--no-preprocess"]
    result = CliRunner().invoke(app, [*base, "-o", str(tmp_path / "w"), "--mr-clip-percentiles", "2", "98"])
    assert result.exit_code == 0, result.output
    entry = json.loads((tmp_path / "w" / "plans.json").read_text())["datasets"]["Dataset001_Tiny"]["normalization"][0]
    assert entry["scheme"] == "mr" and entry["percentiles"] == [2.0, 98.0]
    assert "T1:mr(2-98%)" in result.output
    bad = CliRunner().invoke(app, [*base, "-o", str(tmp_path / "v"), "--mr-clip-percentiles", "98", "2"])
    assert bad.exit_code == 2 and "--mr-clip-percentiles" in bad.output and "0 <= lo < hi <= 100" in bad.output
    assert not (tmp_path / "v").exists()  # refused before any work


def test_plan_preset_hermes_sets_the_papers_preprocessing_under_what_is_typed(make_dataset, tmp_path: Path) -> None:
    folder = make_dataset(cases=2, channels=("T1",))
    base = ["plan", str(folder), "--workers", "1", "--no-check", "--no-preprocess", "--preset", "hermes"]
    result = CliRunner().invoke(app, [*base, "-o", str(tmp_path / "w")])
    assert result.exit_code == 0, result.output
    plans = json.loads((tmp_path / "w" / "plans.json").read_text())
    entry = plans["datasets"]["Dataset001_Tiny"]
    assert entry["normalization"][0]["percentiles"] == [2.0, 98.0]
    assert entry["target_spacing"] == [1.5, 1.5, 1.5]
    # a typed option wins over the preset
    typed = CliRunner().invoke(app, [*base, "-o", str(tmp_path / "t"), "--mr-clip-percentiles", "1", "99"])
    assert typed.exit_code == 0, typed.output
    entry = json.loads((tmp_path / "t" / "plans.json").read_text())["datasets"]["Dataset001_Tiny"]
    assert entry["normalization"][0]["percentiles"] == [1.0, 99.0] and entry["target_spacing"] == [1.5, 1.5, 1.5]
    unknown = CliRunner().invoke(app, ["plan", str(folder), "-o", str(tmp_path / "u"), "--preset", "hermez"])
    assert unknown.exit_code == 2 and "--preset 'hermez' is unknown" in unknown.output and "hermes" in unknown.output
    assert not (tmp_path / "u").exists()
