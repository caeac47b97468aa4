"""Build, validate and write submissions; also score one against a hidden solution.

A classification submission has the columns and row order of sample_submission.csv (or id + label
when there is none). It is validated before it is written: same ids, no missing, extra or duplicate
ids, labels from the class set, probabilities finite and summing to 1. A detection submission
(image, PredictionString) has every test image once and PredictionStrings that parse. A segmentation
submission's check decodes RLE, a layer above this one, so it lives in pipeline/segmentation/submit.py. Every
track writes through `write_submission`: checked, written atomically, with a manifest beside it and a
timestamped copy in history/ so earlier submissions are never overwritten.

Other tasks (pipeline/scoring/tasks.py): multi_label writes the tags over their thresholds joined by the
label separator (an image with none gets its most probable tag: every training label holds one), or one
probability column per tag when sample_submission.csv has them; regression writes the number; ordinal the
grade its thresholds cut the prediction into. Validation refuses an unknown tag or grade, a value that is
not a finite number, and rows out of sample_submission's order.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.core.artifacts import atomic_write, write_csv, write_json
from pipeline.core.errors import PipelineError
from pipeline.data.competition import Competition
from pipeline.data.labels import split_tags
from pipeline.data.table import line_of, read_table
from pipeline.scoring.metrics import score
from pipeline.scoring.tasks import cut_grades, kind_of, multi_hot
from pipeline.scoring.tasks import score as task_score


def is_probability_columns(columns, classes: list[str]) -> bool:
    """One column per class (in any order): the submission holds probabilities, not labels."""
    return len(classes) > 1 and set(columns) == set(classes)


def output_kind(comp: Competition, requested: str) -> str:
    """'probabilities' when sample_submission has one column per class, else 'labels' ('values' for numbers)."""
    if comp.task in ("regression", "ordinal"):
        return "values"
    if requested != "auto":
        return requested
    if comp.sample_submission is not None:
        value_cols = [c for c in comp.sample_submission.columns if c != comp.id_column]
        if is_probability_columns(value_cols, comp.classes):
            return "probabilities"
    return "labels"


def build(comp: Competition, test_ids: np.ndarray, proba: np.ndarray, kind: str,
          thresholds: np.ndarray | None = None) -> pd.DataFrame:
    """Submission frame in sample_submission's row order and columns. `thresholds`: multi_label, the cut of each
    tag (default 0.5); ordinal, the cuts between grades (default halfway)."""
    names = comp.classes if comp.task in ("single_label", "multi_label") else ["pred"]
    by_id = pd.DataFrame(proba, index=pd.Index(test_ids, name=comp.id_column), columns=names)
    order = comp.sample_submission[comp.id_column] if comp.sample_submission is not None else comp.test["id"]
    missing = set(order) - set(by_id.index)
    if missing:
        raise PipelineError(f"sample_submission.csv: ids not in test.csv, e.g. '{sorted(missing)[0]}'; "
                            "the two files must list the same ids")
    rows = by_id.loc[order.to_numpy()]
    if kind == "probabilities":
        cols = ([c for c in comp.sample_submission.columns if c != comp.id_column]
                if comp.sample_submission is not None else comp.classes)
        return rows[cols].reset_index()
    label_col = comp.label_column
    if comp.sample_submission is not None:
        label_col = next(c for c in comp.sample_submission.columns if c != comp.id_column)
    if comp.task == "regression":
        return pd.DataFrame({comp.id_column: rows.index.to_numpy(), label_col: rows["pred"].to_numpy()})
    if comp.task == "ordinal":
        grades = np.asarray(comp.classes, dtype=object)[cut_grades(rows["pred"].to_numpy(), len(comp.classes),
                                                                   thresholds)]
        return pd.DataFrame({comp.id_column: rows.index.to_numpy(), label_col: grades})
    if comp.task == "multi_label":
        return pd.DataFrame({comp.id_column: rows.index.to_numpy(),
                             label_col: tag_strings(rows.to_numpy(), comp.classes, comp.separator, thresholds)})
    labels = np.asarray(comp.classes, dtype=object)[rows.to_numpy().argmax(1)]
    return pd.DataFrame({comp.id_column: rows.index.to_numpy(), label_col: labels})


def tag_strings(proba: np.ndarray, tags: list[str], separator: str, thresholds: np.ndarray | None = None) -> list[str]:
    """Each row's tags with probability at or over their threshold (0.5 by default), joined by the separator, in
    the class order; a row with none gets its most probable tag."""
    cut = np.full(len(tags), 0.5) if thresholds is None else np.broadcast_to(np.asarray(thresholds, float), len(tags))
    on = proba >= cut
    on[np.arange(len(proba)), proba.argmax(1)] |= ~on.any(1)
    return [separator.join(t for t, o in zip(tags, row, strict=True) if o) for row in on]


def apply_overrides(frame: pd.DataFrame, comp: Competition, path: Path) -> tuple[pd.DataFrame, int]:
    """Known test labels from train duplicates (clean.transfer_test_labels): label, or one-hot probabilities."""
    overrides = pd.read_csv(path, dtype=str, keep_default_na=False).set_index("id")["label"]
    hit = frame[comp.id_column].isin(overrides.index)
    out = frame.copy()
    known = frame.loc[hit, comp.id_column].map(overrides)
    value_cols = [c for c in frame.columns if c != comp.id_column]
    if comp.task in ("multi_label",) and is_probability_columns(value_cols, comp.classes):
        for cls in value_cols:
            out.loc[hit, cls] = known.map(lambda v, c=cls: float(c in split_tags(v.strip(), comp.separator)))
    elif is_probability_columns(value_cols, comp.classes):
        for cls in value_cols:
            out.loc[hit, cls] = (known == cls).astype(float)
    else:
        out.loc[hit, value_cols[0]] = known
    return out, int(hit.sum())


def _probabilities(values: pd.DataFrame, frame: pd.DataFrame, source: str) -> np.ndarray:
    """The probability cells as floats; a cell that is not a number is an error naming its line and column."""
    numeric = values.apply(pd.to_numeric, errors="coerce")
    bad = (numeric.isna() & values.notna()).to_numpy()
    if bad.any():
        i, j = (int(k[0]) for k in bad.nonzero())
        raise PipelineError(f"{source} line {line_of(frame, i)}: probability {values.iat[i, j]!r} "
                            f"in column '{values.columns[j]}' is not a number")
    return numeric.to_numpy(dtype=float)


def validate(frame: pd.DataFrame, comp: Competition, source: str = "submission") -> None:
    """Raise a one-line PipelineError for the first problem found."""
    id_col = comp.id_column
    expected = list(comp.sample_submission.columns) if comp.sample_submission is not None else None
    if expected is not None and list(frame.columns) != expected:
        raise PipelineError(f"{source}: columns {list(frame.columns)} differ from sample_submission.csv {expected}")
    if id_col not in frame.columns:
        raise PipelineError(f"{source}: id column '{id_col}' missing")
    ids = frame[id_col].astype(str)
    dup = ids.duplicated().to_numpy().nonzero()[0]
    if len(dup):
        raise PipelineError(f"{source} line {line_of(frame, dup[0])}: duplicate id '{ids.iloc[dup[0]]}'")
    want = set(comp.test["id"])
    if set(ids) != want:
        extra, missing = sorted(set(ids) - want), sorted(want - set(ids))
        raise PipelineError(f"{source}: ids differ from test.csv ({len(missing)} missing, e.g. {missing[:1]}; "
                            f"{len(extra)} extra, e.g. {extra[:1]})")
    if comp.sample_submission is not None and list(ids) != list(comp.sample_submission[id_col].astype(str)):
        raise PipelineError(f"{source}: rows are not in sample_submission.csv's order")
    values = frame.drop(columns=[id_col])
    if comp.task != "single_label":
        return _validate_task_values(values, frame, comp, ids, source)
    if is_probability_columns(values.columns, comp.classes):
        proba = _probabilities(values, frame, source)
        if not np.isfinite(proba).all() or (proba < 0).any():
            raise PipelineError(f"{source}: probabilities must be finite and non-negative")
        if not np.allclose(proba.sum(1), 1.0, atol=1e-4):
            raise PipelineError(f"{source}: probabilities of a row must sum to 1 "
                                f"(row of id '{ids.iloc[int(np.argmax(np.abs(proba.sum(1) - 1)))]}')")
        return
    bad = ~values.iloc[:, 0].astype(str).isin(comp.classes)
    if bad.any():
        raise PipelineError(f"{source}: label '{values.iloc[:, 0][bad].iloc[0]}' (id '{ids[bad].iloc[0]}') "
                            "is not a class of train.csv")


def _validate_task_values(values: pd.DataFrame, frame: pd.DataFrame, comp: Competition, ids: pd.Series,
                          source: str) -> None:
    """The value cells of a multi_label, regression or ordinal submission (validate checked ids and order)."""
    if comp.task == "multi_label" and is_probability_columns(values.columns, comp.classes):
        proba = _probabilities(values, frame, source)
        bad = ~np.isfinite(proba) | (proba < 0) | (proba > 1)
        if bad.any():
            i, j = (int(k[0]) for k in bad.nonzero())
            raise PipelineError(f"{source} line {line_of(frame, i)}: probability {values.iat[i, j]!r} in column "
                                f"'{values.columns[j]}' (id '{ids.iloc[i]}') is not a number in [0, 1]")
        return
    if len(values.columns) != 1:
        raise PipelineError(f"{source}: columns {list(values.columns)}; a {comp.task} submission has the id and one "
                            "value column" + (" (or one probability column per tag)" if comp.task == "multi_label"
                                              else ""))
    column = values.iloc[:, 0]
    if comp.task == "regression":
        numbers = pd.to_numeric(column, errors="coerce").to_numpy(dtype=float)
        bad = (~np.isfinite(numbers)).nonzero()[0]
        if len(bad):
            raise PipelineError(f"{source} line {line_of(frame, bad[0])}: value {column.iloc[bad[0]]!r} (id "
                                f"'{ids.iloc[bad[0]]}') is not a finite number; every test row needs one")
        return
    known = set(comp.classes)
    for i, cell in enumerate(column.astype(str)):
        parts = split_tags(cell.strip(), comp.separator) if comp.task == "multi_label" else [cell]
        unknown = [t for t in parts if t not in known] or ([] if parts else [cell])
        if unknown:
            what = "tag" if comp.task == "multi_label" else "grade"
            raise PipelineError(f"{source} line {line_of(frame, i)}: {what} '{unknown[0]}' (id '{ids.iloc[i]}') is "
                                f"not a {what} of train.csv ({', '.join(comp.classes[:10])}"
                                f"{', ...' if len(comp.classes) > 10 else ''})")


def validate_detection(frame: pd.DataFrame, source: str, images: list[str], classes: list[str]) -> None:
    """Raise a one-line PipelineError unless the columns are image, PredictionString, every test image has exactly
    one row, and each PredictionString is groups of `label score xmin ymin xmax ymax` with known labels."""
    if list(frame.columns) != ["image", "PredictionString"]:
        raise PipelineError(f"{source}: columns {list(frame.columns)}; a detection submission has image, "
                            "PredictionString")
    dup = frame["image"][frame["image"].duplicated()]
    if len(dup):
        line = int(dup.index[0]) + 2
        raise PipelineError(f"{source} line {line}: image '{dup.iloc[0]}' listed twice; one row per test image")
    missing, extra = sorted(set(images) - set(frame["image"])), sorted(set(frame["image"]) - set(images))
    if missing or extra:
        raise PipelineError(f"{source}: images differ from the test set ({len(missing)} missing, e.g. {missing[:1]}; "
                            f"{len(extra)} extra, e.g. {extra[:1]}); predict every test image once")
    parse_prediction_strings(frame["PredictionString"].tolist(), classes, source)


def write_submission(frame: pd.DataFrame, out_dir: Path, name: str, manifest: dict,
                     check: Callable[[pd.DataFrame, str], None]) -> Path:
    """The submission writer of every track: check(frame, path) raises on the first problem; then <name>.csv is written
    atomically, a timestamped copy goes to history/ and <name>.manifest.json records what made it."""
    out_dir = Path(out_dir)
    path = out_dir / f"{name}.csv"
    check(frame, str(path))
    write_csv(path, frame)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    history = out_dir / "history"
    copy, n = history / f"{name}-{stamp}.csv", 1
    while copy.exists():
        copy, n = history / f"{name}-{stamp}-{n}.csv", n + 1
    atomic_write(copy, lambda tmp: shutil.copyfile(path, tmp))
    write_json(out_dir / f"{name}.manifest.json",
               {**manifest, "written": stamp, "rows": len(frame), "history_copy": str(copy)})
    return path


def write(frame: pd.DataFrame, comp: Competition, out_dir: Path, manifest: dict) -> Path:
    """A classification submission, checked against the competition by `validate`."""
    return write_submission(frame, out_dir, comp.name, manifest, lambda f, source: validate(f, comp, source))


def read_submission(path: Path, what: str = "submission") -> pd.DataFrame:
    """A submission (or solution) CSV read exactly like the competition's CSVs: the same id treatment
    (leading spaces skipped, as in test.csv), line numbers and one-line errors."""
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"{path}: {what} not found")
    return read_table(path)


def score_file(submission: Path, solution: Path, metric: str = "accuracy", separator: str = " ") -> float:
    """Score a label submission against a solution file with the same id column (the demo's private LB): class
    labels (accuracy, macro_f1), tags joined by `separator` (multi-label F-scores), or numbers (rmse, mae, r2;
    qwk on integer grades)."""
    sub, sol = read_submission(submission, "submission"), read_submission(solution, "solution")
    if len(sol.columns) < 2:
        raise PipelineError(f"{solution}: needs an id column and a label column; columns are {list(sol.columns)}")
    id_col, label_col = sol.columns[0], sol.columns[1]
    absent = [c for c in (id_col, label_col) if c not in sub.columns]
    if absent:
        raise PipelineError(f"{submission}: column '{absent[0]}' missing; "
                            f"a label submission has the solution's columns '{id_col}' and '{label_col}'")
    dup = sub[id_col].duplicated().to_numpy().nonzero()[0]
    if len(dup):
        raise PipelineError(f"{submission} line {line_of(sub, dup[0])}: duplicate id '{sub[id_col].iloc[dup[0]]}'")
    missing, extra = sorted(set(sol[id_col]) - set(sub[id_col])), sorted(set(sub[id_col]) - set(sol[id_col]))
    if missing or extra:
        raise PipelineError(f"{submission}: ids do not match {solution} ({len(missing)} missing, e.g. {missing[:1]}; "
                            f"{len(extra)} extra, e.g. {extra[:1]})")
    merged = sol[[id_col, label_col]].merge(sub[[id_col, label_col]], on=id_col, how="left", suffixes=("_true", ""))
    kind = kind_of(metric)
    if kind == "value":
        values = pd.to_numeric(merged[label_col], errors="coerce").to_numpy(float)
        if not np.isfinite(values).all():
            bad = merged[label_col][~np.isfinite(values)].iloc[0]
            raise PipelineError(f"{submission}: value {bad!r} in column '{label_col}' is not a finite number")
        truth = merged[f"{label_col}_true"].astype(float).to_numpy()
        return task_score(metric, truth.astype(int) if metric == "qwk" else truth, values.reshape(-1, 1))
    if kind == "multi":
        cells = pd.concat([sol[label_col], sub[label_col]])
        tags = sorted({t for v in cells for t in split_tags(v.strip(), separator)})
        return task_score(metric, multi_hot(merged[f"{label_col}_true"], tags, separator),
                          multi_hot(merged[label_col], tags, separator))
    classes = sorted(set(sol[label_col]) | set(sub[label_col]))
    index = {c: i for i, c in enumerate(classes)}
    onehot = np.eye(len(classes))[merged[label_col].map(index)]
    return score(metric, merged[f"{label_col}_true"].map(index).to_numpy(), onehot)


def parse_prediction_strings(strings: list[str], classes: list[str], source: str) -> list[dict]:
    """Detection submission rows (`label score xmin ymin xmax ymax` groups) as arrays of labels (class index),
    scores and boxes, with a one-line error naming the bad row."""
    index = {c: i for i, c in enumerate(classes)}
    out = []
    for row, text in enumerate(strings):
        parts = text.split()
        if len(parts) % 6:
            raise PipelineError(f"{source} line {row + 2}: PredictionString needs groups of 6 values "
                                "(label score xmin ymin xmax ymax)")
        groups = np.asarray(parts, dtype=object).reshape(-1, 6)
        unknown = [g for g in groups[:, 0] if g not in index]
        if unknown:
            raise PipelineError(f"{source} line {row + 2}: unknown label '{unknown[0]}'; expected one of {classes}")
        try:
            numbers = groups[:, 1:].astype(np.float64)
        except ValueError:
            raise PipelineError(f"{source} line {row + 2}: PredictionString has a value that is not a number") from None
        if not np.isfinite(numbers).all():
            raise PipelineError(f"{source} line {row + 2}: PredictionString has a value that is not finite")
        out.append({"labels": np.asarray([index[g] for g in groups[:, 0]], dtype=np.int64),
                    "scores": numbers[:, 0].astype(np.float32),
                    "boxes": numbers[:, 1:].astype(np.float32).reshape(-1, 4)})
    return out
