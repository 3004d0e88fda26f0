"""Progress output: a bar in place on a terminal; elsewhere a plain line at most every few seconds."""

from __future__ import annotations

import io

from mosaicseg.progress import progress_bar


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_plain_lines_and_not_one_per_update():
    log = io.StringIO()
    with progress_bar(total=5000, desc="train", unit="it", stream=log) as bar:
        for i in range(5000):
            bar.update(1)
            bar.set_postfix(loss=f"{1 / (i + 1):.4f}", refresh=False)
    text = log.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    # the start and the end; an update in between only if the loop took more than the 10-second interval
    assert 1 <= len(lines) <= 3, lines
    assert lines[-1].startswith("train: 100%") and "5000/5000" in lines[-1]
    assert text.endswith("\n")


def test_with_no_interval_every_state_is_its_own_line():
    log = io.StringIO()
    with progress_bar(total=4, desc="predict", unit="case", stream=log, interval_s=0) as bar:
        for _ in range(4):
            bar.update(1)
    states = [line.split("|")[0].strip() for line in log.getvalue().splitlines()]
    # closing draws the end once more, with the final rate
    assert states == [f"predict: {p:>3}%" for p in (0, 25, 50, 75, 100, 100)]


def test_a_terminal_gets_the_bar_redrawn_in_place():
    term = _Terminal()
    with progress_bar(total=3, desc="x", unit="it", stream=term) as bar:
        for _ in range(3):
            bar.update(1)
    assert "\r" in term.getvalue()


def test_disabled_writes_nothing():
    log = io.StringIO()
    with progress_bar(total=3, desc="x", unit="it", stream=log, disable=True) as bar:
        bar.update(3)
    assert log.getvalue() == ""
