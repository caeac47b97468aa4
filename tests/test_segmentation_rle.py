"""Kaggle run-length encoding: exact round trips, agreement with the plain loop, and one error per bad string."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.core.errors import PipelineError
from pipeline.segmentation.rle import decode, decode_many, encode, encode_many

from .segmentation_reference import blobs, kernel_decode, loop_decode, loop_encode

SHAPES = [(1, 1), (1, 7), (7, 1), (4, 4), (5, 9), (16, 3), (32, 48), (101, 64)]


def _cases(shape: tuple[int, int], rng: np.random.Generator) -> list[np.ndarray]:
    h, w = shape
    empty, full = np.zeros(shape, bool), np.ones(shape, bool)
    corners = []
    for y, x in ((0, 0), (0, w - 1), (h - 1, 0), (h - 1, w - 1)):
        m = np.zeros(shape, bool)
        m[y, x] = True
        corners.append(m)
    noise = [rng.random(shape) < p for p in (0.05, 0.5, 0.95)]
    return [empty, full, *corners, *noise, blobs(rng, shape, 3)]


@pytest.mark.parametrize("shape", SHAPES)
def test_round_trip_and_the_plain_loop_agree(shape):
    rng = np.random.default_rng(sum(shape))
    for mask in _cases(shape, rng):
        rle = encode(mask)
        assert rle == loop_encode(mask)
        np.testing.assert_array_equal(decode(rle, shape), mask)
        np.testing.assert_array_equal(loop_decode(rle, shape), mask)
        np.testing.assert_array_equal(kernel_decode(rle, shape), mask)


def test_known_strings():
    """Column-major and 1-based: down the first column, then the next."""
    m = np.zeros((3, 4), bool)
    m[0, 0] = m[1, 0] = m[2, 3] = True
    assert encode(m) == "1 2 12 1"
    assert encode(np.zeros((3, 4), bool)) == ""
    assert encode(np.ones((3, 4), bool)) == "1 12"
    # a run that crosses a column boundary: pixel 3 is (2, 0), pixel 4 is (0, 1)
    np.testing.assert_array_equal(decode("3 2", (3, 4)), [[0, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]])
    # non-square: the second column of a 2x3 image starts at pixel 3
    np.testing.assert_array_equal(decode("3 2", (2, 3)), [[0, 1, 0], [0, 1, 0]])
    # nonzero values of any dtype are foreground
    assert encode(np.array([[0, 7], [255, 0]], np.uint8)) == "2 2"


def test_encode_takes_one_2d_mask():
    with pytest.raises(ValueError, match=r"a mask is \(height, width\), got shape \(2, 3, 4\)"):
        encode(np.zeros((2, 3, 4), bool))


def test_touching_runs_and_spacing_are_accepted():
    np.testing.assert_array_equal(decode("1 1 2 1", (1, 3)), [[1, 1, 0]])
    np.testing.assert_array_equal(decode("  1 1\t3  1\n", (1, 3)), [[1, 0, 1]])
    np.testing.assert_array_equal(decode("   ", (2, 2)), np.zeros((2, 2), bool))


def test_many():
    rng = np.random.default_rng(3)
    masks = np.stack([blobs(rng, (20, 30), 2) for _ in range(4)] + [np.zeros((20, 30), bool)])
    rles = encode_many(masks)
    assert rles[-1] == ""
    np.testing.assert_array_equal(decode_many(rles, (20, 30), [f"row {i}" for i in range(5)]), masks)


WHERE = "train.csv line 12, column ship"


@pytest.mark.parametrize(("rle", "message"), [
    ("1 2 5", "train.csv line 12, column ship: run-length encoding has an odd number of numbers (3); "
              "write 'start length' pairs separated by spaces"),
    ("1 2.5", "train.csv line 12, column ship: run-length encoding has '2.5', not a whole number of pixels; "
              "starts and lengths are whole numbers"),
    ("1 x", "train.csv line 12, column ship: run-length encoding has 'x', not a whole number of pixels; "
            "starts and lengths are whole numbers"),
    ("1 99999999999999999999", "train.csv line 12, column ship: run-length encoding has '99999999999999999999', not "
                               "a whole number of pixels; starts and lengths are whole numbers"),
    ("0 3", "train.csv line 12, column ship: run-length encoding run 1 starts at 0; starts are counted from 1 "
            "(Kaggle's RLE is 1-based)"),
    ("1 2 -4 1", "train.csv line 12, column ship: run-length encoding run 2 starts at -4; starts are counted from 1 "
                 "(Kaggle's RLE is 1-based)"),
    ("1 2 6 0", "train.csv line 12, column ship: run-length encoding run 2 has length 0; every run covers at least "
                "one pixel"),
    ("10 3", "train.csv line 12, column ship: run-length encoding run 1 (10 3) ends at pixel 12, out of range for a "
             "3x3 image (9 pixels); check the image size and that runs go down the columns (column-major)"),
    ("5 2 1 1", "train.csv line 12, column ship: run-length encoding run 2 (1 1) comes before run 1 (5 2); "
                "sort the runs by start"),
    ("1 3 3 2", "train.csv line 12, column ship: run-length encoding run 2 (3 2) overlaps run 1 (1 3); each pixel "
                "belongs to one run: merge the two"),
])
def test_bad_strings_name_where_and_the_fix(rle, message):
    with pytest.raises(PipelineError) as err:
        decode(rle, (3, 3), WHERE)
    assert str(err.value) == message
    assert "\n" not in str(err.value)


def test_last_pixel_is_in_range():
    np.testing.assert_array_equal(decode("9 1", (3, 3)), [[0, 0, 0], [0, 0, 0], [0, 0, 1]])
