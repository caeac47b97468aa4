"""A generated segmentation competition: soft-edged shapes of three classes on textured gray backgrounds.

Each image (128x128 by default) is a grainy background (smooth noise at two scales plus pixel noise, like
steel or seismic scans) with 0-3 objects, about a fifth of the images holding none. The classes differ in
shape and brightness: `disc` (bright ellipses), `bar` (dark rotated bars) and `blob` (light-gray irregular
blobs: a circle with a smooth-noise wobble). Edges are soft: each object is blended in over a couple of pixels, and
its mask is where the blend is at least one half. A later object covers earlier ones, and the masks follow
what is visible, so the classes never overlap.

Written in the wide form of the segmentation contract (docs/segmentation.md): images/<id>.png, train.csv
(ImageId and one RLE column per class), test.csv, sample_submission.csv (the test ids, empty masks), and
the test masks in a hidden solution file beside the folder (`solution_path`), for scoring outside it.
Deterministic for a seed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from pipeline.core.artifacts import write_csv
from pipeline.segmentation.rle import encode

CLASSES = ("disc", "bar", "blob")
SHADE = {"disc": (200.0, 240.0), "bar": (15.0, 50.0), "blob": (155.0, 180.0)}  # object gray levels per class
EMPTY_SHARE = 0.2
EDGE = 1.5  # pixels over which an object's edge blends into the background


def solution_path(out: Path) -> Path:
    return Path(out).parent / f"{Path(out).name}_solution.csv"


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """(size, size) noise in [-1, 1], smooth over size / cells pixels."""
    small = rng.uniform(-1, 1, (cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(small).resize((size, size), Image.BICUBIC), dtype=np.float64)


def background(rng: np.random.Generator, size: int) -> np.ndarray:
    """(size, size) float gray levels: a base level, coarse and fine smooth noise, and grain."""
    level = rng.uniform(70, 150)
    return (level + 25 * _smooth_noise(rng, size, 4) + 12 * _smooth_noise(rng, size, int(rng.integers(10, 24)))
            + rng.normal(0, 8, (size, size)))


def _distance_inside(rng: np.random.Generator, cls: str, size: int) -> np.ndarray:
    """(size, size) signed distance-like field of one object: positive inside, about one unit per pixel."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    cy, cx = rng.uniform(0.15, 0.85, 2) * size
    angle = rng.uniform(0, np.pi)
    u = (x - cx) * np.cos(angle) + (y - cy) * np.sin(angle)
    v = -(x - cx) * np.sin(angle) + (y - cy) * np.cos(angle)
    if cls == "disc":
        a, b = rng.uniform(0.06, 0.16, 2) * size
        radius = np.hypot(u / a, v / b)
        return (1 - radius) * min(a, b)
    if cls == "bar":
        half_length, half_width = rng.uniform(0.15, 0.35) * size, rng.uniform(0.02, 0.05) * size
        return np.minimum(half_length - np.abs(u), half_width - np.abs(v))
    radius = rng.uniform(0.08, 0.18) * size
    wobble = 0.35 * radius * _smooth_noise(rng, size, 6)
    return radius + wobble - np.hypot(u, v)


def sample(rng: np.random.Generator, size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """One (size, size) uint8 gray image and its (len(CLASSES), size, size) bool masks."""
    image = background(rng, size)
    masks = np.zeros((len(CLASSES), size, size), dtype=bool)
    n_objects = 0 if rng.random() < EMPTY_SHARE else int(rng.integers(1, 4))
    for _ in range(n_objects):
        c = int(rng.integers(len(CLASSES)))
        cls = CLASSES[c]
        alpha = np.clip(_distance_inside(rng, cls, size) / EDGE + 0.5, 0.0, 1.0)
        shade = rng.uniform(*SHADE[cls]) + rng.normal(0, 6, (size, size))
        image = image * (1 - alpha) + shade * alpha
        inside = alpha >= 0.5
        masks[:, inside] = False  # what this object covers is no longer visible as another class
        masks[c] |= inside
    return np.clip(image + 0.5, 0, 255).astype(np.uint8), masks


def build_masks(out: Path, n_train: int = 400, n_test: int = 100, seed: int = 0, size: int = 128) -> Path:
    """Write the competition folder to `out` and its hidden test masks to `solution_path(out)`."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tables: dict[str, list[list[str]]] = {"train": [], "test": []}
    for split, n in (("train", n_train), ("test", n_test)):
        for i in range(n):
            ident = f"images/{split}_{i:05d}.png"
            image, masks = sample(rng, size)
            Image.fromarray(image).save(out / ident)
            tables[split].append([ident, *(encode(m) for m in masks)])
    columns = ["ImageId", *CLASSES]
    write_csv(out / "train.csv", pd.DataFrame(tables["train"], columns=columns))
    test_ids = [row[0] for row in tables["test"]]
    write_csv(out / "test.csv", pd.DataFrame({"ImageId": test_ids}))
    write_csv(out / "sample_submission.csv", pd.DataFrame({"ImageId": test_ids, **{c: "" for c in CLASSES}}))
    write_csv(solution_path(out), pd.DataFrame(tables["test"], columns=columns))
    return out
