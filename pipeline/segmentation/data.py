"""Segmentation competition folder: train.csv with masks (as run-length encodings or PNG files), test.csv, images.

The masks of train.csv come in one of these forms (docs/segmentation.md):

- wide: an id column and one RLE column per class (`image,ship,boat`); an empty cell is an empty mask. With a
  single mask column (Airbus Ship, TGS Salt), several rows of one id are that image's objects, joined.
- long: one row per image and class, `ImageId,ClassId,EncodedPixels`; rows of an image and class given more
  than once are joined, an image without a row for a class has an empty mask for it. `combined` is the same
  with image and class in one column, `<id>_<class>` (`ImageId_ClassId` in Severstal's first release,
  `Image_Label` in Understanding Clouds), split at its last underscore.
- index PNGs: train.csv lists the ids only and `masks/<id stem>.png` holds each pixel's class index
  (0 = background, 1 = the first class, ...).
- per-class PNGs: `masks/<id stem>_<class>.png`, one binary mask (0 and one other value) per image and class.

Every run and mask is checked when the folder is read (sizes against the image's, runs inside the image,
class indices known), so a bad cell is one PipelineError naming the file, line, column and the fix before any
training starts; the masks themselves are decoded on request (`SegmentationData.masks(i)`), since a whole
competition's masks rarely fit in memory. sample_submission.csv, when present, fixes the output form: `wide`
(one row per image, one RLE column per class), `long` (one row per image and class) or `combined`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from pipeline.core.config import CompetitionConfig
from pipeline.core.errors import PipelineError
from pipeline.data.competition import ID_CANDIDATES, LABEL_CANDIDATES, resolve_paths
from pipeline.data.images import image_size, is_gray
from pipeline.data.labels import sort_classes
from pipeline.data.table import line_of, read_table
from pipeline.segmentation.rle import parse_runs, runs_to_mask

CLASS_CANDIDATES = ("classid", "class_id", "class", "label", "category", "category_id")
RLE_CANDIDATES = ("encodedpixels", "encoded_pixels", "rle", "rle_mask", "mask", "segmentation")
COMBINED_CANDIDATES = ("imageid_classid", "image_label", "imageid_label", "image_class", "image_classid")
FORMS = ("wide", "long", "combined", "index_png", "class_png")


@dataclass(frozen=True)
class Split:
    """Images of one split, in CSV order: ids as written, resolved paths, decoded sizes, their first CSV line."""

    ids: list[str]
    paths: list[str]
    heights: np.ndarray
    widths: np.ndarray
    lines: list[int]

    def __len__(self) -> int:
        return len(self.ids)

    def shape(self, i: int) -> tuple[int, int]:
        return int(self.heights[i]), int(self.widths[i])


@dataclass(frozen=True)
class RunMasks:
    """Checked runs per training image and class: runs[i][c] lists (0-based starts, lengths) pairs, one per
    RLE cell (several when rows repeat), joined when decoded."""

    runs: list[list[list[tuple[np.ndarray, np.ndarray]]]]

    def masks(self, i: int, shape: tuple[int, int]) -> np.ndarray:
        out = np.zeros((len(self.runs[i]), *shape), dtype=bool)
        for c, cells in enumerate(self.runs[i]):
            for starts, lengths in cells:
                out[c] |= runs_to_mask(starts, lengths, shape)
        return out


@dataclass(frozen=True)
class PngMasks:
    """Mask files per training image: one index PNG each (`files[i] = [path]`) or one binary PNG per class."""

    files: list[list[Path]]
    n_classes: int
    index: bool

    def masks(self, i: int, shape: tuple[int, int]) -> np.ndarray:
        if self.index:
            values = read_mask(self.files[i][0])
            return values[None] == np.arange(1, self.n_classes + 1)[:, None, None]
        return np.stack([read_mask(f) != 0 for f in self.files[i]])


@dataclass
class SegmentationData:
    """A read segmentation folder. `masks(i)` gives training image i's (C, H, W) bool masks, C = len(classes)."""

    root: Path
    classes: list[str]
    id_column: str
    train: Split
    test: Split
    mask_form: str  # one of FORMS: how train.csv (or masks/) gives the masks
    submission_form: str  # "wide", "long" or "combined": the sample submission's form, else train.csv's
    submission_columns: list[str]  # the output header: id + class columns (wide), id, class, RLE (long),
    # or <id>_<class>, RLE (combined)
    sample_submission: pd.DataFrame | None
    source: RunMasks | PngMasks = field(repr=False)

    def masks(self, i: int) -> np.ndarray:
        return self.source.masks(i, self.train.shape(i))

    def only(self, rows: np.ndarray) -> SegmentationData:
        """The folder with only these training images (their masks with them); the test images unchanged."""
        rows = [int(i) for i in rows]
        train = Split([self.train.ids[i] for i in rows], [self.train.paths[i] for i in rows],
                      self.train.heights[rows], self.train.widths[rows], [self.train.lines[i] for i in rows])
        source = (RunMasks([self.source.runs[i] for i in rows]) if isinstance(self.source, RunMasks)
                  else replace(self.source, files=[self.source.files[i] for i in rows]))
        return replace(self, train=train, source=source)


