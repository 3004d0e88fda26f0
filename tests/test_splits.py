"""Patient-grouped, deterministic k-fold splits."""

from __future__ import annotations

from mosaicseg.config import parse_collection
from mosaicseg.data.splits import fold_cases, make_splits, patient_of, suspected_grouping

ACDC = [f"patient{p:03d}_frame{f:02d}" for p in range(1, 21) for f in (1, 12)]
REGEX = r"^(?P<patient>patient\d+)_frame\d+$"


def test_no_patient_on_both_sides_and_every_case_validated_once():
    splits = make_splits(ACDC, 5, 12345, REGEX)
    seen = []
    for s in splits:
        train_p = {patient_of(c, REGEX) for c in s.train}
        val_p = {patient_of(c, REGEX) for c in s.val}
        assert not train_p & val_p
        assert len(s.val) == 8 and len(s.train) == 32
        seen += s.val
    assert sorted(seen) == sorted(ACDC)


def test_without_rule_frames_of_one_patient_can_leak():
    splits = make_splits(ACDC, 5, 12345, None)
    leaks = sum(bool({patient_of(c, REGEX) for c in s.train} & {patient_of(c, REGEX) for c in s.val}) for s in splits)
    assert leaks > 0
    n, examples = suspected_grouping(ACDC)
    assert n == 40 and examples[0] == "patient001"


def test_deterministic_and_order_independent():
    assert make_splits(ACDC, 5, 1, REGEX) == make_splits(list(reversed(ACDC)), 5, 1, REGEX)
    assert make_splits(ACDC, 5, 1, REGEX) != make_splits(ACDC, 5, 2, REGEX)


def test_too_small_dataset_is_only_trained_on():
    cfg = parse_collection({"folds": 5, "datasets": ["/x/Big", "/x/Tiny"]})
    train, val, notes = fold_cases(cfg, {"Big": [f"b{i}" for i in range(10)], "Tiny": ["t0"]}, 0)
    assert ("Tiny", "t0") in train and all(d == "Big" for d, _ in val) and len(val) == 2
    assert len(notes) == 1 and "Tiny" in notes[0] and "never validated" in notes[0]
    train_all, val_all, _ = fold_cases(cfg, {"Big": [f"b{i}" for i in range(10)], "Tiny": ["t0"]}, "all")
    assert len(train_all) == 11 and not val_all
