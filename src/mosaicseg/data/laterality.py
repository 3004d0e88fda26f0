"""Left/right label pairs, so that mirroring along the left-right axis swaps them instead of teaching the
network that ``Caudate_R`` may lie on either side.

Images are read in the canonical ``LPS`` orientation (:mod:`mosaicseg.data.io`), so spatial axis 0 runs
from the patient's right to left; for 2D images axis 0 is the horizontal one. nnU-Net mirrors every axis
and its users switch mirroring off for lateralised label sets (TotalSegmentator trains without it);
swapping the pair keeps the augmentation and gives correct labels.

A label is lateral when a token of its name (split at ``_``, ``-``, ``.``, spaces, and a leading
``Left``/``Right`` before a capital) is a side word: ``L``/``R``, ``left``/``right``, ``lh``/``rh``
(any case). Its partner is the same name with the other side word.
"""

from __future__ import annotations

import re

LATERAL_AXIS = 0  # spatial axis running right → left in the canonical LPS orientation

_SIDES = {"l": "r", "r": "l", "left": "right", "right": "left", "lh": "rh", "rh": "lh"}
_TOKEN = re.compile(r"[A-Za-z0-9]+")
_CAMEL_PREFIX = re.compile(r"^(Left|Right)(?=[A-Z])")


def _swap_case(word: str, like: str) -> str:
    if like.isupper():
        return word.upper()
    if like[0].isupper():
        return word.capitalize()
    return word.lower()


def lateral_partner(name: str) -> str | None:
    """The label name with its side word swapped (``"Caudate_R"`` → ``"Caudate_L"``, ``"kidney_left"`` →
    ``"kidney_right"``, ``"LeftKidney"`` → ``"RightKidney"``), or None when the name has no side word."""
    m = _CAMEL_PREFIX.match(name)
    if m:
        other = "Right" if m.group(1) == "Left" else "Left"
        return other + name[m.end() :]
    for tok in _TOKEN.finditer(name):
        word = tok.group(0)
        other = _SIDES.get(word.lower())
        if other is None:
            continue
        # tokens are whole alphanumeric runs, so "L1" or "Lung" never read as a side
        start, end = tok.span()
        return name[:start] + _swap_case(other, word) + name[end:]
    return None


def lateral_pairs(labels: dict[str, tuple[int, ...]]) -> tuple[list[tuple[str, str]], list[str]]:
    """Of one dataset's ``label name → values``: the ``(label, partner)`` pairs a left-right mirror swaps
    (each pair once), and the lateral labels it cannot swap (partner missing, or a multi-value region)."""
    pairs: list[tuple[str, str]] = []
    unswappable: list[str] = []
    for label, values in labels.items():
        partner = lateral_partner(label)
        if partner is None:
            continue
        other = labels.get(partner)
        if other is None or len(values) != 1 or len(other) != 1:
            unswappable.append(label)
        elif (partner, label) not in pairs:
            pairs.append((label, partner))
    return pairs, unswappable
