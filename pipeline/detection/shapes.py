"""A multi-object, multi-class detection competition, generated: several objects per image, in several classes.

Each image (128x128 by default) is a textured background -- a smooth colour field overlaid with
one of stripes, checks or blotches and pixel noise -- with 1-4 objects from 10 classes pasted on
it. A class is a shape with its own colour and pattern (jittered per object), so the classes are
told apart by shape and colour together: disc, square, triangle, diamond, cross, ring, star,
hexagon, bar and arrow. Objects are 24-64 px, placed so that no two overlap by more than
`max_overlap` IoU; each tight box is measured from the pasted pixels (a later object may cover
part of an earlier one, never most of it). `kind="digits"` pastes handwritten digits instead
(scikit-learn's bundled 8x8 scans, upscaled with smoothing): ten look-alike silhouettes in one random
colour each, so only the outline names the class (3/5/8/9, 1/7, 4/9 confuse as in real fine-grained
detection); train draws from other scans than val and test. Written in the bananas folder contract (bananas.py):
train.csv and val.csv with one row per box, test.csv, and the hidden test_solution.csv.
Deterministic for a seed.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from pipeline.core.artifacts import write_csv

KINDS = ("shapes", "digits")
CLASSES = ("disc", "square", "triangle", "diamond", "cross", "ring", "star", "hexagon", "bar", "arrow")
COLOURS = ((220, 40, 40), (40, 170, 60), (40, 80, 220), (230, 200, 30), (200, 60, 200),
           (30, 200, 210), (250, 140, 20), (245, 245, 245), (120, 70, 30), (20, 20, 20))


def texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """(size, size, 3) float background: a smooth colour field with stripes, checks or blotches and noise."""
    base = np.asarray(Image.fromarray(rng.integers(40, 215, (3, 3, 3), dtype=np.uint8))
                      .resize((size, size), Image.BICUBIC), dtype=np.float64)
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    kind = int(rng.integers(3))
    period = float(rng.uniform(6, 20))
    if kind == 0:  # stripes at a random angle
        angle = float(rng.uniform(0, math.pi))
        pattern = np.sin((x * math.cos(angle) + y * math.sin(angle)) * 2 * math.pi / period)
    elif kind == 1:  # checks
        pattern = np.sign(np.sin(x * 2 * math.pi / period) * np.sin(y * 2 * math.pi / period))
    else:  # blotches: upsampled noise
        small = rng.normal(0, 1, (max(2, int(size / period)),) * 2)
        pattern = np.asarray(Image.fromarray(small.astype(np.float32)).resize((size, size), Image.BILINEAR))
        pattern = pattern / (np.abs(pattern).max() + 1e-9)
    tint = rng.uniform(-1, 1, 3) * float(rng.uniform(15, 40))
    return base + pattern[..., None] * tint + rng.normal(0, 6, (size, size, 3))


def _polygon(n: int, star: bool = False) -> list[tuple[float, float]]:
    points = []
    for i in range(n * (2 if star else 1)):
        r = 0.5 if not star or i % 2 == 0 else 0.22
        a = -math.pi / 2 + i * math.pi / (n if star else n / 2)
        points.append((0.5 + r * math.cos(a), 0.5 + r * math.sin(a)))
    return points


SHAPES = {
    "triangle": [(0.5, 0.0), (1.0, 1.0), (0.0, 1.0)],
    "diamond": [(0.5, 0.0), (1.0, 0.5), (0.5, 1.0), (0.0, 0.5)],
    "cross": [(0.35, 0), (0.65, 0), (0.65, 0.35), (1, 0.35), (1, 0.65), (0.65, 0.65), (0.65, 1), (0.35, 1),
              (0.35, 0.65), (0, 0.65), (0, 0.35), (0.35, 0.35)],
    "star": _polygon(5, star=True),
    "hexagon": [(0.5 + 0.5 * math.cos(i * math.pi / 3), 0.5 + 0.5 * math.sin(i * math.pi / 3)) for i in range(6)],
    "arrow": [(0, 0.35), (0.55, 0.35), (0.55, 0.1), (1, 0.5), (0.55, 0.9), (0.55, 0.65), (0, 0.65)],
}


def draw_object(rng: np.random.Generator, cls: int, w: int, h: int) -> Image.Image:
    """An RGBA picture of class `cls` filling a w x h box: its shape in its colour, with a darker pattern."""
    obj = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    draw = ImageDraw.Draw(obj)
    colour = tuple(int(np.clip(c + rng.normal(0, 12), 0, 255)) for c in COLOURS[cls]) + (255,)
    name = CLASSES[cls]
    box = [0, 0, w - 1, h - 1]
    if name == "disc":
        draw.ellipse(box, fill=colour)
    elif name == "square":
        draw.rectangle(box, fill=colour)
    elif name == "ring":
        draw.ellipse(box, fill=colour)
        draw.ellipse([w * 0.3, h * 0.3, w * 0.7 - 1, h * 0.7 - 1], fill=(0, 0, 0, 0))
    elif name == "bar":
        draw.rectangle(box, fill=colour)
        for i in range(1, 4):
            draw.line([(w * i / 4, 0), (w * i / 4, h)], fill=(0, 0, 0, 255), width=max(1, w // 16))
    else:
        draw.polygon([(x * (w - 1), y * (h - 1)) for x, y in SHAPES[name]], fill=colour)
    if cls % 2:  # odd classes carry a dark central dot: a pattern cue beside shape and colour
        draw.ellipse([w * 0.42, h * 0.42, w * 0.58, h * 0.58], fill=(30, 30, 30, 255))
    return obj


DIGITS = tuple(str(d) for d in range(10))


def digit_pool(split: str) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digit scans (N, 8, 8) in [0, 1] and their classes; test and val take every fifth scan, train
    the others, so no scan is both trained on and detected."""
    from sklearn.datasets import load_digits  # bundled with scikit-learn: nothing is downloaded

    digits = load_digits()
    held = np.arange(len(digits.target)) % 5 == 0
    keep = ~held if split == "train" else held
    return digits.images[keep] / 16.0, digits.target[keep]


