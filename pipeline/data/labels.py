"""The label column of train.csv, for every task: what task it looks like, and its classes and targets.

`detect_task` decides `competition.task: auto` from the column; `read_labels` checks every cell for the task and
returns (classes, y): single_label: classes are the labels (each in at least 2 rows: folds need them twice), y the
class index; multi_label: classes are the tags (each in at least 2 rows), y is -1 (the targets are the tags in
`label`); regression: no classes, y the number; ordinal: classes are the integer grades in numeric order, y the
grade's index. Every bad cell is a one-line error naming the file and line.

A column that is numbers but for a few cells (`inf`, `n/a`) is refused by `detect_task` rather than read as classes:
those cells would become classes of their own, and a regression would silently turn into a classification.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.core.errors import PipelineError

MAX_CLASS_INTEGERS = 20  # integer labels with more distinct values than this are a number to regress, not classes

# pandas, numpy and spreadsheets write a lost value as NaN/nan/<NA> when a table is saved again, so
# a label spelled that way is a missing label, not a class (a class really named so must be renamed).
# 'NA', 'None' and 'null' stay labels: real classes carry those names (a region, a severity).
MISSING_LABELS = {"nan", "<na>"}

# Training computes in float32 (at most 3.4e38) and standardises the target; predictions are center + scale * output,
# so a target near float32's limit overflows to inf. 1e30 leaves eight orders of magnitude for that.
MAX_TARGET = 1e30


def sort_classes(labels: list[str]) -> list[str]:
    """Numeric labels sort as numbers ('2' before '10'), others as text."""
    try:
        return sorted(labels, key=float)
    except ValueError:
        return sorted(labels)


def split_tags(label: str, separator: str) -> list[str]:
    return [t for t in label.split(separator) if t != ""] if separator else [label]


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def is_integer(text: str) -> bool:
    """'3', '-1', '4.0': an integer label, written as the CSV writer wrote it."""
    number = _number(text)
    return number is not None and np.isfinite(number) and number == int(number)


def detect_task(labels: pd.Series, separator: str, lines: list[int] | None = None, csv: Path = Path("train.csv"),
                column: str = "label") -> tuple[str, str]:
    """(task, reason) from a label column: tags when any label holds the separator, a number to regress when every
    label is a number and either one is not an integer or there are more than MAX_CLASS_INTEGERS distinct
    integers; otherwise classes (integer grades stay single_label: say competition.task=ordinal for them).

    A column of numbers but for a few cells is an error naming those cells (`_check_mixed`); `lines` are the rows'
    file lines (default: the rows after a header line), `csv` and `column` name them."""
    lines = list(range(2, len(labels) + 2)) if lines is None else lines
    _check_mixed(labels, lines, csv, column, before_tags=True)
    values = labels[labels.str.strip() != ""]
    if separator:
        tagged = int(values.str.strip().str.contains(separator, regex=False).sum())
        if tagged:
            return "multi_label", f"{tagged:,} of {len(values):,} labels hold the separator {separator!r}"
    _check_mixed(labels, lines, csv, column, before_tags=False)
    numbers = [_number(v) for v in values]
    distinct = values.nunique()
    if values.size and all(n is not None and np.isfinite(n) for n in numbers):
        if any(n != int(n) for n in numbers):
            return "regression", f"{distinct:,} distinct values, not all integers"
        if distinct > MAX_CLASS_INTEGERS:
            return "regression", f"{distinct:,} distinct integer values (over {MAX_CLASS_INTEGERS})"
        return "single_label", (f"{distinct} distinct integer values (set competition.task=ordinal for grades, "
                                "regression for a number)")
    return "single_label", f"{distinct:,} classes, no label holds the separator {separator!r}"


def _check_mixed(labels: pd.Series, lines: list[int], csv: Path, column: str, before_tags: bool) -> None:
    """Refuse a column whose non-empty cells are mostly finite numbers, the rest not: as classes, the bad cells
    would be classes of their own and the numbers classes too (a regression read as classification, every
    prediction one of the bad cells). Numbers that are not integers, or bad cells that are themselves non-finite
    numbers (inf, nan), are never tags, so they are refused before the separator rule (a cell 'not known' holds a
    space); more than MAX_CLASS_INTEGERS distinct integers only after it (numeric tag ids are tags)."""
    filled = [(i, v) for i, v in enumerate(labels) if v.strip() != ""]
    numbers = {i: n for i, v in filled if (n := _number(v)) is not None and np.isfinite(n)}
    bad = [(i, v) for i, v in filled if i not in numbers]
    if not bad or len(numbers) <= len(bad):
        return
    values = list(numbers.values())
    if before_tags:
        numeric = any(n != int(n) for n in values) or all(_number(v) is not None for _, v in bad)
    else:
        numeric = len(set(values)) > MAX_CLASS_INTEGERS
    if not numeric:
        return
    shown = ", ".join(f"line {lines[i]}: {v!r}" for i, v in bad[:3]) + (f" and {len(bad) - 3:,} more"
                                                                         if len(bad) > 3 else "")
    raise PipelineError(f"{csv}: column '{column}' holds numbers but for {len(bad):,} of {len(filled):,} cells "
                        f"({shown}); competition.task=auto cannot tell a number to regress from classes: fix or "
                        "remove those rows, or set competition.task explicitly (regression, ordinal or single_label)")


def read_labels(task: str, labels: pd.Series, lines: list[int], separator: str, csv: Path,
                column: str) -> tuple[list[str], np.ndarray]:
    """(classes, y) of a train.csv label column for `task` (see the module doc); `lines` are the rows' file lines."""

    def fail(i: int, what: str) -> PipelineError:
        return PipelineError(f"{csv} line {lines[i]}: {what}")

    if task == "single_label":
        return _read_classes(labels, fail, column)
    for i, v in enumerate(labels):
        if v.strip() == "" or v.strip().lower() in MISSING_LABELS:
            raise fail(i, f"empty or missing target {v!r} in column '{column}'; give every training row a target "
                          "or remove the row")
    if task == "multi_label":
        tags = [split_tags(v.strip(), separator) for v in labels]
        counts = pd.Series([t for row in tags for t in row]).value_counts()
        for tag, n in counts.items():
            if n < 2:
                i = next(j for j, row in enumerate(tags) if tag in row)
                raise fail(i, f"tag '{tag}' appears in only 1 row; folds need at least 2 per tag; "
                              "remove the tag or the row")
        return sort_classes(list(counts.index)), np.full(len(labels), -1)
    numbers = []
    for i, v in enumerate(labels):
        n = _number(v)
        if n is None or not np.isfinite(n):
            raise fail(i, f"target {v!r} in column '{column}' is not a finite number; a {task} target must be "
                          "one (fix the cell, or set competition.task=single_label for classes)")
        if task == "ordinal" and n != int(n):
            raise fail(i, f"grade {v!r} in column '{column}' is not an integer; ordinal grades are integers "
                          "(set competition.task=regression for a number)")
        if task == "regression" and abs(n) > MAX_TARGET:
            raise fail(i, f"target {v!r} in column '{column}' is outside the accepted range -{MAX_TARGET:.0e} to "
                          f"{MAX_TARGET:.0e} (training computes in float32, at most 3.4e38, on the standardised "
                          "target); rescale the column (e.g. its logarithm) or fix the cell")
        numbers.append(n)
    if len(set(numbers)) == 1:
        what = "target" if task == "regression" else "grade"
        need = ("a constant has nothing to learn: submit the value itself without a model"
                if task == "regression" else "ordinal needs at least two grades to cut between: add rows of others")
        raise PipelineError(f"{csv}: every {what} in column '{column}' is {labels.iloc[0].strip()!r} "
                            f"({len(labels):,} rows, lines {lines[0]} to {lines[-1]}); {need}, or check "
                            "competition.label_column")
    if task == "regression":
        return [], np.asarray(numbers, dtype=np.float64)
    classes = sort_classes(sorted(set(labels.str.strip())))
    index = {c: i for i, c in enumerate(classes)}
    return classes, labels.str.strip().map(index).to_numpy()


def _read_classes(labels: pd.Series, fail, column: str) -> tuple[list[str], np.ndarray]:
    """Single-label classes as written (not stripped: a label is written back exactly as read)."""
    empty = (labels == "").to_numpy().nonzero()[0]
    if len(empty):
        raise fail(int(empty[0]), f"empty label in column '{column}'; label every training row")
    lost = labels.str.lower().isin(MISSING_LABELS).to_numpy().nonzero()[0]
    if len(lost):
        raise fail(int(lost[0]), f"label '{labels.iloc[lost[0]]}' in column '{column}' is how a missing value is "
                                 "saved, not a class; label the row or remove it")
    counts = labels.value_counts()
    single = counts[counts < 2]
    if len(single):
        cls = single.index[0]
        raise fail(int((labels == cls).to_numpy().nonzero()[0][0]),
                   f"class '{cls}' has only 1 sample; folds need at least 2 per class; remove the row or merge "
                   "the class")
    classes = sort_classes(list(counts.index))
    index = {c: i for i, c in enumerate(classes)}
    return classes, labels.map(index).astype(int).to_numpy()
