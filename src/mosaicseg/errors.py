"""User-facing errors: every problem names the file, what is wrong and how to fix it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Severity = Literal["error", "warning", "info"]


@dataclass(frozen=True)
class Problem:
    """One finding about user input.

    ``path`` is the file or folder at fault, ``message`` what is wrong, ``fix`` what to do about it.
    ``code`` is a stable short identifier that tests and tools can match on.
    """

    severity: Severity
    code: str
    path: Path | str
    message: str
    fix: str = ""

    def format(self) -> str:
        fix = f" Fix: {self.fix}" if self.fix else ""
        return printable(f"[{self.severity}] {self.code}: {self.path}: {self.message}.{fix}")


def printable(text: str) -> str:
    """``text`` with undecodable file-name bytes (surrogate escapes) shown as ``\\xNN``, so it can be printed."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


class MosaicSegError(Exception):
    """An error caused by user input; the CLI prints it without a traceback and exits with code 2."""

    def __init__(self, message: str, problems: list[Problem] | None = None) -> None:
        self.problems = list(problems or [])
        if self.problems:
            message = message + "\n" + "\n".join("  " + p.format() for p in self.problems)
        super().__init__(message)


def raise_if_errors(problems: list[Problem], what: str) -> None:
    """Raise one :class:`MosaicSegError` listing every error in ``problems`` (warnings do not raise)."""
    errors = [p for p in problems if p.severity == "error"]
    if errors:
        raise MosaicSegError(f"{what}: {len(errors)} problem(s) found", errors)
