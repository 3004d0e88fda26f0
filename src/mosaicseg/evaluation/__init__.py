"""Evaluation: per (case, label) Dice, IoU, HD95 and NSD; ``summary.json``/``metrics.csv``; console tables."""

from __future__ import annotations

from mosaicseg.evaluation.metrics import METRICS, case_metrics, region_mask
from mosaicseg.evaluation.report import (
    LabelMap,
    LabelPair,
    evaluate_folders,
    format_table,
    label_pairs,
    load_label_map,
    parse_mapping,
    summarise,
    write_csv,
)

__all__ = [
    "METRICS",
    "LabelMap",
    "LabelPair",
    "case_metrics",
    "evaluate_folders",
    "format_table",
    "label_pairs",
    "load_label_map",
    "parse_mapping",
    "region_mask",
    "summarise",
    "write_csv",
]