def _find(columns: list[str], candidates: tuple[str, ...]) -> str | None:
    lowered = {c.lower(): c for c in columns}
    return next((lowered[c] for c in candidates if c in lowered), None)


def _id_column(train: pd.DataFrame, test: pd.DataFrame, id_column: str | None, csvs: tuple[Path, Path]) -> str:
    if id_column:
        for frame, csv in zip((train, test), csvs, strict=True):
            if id_column not in frame.columns:
                raise PipelineError(f"{csv}: column '{id_column}' (competition.id_column) missing; "
                                    f"columns are {list(frame.columns)}")
        return id_column
    shared = [c for c in train.columns if c in set(test.columns)]
    found = _find(shared, ID_CANDIDATES) or (shared[0] if shared else None)
    if found is None:
        raise PipelineError(f"{csvs[1]}: no column shared with {csvs[0].name} to use as image id; name the id column "
                            "alike in both files (e.g. 'ImageId') or set competition.id_column")
    return found


def _combined_column(frame: pd.DataFrame, id_column: str | None) -> str | None:
    """The `<id>_<class>` column of a long table written with image and class in one column: a table with such a
    column and an RLE column, but no id column of its own and no class column."""
    columns = list(frame.columns)
    found = _find(columns, COMBINED_CANDIDATES)
    separate = id_column in columns or _find(columns, CLASS_CANDIDATES) is not None
    return found if found and not separate and _find(columns, RLE_CANDIDATES) else None


def _split_combined(frame: pd.DataFrame, column: str, id_column: str, csv: Path) -> pd.DataFrame:
    """The table with `column` split at its last '_': the image id into a new id_column, the class kept in
    `column` (so errors about a class still name the file's column)."""
    values = frame[column]
    bad = (~values.str.contains("_", regex=False)).to_numpy()
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise PipelineError(f"{csv} line {line_of(frame, i)}, column {column}: '{values.iloc[i]}' is not "
                            "<image id>_<class>; write the image id, an underscore and the class")
    parts = values.str.rpartition("_")
    out = frame.copy()
    out[column] = parts[2].to_numpy()
    out.insert(0, id_column, parts[0].to_numpy())
    out.attrs["lines"] = frame.attrs.get("lines")
    return out


def _no_duplicates(frame: pd.DataFrame, column: str, csv: Path, fix: str) -> None:
    dup = frame[column].duplicated()
    if dup.any():
        i = int(np.flatnonzero(dup.to_numpy())[0])
        first = int(np.flatnonzero((frame[column] == frame[column].iloc[i]).to_numpy())[0])
        raise PipelineError(f"{csv} line {line_of(frame, i)}, column {column}: duplicate id '{frame[column].iloc[i]}' "
                            f"(first on line {line_of(frame, first)}); {fix}")


def _split(frame: pd.DataFrame, rows: np.ndarray, id_column: str, root: Path, comp: CompetitionConfig,
           csv: Path, fix: str = "replace the file or remove the row") -> Split:
    """The images of `rows` of frame (each id once), with paths checked to stay inside DATA and sizes from the
    image headers (`fix`: what an unreadable one's error says to do)."""
    part = frame.iloc[rows].reset_index(drop=True)
    part.attrs["lines"] = [line_of(frame, int(r)) for r in rows]
    paths = resolve_paths(part, id_column, root, comp, csv)
    sizes = np.array([_image_size(p, csv, line, fix) for p, line in zip(paths, part.attrs["lines"], strict=True)],
                     dtype=np.int64).reshape(-1, 2)
    return Split(part[id_column].tolist(), paths, sizes[:, 1], sizes[:, 0], list(part.attrs["lines"]))


