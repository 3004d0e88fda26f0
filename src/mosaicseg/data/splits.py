"""Deterministic, patient-grouped k-fold splits, one set per dataset.

Cases of one patient (ACDC's ``patientXXX_frameYY``, LIDC's slices) always fall on the same side. A
dataset with fewer patients than folds is never validated: every fold trains on all of it.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

import numpy as np

from mosaicseg.config import CollectionConfig
from mosaicseg.errors import MosaicSegError

# Case-id endings that usually mean "one more image of the same patient": check warns when these occur
# without a grouping rule.
_SUSPECT = re.compile(r"^(?P<patient>.+?)[_-]?(frame|slice|tp|time|ses|visit|scan|phase|echo|view)[_-]?\d+$", re.I)


def patient_of(case_id: str, regex: str | None) -> str:
    """Patient id of ``case_id``: group ``patient`` or group 1 of ``regex``; the case id itself otherwise.

    A case id the rule does not match is its own patient.
    """
    if not regex:
        return case_id
    m = re.search(regex, case_id)
    if not m:
        return case_id
    if "patient" in m.re.groupindex:
        return m["patient"]
    return m.group(1)


def suspected_grouping(case_ids: list[str]) -> tuple[int, list[str]]:
    """Heuristic for ``check``: how many cases look like repeated images of one patient, with examples."""
    groups = Counter(m["patient"] for c in case_ids if (m := _SUSPECT.match(c)))
    shared = [p for p, n in groups.items() if n > 1]
    return sum(groups[p] for p in shared), shared[:3]


@dataclass(frozen=True)
class Split:
    """One fold of one dataset. ``val`` is empty when the dataset is too small to validate."""

    train: tuple[str, ...]
    val: tuple[str, ...]


def make_splits(case_ids: list[str], folds: int, seed: int, patient_regex: str | None = None) -> list[Split]:
    """``folds`` deterministic patient-grouped splits (same inputs → same splits, order-independent).

    Patients are shuffled with ``seed`` and dealt round-robin, so fold sizes differ by at most one patient.
    """
    cases = sorted(case_ids)
    by_patient: dict[str, list[str]] = {}
    for c in cases:
        by_patient.setdefault(patient_of(c, patient_regex), []).append(c)
    patients = sorted(by_patient)
    if len(patients) < folds:
        return [Split(tuple(cases), ()) for _ in range(folds)]
    order = np.random.default_rng(seed).permutation(len(patients))
    fold_of = {patients[j]: i % folds for i, j in enumerate(order)}
    splits = []
    for f in range(folds):
        val = tuple(c for c in cases if fold_of[patient_of(c, patient_regex)] == f)
        train = tuple(c for c in cases if fold_of[patient_of(c, patient_regex)] != f)
        splits.append(Split(train, val))
    return splits


def split_for_fold(
    case_ids: list[str], fold: int | str, folds: int, seed: int, patient_regex: str | None = None
) -> Split:
    """The split of ``fold`` (``0..folds-1``) or ``"all"`` (train on everything, validate on nothing)."""
    if fold == "all":
        return Split(tuple(sorted(case_ids)), ())
    if not isinstance(fold, int) or not 0 <= fold < folds:
        raise MosaicSegError(f"fold {fold!r} does not exist. Fix: use 0..{folds - 1} or 'all'.")
    return make_splits(case_ids, folds, seed, patient_regex)[fold]


def fold_cases(
    config: CollectionConfig, cases: dict[str, list[str]], fold: int | str
) -> tuple[list[tuple[str, str]], list[tuple[str, str]], list[str]]:
    """Training and validation ``(dataset, case_id)`` pairs of ``fold`` over every dataset, plus notes
    naming the datasets that are too small for ``config.folds`` folds (only trained on)."""
    train: list[tuple[str, str]] = []
    val: list[tuple[str, str]] = []
    notes: list[str] = []
    for entry in config.datasets:
        ids = cases.get(entry.name, [])
        if not ids:
            continue
        split = split_for_fold(ids, fold, config.folds, config.seed, entry.patient_regex)
        if fold != "all" and not split.val:
            n_patients = len({patient_of(c, entry.patient_regex) for c in ids})
            notes.append(
                f"{entry.name}: {n_patients} patient(s) < {config.folds} folds, only trained on, never validated"
            )
        train += [(entry.name, c) for c in split.train]
        val += [(entry.name, c) for c in split.val]
    return train, val, notes
