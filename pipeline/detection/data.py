"""Detection competition folder: train.csv (one row per box), optional val.csv, test.csv, images.

Box rows are `image, label, xmin, ymin, xmax, ymax` in pixels of the image as stored (after its
EXIF rotation); an image with no objects has one row with empty label and box. Every problem is
one PipelineError naming the file, CSV line and fix. Images are decoded once at image_size into the
shared cache; boxes become (class, x1, y1, x2, y2) rows in [0, 1], padded with class -1 to the
fullest image, which is what the batched anchor labelling takes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline.core.artifacts import content_key, fingerprint
from pipeline.core.config import CompetitionConfig, DetectDataConfig
from pipeline.core.errors import PipelineError
from pipeline.data.cache import cached_decode
from pipeline.data.competition import ID_CANDIDATES, resolve_paths
from pipeline.data.images import image_size
from pipeline.data.labels import sort_classes
from pipeline.data.table import line_of, read_table

BOX = ["xmin", "ymin", "xmax", "ymax"]


@dataclass
class Split:
    """Images of one split and their boxes in pixels (rows of `boxes` refer to `images` by position)."""

    images: pd.DataFrame  # columns: image (as in the CSV), path (resolved), width, height, line (its first in the CSV)
    boxes: pd.DataFrame  # columns: item (row of images), label, xmin, ymin, xmax, ymax, line (in the CSV)


@dataclass
class DetectionData:
    classes: list[str]
    train: Split
    val: Split
    test: Split
    val_source: str  # "val.csv" or "10% of train.csv"
    leaks: pd.DataFrame | None = None  # test images also listed for training: image, test_line, csv, line

    def key(self) -> str:
        """Content key of what training reads: the train and validation rows (images, boxes), the bytes of
        their images, the classes and where validation came from. Not the test split: it is only predicted."""
        parts = [(s.images["image"].tolist(), s.boxes[["item", "label", *BOX]].to_numpy().tolist())
                 for s in (self.train, self.val)]
        images = content_key([p for s in (self.train, self.val) for p in s.images["path"]])
        return fingerprint(self.classes, parts, images, self.val_source)

    def test_key(self) -> str:
        """Content key of the test split: its image ids in order and the bytes of its images."""
        return fingerprint(self.test.images["image"].tolist(), content_key(self.test.images["path"]))


def is_detection_folder(data_dir: Path, train_csv: str = "train.csv") -> bool:
    """Whether DATA is a detection folder: its train CSV has the box columns. False when the file is missing or
    unreadable (the reader of either track then names what is wrong)."""
    try:
        header = pd.read_csv(Path(data_dir) / train_csv, nrows=0, encoding="utf-8-sig").columns
    except (OSError, ValueError):
        return False
    return set(BOX) <= {str(c).strip() for c in header}


def _image_column(frame: pd.DataFrame, csv: Path) -> str:
    for cand in ID_CANDIDATES:
        if cand in frame.columns:
            return cand
    raise PipelineError(f"{csv}: no image column among {list(frame.columns)}; name it 'image'")


def _images(ids: pd.Series, lines: list[int], root: Path, comp: CompetitionConfig, csv: Path) -> pd.DataFrame:
    frame = pd.DataFrame({"image": ids.to_numpy(), "line": lines})
    frame["path"] = resolve_paths(frame, "image", root, comp, csv)
    sizes = np.array([image_size(p) for p in frame["path"]], dtype=np.int64).reshape(-1, 2)
    frame["width"], frame["height"] = sizes[:, 0], sizes[:, 1]
    return frame


def _parse_boxes(frame: pd.DataFrame, csv: Path) -> pd.DataFrame:
    """Numeric boxes; rows with an empty label must have an empty box (an image without objects)."""
    missing = [c for c in ["label", *BOX] if c not in frame.columns]
    if missing:
        raise PipelineError(f"{csv}: missing column(s) {missing}; "
                            "a detection train.csv needs image, label, xmin, ymin, xmax, ymax")
    out = frame[["label"]].copy()
    for col in BOX:
        values = pd.to_numeric(frame[col].where(frame[col] != "", np.nan), errors="coerce")
        bad = values.isna() & (frame[col] != "")
        if bad.any():
            i = int(bad.to_numpy().nonzero()[0][0])
            raise PipelineError(f"{csv} line {line_of(frame, i)}: {col} '{frame[col].iloc[i]}' is not a number; "
                                "boxes are pixel coordinates")
        out[col] = values
    empty_box = out[BOX].isna()
    partial = empty_box.any(axis=1) & ~empty_box.all(axis=1)
    label_box = (out["label"] == "") != empty_box.all(axis=1)
    for mask, fix in ((partial, "give all four of xmin, ymin, xmax, ymax"),
                      (label_box, "a box needs a label; leave label and box empty for an image without objects")):
        if mask.any():
            raise PipelineError(f"{csv} line {line_of(frame, int(mask.to_numpy().nonzero()[0][0]))}: incomplete box "
                                f"row; {fix}")
    spaced = out["label"].str.contains(r"\s", regex=True)
    if spaced.any():
        i = int(spaced.to_numpy().nonzero()[0][0])
        raise PipelineError(f"{csv} line {line_of(frame, i)}: label '{out['label'].iloc[i]}' contains a space, "
                            "which PredictionString cannot hold; rename it")
    return out


def _check_geometry(boxes: pd.DataFrame, images: pd.DataFrame, csv: Path) -> None:
    """Every box has positive area and lies inside its image."""
    w = images["width"].to_numpy()[boxes["item"].to_numpy()]
    h = images["height"].to_numpy()[boxes["item"].to_numpy()]
    b = boxes[BOX].to_numpy()
    checks = ((b[:, 0] >= b[:, 2]) | (b[:, 1] >= b[:, 3]), "has xmin >= xmax or ymin >= ymax",
              (b[:, 0] < 0) | (b[:, 1] < 0) | (b[:, 2] > w) | (b[:, 3] > h), "lies outside its image")
    for bad, what in zip(checks[::2], checks[1::2], strict=True):
        bad = np.asarray(bad & ~np.isnan(b).any(1))
        if bad.any():
            i = int(bad.nonzero()[0][0])
            row = boxes.iloc[i]
            raise PipelineError(f"{csv} line {int(row['line'])}: box {[float(v) for v in row[BOX]]} {what} "
                                f"({int(w[i])}x{int(h[i])} pixels); fix or clip the box")


def _read_split(csv: Path, root: Path, comp: CompetitionConfig) -> Split:
    frame = read_table(csv)
    if frame.empty:
        raise PipelineError(f"{csv}: has a header but no rows; it needs one row per box")
    col = _image_column(frame, csv)
    boxes = _parse_boxes(frame, csv)
    lines = np.array([line_of(frame, i) for i in range(len(frame))])
    first = ~frame[col].duplicated().to_numpy()
    images = _images(frame[col][first], lines[first].tolist(), root, comp, csv)
    boxes["item"] = pd.Index(images["image"]).get_indexer(frame[col])
    boxes["line"] = lines
    boxes = boxes[boxes["label"] != ""]
    _check_geometry(boxes, images, csv)
    return Split(images, boxes[["item", "label", *BOX, "line"]].reset_index(drop=True))


def _read_test(csv: Path, root: Path, comp: CompetitionConfig) -> Split:
    frame = read_table(csv)
    col = _image_column(frame, csv)
    dup = frame[col].duplicated()
    if dup.any():
        i = int(dup.to_numpy().nonzero()[0][0])
        raise PipelineError(f"{csv} line {line_of(frame, i)}: duplicate image '{frame[col].iloc[i]}'; "
                            "list each test image once")
    if frame.empty:
        raise PipelineError(f"{csv}: has a header but no rows; it needs one row per test image")
    lines = [line_of(frame, i) for i in range(len(frame))]
    return Split(_images(frame[col], lines, root, comp, csv), pd.DataFrame(columns=["item", "label", *BOX, "line"]))


def _subset(split: Split, keep: np.ndarray) -> Split:
    new_index = np.full(len(split.images), -1)
    new_index[keep] = np.arange(len(keep))
    boxes = split.boxes[np.isin(split.boxes["item"], keep)].copy()
    boxes["item"] = new_index[boxes["item"]]
    return Split(split.images.iloc[keep].reset_index(drop=True), boxes.reset_index(drop=True))


def read_detection(root: Path, cfg: DetectDataConfig, comp: CompetitionConfig, seed: int,
                   holdout: bool = True) -> DetectionData:
    """The folder's splits. Without val.csv, val_fraction of train.csv (drawn with `seed`) is held out when
    `holdout` (one model); otherwise (folds) the validation split is empty and every training image is out of
    fold once."""
    root = Path(root)
    train_csv = root / cfg.train_csv
    if not train_csv.is_file():
        raise PipelineError(f"{train_csv}: not found; "
                            f"a detection folder needs {cfg.train_csv} (one row per box) and {cfg.test_csv}")
    train = _read_split(train_csv, root, comp)
    if cfg.val_csv and (root / cfg.val_csv).is_file():
        val, source = _read_split(root / cfg.val_csv, root, comp), cfg.val_csv
    elif not holdout:
        val, source = _subset(train, np.arange(0)), "none (folds)"
    else:
        order = np.random.default_rng(seed).permutation(len(train.images))
        n_val = max(1, int(round(cfg.val_fraction * len(order))))
        if n_val >= len(order):
            raise PipelineError(f"{train_csv}: {len(order)} image(s) are too few to hold out a validation split; "
                                f"add images or a {cfg.val_csv}")
        train, val = _subset(train, np.sort(order[n_val:])), _subset(train, np.sort(order[:n_val]))
        source = f"{cfg.val_fraction:.0%} of {cfg.train_csv}"
    classes = sort_classes(sorted(set(train.boxes["label"])))
    if not classes:
        raise PipelineError(f"{train_csv}: no boxes at all; label at least one object")
    unknown = (~val.boxes["label"].isin(classes)).to_numpy().nonzero()[0]
    if len(unknown):
        row = val.boxes.iloc[int(unknown[0])]
        where = (f"{root / cfg.val_csv} line {int(row['line'])}: label '{row['label']}' never occurs in {cfg.train_csv}"
                 if source == cfg.val_csv else
                 f"{train_csv} line {int(row['line'])}: label '{row['label']}' occurs only in the validation images "
                 f"held out of {cfg.train_csv}")
        raise PipelineError(f"{where}; the model cannot learn it")
    test = _read_test(root / cfg.test_csv, root, comp)
    val_csv = root / cfg.val_csv if source == cfg.val_csv else train_csv
    return DetectionData(classes, train, val, test, source, _leaks(test, (train, val), (train_csv, val_csv)))


def _leaks(test: Split, parts: tuple[Split, ...], csvs: tuple[Path, ...]) -> pd.DataFrame:
    """Test images that a training or validation CSV also lists (the same file): image, test_line, csv, line."""
    rows = []
    tests = list(test.images[["image", "path", "line"]].itertuples(index=False))
    for split, csv in zip(parts, csvs, strict=True):
        seen = dict(zip(split.images["path"], split.images["line"], strict=True))
        rows += [(image, int(line), str(csv), int(seen[path])) for image, path, line in tests if path in seen]
    return pd.DataFrame(rows, columns=["image", "test_line", "csv", "line"]).drop_duplicates("image")


@dataclass
class Arrays:
    """One split as the network sees it, decoded once per stage run."""

    images: torch.Tensor  # (N, 3, S, S) uint8
    targets: torch.Tensor  # (N, G, 5) normalised boxes, class -1 pads
    sizes: torch.Tensor  # (N, 2) width, height in pixels

    def take(self, idx) -> Arrays:
        idx = torch.as_tensor(idx, dtype=torch.long)
        return Arrays(self.images[idx], self.targets[idx], self.sizes[idx])


def split_arrays(split: Split, classes: list[str], cache: Path, size: int, name: str) -> Arrays:
    """A split's images decoded at size x size (into the cache folder), its box targets and image sizes."""
    if not len(split.images):
        return Arrays(torch.zeros(0, 3, size, size, dtype=torch.uint8), box_targets(split, classes), torch.zeros(0, 2))
    return Arrays(decoded(split, cache, size, f"detect-{name}"), box_targets(split, classes),
                  torch.tensor(split.images[["width", "height"]].to_numpy(), dtype=torch.float32))