def _image_size(path: str, csv: Path, line: int, fix: str) -> tuple[int, int]:
    """image_size, its error naming the CSV row that lists the image and the fix."""
    try:
        return image_size(path)
    except PipelineError as exc:
        raise PipelineError(f"{csv} line {line}: {exc}; {fix}") from None


def read_mask(path: Path) -> np.ndarray:
    """A mask PNG's raw values as an (H, W) array: palette indices, gray levels or 0/1; a gray image saved as RGB
    counts as gray. Read as stored, without EXIF rotation: a mask's pixels are those of its image as decoded."""
    try:
        with Image.open(path) as im:
            im.load()
            arr = np.asarray(im)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise PipelineError(f"{path}: cannot decode mask ({type(exc).__name__}: {exc}); save masks as PNG") from None
    if arr.ndim == 3:
        if arr.shape[2] == 3 and is_gray(arr):
            return arr[..., 0]
        raise PipelineError(f"{path}: mask has {arr.shape[2]} colour channels; a mask is one channel (gray or "
                            "palette) whose value is the class index, or 0/1 per class: save it as 8-bit gray")
    return arr.astype(np.int64) if arr.dtype == bool else arr


def _mask_size_error(path: Path, got: tuple[int, ...], split: Split, i: int, csv: Path) -> PipelineError:
    h, w = split.shape(i)
    return PipelineError(f"{path}: mask is {got[1]}x{got[0]} (width x height) but image '{split.ids[i]}' "
                         f"({csv.name} line {split.lines[i]}) is {w}x{h}; masks must have their image's size")


def _runs_of_cells(cells: list[tuple[int, int, str, int, str]], split: Split, n_classes: int,
                   csv: Path) -> RunMasks:
    """cells: (image, class, RLE string, CSV line, CSV column) -> every run checked against its image's size."""
    runs: list[list[list[tuple[np.ndarray, np.ndarray]]]] = [[[] for _ in range(n_classes)] for _ in split.ids]
    for image, cls, rle, line, column in cells:
        if rle.strip():
            runs[image][cls].append(parse_runs(rle, split.shape(image), f"{csv} line {line}, column {column}"))
    return RunMasks(runs)


def _column_lists(frame: pd.DataFrame, columns: list[str]) -> tuple[list[list[str]], list[int]]:
    """Rows of `columns` as plain lists, and each row's line: a frame's columns are taken once, since every
    pandas column access deep-copies the frame's attrs (the line numbers)."""
    rows = frame[columns].to_numpy().tolist()
    return rows, [line_of(frame, r) for r in range(len(frame))]


def _wide(frame: pd.DataFrame, id_column: str, class_columns: list[str], split: Split, csv: Path) -> RunMasks:
    rows, lines = _column_lists(frame, [id_column, *class_columns])
    image_of = {ident: i for i, ident in enumerate(split.ids)}
    cells = [(image_of[row[0]], c, rle, line, col) for row, line in zip(rows, lines, strict=True)
             for c, (col, rle) in enumerate(zip(class_columns, row[1:], strict=True))]
    return _runs_of_cells(cells, split, len(class_columns), csv)


def _long(frame: pd.DataFrame, id_column: str, class_column: str, rle_column: str, classes: list[str],
          split: Split, csv: Path) -> RunMasks:
    rows, lines = _column_lists(frame, [id_column, class_column, rle_column])
    image_of = {ident: i for i, ident in enumerate(split.ids)}
    class_of = {c: i for i, c in enumerate(classes)}
    cells = [(image_of[ident], class_of[cls], rle, line, rle_column)
             for (ident, cls, rle), line in zip(rows, lines, strict=True)]
    return _runs_of_cells(cells, split, len(classes), csv)


def _check_classes(values: pd.Series, known: list[str] | None, frame: pd.DataFrame, column: str, csv: Path,
                   source: str) -> None:
    empty = (values == "").to_numpy()
    if empty.any():
        i = int(np.flatnonzero(empty)[0])
        raise PipelineError(f"{csv} line {line_of(frame, i)}, column {column}: empty class; every row names its "
                            "class (leave only the mask cell empty for an empty mask)")
    if known is not None:
        unknown = (~values.isin(known)).to_numpy()
        if unknown.any():
            i = int(np.flatnonzero(unknown)[0])
            raise PipelineError(f"{csv} line {line_of(frame, i)}, column {column}: unknown class "
                                f"'{values.iloc[i]}'; the classes of {source} are {known}: fix the class or the "
                                f"header of {source}")


