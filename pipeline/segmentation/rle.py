"""Kaggle's run-length encoding of binary masks.

A mask of shape (height, width) is flattened column by column (Fortran order: down the first column,
then the next), and each run of foreground pixels is written as `start length`, with starts counted
from 1; all pairs are joined by single spaces and an empty string is an empty mask. This is the form
of Airbus Ship, Severstal, Understanding Clouds, TGS Salt and the Data Science Bowl 2018.

Both directions are vectorised, without a Python step per run or pixel: encoding compares each pixel with
the one above it (and each column's top with the previous column's bottom) and sorts only the edges found;
decoding repeats False/True by the lengths of the gaps and runs in turn. Decoding checks the string first
and names `where` it came from in its error.
"""

from __future__ import annotations

import numpy as np

from pipeline.core.errors import PipelineError


def encode(mask: np.ndarray) -> str:
    """The RLE string of one (height, width) mask (any dtype; nonzero is foreground)."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"a mask is (height, width), got shape {mask.shape}")
    if mask.dtype != bool:
        mask = mask != 0
    height, width = mask.shape
    # Run edges in column-major order without the column-major copy of the mask (a strided copy costs more than
    # everything else here): pixel changes down each column, found in row-major order, plus the changes from the
    # bottom of one column to the top of the next; only the few thousand edge positions are then sorted.
    down = np.flatnonzero(mask[1:] != mask[:-1])
    row, col = np.divmod(down, width)
    above_top = np.concatenate(([False], mask[-1, :-1]))  # what precedes each column's first pixel
    tops = np.flatnonzero(mask[0] != above_top)
    last = np.array([height * width] if mask[-1, -1] else [], dtype=np.int64)
    edges = np.concatenate((col * height + row + 1, tops * height, last))  # 0-based starts and exclusive ends
    edges.sort()
    starts, ends = edges[0::2], edges[1::2]
    pairs = np.column_stack((starts + 1, ends - starts)).ravel()
    return " ".join(map(str, pairs.tolist()))


def parse_runs(rle: str, shape: tuple[int, int], where: str) -> tuple[np.ndarray, np.ndarray]:
    """(starts, lengths) as 0-based int64 arrays, checked against an image of `shape` (height, width)."""
    tokens = rle.split()
    if len(tokens) % 2:
        raise PipelineError(f"{where}: run-length encoding has an odd number of numbers ({len(tokens)}); "
                            "write 'start length' pairs separated by spaces")
    if not tokens:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    try:
        values = np.array(list(map(int, tokens)), dtype=np.int64)
    except (ValueError, OverflowError):
        bad = next(t for t in tokens if not _fits_int64(t))
        raise PipelineError(f"{where}: run-length encoding has '{bad}', not a whole number of pixels; "
                            "starts and lengths are whole numbers") from None
    starts, lengths = values[0::2], values[1::2]
    _check_runs(starts, lengths, shape, where)
    return starts - 1, lengths


def _fits_int64(token: str) -> bool:
    try:
        return abs(int(token)) < 2**63
    except ValueError:
        return False


def _check_runs(starts: np.ndarray, lengths: np.ndarray, shape: tuple[int, int], where: str) -> None:
    """Starts from 1, lengths from 1, runs inside the image, each run after the previous one ends."""
    height, width = shape
    n_pixels = height * width
    checks = (
        (starts < 1, lambda i: f"run {i + 1} starts at {starts[i]}; starts are counted from 1 (Kaggle's RLE is "
                               "1-based)"),
        (lengths < 1, lambda i: f"run {i + 1} has length {lengths[i]}; every run covers at least one pixel"),
        (starts > n_pixels - lengths + 1,  # the run's last pixel, start + length - 1, lies past the image
         lambda i: f"run {i + 1} ({starts[i]} {lengths[i]}) ends at pixel {int(starts[i]) + int(lengths[i]) - 1}, "
                   f"out of range for a {height}x{width} image ({n_pixels} pixels); check the image size and that "
                   "runs go down the columns (column-major)"),
    )
    for bad, what in checks:
        if bad.any():
            raise PipelineError(f"{where}: run-length encoding {what(int(np.flatnonzero(bad)[0]))}")
    # run i+1 must start after run i's last pixel; touching runs (start == previous end) are allowed
    clash = starts[1:] < starts[:-1] + lengths[:-1]
    if clash.any():
        i = int(np.flatnonzero(clash)[0])
        first, second = f"run {i + 1} ({starts[i]} {lengths[i]})", f"run {i + 2} ({starts[i + 1]} {lengths[i + 1]})"
        if starts[i + 1] < starts[i]:
            raise PipelineError(f"{where}: run-length encoding {second} comes before {first}; sort the runs by start")
        raise PipelineError(f"{where}: run-length encoding {second} overlaps {first}; each pixel belongs to one run: "
                            "merge the two")


def decode(rle: str, shape: tuple[int, int], where: str = "RLE string") -> np.ndarray:
    """The (height, width) bool mask of an RLE string; PipelineError naming `where` when the string is bad."""
    starts, lengths = parse_runs(rle, shape, where)
    return runs_to_mask(starts, lengths, shape)


def runs_to_mask(starts: np.ndarray, lengths: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(height, width) bool mask from checked 0-based, sorted, disjoint runs."""
    height, width = shape
    n_pixels = height * width
    if starts.size == 0:
        return np.zeros(shape, dtype=bool)
    # the flattened mask alternates gaps and runs: repeat False/True by their lengths, one memset each
    segments = np.empty(2 * starts.size + 1, dtype=np.int64)
    segments[0] = starts[0]
    segments[1::2] = lengths
    segments[2:-1:2] = starts[1:] - (starts[:-1] + lengths[:-1])
    segments[-1] = n_pixels - (starts[-1] + lengths[-1])
    values = np.zeros(segments.size, dtype=bool)
    values[1::2] = True
    return np.repeat(values, segments).reshape((height, width), order="F")


def decode_many(rles: list[str], shape: tuple[int, int], wheres: list[str]) -> np.ndarray:
    """(len(rles), height, width) bool masks of one image size, e.g. the classes of one image."""
    out = np.zeros((len(rles), *shape), dtype=bool)
    for i, (rle, where) in enumerate(zip(rles, wheres, strict=True)):
        if rle.strip():
            out[i] = decode(rle, shape, where)
    return out


def encode_many(masks: np.ndarray) -> list[str]:
    """RLE strings of (n, height, width) masks."""
    return [encode(m) for m in masks]
