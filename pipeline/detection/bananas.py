"""A banana-style detection competition, generated (d2l downloads its bananas; we cannot).

Each 256x256 image is a natural-looking background (smooth colour field, random shapes, noise)
with one banana-like object pasted on it: a yellow crescent drawn at random scale, position and
colour jitter, tilted by up to 20 degrees (max_rotation; the issue's recipe has no rotation, and
full turns slow TinySSD's learning: mAP@0.5 0.52 vs 0.70 after 20 epochs at d2l's settings).
Its tight bounding box is measured from the pasted pixels. Written as a Kaggle-style detection
folder: train.csv and val.csv with one row per box (image, label, xmin, ymin, xmax, ymax in pixels)
and test.csv (image). Deterministic for a seed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from pipeline.core.artifacts import write_csv

SIZE = 256


def background(rng: np.random.Generator, size: int = SIZE) -> Image.Image:
    im = Image.fromarray(rng.integers(0, 255, (3, 3, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
    draw = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(3, 8))):
        x0, y0 = (int(v) for v in rng.integers(-size // 6, size, 2))
        w, h = (int(v) for v in rng.integers(size // 12, size // 2, 2))
        colour = tuple(int(c) for c in rng.integers(0, 255, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x0 + w, y0 + h], fill=colour)
    noisy = np.asarray(im, dtype=np.float64) + rng.normal(0, 5, (size, size, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def banana(rng: np.random.Generator, max_rotation: float = 20.0) -> Image.Image:
    """An RGBA crescent: a yellow disc minus an offset disc, with a brown tip, randomly rotated."""
    side = int(rng.integers(40, 110))
    obj = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    draw = ImageDraw.Draw(obj)
    yellow = tuple(int(np.clip(c + rng.normal(0, 18), 0, 255)) for c in (235, 205, 40)) + (255,)
    draw.ellipse([0, 0, side - 1, side - 1], fill=yellow)
    shift = side * float(rng.uniform(0.22, 0.35))
    draw.ellipse([shift, -shift * 0.6, side - 1 + shift, side - 1 - shift * 0.6], fill=(0, 0, 0, 0))
    draw.ellipse([side * 0.02, side * 0.40, side * 0.14, side * 0.52], fill=(110, 70, 20, 255))
    return obj.rotate(float(rng.uniform(-max_rotation, max_rotation)), resample=Image.BICUBIC, expand=True)


def sample(rng: np.random.Generator, max_rotation: float = 20.0) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """One picture and the tight pixel box (xmin, ymin, xmax, ymax) of its banana."""
    im, obj = background(rng), banana(rng, max_rotation)
    alpha = np.asarray(obj)[..., 3] > 127
    ys, xs = np.nonzero(alpha)
    x = int(rng.integers(0, SIZE - obj.width))
    y = int(rng.integers(0, SIZE - obj.height))
    im.paste(obj, (x, y), obj)
    return im, (x + int(xs.min()), y + int(ys.min()), x + int(xs.max()) + 1, y + int(ys.max()) + 1)


def build_bananas(out: Path, n_train: int = 1000, n_val: int = 100, n_test: int = 100, seed: int = 0,
                  max_rotation: float = 20.0) -> Path:
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tables = {}
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        rows = []
        for i in range(n):
            im, (x0, y0, x1, y1) = sample(rng, max_rotation)
            name = f"images/{split}_{i:04d}.png"
            im.save(out / name)
            rows.append({"image": name, "label": "banana", "xmin": x0, "ymin": y0, "xmax": x1, "ymax": y1})
        tables[split] = pd.DataFrame(rows, columns=["image", "label", "xmin", "ymin", "xmax", "ymax"])
    write_csv(out / "train.csv", tables["train"])
    write_csv(out / "val.csv", tables["val"])
    write_csv(out / "test.csv", tables["test"][["image"]])
    write_csv(out / "test_solution.csv", tables["test"])  # the hidden boxes, for scoring a submission
    return out