def _sample_form(sample: pd.DataFrame, id_column: str, path: Path,
                 combined: str | None) -> tuple[str, str | None, str | None]:
    """('wide', None, None), or ('long' or 'combined', class column, RLE column) from the sample submission's
    header (`combined`: its <id>_<class> column, already split)."""
    if id_column not in sample.columns:
        raise PipelineError(f"{path}: id column '{id_column}' missing; columns are {list(sample.columns)}")
    values = [c for c in sample.columns if c != id_column]
    if not values:
        raise PipelineError(f"{path}: only the id column '{id_column}'; add one RLE column per class (wide) or "
                            "the class and EncodedPixels columns (long)")
    class_column, rle_column = combined or _find(values, CLASS_CANDIDATES), _find(values, RLE_CANDIDATES)
    if class_column and rle_column:
        return "combined" if combined else "long", class_column, rle_column
    return "wide", None, None


def _sample_classes(sample: pd.DataFrame, form: tuple[str, str | None, str | None], id_column: str,
                    path: Path) -> list[str]:
    kind, class_column, _ = form
    if kind == "wide":
        return [c for c in sample.columns if c != id_column]
    _check_classes(sample[class_column], None, sample, class_column, path, path.name)
    return sort_classes(sample[class_column].unique().tolist())


def _check_sample(sample: pd.DataFrame, form: tuple[str, str | None, str | None], id_column: str,
                  classes: list[str], test: Split, path: Path) -> None:
    """The test ids once each (once per class in the long forms), and the classes of train."""
    kind, class_column, _ = form
    id_label = class_column if kind == "combined" else id_column  # the file's column that holds the id
    if kind == "wide":
        odd = [c for c in sample.columns if c != id_column and c not in classes]
        if odd:
            raise PipelineError(f"{path}: column '{odd[0]}' is not a class of train.csv {classes}; a wide submission "
                                "has the id and one RLE column per class: fix the header")
        _no_duplicates(sample, id_column, path, "list each test image once")
    else:
        _check_classes(sample[class_column], classes, sample, class_column, path, "train.csv")
        pairs = sample[id_column] + "\x00" + sample[class_column]
        dup = pairs.duplicated().to_numpy()
        if dup.any():
            i = int(np.flatnonzero(dup)[0])
            raise PipelineError(f"{path} line {line_of(sample, i)}, column {id_label}: image "
                                f"'{sample[id_column].iloc[i]}' and class '{sample[class_column].iloc[i]}' appear "
                                "twice; list each test image once per class")
        per_image = sample.groupby(id_column, sort=False)[class_column].nunique()
        short = per_image[per_image < len(classes)]
        if len(short):
            ident = short.index[0]
            i = int(np.flatnonzero((sample[id_column] == ident).to_numpy())[0])
            raise PipelineError(f"{path} line {line_of(sample, i)}, column {id_label}: image '{ident}' has rows for "
                                f"{short.iloc[0]} of the {len(classes)} classes {classes}; list each test image "
                                "once per class")
    extra = (~sample[id_column].isin(set(test.ids))).to_numpy()
    if extra.any():
        i = int(np.flatnonzero(extra)[0])
        raise PipelineError(f"{path} line {line_of(sample, i)}, column {id_label}: id '{sample[id_column].iloc[i]}' "
                            "is not in test.csv; the two files must list the same ids")
    listed = set(sample[id_column])
    missing = [i for i, ident in enumerate(test.ids) if ident not in listed]
    if missing:
        raise PipelineError(f"{path}: no row for test.csv's id '{test.ids[missing[0]]}' (test.csv line "
                            f"{test.lines[missing[0]]}) and {len(missing) - 1} more; the two files must list the "
                            "same ids")


def _png_masks(split: Split, masks_dir: Path, classes: list[str] | None, csv: Path) -> tuple[PngMasks, list[str], str]:
    """The mask files of every training image, each checked (size, values), and the classes."""
    if not masks_dir.is_dir():
        raise PipelineError(f"{csv}: no mask column (an RLE column per class, or ImageId,ClassId,EncodedPixels) and "
                            f"no {masks_dir.name}/ folder of mask PNGs; add one of them (docs/segmentation.md)")
    stems = [Path(ident).stem for ident in split.ids]
    listing = {p.name for p in masks_dir.iterdir() if p.suffix.lower() == ".png"}
    if f"{stems[0]}.png" in listing:
        return _index_pngs(split, stems, masks_dir, listing, classes, csv)
    return _class_pngs(split, stems, masks_dir, listing, classes, csv)


