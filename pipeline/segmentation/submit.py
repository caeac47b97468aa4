"""Segmentation submissions: built in the sample submission's form, checked before they are written, read back,
and scored against a hidden solution file (the demo's private leaderboard).

The form (docs/segmentation.md) is the sample submission's: `wide` (the id and one RLE column per class), `long`
(id, class, RLE: one row per image and class) or `combined` (`<id>_<class>`, RLE); its rows keep the sample's
order. Without a sample submission the form is train.csv's and rows follow test.csv. The checks live here
rather than beside the other tracks' in pipeline/scoring/submission.py because they decode RLE
(pipeline/segmentation/rle.py), a layer above scoring.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.core.errors import PipelineError
from pipeline.data.table import line_of
from pipeline.segmentation.data import (
    CLASS_CANDIDATES,
    RLE_CANDIDATES,
    SegmentationData,
    _combined_column,
    _find,
    _split_combined,
)
from pipeline.segmentation.metrics import dice
from pipeline.segmentation.rle import decode, parse_runs


def expected_keys(data: SegmentationData) -> pd.DataFrame:
    """The key columns every submission row must hold, in order: the sample submission's (all but its RLE
    columns), else the test ids (wide) or each test id with each class (long, combined)."""
    columns, form = data.submission_columns, data.submission_form
    key_columns = columns[:1] if form in ("wide", "combined") else columns[:2]
    if data.sample_submission is not None:
        return data.sample_submission[key_columns].reset_index(drop=True)
    if form == "wide":
        return pd.DataFrame({columns[0]: data.test.ids})
    pairs = [(i, c) for i in data.test.ids for c in data.classes]
    if form == "long":
        return pd.DataFrame(pairs, columns=key_columns)
    return pd.DataFrame({columns[0]: [f"{i}_{c}" for i, c in pairs]})


def _row_pairs(keys: pd.DataFrame, form: str) -> tuple[list[str], list[str | None]]:
    """(image id, class) of each key row; the class is None in the wide form (one row holds every class)."""
    if form == "wide":
        return keys.iloc[:, 0].tolist(), [None] * len(keys)
    if form == "long":
        return keys.iloc[:, 0].tolist(), keys.iloc[:, 1].tolist()
    split = keys.iloc[:, 0].str.rpartition("_")
    return split[0].tolist(), split[2].tolist()


def build_frame(data: SegmentationData, rles: dict[tuple[str, str], str]) -> pd.DataFrame:
    """The submission frame from the RLE of every (test id, class)."""
    keys, form, columns = expected_keys(data), data.submission_form, data.submission_columns
    ids, classes = _row_pairs(keys, form)
    frame = keys.copy()
    if form == "wide":
        for c in columns[1:]:
            frame[c] = [rles[(i, c)] for i in ids]
    else:
        frame[columns[-1]] = [rles[(i, c)] for i, c in zip(ids, classes, strict=True)]
    return frame[columns]


def validate_segmentation(frame: pd.DataFrame, source: str, data: SegmentationData) -> None:
    """Raise a one-line PipelineError unless the frame has the submission's columns, the expected rows in order
    (the sample submission's, else one per test image, or per test image and class), and every RLE cell parses
    as runs inside its image."""
    columns = data.submission_columns
    if list(frame.columns) != columns:
        raise PipelineError(f"{source}: columns {list(frame.columns)}; this competition's submission has {columns} "
                            f"({data.submission_form} form)")
    keys = expected_keys(data)
    if len(frame) != len(keys):
        raise PipelineError(f"{source}: {len(frame)} rows, expected {len(keys)} (one per test image"
                            f"{'' if data.submission_form == 'wide' else ' and class'})")
    got = frame[list(keys.columns)].astype(str).reset_index(drop=True)
    differs = np.flatnonzero((got != keys).any(axis=1).to_numpy())
    if len(differs):
        i = int(differs[0])
        raise PipelineError(f"{source} line {line_of(frame, i)}: {got.iloc[i].tolist()} where "
                            f"{keys.iloc[i].tolist()} is expected; keep the sample submission's rows and order")
    shapes = {ident: data.test.shape(i) for i, ident in enumerate(data.test.ids)}
    ids, _ = _row_pairs(keys, data.submission_form)
    rle_columns = columns[1:] if data.submission_form == "wide" else columns[-1:]
    for c in rle_columns:
        for i, (ident, cell) in enumerate(zip(ids, frame[c].fillna("").astype(str), strict=True)):
            if cell.strip():
                parse_runs(cell, shapes[ident], f"{source} line {line_of(frame, i)}, column {c}")


def read_cells(frame: pd.DataFrame, id_column: str, classes: list[str], source: str
               ) -> dict[tuple[str, str], list[str]]:
    """{(image id, class): its RLE cells} of a submission or solution in any of the three forms (told apart by
    the header); an id's rows in a one-class wide file are its objects, all kept."""
    cells: dict[tuple[str, str], list[str]] = defaultdict(list)
    columns = list(frame.columns)
    if id_column in columns and set(classes) <= set(columns):
        for c in classes:
            for ident, rle in zip(frame[id_column], frame[c], strict=True):
                cells[(ident, c)].append(rle)
        return cells
    combined = _combined_column(frame, id_column)
    if combined:
        frame = _split_combined(frame, combined, id_column, Path(source))
    class_column = combined or _find(columns, CLASS_CANDIDATES)
    rle_column = _find(columns, RLE_CANDIDATES)
    if id_column not in frame.columns or not class_column or not rle_column:
        raise PipelineError(f"{source}: columns {columns} are none of the mask forms for id '{id_column}' and "
                            f"classes {classes}: write {id_column} and one RLE column per class, or "
                            f"{id_column},ClassId,EncodedPixels")
    for ident, c, rle in zip(frame[id_column], frame[class_column], frame[rle_column], strict=True):
        cells[(ident, c)].append(rle)
    return cells


def _mask(cells: list[str], shape: tuple[int, int], where: str) -> np.ndarray:
    out = np.zeros(shape, bool)
    for rle in cells:
        out |= decode(rle or "", shape, where)
    return out


def score_masks(submission: pd.DataFrame, solution: pd.DataFrame, data: SegmentationData,
                sources: tuple[str, str] = ("submission", "solution")) -> dict:
    """Mean Dice over every test image and class (Kaggle's: 1 where both masks are empty), and per class."""
    found = [read_cells(frame, data.id_column, data.classes, src)
             for frame, src in zip((submission, solution), sources, strict=True)]
    scores = np.zeros((len(data.test), len(data.classes)))
    for i, ident in enumerate(data.test.ids):
        shape = data.test.shape(i)
        for j, c in enumerate(data.classes):
            pred, true = (_mask(f.get((ident, c), []), shape, f"{src}: image '{ident}', class {c}")
                          for f, src in zip(found, sources, strict=True))
            scores[i, j] = dice(pred, true)
    return {"dice": float(scores.mean()), "per_class": dict(zip(data.classes, scores.mean(0).tolist(), strict=True))}