def decoded(split: Split, folder: Path, size: int, desc: str) -> torch.Tensor:
    """(N, 3, size, size) uint8 images, decoded once into the cache folder."""
    array = cached_decode(folder, content_key(split.images["path"]), split.images["path"].tolist(), size, 3, desc)
    return torch.from_numpy(np.array(array)).permute(0, 3, 1, 2)  # a writable copy in memory


def box_targets(split: Split, classes: list[str]) -> torch.Tensor:
    """(N, G, 5) rows [class, x1, y1, x2, y2] with coordinates in [0, 1]; class -1 pads (G >= 1)."""
    counts = np.bincount(split.boxes["item"].to_numpy(dtype=np.int64), minlength=len(split.images))
    out = torch.full((len(split.images), max(1, int(counts.max(initial=0))), 5), -1.0)
    if len(split.boxes):
        item = split.boxes["item"].to_numpy(dtype=np.int64)
        order = np.argsort(item, kind="stable")
        item = item[order]
        slot = np.arange(len(item)) - np.searchsorted(item, item)  # position of each box within its image
        scale = np.stack([split.images["width"], split.images["height"]] * 2, 1)[item]
        coords = split.boxes[BOX].to_numpy(dtype=np.float64)[order] / scale
        label = pd.Index(classes).get_indexer(split.boxes["label"].to_numpy()[order])
        out[item, slot] = torch.from_numpy(np.column_stack([label, coords])).float()
    return out