def _index_pngs(split: Split, stems: list[str], masks_dir: Path, listing: set[str], classes: list[str] | None,
                csv: Path) -> tuple[PngMasks, list[str], str]:
    files, top = [], 0
    for i, stem in enumerate(stems):
        path = masks_dir / f"{stem}.png"
        if path.name not in listing:
            raise PipelineError(f"{path}: mask of image '{split.ids[i]}' ({csv.name} line {split.lines[i]}) not "
                                f"found; every training image needs {masks_dir.name}/<id>.png (all 0 when empty)")
        values = read_mask(path)
        if values.shape != split.shape(i):
            raise _mask_size_error(path, values.shape, split, i, csv)
        high = int(values.max())
        if classes is not None and high > len(classes):
            raise PipelineError(f"{path}: pixel value {high} is an unknown class; the sample submission has "
                                f"{len(classes)} classes {classes}, so values run 0 (background) to {len(classes)}")
        top = max(top, high)
        files.append([path])
    if classes is None:
        if top == 0:
            raise PipelineError(f"{masks_dir}: every mask is all 0 (background); pixel values are class indices "
                                "1, 2, ... where an object is")
        classes = [str(c) for c in range(1, top + 1)]
    return PngMasks(files, len(classes), index=True), classes, "index_png"


def _class_pngs(split: Split, stems: list[str], masks_dir: Path, listing: set[str], classes: list[str] | None,
                csv: Path) -> tuple[PngMasks, list[str], str]:
    found: dict[str, set[str]] = {}
    for name in listing:
        stem, _, cls = name[:-4].rpartition("_")
        if stem:
            found.setdefault(stem, set()).add(cls)
    if stems[0] not in found:
        raise PipelineError(f"{masks_dir}: no mask for image '{split.ids[0]}' ({csv.name} line {split.lines[0]}); "
                            f"name masks {stems[0]}.png (class indices) or {stems[0]}_<class>.png (one per class)")
    seen = sort_classes(sorted(set().union(*(found.get(s, set()) for s in stems))))
    if classes is not None:
        odd = [c for c in seen if c not in classes]
        if odd:
            stem = next(s for s in stems if odd[0] in found.get(s, ()))
            raise PipelineError(f"{masks_dir / f'{stem}_{odd[0]}.png'}: unknown class '{odd[0]}'; the sample "
                                f"submission's classes are {classes}: rename the file or fix the sample submission")
    classes = classes if classes is not None else seen
    files = []
    for i, stem in enumerate(stems):
        paths = [masks_dir / f"{stem}_{c}.png" for c in classes]
        for path in paths:
            if path.name not in listing:
                raise PipelineError(f"{path}: mask not found for image '{split.ids[i]}' ({csv.name} line "
                                    f"{split.lines[i]}); every image needs one mask per class {classes} "
                                    "(all 0 when the class is absent)")
            values = read_mask(path)
            if values.shape != split.shape(i):
                raise _mask_size_error(path, values.shape, split, i, csv)
            levels = np.unique(values)
            if len(levels) > 2 or (len(levels) == 2 and levels[0] != 0):
                raise PipelineError(f"{path}: mask has values {levels[:5].tolist()}; a per-class mask holds 0 and "
                                    "one foreground value (1 or 255): threshold it")
        files.append(paths)
    return PngMasks(files, len(classes), index=False), classes, "class_png"


