"""The segmentation folder reader: each mask form read back exactly, and each contract error as one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline import cli
from pipeline.core.config import CompetitionConfig
from pipeline.core.errors import PipelineError
from pipeline.data.table import read_table
from pipeline.segmentation import generate
from pipeline.segmentation.data import read_segmentation
from pipeline.segmentation.rle import decode, encode

from .segmentation_reference import blobs

CLASSES = ["ship", "boat"]
SIZES = {"a": (6, 8), "b": (5, 5), "c": (9, 4)}  # id -> (height, width): non-square, both ways
TEST = {"t1": (6, 6), "t2": (4, 7)}


def _csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    path.write_text("\n".join(",".join(r) for r in [header, *rows]) + "\n")


def _images(root: Path, sizes: dict[str, tuple[int, int]], seed: int) -> None:
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(exist_ok=True)
    for ident, (h, w) in sizes.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "images" / f"{ident}.png")


def _true_masks(seed: int = 0) -> dict[str, np.ndarray]:
    """(2, H, W) masks per training image; image 'b' has an empty 'boat' mask, 'c' is empty."""
    rng = np.random.default_rng(seed)
    out = {ident: np.stack([blobs(rng, shape, 2) for _ in CLASSES]) for ident, shape in SIZES.items()}
    out["b"][1] = False
    out["c"][:] = False
    return out


def _folder(root: Path, form: str, masks: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """A competition with the training masks in `form`; returns the masks written."""
    masks = masks or _true_masks()
    _images(root, SIZES, 0)
    _images(root, TEST, 1)
    _csv(root / "test.csv", ["ImageId"], [[f"images/{t}.png"] for t in TEST])
    ids = [f"images/{i}.png" for i in SIZES]
    if form == "wide":
        _csv(root / "train.csv", ["ImageId", *CLASSES], [[i, *(encode(m) for m in masks[k])]
                                                          for i, k in zip(ids, SIZES, strict=True)])
    elif form == "long":
        # non-empty masks only (Severstal), but an image without any mask keeps one empty row (Clouds) to be listed
        rows = [[i, c, encode(masks[k][ci])] for i, k in zip(ids, SIZES, strict=True)
                for ci, c in enumerate(CLASSES) if masks[k][ci].any() or (ci == 0 and not masks[k].any())]
        _csv(root / "train.csv", ["ImageId", "ClassId", "EncodedPixels"], rows)
    else:
        _csv(root / "train.csv", ["ImageId"], [[i] for i in ids])
        (root / "masks").mkdir()
        for k, m in masks.items():
            if form == "index_png":
                index = np.zeros(m.shape[1:], np.uint8)
                for ci in range(len(m)):
                    index[m[ci]] = ci + 1  # later classes win where masks overlap
                Image.fromarray(index).save(root / "masks" / f"{k}.png")
            else:
                for ci, c in enumerate(CLASSES):
                    Image.fromarray(m[ci].astype(np.uint8) * 255).save(root / "masks" / f"{k}_{c}.png")
    return masks


def _read(root: Path, **comp):
    return read_segmentation(root, CompetitionConfig(**comp))


def _error(root: Path, **comp) -> str:
    with pytest.raises(PipelineError) as err:
        _read(root, **comp)
    message = str(err.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("form", ["wide", "long", "class_png"])
def test_each_form_reads_back_exactly(tmp_path, form):
    masks = _folder(tmp_path, form)
    data = _read(tmp_path)
    assert data.mask_form == form
    assert data.classes == (CLASSES if form == "wide" else ["boat", "ship"])  # from file names or rows: sorted
    assert data.train.ids == [f"images/{i}.png" for i in SIZES]
    assert [data.train.shape(i) for i in range(3)] == list(SIZES.values())
    assert [data.test.shape(i) for i in range(2)] == list(TEST.values())
    order = [CLASSES.index(c) for c in data.classes]
    for i, k in enumerate(SIZES):
        got = data.masks(i)
        assert got.dtype == bool and got.shape == (2, *SIZES[k])
        np.testing.assert_array_equal(got, masks[k][order])


def test_long_form_lines_and_images_without_rows(tmp_path):
    masks = _true_masks()
    masks["c"][0, 0, 0] = True  # give 'c' one row so that every image is listed
    _folder(tmp_path, "long", masks)
    data = _read(tmp_path)
    # rows: a/ship, a/boat, b/ship, c/ship -> each image's first line
    assert data.train.lines == [2, 4, 5]
    np.testing.assert_array_equal(data.masks(2)[data.classes.index("boat")], np.zeros(SIZES["c"], bool))
    assert data.submission_form == "long"
    assert data.submission_columns == ["ImageId", "ClassId", "EncodedPixels"]


def test_index_pngs_read_back(tmp_path):
    masks = _true_masks()
    masks["a"][0] &= ~masks["a"][1]  # index masks hold one class per pixel
    _folder(tmp_path, "index_png", masks)
    data = _read(tmp_path)
    assert data.mask_form == "index_png"
    assert data.classes == ["1", "2"]  # no sample submission to name them: the indices
    for i, k in enumerate(SIZES):
        np.testing.assert_array_equal(data.masks(i), masks[k])


def test_index_pngs_take_class_names_from_the_sample_submission(tmp_path):
    masks = _true_masks()
    masks["a"][0] &= ~masks["a"][1]
    _folder(tmp_path, "index_png", masks)
    _csv(tmp_path / "sample_submission.csv", ["ImageId", *CLASSES], [[f"images/{t}.png", "", ""] for t in TEST])
    data = _read(tmp_path)
    assert data.classes == CLASSES
    assert data.submission_form == "wide"
    assert data.submission_columns == ["ImageId", *CLASSES]


def test_airbus_style_rows_of_one_image_are_joined(tmp_path):
    _images(tmp_path, {"a": (4, 4)}, 0)
    _images(tmp_path, TEST, 1)
    _csv(tmp_path / "test.csv", ["ImageId"], [[f"images/{t}.png"] for t in TEST])
    _csv(tmp_path / "train.csv", ["ImageId", "EncodedPixels"], [["images/a.png", "1 2"], ["images/a.png", "9 3"]])
    data = _read(tmp_path)
    assert data.classes == ["EncodedPixels"] and len(data.train) == 1
    expected = np.zeros((4, 4), bool)
    expected[:2, 0] = True
    expected[:3, 2] = True
    np.testing.assert_array_equal(data.masks(0)[0], expected)


def test_long_sample_submission_fixes_the_form(tmp_path):
    _folder(tmp_path, "wide")
    _csv(tmp_path / "sample_submission.csv", ["ImageId", "ClassId", "EncodedPixels"],
         [[f"images/{t}.png", c, ""] for t in TEST for c in CLASSES])
    data = _read(tmp_path)
    assert data.mask_form == "wide" and data.submission_form == "long"
    assert data.sample_submission is not None and len(data.sample_submission) == 4


def test_combined_id_and_class_column(tmp_path):
    """Understanding Clouds: `Image_Label` holds '<image>_<class>', in train.csv and the sample submission."""
    masks = _folder(tmp_path, "wide")
    rows = [[f"images/{k}.png_{c}", encode(masks[k][ci])] for k in SIZES for ci, c in enumerate(CLASSES)]
    _csv(tmp_path / "train.csv", ["Image_Label", "EncodedPixels"], rows)
    _csv(tmp_path / "sample_submission.csv", ["Image_Label", "EncodedPixels"],
         [[f"images/{t}.png_{c}", ""] for t in TEST for c in CLASSES])
    data = _read(tmp_path)
    assert (data.mask_form, data.submission_form, data.id_column) == ("combined", "combined", "ImageId")
    assert data.submission_columns == ["Image_Label", "EncodedPixels"]
    assert data.classes == ["boat", "ship"]
    assert data.train.ids == [f"images/{k}.png" for k in SIZES]
    assert data.train.lines == [2, 4, 6]
    for i, k in enumerate(SIZES):
        np.testing.assert_array_equal(data.masks(i), masks[k][::-1])
    (tmp_path / "sample_submission.csv").unlink()
    data = _read(tmp_path)
    assert (data.submission_form, data.submission_columns) == ("combined", ["Image_Label", "EncodedPixels"])


def test_combined_column_without_an_underscore(tmp_path):
    _folder(tmp_path, "wide")
    _csv(tmp_path / "train.csv", ["Image_Label", "EncodedPixels"], [["images/a.png_ship", "1 2"], ["b.png", "1 2"]])
    assert _error(tmp_path) == (f"{tmp_path / 'train.csv'} line 3, column Image_Label: 'b.png' is not "
                                "<image id>_<class>; write the image id, an underscore and the class")


# ---- errors: one line each, naming the file, line and column, and the fix


def test_no_id_column_in_common(tmp_path):
    _folder(tmp_path, "wide")
    _csv(tmp_path / "test.csv", ["file"], [[f"images/{t}.png"] for t in TEST])
    assert _error(tmp_path) == (f"{tmp_path / 'test.csv'}: no column shared with train.csv to use as image id; name "
                                "the id column alike in both files (e.g. 'ImageId') or set competition.id_column")


def test_missing_configured_id_column(tmp_path):
    _folder(tmp_path, "wide")
    assert _error(tmp_path, id_column="image") == (f"{tmp_path / 'train.csv'}: column 'image' (competition.id_column) "
                                                   f"missing; columns are ['ImageId', 'ship', 'boat']")


def test_missing_image(tmp_path):
    _folder(tmp_path, "wide")
    (tmp_path / "images" / "b.png").unlink()
    assert _error(tmp_path) == (f"{tmp_path / 'train.csv'} line 3: image 'images/b.png' not found in {tmp_path}; "
                                "fix the path or remove the row")


def test_run_out_of_range_names_line_and_column(tmp_path):
    masks = _folder(tmp_path, "wide")
    rows = [[f"images/{k}.png", *(encode(m) for m in masks[k])] for k in SIZES]
    rows[1][2] = "21 6"  # 'b' is 5x5: pixels 21..26
    _csv(tmp_path / "train.csv", ["ImageId", *CLASSES], rows)
    assert _error(tmp_path) == (f"{tmp_path / 'train.csv'} line 3, column boat: run-length encoding run 1 (21 6) ends "
                                "at pixel 26, out of range for a 5x5 image (25 pixels); check the image size and "
                                "that runs go down the columns (column-major)")


def test_overlapping_runs_in_the_long_form(tmp_path):
    _folder(tmp_path, "long")
    _csv(tmp_path / "train.csv", ["ImageId", "ClassId", "EncodedPixels"],
         [["images/a.png", "ship", "1 3"], ["images/b.png", "boat", "1 4 3 2"]])
    assert _error(tmp_path) == (f"{tmp_path / 'train.csv'} line 3, column EncodedPixels: run-length encoding run 2 "
                                "(3 2) overlaps run 1 (1 4); each pixel belongs to one run: merge the two")


def test_mask_png_size_mismatch(tmp_path):
    _folder(tmp_path, "index_png")
    Image.fromarray(np.zeros((5, 6), np.uint8)).save(tmp_path / "masks" / "b.png")
    assert _error(tmp_path) == (f"{tmp_path / 'masks' / 'b.png'}: mask is 6x5 (width x height) but image "
                                "'images/b.png' (train.csv line 3) is 5x5; masks must have their image's size")


def test_class_png_size_mismatch(tmp_path):
    _folder(tmp_path, "class_png")
    Image.fromarray(np.zeros((8, 6), np.uint8)).save(tmp_path / "masks" / "a_boat.png")
    assert _error(tmp_path) == (f"{tmp_path / 'masks' / 'a_boat.png'}: mask is 6x8 (width x height) but image "
                                "'images/a.png' (train.csv line 2) is 8x6; masks must have their image's size")


def test_missing_mask_png(tmp_path):
    _folder(tmp_path, "index_png")
    (tmp_path / "masks" / "c.png").unlink()
    assert _error(tmp_path) == (f"{tmp_path / 'masks' / 'c.png'}: mask of image 'images/c.png' (train.csv line 4) not "
                                "found; every training image needs masks/<id>.png (all 0 when empty)")


def test_missing_class_png(tmp_path):
    _folder(tmp_path, "class_png")
    (tmp_path / "masks" / "b_ship.png").unlink()
    assert _error(tmp_path) == (f"{tmp_path / 'masks' / 'b_ship.png'}: mask not found for image 'images/b.png' "
                                "(train.csv line 3); every image needs one mask per class ['boat', 'ship'] (all 0 "
                                "when the class is absent)")


def test_no_masks_at_all(tmp_path):
    _folder(tmp_path, "index_png")
    for f in (tmp_path / "masks").iterdir():
        f.unlink()
    (tmp_path / "masks").rmdir()
    assert _error(tmp_path) == (f"{tmp_path / 'train.csv'}: no mask column (an RLE column per class, or "
                                "ImageId,ClassId,EncodedPixels) and no masks/ folder of mask PNGs; add one of them "
                                "(docs/segmentation.md)")


def test_unknown_class_in_the_long_form(tmp_path):
    _folder(tmp_path, "long")
    _csv(tmp_path / "sample_submission.csv", ["ImageId", "ClassId", "EncodedPixels"],
         [[f"images/{t}.png", c, ""] for t in TEST for c in CLASSES])
    _csv(tmp_path / "train.csv", ["ImageId", "ClassId", "EncodedPixels"],
         [["images/a.png", "ship", "1 3"], ["images/b.png", "whale", "1 4"]])
    assert _error(tmp_path) == (f"{tmp_path / 'train.csv'} line 3, column ClassId: unknown class 'whale'; the classes "
                                "of sample_submission.csv are ['boat', 'ship']: fix the class or the header of "
                                "sample_submission.csv")


def test_unknown_class_index_in_a_png(tmp_path):
    _folder(tmp_path, "index_png")
    _csv(tmp_path / "sample_submission.csv", ["ImageId", *CLASSES], [[f"images/{t}.png", "", ""] for t in TEST])
    index = np.zeros(SIZES["b"], np.uint8)
    index[2, 2] = 3
    Image.fromarray(index).save(tmp_path / "masks" / "b.png")
    assert _error(tmp_path) == (f"{tmp_path / 'masks' / 'b.png'}: pixel value 3 is an unknown class; the sample "
                                "submission has 2 classes ['ship', 'boat'], so values run 0 (background) to 2")


def test_unknown_class_file(tmp_path):
    _folder(tmp_path, "class_png")
    _csv(tmp_path / "sample_submission.csv", ["ImageId", *CLASSES], [[f"images/{t}.png", "", ""] for t in TEST])
    Image.fromarray(np.zeros(SIZES["c"], np.uint8)).save(tmp_path / "masks" / "c_whale.png")
    assert _error(tmp_path) == (f"{tmp_path / 'masks' / 'c_whale.png'}: unknown class 'whale'; the sample "
                                "submission's classes are ['ship', 'boat']: rename the file or fix the sample "
                                "submission")


def test_unknown_class_column_in_the_sample(tmp_path):
    _folder(tmp_path, "wide")
    _csv(tmp_path / "sample_submission.csv", ["ImageId", "ship", "whale"], [[f"images/{t}.png", "", ""] for t in TEST])
    assert _error(tmp_path) == (f"{tmp_path / 'train.csv'}: column 'boat' is an unknown class; the classes of "
                                "sample_submission.csv are ['ship', 'whale']: fix the header of either file")


def test_non_binary_class_png(tmp_path):
    _folder(tmp_path, "class_png")
    Image.fromarray(np.arange(25, dtype=np.uint8).reshape(5, 5)).save(tmp_path / "masks" / "b_ship.png")
    assert _error(tmp_path) == (f"{tmp_path / 'masks' / 'b_ship.png'}: mask has values [0, 1, 2, 3, 4]; a per-class "
                                "mask holds 0 and one foreground value (1 or 255): threshold it")


def test_colour_mask(tmp_path):
    _folder(tmp_path, "index_png")
    rgb = np.zeros((*SIZES["a"], 3), np.uint8)
    rgb[0, 0] = (255, 0, 0)
    Image.fromarray(rgb).save(tmp_path / "masks" / "a.png")
    assert _error(tmp_path) == (f"{tmp_path / 'masks' / 'a.png'}: mask has 3 colour channels; a mask is one channel "
                                "(gray or palette) whose value is the class index, or 0/1 per class: save it as "
                                "8-bit gray")


def test_duplicate_ids(tmp_path):
    masks = _folder(tmp_path, "wide")
    rows = [[f"images/{k}.png", *(encode(m) for m in masks[k])] for k in SIZES]
    _csv(tmp_path / "train.csv", ["ImageId", *CLASSES], [*rows, rows[0]])
    assert _error(tmp_path) == (f"{tmp_path / 'train.csv'} line 5, column ImageId: duplicate id 'images/a.png' (first "
                                "on line 2); give each image one row with one RLE column per class")
    _csv(tmp_path / "train.csv", ["ImageId", *CLASSES], rows)
    _csv(tmp_path / "test.csv", ["ImageId"], [["images/t1.png"], ["images/t2.png"], ["images/t1.png"]])
    assert _error(tmp_path) == (f"{tmp_path / 'test.csv'} line 4, column ImageId: duplicate id 'images/t1.png' (first "
                                "on line 2); list each test image once")


def test_sample_submission_must_list_the_test_ids(tmp_path):
    _folder(tmp_path, "wide")
    _csv(tmp_path / "sample_submission.csv", ["ImageId", *CLASSES], [["images/t1.png", "", ""]])
    assert _error(tmp_path) == (f"{tmp_path / 'sample_submission.csv'}: no row for test.csv's id 'images/t2.png' "
                                "(test.csv line 3) and 0 more; the two files must list the same ids")


def test_long_sample_submission_lists_every_class(tmp_path):
    _folder(tmp_path, "wide")
    rows = [[f"images/{t}.png", c, ""] for t in TEST for c in CLASSES]
    _csv(tmp_path / "sample_submission.csv", ["ImageId", "ClassId", "EncodedPixels"], rows[:3])
    assert _error(tmp_path) == (f"{tmp_path / 'sample_submission.csv'} line 4, column ImageId: image 'images/t2.png' "
                                "has rows for 1 of the 2 classes ['ship', 'boat']; list each test image once per "
                                "class")
    _csv(tmp_path / "sample_submission.csv", ["ImageId", "ClassId", "EncodedPixels"], [*rows, rows[1]])
    assert _error(tmp_path) == (f"{tmp_path / 'sample_submission.csv'} line 6, column ImageId: image 'images/t1.png' "
                                "and class 'boat' appear twice; list each test image once per class")


def test_combined_sample_names_its_own_column(tmp_path):
    _folder(tmp_path, "wide")
    _csv(tmp_path / "sample_submission.csv", ["Image_Label", "EncodedPixels"],
         [[f"images/{t}.png_{c}", ""] for t in [*TEST, "t9"] for c in CLASSES])
    assert _error(tmp_path) == (f"{tmp_path / 'sample_submission.csv'} line 6, column Image_Label: id "
                                "'images/t9.png' is not in test.csv; the two files must list the same ids")


def test_empty_class_cell_in_the_long_form(tmp_path):
    _folder(tmp_path, "long")
    _csv(tmp_path / "train.csv", ["ImageId", "ClassId", "EncodedPixels"], [["images/a.png", "", "1 3"]])
    assert _error(tmp_path) == (f"{tmp_path / 'train.csv'} line 2, column ClassId: empty class; every row names its "
                                "class (leave only the mask cell empty for an empty mask)")


# ---- the generated competition (python -m pipeline make-masks)


def test_the_reader_reads_what_make_masks_writes(tmp_path):
    out = tmp_path / "masks"
    assert cli.main(["make-masks", "--out", str(out), "--train", "24", "--test", "6", "--seed", "3"]) == 0
    data = _read(out)
    assert (data.classes, data.mask_form, data.submission_form) == (list(generate.CLASSES), "wide", "wide")
    assert data.submission_columns == ["ImageId", *generate.CLASSES]
    assert (len(data.train), len(data.test)) == (24, 6)
    assert set(data.train.heights) == set(data.train.widths) == {128}

    rng = np.random.default_rng(3)  # the generator's draws, in the order it makes them: train, then test
    expected = [generate.sample(rng) for _ in range(30)]
    for i in range(24):
        np.testing.assert_array_equal(np.asarray(Image.open(data.train.paths[i])), expected[i][0])
        np.testing.assert_array_equal(data.masks(i), expected[i][1])
    masks = np.stack([data.masks(i) for i in range(24)])
    empty = ~masks.any(axis=(1, 2, 3))
    assert 0 < empty.sum() < 24  # some images hold no object, most hold some
    assert masks.sum(axis=1).max() == 1  # a pixel belongs to one class at most
    assert all(masks[:, c].any() for c in range(3))

    solution = read_table(generate.solution_path(out))
    assert solution["ImageId"].tolist() == data.test.ids
    for i, row in solution.iterrows():
        got = np.stack([decode(row[c], (128, 128), f"solution line {i + 2}") for c in generate.CLASSES])
        np.testing.assert_array_equal(got, expected[24 + i][1])
    assert not generate.solution_path(out).is_relative_to(out)  # hidden: outside the competition folder


def test_make_masks_is_deterministic(tmp_path):
    a = generate.build_masks(tmp_path / "a", 5, 2, seed=7)
    b = generate.build_masks(tmp_path / "b", 5, 2, seed=7)
    assert (a / "train.csv").read_bytes() == (b / "train.csv").read_bytes()
    assert (a / "images" / "test_00001.png").read_bytes() == (b / "images" / "test_00001.png").read_bytes()
