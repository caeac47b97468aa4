"""Read a competition folder (the input contract in DESIGN.md) without ever writing to it.

Output: a `Competition` with train and test tables holding `id` (as written in the CSV), `path`
(absolute, checked to stay inside DATA) and, for train, `label` (string, as written) and `y` (class
index). Every contract violation is a one-line `PipelineError` naming the file, line and fix.
Line numbers are the CSV's own (header = line 1).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from .config import CompetitionConfig
from .errors import PipelineError

ID_CANDIDATES = ("image", "image_id", "id", "filename", "file_name", "file", "path", "image_path", "img", "name")
LABEL_CANDIDATES = ("label", "labels", "target", "class", "category", "y")


@dataclass
class Competition:
    root: Path
    name: str
    train: pd.DataFrame
    test: pd.DataFrame
    classes: list[str]
    id_column: str
    label_column: str
    sample_submission: pd.DataFrame | None

    @property
    def class_index(self) -> dict[str, int]:
        return {c: i for i, c in enumerate(self.classes)}


def _read_csv(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise PipelineError(f"{path}: file not found; the competition folder must contain it (see README 'competition folder')")
    try:
        # Strings throughout: ids and labels are written back exactly as they were read.
        return pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise PipelineError(f"{path}: not a readable CSV ({str(exc).splitlines()[0]})") from None
    except pd.errors.EmptyDataError:
        raise PipelineError(f"{path}: file is empty; it needs a header row and one row per image") from None


def _detect_id(train: pd.DataFrame, test: pd.DataFrame, cfg: CompetitionConfig, files: tuple[Path, Path]) -> str:
    if cfg.id_column:
        for frame, path in zip((train, test), files, strict=True):
            if cfg.id_column not in frame.columns:
                raise PipelineError(f"{path}: column '{cfg.id_column}' (competition.id_column) missing; columns are {list(frame.columns)}")
        return cfg.id_column
    shared = [c for c in train.columns if c in set(test.columns)]
    for cand in ID_CANDIDATES:
        if cand in shared:
            return cand
    if shared:
        return shared[0]
    raise PipelineError(f"{files[1]}: no column shared with {files[0].name} to use as image id; set competition.id_column")


def _detect_label(train: pd.DataFrame, test: pd.DataFrame, id_col: str, cfg: CompetitionConfig, path: Path) -> str:
    if cfg.label_column:
        if cfg.label_column not in train.columns:
            raise PipelineError(f"{path}: column '{cfg.label_column}' (competition.label_column) missing; columns are {list(train.columns)}")
        return cfg.label_column
    extra = [c for c in train.columns if c not in set(test.columns) and c not in (id_col, cfg.group_column)]
    if len(extra) == 1:
        return extra[0]
    for cand in LABEL_CANDIDATES:
        if cand in train.columns and cand != id_col:
            return cand
    raise PipelineError(f"{path}: cannot tell the label column among {list(train.columns)}; set competition.label_column")


def _resolve_paths(frame: pd.DataFrame, id_col: str, root: Path, cfg: CompetitionConfig, csv: Path) -> list[str]:
    """Absolute paths that provably stay inside DATA (no '..', absolute paths or links out)."""
    real_root = root.resolve()
    out = []
    for i, ident in enumerate(frame[id_col]):
        line = i + 2
        if ident == "":
            raise PipelineError(f"{csv} line {line}: empty '{id_col}'; every row needs an image id")
        rel = os.path.join(cfg.image_dir, ident + cfg.image_suffix) if (cfg.image_dir or cfg.image_suffix) else ident
        if os.path.isabs(rel) or rel.startswith(("\\", "~")):
            raise PipelineError(f"{csv} line {line}: image path '{rel}' is absolute; paths must be relative to {root}")
        real = (real_root / rel).resolve()
        if not real.is_relative_to(real_root):
            raise PipelineError(f"{csv} line {line}: image path '{rel}' leads outside the competition folder {root}; keep images inside it")
        if not real.is_file():
            raise PipelineError(f"{csv} line {line}: image '{rel}' not found in {root}; fix the path or remove the row")
        out.append(str(real))
    return out


def _check_ids(frame: pd.DataFrame, id_col: str, csv: Path) -> None:
    if frame.empty:
        raise PipelineError(f"{csv}: has a header but no rows; it needs one row per image")
    dup = frame[id_col].duplicated(keep="first")
    if dup.any():
        i = int(dup.to_numpy().nonzero()[0][0])
        first = int((frame[id_col] == frame[id_col].iloc[i]).to_numpy().nonzero()[0][0])
        raise PipelineError(f"{csv} line {i + 2}: duplicate id '{frame[id_col].iloc[i]}' (first on line {first + 2}); ids must be unique")


def sort_classes(labels: list[str]) -> list[str]:
    """Numeric labels sort as numbers ('2' before '10'), others as text."""
    try:
        return sorted(labels, key=float)
    except ValueError:
        return sorted(labels)


def _check_labels(train: pd.DataFrame, label_col: str, csv: Path) -> list[str]:
    empty = (train[label_col] == "").to_numpy().nonzero()[0]
    if len(empty):
        raise PipelineError(f"{csv} line {empty[0] + 2}: empty label in column '{label_col}'; label every training row")
    counts = train[label_col].value_counts()
    single = counts[counts < 2]
    if len(single):
        cls = single.index[0]
        line = int((train[label_col] == cls).to_numpy().nonzero()[0][0]) + 2
        raise PipelineError(
            f"{csv} line {line}: class '{cls}' has only 1 sample; folds need at least 2 per class; remove the row or merge the class"
        )
    return sort_classes(list(counts.index))


def read_competition(root: Path, cfg: CompetitionConfig) -> Competition:
    """Validate the folder and return its tables; never writes inside root."""
    root = Path(root)
    if not root.is_dir():
        raise PipelineError(f"{root}: competition folder not found; pass DATA=path/to/competition")
    train_csv, test_csv = root / cfg.train_csv, root / cfg.test_csv
    train_raw, test_raw = _read_csv(train_csv), _read_csv(test_csv)
    id_col = _detect_id(train_raw, test_raw, cfg, (train_csv, test_csv))
    label_col = _detect_label(train_raw, test_raw, id_col, cfg, train_csv)
    for frame, csv in ((train_raw, train_csv), (test_raw, test_csv)):
        _check_ids(frame, id_col, csv)
    classes = _check_labels(train_raw, label_col, train_csv)
    index = {c: i for i, c in enumerate(classes)}
    train = pd.DataFrame({
        "id": train_raw[id_col],
        "path": _resolve_paths(train_raw, id_col, root, cfg, train_csv),
        "label": train_raw[label_col],
    })
    train["y"] = train["label"].map(index).astype(int)
    if cfg.group_column:
        if cfg.group_column not in train_raw.columns:
            raise PipelineError(f"{train_csv}: column '{cfg.group_column}' (competition.group_column) missing; columns are {list(train_raw.columns)}")
        train["user_group"] = train_raw[cfg.group_column]
    test = pd.DataFrame({"id": test_raw[id_col], "path": _resolve_paths(test_raw, id_col, root, cfg, test_csv)})
    sample_path = root / cfg.sample_submission_csv
    sample = _read_csv(sample_path) if sample_path.is_file() else None
    if sample is not None and id_col not in sample.columns:
        raise PipelineError(f"{sample_path}: id column '{id_col}' missing; columns are {list(sample.columns)}")
    name = cfg.name or root.resolve().name
    return Competition(root, name, train, test, classes, id_col, label_col, sample)
