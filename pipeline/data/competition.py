"""Read a competition folder (the contract in docs/competition.md) without ever writing to it.

Output: a `Competition` with train and test tables holding `id` (as written in the CSV), `path`
(absolute, checked to stay inside DATA), `line` (the row's line in its CSV) and, for train, `label`
(string, as written) and `y` (class index). Every contract violation is a one-line `PipelineError`
naming the file, line and fix. Line numbers are the ones an editor shows (header = line 1, blank
lines and quoted line breaks counted). CSVs are read with the standard library's csv module, which
reports where a record starts; pandas does not.

`read_extra` reads the folders of `competition.extra` under the same contract (a train.csv with the
competition's id and label columns, images inside the folder, labels that are classes of the
competition's train.csv) as extra training rows; only the clean stage reads them.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from pipeline.core.config import CompetitionConfig
from pipeline.core.errors import PipelineError
from pipeline.data.labels import detect_task, read_labels
from pipeline.data.table import line_of, read_table

log = logging.getLogger(__name__)

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
    task: str = "single_label"  # pipeline/scoring/tasks.py: single_label, multi_label, regression or ordinal
    separator: str = " "  # multi_label: what separates the tags of a label

    @property
    def class_index(self) -> dict[str, int]:
        return {c: i for i, c in enumerate(self.classes)}


def _detect_id(train: pd.DataFrame, test: pd.DataFrame, cfg: CompetitionConfig, files: tuple[Path, Path]) -> str:
    if cfg.id_column:
        for frame, path in zip((train, test), files, strict=True):
            if cfg.id_column not in frame.columns:
                raise PipelineError(f"{path}: column '{cfg.id_column}' (competition.id_column) missing; "
                                    f"columns are {list(frame.columns)}")
        return cfg.id_column
    shared = [c for c in train.columns if c in set(test.columns)]
    for cand in ID_CANDIDATES:
        if cand in shared:
            return cand
    if shared:
        return shared[0]
    raise PipelineError(f"{files[1]}: no column shared with {files[0].name} to use as image id; "
                        "set competition.id_column")


def _detect_label(train: pd.DataFrame, test: pd.DataFrame, id_col: str, cfg: CompetitionConfig, path: Path) -> str:
    if cfg.label_column:
        if cfg.label_column not in train.columns:
            raise PipelineError(f"{path}: column '{cfg.label_column}' (competition.label_column) missing; "
                                f"columns are {list(train.columns)}")
        return cfg.label_column
    extra = [c for c in train.columns if c not in set(test.columns) and c not in (id_col, cfg.group_column)]
    if len(extra) == 1:
        return extra[0]
    for cand in LABEL_CANDIDATES:
        if cand in train.columns and cand != id_col:
            return cand
    raise PipelineError(f"{path}: cannot tell the label column among {list(train.columns)}; "
                        "set competition.label_column")


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
SEARCH_DEPTH = 2  # DATA/train_images/x.png and DATA/train/images/x.png: the layouts Kaggle folders use


def image_folders(root: Path, ident: str) -> list[tuple[str, str]]:
    """Each (folder relative to DATA, suffix) up to SEARCH_DEPTH levels down that holds the image `ident` names
    (as a file name, or a file name without its image suffix).
    Kaggle folders keep bare ids in their CSVs and the images in per-split folders (train_images/, test/images/),
    which one competition.image_dir cannot express: each CSV finds its own folder from its first id."""
    found = set()
    for folder, dirs, files in os.walk(root):
        rel = os.path.relpath(folder, root)
        depth = 0 if rel == "." else rel.count(os.sep) + 1
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if depth < SEARCH_DEPTH else []
        names = set(files)
        if depth and ident in names:
            found.add((rel, ""))
        found.update((rel, s) for s in IMAGE_SUFFIXES if ident + s in names)
    return sorted(found)


def image_location(root: Path, first: str, cfg: CompetitionConfig, csv: Path, line: int) -> tuple[str, str]:
    """(image_dir, image_suffix) a CSV's ids are read with: competition.image_dir and image_suffix when either is
    set or the first id is a path from DATA, else the one subfolder that holds the first id's image
    (image_folders); the bundles record the same pair."""
    if cfg.image_dir or cfg.image_suffix or not first or (root / first).is_file():
        return cfg.image_dir, cfg.image_suffix
    found = image_folders(root, first)
    if len(found) > 1:
        raise PipelineError(f"{csv} line {line}: image '{first}' is in several folders ("
                            + ", ".join(os.path.join(d, first + x) for d, x in found)
                            + "); set competition.image_dir (and image_suffix) to the right one")
    if not found:
        return "", ""
    log.info(f"{csv.name}: images found in {os.path.join(found[0][0], '*' + found[0][1])} "
             "(competition.image_dir / image_suffix set this)")
    return found[0]


def resolve_paths(frame: pd.DataFrame, id_col: str, root: Path, cfg: CompetitionConfig, csv: Path) -> list[str]:
    """Absolute paths that provably stay inside DATA (no '..', absolute paths or links out); ids are read in the
    folder image_location gives."""
    real_root = root.resolve()
    ids = [str(x) for x in frame[id_col]]
    first = next((i for i, x in enumerate(ids) if x), 0)
    image_dir, suffix = image_location(real_root, ids[first] if ids else "", cfg, csv, line_of(frame, first))
    out = []
    for i, ident in enumerate(frame[id_col]):
        line = line_of(frame, i)
        if ident == "":
            raise PipelineError(f"{csv} line {line}: empty '{id_col}'; every row needs an image id")
        rel = os.path.join(image_dir, ident + suffix) if (image_dir or suffix) else ident
        if os.path.isabs(rel) or rel.startswith(("\\", "~")):
            raise PipelineError(f"{csv} line {line}: image path '{rel}' is absolute; paths must be relative to {root}")
        try:
            real = (real_root / rel).resolve()
        except (OSError, RuntimeError):  # RuntimeError: Python < 3.13 reports a link loop so
            raise PipelineError(f"{csv} line {line}: image path '{rel}' runs into a loop of symbolic links in {root}; "
                                "fix or remove the links") from None
        if not real.is_relative_to(real_root):
            raise PipelineError(f"{csv} line {line}: image path '{rel}' leads outside the competition folder {root}; "
                                "keep images inside it")
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
        raise PipelineError(f"{csv} line {line_of(frame, i)}: duplicate id '{frame[id_col].iloc[i]}' "
                            f"(first on line {line_of(frame, first)}); ids must be unique")


def _check_sample(sample: pd.DataFrame, test: pd.DataFrame, id_col: str, classes: list[str], path: Path,
                  task: str = "single_label") -> None:
    """sample_submission.csv fixes the submission: the test ids once each, and a label or per-class columns."""
    if id_col not in sample.columns:
        raise PipelineError(f"{path}: id column '{id_col}' missing; columns are {list(sample.columns)}")
    values = [c for c in sample.columns if c != id_col]
    if not values:
        raise PipelineError(f"{path}: only the id column '{id_col}'; add the label column "
                            "(or one probability column per class)")
    if task == "multi_label" and len(values) > 1 and (unseen := [c for c in values if c not in classes]):
        raise PipelineError(f"{path}: tag column '{unseen[0]}' never appears in train.csv's labels; a model cannot "
                            "learn it: fix the header or add training rows with that tag")
    if task in ("regression", "ordinal") and len(values) > 1:
        raise PipelineError(f"{path}: columns {values}; a {task} submission has the id and one value column")
    if len(values) > 1 and set(values) != set(classes):
        odd = [c for c in values if c not in classes] or sorted(set(classes) - set(values))
        raise PipelineError(f"{path}: columns {values} are neither one label column nor one probability column "
                            f"per class of train.csv ('{odd[0]}' does not fit); fix the header")
    _check_ids(sample, id_col, path)
    known = set(test["id"])
    extra = (~sample[id_col].isin(known)).to_numpy().nonzero()[0]
    if len(extra):
        raise PipelineError(f"{path} line {line_of(sample, extra[0])}: id '{sample[id_col].iloc[extra[0]]}' "
                            "is not in test.csv; the two files must list the same ids")
    missing = test[~test["id"].isin(set(sample[id_col]))]
    if len(missing):
        raise PipelineError(f"{path}: no row for test.csv's id '{missing['id'].iloc[0]}' "
                            f"(test.csv line {missing['line'].iloc[0]}) and {len(missing) - 1} more; "
                            "the two files must list the same ids")


def read_competition(root: Path, cfg: CompetitionConfig) -> Competition:
    """Validate the folder and return its tables; never writes inside root."""
    root = Path(root)
    if not root.is_dir():
        raise PipelineError(f"{root}: competition folder not found; pass DATA=path/to/competition")
    train_csv, test_csv = root / cfg.train_csv, root / cfg.test_csv
    train_raw, test_raw = read_table(train_csv), read_table(test_csv)
    id_col = _detect_id(train_raw, test_raw, cfg, (train_csv, test_csv))
    label_col = _detect_label(train_raw, test_raw, id_col, cfg, train_csv)
    for frame, path in ((train_raw, train_csv), (test_raw, test_csv)):
        _check_ids(frame, id_col, path)
    task = cfg.task if cfg.task != "auto" else detect_task(train_raw[label_col], cfg.label_separator,
                                                           train_raw.attrs["lines"], train_csv, label_col)[0]
    classes, y = read_labels(task, train_raw[label_col], train_raw.attrs["lines"], cfg.label_separator, train_csv,
                             label_col)
    train = pd.DataFrame({
        "id": train_raw[id_col],
        "path": resolve_paths(train_raw, id_col, root, cfg, train_csv),
        "label": train_raw[label_col],
        "line": train_raw.attrs["lines"],
    })
    train["y"] = y
    if cfg.group_column:
        if cfg.group_column not in train_raw.columns:
            raise PipelineError(f"{train_csv}: column '{cfg.group_column}' (competition.group_column) missing; "
                                f"columns are {list(train_raw.columns)}")
        train["user_group"] = train_raw[cfg.group_column]
    test = pd.DataFrame({"id": test_raw[id_col], "path": resolve_paths(test_raw, id_col, root, cfg, test_csv),
                         "line": test_raw.attrs["lines"]})
    sample_path = root / cfg.sample_submission_csv
    sample = read_table(sample_path) if sample_path.is_file() else None
    if sample is not None:
        _check_sample(sample, test, id_col, classes, sample_path, task)
    name = cfg.name or root.resolve().name
    return Competition(root, name, train, test, classes, id_col, label_col, sample, task, cfg.label_separator)


def read_extra(comp: Competition, cfg: CompetitionConfig) -> pd.DataFrame:
    """The rows of every `competition.extra` folder: id, path, label, line, y and `source` (the folder as configured).

    Each folder is checked like the competition folder (its CSV, unique ids, images inside it, no links out) and
    never written to. Relative folders are read from the current directory, like DATA.
    """
    if cfg.extra and comp.task != "single_label":
        raise PipelineError(f"competition.extra: extra folders are read for single_label tasks only, this one is "
                            f"{comp.task}; merge their rows into train.csv instead")
    seen: dict[Path, str] = {comp.root.resolve(): "the competition folder"}
    parts = [pd.DataFrame(columns=["id", "path", "label", "line", "y", "source"])]
    for folder in cfg.extra:
        root = Path(folder)
        if not folder or not root.is_dir():
            raise PipelineError(f"competition.extra: folder '{folder}' not found; give folders of labelled images, "
                                "each with its own train.csv")
        if root.resolve() in seen:
            raise PipelineError(f"competition.extra: folder '{folder}' is {seen[root.resolve()]} again; "
                                "list each folder once")
        seen[root.resolve()] = f"the same folder as '{folder}'"
        parts.append(_read_extra_folder(root, comp, cfg).assign(source=folder))
    return pd.concat(parts, ignore_index=True).astype({"line": int, "y": int})


def _read_extra_folder(root: Path, comp: Competition, cfg: CompetitionConfig) -> pd.DataFrame:
    csv = root / cfg.train_csv
    raw = read_table(csv)
    for column, what in ((comp.id_column, "id"), (comp.label_column, "label")):
        if column not in raw.columns:
            raise PipelineError(f"{csv}: {what} column '{column}' (as in {comp.root / cfg.train_csv}) missing; "
                                f"columns are {list(raw.columns)}")
    _check_ids(raw, comp.id_column, csv)
    labels, index = raw[comp.label_column], comp.class_index
    unknown = (~labels.isin(index)).to_numpy().nonzero()[0]
    if len(unknown):
        i = int(unknown[0])
        if labels.iloc[i] == "":
            raise PipelineError(f"{csv} line {line_of(raw, i)}: empty label in column '{comp.label_column}'; "
                                "label every row")
        raise PipelineError(f"{csv} line {line_of(raw, i)}: label '{labels.iloc[i]}' is not a class of "
                            f"{comp.root / cfg.train_csv} ({', '.join(comp.classes[:10])}"
                            f"{', ...' if len(comp.classes) > 10 else ''}); fix the label or remove the row")
    return pd.DataFrame({"id": raw[comp.id_column], "path": resolve_paths(raw, comp.id_column, root, cfg, csv),
                         "label": labels, "line": raw.attrs["lines"], "y": labels.map(index).astype(int)})


def resolve_task(root: Path, cfg: CompetitionConfig) -> tuple[str, str | None]:
    """(task, reason): competition.task when set, else labels.detect_task on train.csv's label column (the reason is
    None when the task was given). Reads only the two CSVs; read_competition checks the rest."""
    if cfg.task != "auto":
        return cfg.task, None
    train_csv, test_csv = Path(root) / cfg.train_csv, Path(root) / cfg.test_csv
    train, test = read_table(train_csv), read_table(test_csv)
    id_col = _detect_id(train, test, cfg, (train_csv, test_csv))
    label_col = _detect_label(train, test, id_col, cfg, train_csv)
    return detect_task(train[label_col], cfg.label_separator, train.attrs["lines"], train_csv, label_col)
