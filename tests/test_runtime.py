"""Checkpoint I/O (:mod:`mosaicseg.runtime`): every way a checkpoint file can be broken is a MosaicSegError that
names the file and says how to fix it; loading never executes code."""

from __future__ import annotations

import argparse
import io
import os
import pickle
import random
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from mosaicseg.errors import MosaicSegError
from mosaicseg.runtime import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, load_checkpoint, save_checkpoint

STATE: dict[str, Any] = {
    "model": {"conv.weight": torch.arange(64, dtype=torch.float32).reshape(4, 4, 2, 2), "conv.bias": torch.ones(4)},
    "iteration": 7,
    "plans": {"dim": 2, "network": {"patch_size": [32, 32]}},
    "vocabulary": {"tasks": ["A/liver", "B/liver"]},
}


def _checkpoint_bytes(tmp_path: Path, legacy: bool = False) -> bytes:
    """A real checkpoint file's bytes: ``save_checkpoint``'s zip format, or torch's pre-1.6 (legacy) format."""
    if not legacy:
        return save_checkpoint(tmp_path / "whole.pt", STATE).read_bytes()
    buf = io.BytesIO()
    torch.save({**STATE, "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION}, buf,
               _use_new_zipfile_serialization=False)  # fmt: skip
    return buf.getvalue()


def _refused(path: Path, *words: str) -> str:
    """Load ``path``; the error must be a MosaicSegError naming the file, with a fix (and ``words``)."""
    with pytest.raises(MosaicSegError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert type(info.value) is MosaicSegError
    assert str(path) in message and "Fix:" in message, message
    for w in words:
        assert w in message, message
    return message


def test_round_trip_keeps_tensors_and_primitives_and_tags_the_format(tmp_path: Path) -> None:
    ckpt = load_checkpoint(save_checkpoint(tmp_path / "c.pt", STATE))
    assert ckpt["format"] == CHECKPOINT_FORMAT and ckpt["version"] == CHECKPOINT_VERSION
    assert ckpt["iteration"] == 7 and ckpt["plans"] == STATE["plans"] and ckpt["vocabulary"] == STATE["vocabulary"]
    for k, v in STATE["model"].items():
        assert torch.equal(ckpt["model"][k], v)
    # the legacy (non-zip) torch format of the same state loads too: only truncations of it are refused below
    (tmp_path / "legacy.pt").write_bytes(_checkpoint_bytes(tmp_path, legacy=True))
    assert load_checkpoint(tmp_path / "legacy.pt")["iteration"] == 7


def test_missing_file(tmp_path: Path) -> None:
    _refused(tmp_path / "run" / "checkpoint_final.pt", "not found")


def test_a_folder_is_not_a_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "fold_0").mkdir()
    _refused(tmp_path / "fold_0", "folder")


def test_empty_file(tmp_path: Path) -> None:
    (tmp_path / "c.pt").write_bytes(b"")
    _refused(tmp_path / "c.pt", "empty")


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("fraction", [0.0005, 0.01, 0.1, 0.5, 0.9, 0.99, -1])
def test_truncated_checkpoint(tmp_path: Path, legacy: bool, fraction: float) -> None:
    """An interrupted copy: the first bytes of a real checkpoint (-1: all but the last byte). Truncated legacy
    files make torch raise an EOFError with an empty message; the error must still say what is wrong."""
    data = _checkpoint_bytes(tmp_path, legacy)
    cut = len(data) - 1 if fraction == -1 else max(1, int(len(data) * fraction))
    (tmp_path / "cut.pt").write_bytes(data[:cut])
    message = _refused(tmp_path / "cut.pt", "not a loadable MosaicSeg checkpoint")
    assert "()" not in message and ": )" not in message  # the reason in parentheses is never blank


@pytest.mark.parametrize("seed", range(6))
def test_random_bytes(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    data = bytes(rng.randrange(256) for _ in range(rng.choice([1, 7, 300, 5000])))
    if seed % 2:  # zip magic first: torch takes it for its own format and fails further in
        data = b"PK\x03\x04" + data
    (tmp_path / "noise.pt").write_bytes(data)
    _refused(tmp_path / "noise.pt")


class _Payload:
    """Unpickling this runs ``touch MARKER`` (the classic pickle attack), so a loader that executes code shows."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def test_the_payload_executes_under_plain_pickle(tmp_path: Path) -> None:
    """The control for the test below: an unrestricted unpickler does run it."""
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(_Payload(marker)))
    assert marker.exists()


@pytest.mark.parametrize("how", ["torch.save", "torch.save-legacy", "pickle"])
def test_pickle_that_would_execute_code_is_refused_without_executing_it(tmp_path: Path, how: str) -> None:
    marker = tmp_path / "ran"
    state = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "model": _Payload(marker)}
    path = tmp_path / "evil.pt"
    if how == "pickle":
        path.write_bytes(pickle.dumps(state, protocol=2))  # torch.load's own protocol
    else:
        torch.save(state, path, _use_new_zipfile_serialization=how == "torch.save")
    _refused(path, "not a loadable MosaicSeg checkpoint")
    assert not marker.exists()


def test_an_arbitrary_class_instance_is_refused(tmp_path: Path) -> None:
    state = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "args": argparse.Namespace(lr=0.1)}
    torch.save(state, tmp_path / "c.pt")
    _refused(tmp_path / "c.pt", "not a loadable MosaicSeg checkpoint")


@pytest.mark.parametrize(
    "obj",
    [
        {"model": {"w": torch.zeros(2)}, "iteration": 3},  # a plain state dict without the format tag
        {"format": "nnunet/checkpoint", "model": {}},
        [torch.zeros(2), 3],
        torch.zeros(2, 2),
        42,
    ],
    ids=["dict-without-format", "other-format", "list", "tensor", "int"],
)
def test_a_valid_torch_file_that_is_not_a_mosaicseg_checkpoint(tmp_path: Path, obj: Any) -> None:
    torch.save(obj, tmp_path / "other.pt")
    _refused(tmp_path / "other.pt", "not a MosaicSeg checkpoint")


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_predict_with_a_truncated_checkpoint_exits_2_with_the_message(tmp_path: Path, legacy: bool) -> None:
    data = _checkpoint_bytes(tmp_path, legacy)
    model = tmp_path / "checkpoint_final.pt"
    model.write_bytes(data[: len(data) // 2])
    (tmp_path / "images").mkdir()
    cmd = [sys.executable, "-m", "mosaicseg.cli", "predict", "-m", str(model), "-i", str(tmp_path / "images")]
    proc = subprocess.run([*cmd, "-o", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output
    assert "Traceback" not in output, output
    assert f"error: {model}: not a loadable MosaicSeg checkpoint" in output and "Fix:" in output, output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("state", "message"),
    [
        ({"version": 99}, "newer than this mosaicseg reads"),
        ({"version": "1"}, "no valid version"),
        ({"model": {}}, r"lacks \['model_config'"),
    ],
)
def test_newer_versionless_or_incomplete_checkpoints_are_refused_by_name(tmp_path, state, message):
    from mosaicseg.runtime import CHECKPOINT_FORMAT, MODEL_KEYS

    path = tmp_path / "c.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "version": 1, **state}, path)
    with pytest.raises(MosaicSegError, match=message) as info:
        load_checkpoint(path, require=MODEL_KEYS)
    assert str(path) in str(info.value) and "Fix:" in str(info.value)
