"""Evaluation: per (case, label) Dice, IoU, HD95 and NSD (:mod:`.metrics`); ``summary.json``/``metrics.csv`` and
console tables (:mod:`.report`).

Nothing is imported here: the training loop's validation uses :mod:`.metrics` alone, and importing the package
must not pull the report (and its readers of whole datasets) into every process that trains.
"""