def draw_digit(rng: np.random.Generator, scan: np.ndarray, w: int, h: int) -> Image.Image:
    """An RGBA digit filling a w x h box: the scan upscaled smoothly as the alpha of one random colour."""
    alpha = Image.fromarray((scan * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC)
    alpha = np.clip((np.asarray(alpha, dtype=np.float64) - 60) * 1.6, 0, 255).astype(np.uint8)
    colour = rng.integers(0, 256, 3).astype(np.uint8)
    rgba = np.concatenate([np.broadcast_to(colour, (h, w, 3)), alpha[..., None]], axis=2)
    return Image.fromarray(np.ascontiguousarray(rgba), "RGBA")


def _iou(a: tuple[int, ...], b: tuple[int, ...]) -> float:
    iw, ih = min(a[2], b[2]) - max(a[0], b[0]), min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def sample(rng: np.random.Generator, size: int = 128, objects: tuple[int, int] = (1, 4),
           side: tuple[int, int] = (24, 64), max_overlap: float = 0.1,
           digits: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[Image.Image, list[tuple]]:
    """One picture and its boxes [(class, xmin, ymin, xmax, ymax)] in pixels, tight around the pasted pixels;
    `digits` (digit_pool) pastes digits instead of shapes."""
    im = Image.fromarray(np.clip(texture(rng, size), 0, 255).astype(np.uint8))
    placed: list[tuple] = []
    for _ in range(int(rng.integers(objects[0], objects[1] + 1))):
        for _attempt in range(30):
            cls = int(rng.integers(len(CLASSES)))
            w = int(rng.integers(side[0], side[1] + 1))
            aspect = 0.4 if CLASSES[cls] == "bar" and digits is None else float(rng.uniform(0.8, 1.25))
            h = int(np.clip(round(w * aspect), max(8, side[0] // 2), side[1]))
            x, y = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
            if all(_iou((x, y, x + w, y + h), p[1:]) <= max_overlap for p in placed):
                break
        else:
            continue  # no room left: fewer objects in this image
        if digits is None:
            obj = draw_object(rng, cls, w, h)
        else:
            scans, targets = digits
            obj = draw_digit(rng, scans[rng.choice(np.nonzero(targets == cls)[0])], w, h)
        ys, xs = np.nonzero(np.asarray(obj)[..., 3] > 127)
        if not len(xs):
            continue  # a scan too faint to show at this size
        im.paste(obj, (x, y), obj)
        placed.append((cls, x + int(xs.min()), y + int(ys.min()), x + int(xs.max()) + 1, y + int(ys.max()) + 1))
    return im, placed


def build_shapes(out: Path, n_train: int = 1500, n_val: int = 200, n_test: int = 300, seed: int = 0,
                 size: int = 128, kind: str = "shapes") -> Path:
    """Write the competition folder (PNG images, train.csv, val.csv, test.csv, test_solution.csv) of `kind`."""
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r}: one of {KINDS}")
    names = DIGITS if kind == "digits" else CLASSES
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    columns = ["image", "label", "xmin", "ymin", "xmax", "ymax"]
    tables = {}
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        rows = []
        pool = digit_pool(split) if kind == "digits" else None
        for i in range(n):
            im, boxes = sample(rng, size, digits=pool)
            name = f"images/{split}_{i:04d}.png"
            im.save(out / name)
            rows += [{"image": name, "label": names[c], "xmin": x0, "ymin": y0, "xmax": x1, "ymax": y1}
                     for c, x0, y0, x1, y1 in boxes]
        tables[split] = pd.DataFrame(rows, columns=columns)
    write_csv(out / "train.csv", tables["train"])
    if n_val:
        write_csv(out / "val.csv", tables["val"])
    write_csv(out / "test.csv", tables["test"][["image"]].drop_duplicates())
    write_csv(out / "test_solution.csv", tables["test"])  # the hidden boxes, for scoring a submission
    return out
