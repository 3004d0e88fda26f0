"""Progress bars that suit where the output goes.

On a terminal: tqdm's bar, redrawn in place as usual. Anywhere else (CI, ``nohup``, a scheduler's log file) a bar
redrawn with carriage returns becomes one log line per update (a 400-iteration demo wrote ~150 KB that way), so
there the bar prints a plain line at most every :data:`LOG_INTERVAL_S` seconds, and once at the end.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import IO, Any

from tqdm import tqdm

LOG_INTERVAL_S = 10.0


class _LineWriter:
    """A file for tqdm that turns each in-place redraw (``"\\r" + text``) into a line of its own."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.last = ""

    def write(self, text: str) -> None:
        line = text.replace("\r", "").strip()
        if line and line != self.last:  # closing redraws the last state again
            self.stream.write(line + "\n")
            self.last = line

    def flush(self) -> None:
        self.stream.flush()


def is_terminal(stream: IO[str]) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # a closed or file-like object without a terminal
        return False


def progress_bar(
    iterable: Iterable[Any] | None = None,
    *,
    desc: str,
    unit: str,
    total: int | None = None,
    initial: int = 0,
    disable: bool = False,
    stream: IO[str] | None = None,
    interval_s: float = LOG_INTERVAL_S,
) -> tqdm:
    """A tqdm bar on ``stream`` (default ``sys.stderr``): in place on a terminal, else a line every ``interval_s``.

    Update its postfix with ``set_postfix(..., refresh=False)``: a refresh draws regardless of the interval.
    """
    stream = sys.stderr if stream is None else stream
    common: dict[str, Any] = dict(total=total, initial=initial, desc=desc, unit=unit, disable=disable)
    if is_terminal(stream):
        return tqdm(iterable, file=stream, dynamic_ncols=True, **common)
    return tqdm(
        iterable,
        file=_LineWriter(stream),
        mininterval=interval_s,
        maxinterval=max(interval_s, 10 * interval_s),
        miniters=1,  # tqdm's dynamic miniters would skip the time check between updates
        ncols=100,
        ascii=True,
        **common,
    )