def read_segmentation(root: Path, comp: CompetitionConfig, masks_dir: str = "masks") -> SegmentationData:
    """Read and check a segmentation folder (module docstring). `comp` names the CSVs, the id column, and the
    image folder and suffix prefixed to ids; `masks_dir` is the folder of mask PNGs inside DATA."""
    root = Path(root)
    train_csv, test_csv = root / comp.train_csv, root / comp.test_csv
    train, test = read_table(train_csv), read_table(test_csv)
    for frame, csv in ((train, train_csv), (test, test_csv)):
        if frame.empty:
            raise PipelineError(f"{csv}: has a header but no rows; it needs one row per image")
    combined = _combined_column(train, comp.id_column)
    if combined:  # no id column shared with test.csv: the test's id column names the ids split off
        id_column = comp.id_column or _find(list(test.columns), ID_CANDIDATES) or test.columns[0]
        if id_column not in test.columns:
            raise PipelineError(f"{test_csv}: column '{id_column}' (competition.id_column) missing; "
                                f"columns are {list(test.columns)}")
        train = _split_combined(train, combined, id_column, train_csv)
    else:
        id_column = _id_column(train, test, comp.id_column, (train_csv, test_csv))
    _no_duplicates(test, id_column, test_csv, "list each test image once")
    test_split = _split(test, np.arange(len(test)), id_column, root, comp, test_csv,
                        "every test image must be readable: replace the file")

    sample_path = root / comp.sample_submission_csv
    sample_raw = read_table(sample_path) if sample_path.is_file() else None
    sample, sample_form, known = sample_raw, None, None
    if sample_raw is not None:
        sample_combined = _combined_column(sample_raw, id_column)
        if sample_combined:
            sample = _split_combined(sample_raw, sample_combined, id_column, sample_path)
        sample_form = _sample_form(sample, id_column, sample_path, sample_combined)
        known = _sample_classes(sample, sample_form, id_column, sample_path)

    own = [c for c in train.columns if c != id_column and c not in set(test.columns)]
    class_column, rle_column = combined or _find(own, CLASS_CANDIDATES), _find(own, RLE_CANDIDATES)
    first_rows = np.flatnonzero(~train[id_column].duplicated().to_numpy())
    if class_column and rle_column:
        _check_classes(train[class_column], known, train, class_column, train_csv, sample_path.name)
        classes = known or sort_classes(train[class_column].unique().tolist())
        split = _split(train, first_rows, id_column, root, comp, train_csv)
        source = _long(train, id_column, class_column, rle_column, classes, split, train_csv)
        form = "combined" if combined else "long"
        own_columns = [combined, rle_column] if combined else [id_column, class_column, rle_column]
    elif own:
        if len(own) > 1:
            _no_duplicates(train, id_column, train_csv, "give each image one row with one RLE column per class")
        if known is not None and (odd := [c for c in own if c not in known]):
            raise PipelineError(f"{train_csv}: column '{odd[0]}' is an unknown class; the classes of "
                                f"{sample_path.name} are {known}: fix the header of either file")
        classes = own
        split = _split(train, first_rows, id_column, root, comp, train_csv)
        source = _wide(train, id_column, own, split, train_csv)
        form, own_columns = "wide", [id_column, *own]
    else:
        _no_duplicates(train, id_column, train_csv, "list each training image once")
        split = _split(train, np.arange(len(train)), id_column, root, comp, train_csv)
        source, classes, form = _png_masks(split, root / masks_dir, known, train_csv)
        own_columns = [id_column, *classes]

    if sample is not None:
        _check_sample(sample, sample_form, id_column, classes, test_split, sample_path)
        submission_form, columns = sample_form[0], list(sample_raw.columns)
    else:
        submission_form = form if form in ("long", "combined") else "wide"
        columns = own_columns
    return SegmentationData(root, list(classes), id_column, split, test_split, form, submission_form, columns,
                            sample_raw, source)


_RLE = re.compile(r"\s*\d+\s+\d+(\s+\d+\s+\d+)*\s*")


def is_segmentation_folder(root: Path, train_csv: str = "train.csv", test_csv: str = "test.csv",
                           masks_dir: str = "masks") -> bool:
    """Whether DATA holds masks in one of the forms read_segmentation reads: a mask column (by name, or a long or
    combined table), only ids beside a masks/ folder, or class columns whose every filled cell is a run-length
    encoding. A single column named like a classification label (label, target, ...) is a label, even when its values
    are pairs of numbers (multi-label tags). False when a CSV is missing or unreadable (the reader then says why)."""
    try:
        train, test = read_table(Path(root) / train_csv), read_table(Path(root) / test_csv)
    except (PipelineError, OSError):
        return False
    if _combined_column(train, None):
        return True
    own = [c for c in train.columns if c not in set(test.columns)]
    if _find(own, RLE_CANDIDATES):
        return True
    if not own:
        return (Path(root) / masks_dir).is_dir()
    if len(own) == 1 and own[0].lower() in LABEL_CANDIDATES:
        return False
    cells = pd.concat([train[c] for c in own]).str.strip()
    filled = cells[cells != ""]
    return bool(len(filled)) and bool(filled.str.fullmatch(_RLE).all())
