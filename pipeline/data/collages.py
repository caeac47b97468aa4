"""Build the embedded multi-label and regression competitions: 2x2 collages of scikit-learn's bundled digits.

Real digits with no download, like pipeline/data/digits.py. Each image is a 2x2 grid of cells; one to four cells
(`--min-digits 0`: zero to four, so some collages are empty black canvases) hold a digit (8x8, upscaled `scale`x
by pixel repetition, 2x to 16x16 by default, at a random offset of 0-4 pixels inside its cell of 8*scale+4
pixels), the others stay black: 40x40 grayscale PNGs by default; `--scale 3` gives 24x24 digits in 28x28 cells,
56x56 images (a counting competition's form: 56x56 collages).
- multi_label: the label is the sorted set of digit classes present, space-separated ("1 3 7"; a
  digit drawn twice counts once).
- regression: the target is the sum of the digits present, written as a float ("17.0"); with
  `--target count`, the number of digits drawn ("3.0").

The source digits are split 80/20 (stratified) *before* any collage is made: test collages are built
from test digits only, so no test image shares a digit image with a train image. Test targets go to a
solution file outside the competition folder (`<folder>_solution.csv`), used only by `pipeline score`.
File names are a seeded permutation. Deterministic: the same arguments write byte-identical files.

Run `python -m pipeline.data.collages --task multi_label --out data/collages_multi_label` (the Makefile's
`make demo TASK=multi_label` does).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from pipeline.core.artifacts import write_csv
from pipeline.data.digits import solution_path

log = logging.getLogger(__name__)

TASKS = ("multi_label", "regression")
SCALE = 2  # default: 8x8 digit -> 16x16
OFFSET = 4  # a cell of 8*scale+OFFSET pixels holds the digit at a random offset of 0..OFFSET pixels each way
GRID = 2  # 2x2 cells -> 40x40 images at the default scale
TARGETS = ("sum", "count")  # regression targets
DEFAULT_OUT = {"multi_label": Path("data/collages_multi_label"), "regression": Path("data/collages_regression")}


def _digits(scale: int = SCALE) -> tuple[np.ndarray, np.ndarray]:
    bunch = load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    return np.kron(images, np.ones((scale, scale), dtype=np.uint8)), bunch.target


def collage(digits: np.ndarray, cells: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """A (GRID*cell)^2 uint8 image with digits[i] in cell cells[i] (row-major) at offsets[i] (dy, dx); a cell is
    the digits' side plus OFFSET."""
    size = digits.shape[1]
    cell_side = size + OFFSET
    out = np.zeros((GRID * cell_side, GRID * cell_side), dtype=np.uint8)
    for img, cell, (dy, dx) in zip(digits, cells, offsets, strict=True):
        y, x = (cell // GRID) * cell_side + dy, (cell % GRID) * cell_side + dx
        out[y:y + size, x:x + size] = img
    return out


def target(task: str, classes: np.ndarray, regression_target: str = "sum") -> str:
    """The CSV value for a collage holding digits of `classes` (with repeats)."""
    if task == "multi_label":
        return " ".join(str(c) for c in sorted(set(classes.tolist())))
    return f"{float(len(classes) if regression_target == 'count' else classes.sum()):.1f}"


def _plan(rng: np.random.Generator, pool: np.ndarray, n: int, min_digits: int = 1
          ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """n collages: (source digit indices, cells, offsets); min_digits to four digits, each count equally likely."""
    plans = []
    for _ in range(n):
        m = int(rng.integers(min_digits, GRID * GRID + 1))
        cells = np.sort(rng.choice(GRID * GRID, m, replace=False))
        plans.append((rng.choice(pool, m, replace=False), cells, rng.integers(0, OFFSET + 1, (m, 2))))
    return plans


def build_collages(out: Path, task: str, seed: int = 0, n_train: int = 1200, n_test: int = 300, scale: int = SCALE,
                   regression_target: str = "sum", min_digits: int = 1) -> Path:
    """Write the competition to `out` (train.csv, test.csv, sample_submission.csv, images/) and its hidden
    solution beside it; the digits of each collage are recorded in `<out>_digits.csv` (also outside the folder)
    so tests and readers can check every label against what was drawn."""
    if task not in TASKS:
        raise ValueError(f"unknown collage task {task}; one of {', '.join(TASKS)}")
    if regression_target not in TARGETS:
        raise ValueError(f"unknown regression target {regression_target}; one of {', '.join(TARGETS)}")
    if not 0 <= min_digits <= GRID * GRID:
        raise ValueError(f"min_digits={min_digits}: must be between 0 and {GRID * GRID}")
    out = Path(out)
    images, labels = _digits(scale)
    train_pool, test_pool = train_test_split(np.arange(len(labels)), test_size=0.2, stratify=labels,
                                             random_state=seed)
    rng = np.random.default_rng(seed)
    plans = _plan(rng, np.sort(train_pool), n_train, min_digits) + _plan(rng, np.sort(test_pool), n_test, min_digits)
    names = rng.permutation(len(plans))
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (src, cells, offsets) in enumerate(plans):
        rel = f"images/{names[i]:05d}.png"
        Image.fromarray(collage(images[src], cells, offsets)).save(out / rel)
        rows.append({"image": rel, "label": target(task, labels[src], regression_target),
                     "split": "train" if i < n_train else "test",
                     "digits": " ".join(str(labels[s]) for s in src), "cells": " ".join(map(str, cells)),
                     "source": " ".join(map(str, src))})
    frame = pd.DataFrame(rows).sort_values("image")
    train, test = frame[frame["split"] == "train"], frame[frame["split"] == "test"]
    write_csv(out / "train.csv", train[["image", "label"]])
    write_csv(out / "test.csv", test[["image"]])
    placeholder = "0" if task == "multi_label" else "0.0"
    write_csv(out / "sample_submission.csv", test[["image"]].assign(label=placeholder))
    write_csv(solution_path(out), test[["image", "label"]])
    write_csv(digits_path(out), frame[["image", "split", "digits", "cells", "source"]])
    return out


def digits_path(out: Path) -> Path:
    """Where the digits drawn in each collage are listed (outside the competition folder, like the solution)."""
    return Path(out).parent / f"{Path(out).name}_digits.csv"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.data.collages", description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=TASKS, required=True)
    parser.add_argument("--out", type=Path, default=None, help="competition folder (default data/collages_<task>)")
    parser.add_argument("--train", type=int, default=1200, help="training collages")
    parser.add_argument("--test", type=int, default=300, help="test collages (targets in the hidden solution)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=int, default=SCALE, help="digit upscale: 2 gives 40x40 images, 3 56x56")
    parser.add_argument("--target", choices=TARGETS, default="sum", help="regression: sum or count of the digits")
    parser.add_argument("--min-digits", type=int, default=1, help="fewest digits per collage (0: some are empty)")
    args = parser.parse_args(argv)
    out = build_collages(args.out or DEFAULT_OUT[args.task], args.task, args.seed, args.train, args.test,
                         args.scale, args.target, args.min_digits)
    side = GRID * (8 * args.scale + OFFSET)
    log.info(f"collages: {args.task} competition of {side}x{side} images written to {out} ({args.train} train, "
          f"{args.test} test images), "
          f"hidden solution to {solution_path(out)}")


if __name__ == "__main__":
    main()
