"""Near-duplicate detection: planted transformations are found, distinct images are not paired."""

import io
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageEnhance, ImageOps

from pipeline.context import Context
from pipeline.core.config import load_config
from pipeline.data import dedup
from pipeline.data.dedup import compute_features
from pipeline.scoring import submission
from pipeline.stages import clean, folds

from .conftest import natural_image


def _jpeg(im: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    im.convert("RGB").save(buf, "JPEG", quality=quality)
    buf.seek(0)
    return Image.open(buf).copy()


def _crop(im: Image.Image, left: float, top: float, right: float, bottom: float) -> Image.Image:
    w, h = im.size
    return im.crop((round(w * left), round(h * top), round(w * (1 - right)), round(h * (1 - bottom))))


TRANSFORMS = {
    "png_to_jpeg_q75": lambda im: _jpeg(im, 75),
    "jpeg_q90": lambda im: _jpeg(im, 90),
    "half_size": lambda im: im.resize((im.width // 2, im.height // 2), Image.BILINEAR),
    "upscaled_1.5x": lambda im: im.resize((im.width * 3 // 2, im.height * 3 // 2), Image.BICUBIC),
    "centre_crop_5pct": lambda im: _crop(im, 0.025, 0.025, 0.025, 0.025),
    "corner_crop_5pct": lambda im: _crop(im, 0.05, 0.05, 0, 0),
    "side_crop_3pct": lambda im: _crop(im, 0, 0.0, 0.03, 0.01),
    "brighter_15pct": lambda im: ImageEnhance.Brightness(im).enhance(1.15),
    "darker_15pct": lambda im: ImageEnhance.Brightness(im).enhance(0.85),
    "contrast_-15pct": lambda im: ImageEnhance.Contrast(im).enhance(0.85),
    "contrast_+15pct": lambda im: ImageEnhance.Contrast(im).enhance(1.15),
    "rgb_to_gray": lambda im: im.convert("L"),
}


def _planted_folder(root: Path, n_each: int = 3) -> tuple[Path, list[tuple[str, str, str]]]:
    """train: distinct base images + one transformed copy of each (same label); test: a few distinct images."""
    (root / "img").mkdir(parents=True)
    rows, planted, seed = [], [], 0
    for name, fn in TRANSFORMS.items():
        for k in range(n_each):
            _plant(root, rows, planted, name, k, seed, natural_image(1000 + seed), fn)
            seed += 1
    _write_tables(root, rows, [natural_image(5000 + t) for t in range(3)])
    return root, planted


def _plant(root: Path, rows: list, planted: list, name: str, k: int, seed: int, base: Image.Image, fn) -> None:
    """Save a base image and its transformed copy under one label; record the pair as planted."""
    label = ["a", "b"][seed % 2]
    base_path, copy_path = f"img/base{seed}.png", f"img/{name}{k}.{'jpg' if 'jpeg' in name else 'png'}"
    base.save(root / base_path)
    fn(base).save(root / copy_path)
    rows += [(base_path, label), (copy_path, label)]
    planted.append((name, base_path, copy_path))


def _write_tables(root: Path, rows: list, tests: list[Image.Image]) -> None:
    """train.csv from the planted rows; the test images and test.csv."""
    pd.DataFrame(rows, columns=["image", "label"]).to_csv(root / "train.csv", index=False)
    for t, image in enumerate(tests):
        image.save(root / f"img/test{t}.png")
    pd.DataFrame({"image": [f"img/test{t}.png" for t in range(len(tests))]}).to_csv(root / "test.csv", index=False)


@pytest.mark.slow
def test_every_planted_transformation_is_found(tmp_path: Path):
    data, planted = _planted_folder(tmp_path / "comp")
    ctx = Context(load_config(None, ["clean.workers=2"]), data, tmp_path / "work")
    summary = clean.run(ctx)
    pairs = pd.read_csv(ctx.work_dir / "duplicates.csv")
    found = {frozenset(p) for p in zip(pairs.id_a, pairs.id_b, strict=True)}
    missed = [name for name, a, b in planted if frozenset((a, b)) not in found]
    assert not missed, f"near duplicates not found: {missed}"
    assert summary["near_pairs"] == len(planted) and summary["exact_pairs"] == 0  # and nothing else was paired
    html = (ctx.work_dir / "report" / "clean.html").read_text()
    assert html.count('class="group"') == len(planted) and "data:image/png;base64," in html
    # groups never span folds
    folds.run(Context(load_config(None, ["clean.workers=2", "folds.n_splits=3"]), data, tmp_path / "work"))
    frame = pd.read_csv(ctx.work_dir / "folds.csv")
    assert (frame.groupby("group")["fold"].nunique() == 1).all() and frame["group"].nunique() == len(planted)


@pytest.mark.slow
def test_distinct_natural_images_give_no_false_pairs(tmp_path: Path):
    """600 distinct generated pictures at the default threshold: 0 of 179,700 pairs (measured)."""
    paths = []
    for seed in range(600):
        path = tmp_path / f"{seed}.png"
        natural_image(seed).save(path)
        paths.append(str(path))
    feats = compute_features(paths, near_min_size=32, workers=2, desc="hash")
    phash = np.array([f["phash"] for f in feats], dtype=np.uint64)
    dhash = np.array([f["dhash"] for f in feats], dtype=np.uint64)
    i, j, dist = dedup.near_pairs(phash, dhash, load_config().clean.near_threshold)
    assert len(i) == 0, f"false pairs: {list(zip(i, j, dist, strict=True))[:5]}"


def test_multi_index_search_equals_brute_force():
    rng = np.random.default_rng(0)
    n, v = 400, 6
    P = rng.integers(0, 2**63, (n, v), dtype=np.int64).astype(np.uint64)
    D = rng.integers(0, 2**63, (n, v), dtype=np.int64).astype(np.uint64)
    for i in range(0, 120, 2):  # plant pairs at distances 0..14 spread over both hashes and the crop columns
        flips = rng.choice(64, size=int(rng.integers(0, 8)), replace=False)
        P[i + 1, 0] = P[i, int(rng.integers(0, v))] ^ np.uint64(sum(1 << int(f) for f in flips))
        D[i + 1, 0] = D[i, 0] ^ np.uint64(sum(1 << int(f)
                                              for f in rng.choice(64, size=int(rng.integers(0, 7)), replace=False)))
    for threshold in (0, 6, 14):
        dist = dedup.popcount(P[:, None, :] ^ P[None, :, 0, None]) + dedup.popcount(D[:, None, :] ^ D[None, :, 0, None])
        best = dist.min(-1)
        best = np.minimum(best, best.T)
        np.fill_diagonal(best, 99)
        bi, bj = np.nonzero(np.triu(best <= threshold))
        i, j, d = dedup.near_pairs(P, D, threshold)
        assert set(zip(i.tolist(), j.tolist(), strict=True)) == set(zip(bi.tolist(), bj.tolist(), strict=True))
        assert (d == best[i, j]).all()


def test_groups_are_connected_components():
    assert dedup.groups(6, np.array([0, 1, 4]), np.array([1, 2, 5])).tolist() == [0, 0, 0, 1, 2, 2]


def test_truncated_zero_size_and_flat_images_are_dropped(tmp_path: Path):
    from .conftest import write_competition

    data = write_competition(tmp_path / "comp", n_per_class=5)
    natural_image(1).save(data / "img/cat_0.png")
    raw = (data / "img/cat_0.png").read_bytes()
    (data / "img/cat_0.png").write_bytes(raw[: len(raw) // 2])  # truncated
    (data / "img/cat_1.png").write_bytes(b"")  # zero size
    Image.new("RGB", (20, 20), (10, 200, 30)).save(data / "img/dog_0.png")  # one flat colour
    ctx = Context(load_config(None, ["clean.drop_flat=true"]), data, tmp_path / "work")
    summary = clean.run(ctx)
    dropped = pd.read_csv(ctx.work_dir / "dropped.csv").set_index("id")["reason"]
    assert summary["unreadable"] == 2 and summary["flat"] == 1 and summary["flat_dropped"] == 1
    assert "cannot decode" in dropped["img/cat_0.png"] and "cannot decode" in dropped["img/cat_1.png"]
    assert dropped["img/dog_0.png"] == "single flat colour"


def _flat_folder(root: Path) -> Path:
    """Labels a and b (natural pictures) and 'empty' (only black canvases); two a rows are flat grey too."""
    (root / "img").mkdir(parents=True)
    rows = []
    for k in range(8):
        natural_image(300 + k, 40).save(root / f"img/pic{k}.png")
        rows.append((f"img/pic{k}.png", "ab"[k % 2]))
    for k in range(4):
        Image.new("L", (40, 40), 0).save(root / f"img/empty{k}.png")
        rows.append((f"img/empty{k}.png", "empty"))
    for k in range(2):
        Image.new("RGB", (40, 40), (90, 90, 90)).save(root / f"img/grey{k}.png")
        rows.append((f"img/grey{k}.png", "a"))
    _write_tables(root, rows, [natural_image(400), Image.new("L", (40, 40), 0)])
    return root


def test_flat_images_are_kept_and_reported_by_default(tmp_path: Path, caplog):
    """Identical black canvases are neither duplicates of each other (each is an example of 'empty') nor of the
    black test image; the log and the report list their labels."""
    data = _flat_folder(tmp_path / "comp")
    ctx = Context(load_config(None, ["clean.workers=1"]), data, tmp_path / "work")
    with caplog.at_level("INFO", logger="pipeline"):
        summary = clean.run(ctx)
    kept = pd.read_csv(ctx.work_dir / "clean.csv")
    assert len(kept) == 14 and summary["flat"] == 6 and summary["flat_dropped"] == 0
    assert summary["exact_pairs"] == 0 and summary["duplicates_dropped"] == 0 and summary["test_labels_known"] == 0
    assert kept["group"].nunique() == 14  # no flat image is grouped with another: they spread over the folds
    assert any("6 flat training images with 2 labels ('empty' x4, 'a' x2)" in r.message for r in caplog.records)
    html = (ctx.work_dir / "report" / "clean.html").read_text()
    assert "<h2>Flat images</h2>" in html and "<td>empty</td><td>4</td>" in html


def test_drop_flat_never_drops_the_last_images_of_a_label(tmp_path: Path, caplog):
    data = _flat_folder(tmp_path / "comp")
    ctx = Context(load_config(None, ["clean.workers=1", "clean.drop_flat=true"]), data, tmp_path / "work")
    summary = clean.run(ctx)
    dropped = pd.read_csv(ctx.work_dir / "dropped.csv")
    assert set(dropped["id"]) == {"img/grey0.png", "img/grey1.png"} and summary["flat_dropped"] == 2
    assert (pd.read_csv(ctx.work_dir / "clean.csv")["label"] == "empty").sum() == 4


def test_one_label_on_every_flat_image_is_called_a_pattern(tmp_path: Path, caplog):
    data = _flat_folder(tmp_path / "comp")
    train = pd.read_csv(data / "train.csv")
    train[~train["image"].str.startswith("img/grey")].to_csv(data / "train.csv", index=False)
    with caplog.at_level("INFO", logger="pipeline"):
        clean.run(Context(load_config(None, ["clean.workers=1"]), data, tmp_path / "work"))
    assert any(r.message == "clean: 4 flat training images all labelled 'empty': a pattern (an empty class), "
                            "not corruption; kept" for r in caplog.records)


def _blobs(rng: np.random.Generator, n: int, size: int = 64) -> np.ndarray:
    """A black canvas with n bright Gaussian blobs at random places (microscopy, stars, counting)."""
    yy, xx = np.mgrid[:size, :size]
    out = np.zeros((size, size))
    for _ in range(n):
        cy, cx, r = rng.uniform(8, size - 8), rng.uniform(8, size - 8), rng.uniform(2, 4)
        out += 230 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
    return np.clip(out, 0, 255).astype(np.uint8)


def _dark_folder(root: Path) -> tuple[Path, set[frozenset]]:
    """Mostly-dark 64x64 images of different content and empty ones, with planted true duplicates.

    Labels: 'empty' (black canvases, and near-flat ones: black with faint sensor noise), 'blob2'..'blob4' (that many
    blobs on black), 'night_a' / 'night_b' (pictures at a tenth of their brightness). Planted, each under its
    original's label: two JPEG q90 copies of night pictures, two one-pixel shifts of blob images, one exact copy.
    """
    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True)
    rows, planted = [], set()

    def save(name: str, pixels: np.ndarray | Image.Image, label: str) -> str:
        image = pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels)
        image.save(root / f"img/{name}")
        rows.append((f"img/{name}", label))
        return f"img/{name}"

    blobs = [save(f"blob{k}.png", _blobs(rng, 2 + k % 3), f"blob{2 + k % 3}") for k in range(45)]
    night = [save(f"night{k}.png", ImageEnhance.Brightness(natural_image(700 + k, 64)).enhance(0.1),
                  f"night_{'ab'[k % 2]}") for k in range(45)]
    for k in range(6):
        save(f"empty{k}.png", np.zeros((64, 64), np.uint8), "empty")
        save(f"noise{k}.png", np.clip(rng.normal(3, 1.5, (64, 64)), 0, 255).astype(np.uint8), "empty")
    labels = dict(rows)
    for k in range(2):
        copy = save(f"night_copy{k}.jpg", _jpeg(Image.open(root / night[k]), 90), labels[night[k]])
        planted.add(frozenset((night[k], copy)))
        shifted = np.roll(np.asarray(Image.open(root / blobs[k])), 1, axis=1)
        planted.add(frozenset((blobs[k], save(f"blob_shift{k}.png", shifted, labels[blobs[k]]))))
    planted.add(frozenset((blobs[5], save("blob_copy.png", Image.open(root / blobs[5]), labels[blobs[5]]))))
    _write_tables(root, rows, [Image.fromarray(_blobs(rng, 2)), natural_image(800, 64), Image.new("L", (64, 64))])
    return root, planted


def test_mostly_dark_and_empty_images_lose_nothing_but_true_duplicates(tmp_path: Path):
    """Perceptual hashes pair distinct mostly-black images by the thousand; here, with the defaults, the planted
    copies are the only pairs, the exact copy the only row dropped, and every empty image stays."""
    data, planted = _dark_folder(tmp_path / "comp")
    ctx = Context(load_config(None, ["clean.workers=1"]), data, tmp_path / "work")
    summary = clean.run(ctx)
    pairs = pd.read_csv(ctx.work_dir / "duplicates.csv")
    assert {frozenset(p) for p in zip(pairs.id_a, pairs.id_b, strict=True)} == planted
    dropped = pd.read_csv(ctx.work_dir / "dropped.csv")
    assert list(dropped["id"]) == ["img/blob_copy.png"] and summary["conflicts_dropped"] == 0
    kept = pd.read_csv(ctx.work_dir / "clean.csv")
    assert (kept["label"] == "empty").sum() == 12 and summary["flat"] == 6 and summary["pairs_set_aside"] == 0
    assert summary["sparse_compared"] >= 45 + 6  # the blobs and the noisy canvases at least


def test_a_hash_pair_counts_only_when_pixel_space_confirms_it():
    """Two images with equal perceptual hashes whose pixels differ (what mostly-dark images give) do not pair;
    a copy does."""
    rng = np.random.default_rng(1)
    base = rng.integers(0, 255, (6, 16, 16)).astype(np.uint8)
    other = rng.integers(0, 255, (6, 16, 16)).astype(np.uint8)
    frame = pd.DataFrame({"pixel": ["p0", "p1", "p2"], "flat": False, "phash": [[7] * 6] * 3, "dhash": [[9] * 6] * 3,
                          "crop_grids": [base, np.clip(base.astype(int) + 3, 0, 255).astype(np.uint8), other],
                          "shift_grids": None, "small": False})
    pairs = dedup.find_pairs(frame, 14, True)
    assert list(zip(pairs["a"], pairs["b"], pairs["kind"], strict=True)) == [(0, 1, "near")]
    assert len(dedup.find_pairs(frame, 14, True, confirm_threshold=2.0)) == 3


def test_a_flood_of_pairs_is_set_aside(tmp_path: Path, caplog):
    """clean.small_threshold=1.5 pairs most two of the 29 small images: more pairs than images, so none is
    acted on (no group, no conflict) and the warning names the settings to look at."""
    data = _small_conflict_folder(tmp_path / "comp")
    ctx = Context(load_config(None, ["clean.workers=1", "clean.small_threshold=1.5"]), data, tmp_path / "work")
    with caplog.at_level("WARNING", logger="pipeline"):
        summary = clean.run(ctx)
    assert summary["pairs_set_aside"] > 29 and summary["small_pairs"] == 0 and summary["conflicts_dropped"] == 0
    kept = pd.read_csv(ctx.work_dir / "clean.csv")
    assert len(kept) == 27 and kept["group"].nunique() == 27  # all training rows, none grouped
    warning = [r.message for r in caplog.records if "more than duplicates explain" in r.message]
    assert len(warning) == 1 and "look at clean.small_threshold (or clean.near_duplicates=false)" in warning[0]


def _train_test_duplicate(tmp_path: Path) -> Path:
    from .conftest import write_competition

    data = write_competition(tmp_path / "comp", n_per_class=4, n_test=3)
    natural_image(7).save(data / "img/dog_2.png")
    _jpeg(natural_image(7), 80).save(data / "img/test_1.jpg")
    test = pd.read_csv(data / "test.csv")
    test.loc[1, "image"] = "img/test_1.jpg"
    test.to_csv(data / "test.csv", index=False)
    pd.DataFrame({"image": test["image"], "label": "cat"}).to_csv(data / "sample_submission.csv", index=False)
    return data


def test_train_test_duplicates_are_reported_and_labels_transferred_only_on_request(tmp_path: Path):
    data = _train_test_duplicate(tmp_path)
    ctx = Context(load_config(), data, tmp_path / "work")
    summary = clean.run(ctx)
    assert (summary["train_test_pairs"] == 1 and summary["test_labels_known"] == 1
            and summary["test_labels_transferred"] == 0)
    assert not (ctx.work_dir / "test_label_overrides.csv").exists()
    ctx = Context(load_config(None, ["clean.transfer_test_labels=true"]), data, tmp_path / "work")
    assert clean.run(ctx)["test_labels_transferred"] == 1
    overrides = pd.read_csv(ctx.work_dir / "test_label_overrides.csv", dtype=str)
    assert overrides.to_dict("records") == [{"id": "img/test_1.jpg", "label": "dog", "train_id": "img/dog_2.png"}]
    comp = ctx.competition
    proba = np.tile([[0.9, 0.1]], (3, 1))  # the model says cat everywhere
    frame = submission.build(comp, comp.test["id"].to_numpy(), proba, "labels")
    frame, n = submission.apply_overrides(frame, comp, ctx.work_dir / "test_label_overrides.csv")
    assert n == 1 and frame.set_index("image").loc["img/test_1.jpg", "label"] == "dog"
    submission.validate(frame, comp)


def test_user_groups_and_duplicate_groups_share_folds(tmp_path: Path):
    from .conftest import write_competition

    data = write_competition(tmp_path / "comp", n_per_class=12)
    train = pd.read_csv(data / "train.csv")
    train["patient"] = [f"p{i // 3}" for i in range(len(train))]
    train.to_csv(data / "train.csv", index=False)
    shutil.copy(data / "img/cat_0.png", data / "img/dog_11.png")  # duplicate across two patients (and labels: dropped)
    shutil.copy(data / "img/cat_4.png", data / "img/cat_9.png")   # same label: links patients p1 and p3
    ctx = Context(load_config(None, ["competition.group_column=patient", "folds.n_splits=3",
                                     "clean.drop_exact_duplicates=false"]),
                  data, tmp_path / "work")
    clean.run(ctx)
    folds.run(ctx)
    frame = pd.read_csv(ctx.work_dir / "folds.csv", dtype={"user_group": str})
    assert (frame.groupby("user_group")["fold"].nunique() == 1).all()
    assert (frame.groupby("group")["fold"].nunique() == 1).all()
    assert frame.set_index("id").loc[["img/cat_3.png", "img/cat_9.png"], "fold"].nunique() == 1


def _shift(im: Image.Image, dx: int, dy: int) -> Image.Image:
    """Move the picture by (dx, dy) pixels; the uncovered row or column repeats the old edge."""
    a = np.asarray(im)
    h, w = a.shape[:2]
    padded = np.pad(a, ((1, 1), (1, 1)) + ((0, 0),) * (a.ndim - 2), mode="edge")
    return Image.fromarray(padded[1 - dy:1 - dy + h, 1 - dx:1 - dx + w])


SMALL_TRANSFORMS = {
    "png_to_jpeg_q75": lambda im: _jpeg(im, 75),
    "jpeg_q90": lambda im: _jpeg(im, 90),
    "rgb_to_gray": lambda im: im.convert("L"),
    "gray_jpeg_to_rgb": lambda im: _jpeg(im.convert("L"), 85).convert("RGB"),
    "brighter_15pct": lambda im: ImageEnhance.Brightness(im).enhance(1.15),
    "darker_15pct": lambda im: ImageEnhance.Brightness(im).enhance(0.85),
    "contrast_-15pct": lambda im: ImageEnhance.Contrast(im).enhance(0.85),
    "contrast_+15pct": lambda im: ImageEnhance.Contrast(im).enhance(1.15),
    "shift_right_1px": lambda im: _shift(im, 1, 0),
    "shift_up_1px": lambda im: _shift(im, 0, -1),
    "shift_diagonal_1px": lambda im: _shift(im, -1, 1),
}


def _digit_28(k: int) -> Image.Image:
    """An MNIST-like picture: one of the embedded 8x8 digits upscaled to 28x28."""
    from sklearn.datasets import load_digits

    pixels = np.round(load_digits().images[k] * (255.0 / 16.0)).astype(np.uint8)
    return Image.fromarray(pixels).resize((28, 28), Image.BICUBIC)


def _small_planted_folder(root: Path) -> tuple[Path, list[tuple[str, str, str]]]:
    """28x28 train images: distinct bases (generated pictures and upscaled digits) + one transformed copy of each."""
    (root / "img").mkdir(parents=True)
    rows, planted, seed = [], [], 0
    for name, fn in SMALL_TRANSFORMS.items():
        digit = ImageOps.colorize(_digit_28(seed * 7), (20, 0, 60), (250, 220, 120))  # colour: gray is a change
        for k, base in enumerate([natural_image(2000 + seed, 28), natural_image(3000 + seed, 28), digit]):
            _plant(root, rows, planted, name, k, seed, base, fn)
            seed += 1
    _write_tables(root, rows, [natural_image(6000 + t, 28) for t in range(3)])
    return root, planted


def test_every_planted_small_transformation_is_found(tmp_path: Path):
    """Below clean.near_min_size (28x28 here): every planted copy pairs with its base, in pixel space, and nothing
    else pairs; the pairs become groups that the folds keep together."""
    data, planted = _small_planted_folder(tmp_path / "comp")
    ctx = Context(load_config(None, ["clean.workers=1", "folds.n_splits=3"]), data, tmp_path / "work")
    summary = clean.run(ctx)
    pairs = pd.read_csv(ctx.work_dir / "duplicates.csv")
    found = {frozenset(p): k for p, k in zip(zip(pairs.id_a, pairs.id_b, strict=True), pairs.kind, strict=True)}
    missed = [name for name, a, b in planted if found.get(frozenset((a, b))) != "small"]
    assert not missed, f"small near duplicates not found: {missed}"
    assert summary["small_pairs"] == len(planted) and summary["near_pairs"] == 0 and summary["exact_pairs"] == 0
    assert summary["small_compared"] == 2 * len(planted) + 3 and summary["not_near_hashed"] == 2 * len(planted) + 3
    assert (pairs.distance <= load_config().clean.small_threshold).all()
    folds.run(ctx)
    frame = pd.read_csv(ctx.work_dir / "folds.csv")
    assert (frame.groupby("group")["fold"].nunique() == 1).all() and frame["group"].nunique() == len(planted)


def test_small_search_equals_brute_force():
    rng = np.random.default_rng(0)
    n, s, d = 120, len(dedup.SHIFTS), dedup.SMALL_GRID ** 2
    vectors = rng.normal(size=(n, s, d))
    for i in range(0, 60, 2):  # plant near copies, some through a shifted row
        vectors[i + 1, 4] = vectors[i, int(rng.integers(0, s))] + rng.normal(0, 0.01 * (i % 7), d)
    vectors[5, 2] = np.nan  # a flat shift
    vectors = (vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)).astype(np.float32)
    dist = np.linalg.norm(vectors[:, None, :, :].astype(np.float64) - vectors[None, :, 4, None, :], axis=-1)
    best = np.fmin(np.nanmin(dist, -1), np.nanmin(dist, -1).T)
    np.fill_diagonal(best, 9)
    for threshold in (0.05, 0.2, 0.6):
        bi, bj = np.nonzero(np.triu(best <= threshold))
        i, j, dd = dedup.small_pairs(vectors, threshold)
        assert set(zip(i.tolist(), j.tolist(), strict=True)) == set(zip(bi.tolist(), bj.tolist(), strict=True))
        np.testing.assert_allclose(dd, best[i, j], atol=1e-5)
    assert len(dedup.small_pairs(vectors, 0.6)[0]) == 30


def test_embedded_digits_give_no_cross_label_pairs():
    """The 1,797 8x8 digits at the default threshold: one pair (0.088 apart, one label); the closest two digits of
    different labels are 0.217 apart (measured), far beyond the default 0.09."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    pixels = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)  # as pipeline/data/digits.py writes them
    vectors = np.stack([dedup.small_vectors(p) for p in pixels])
    i, j, dist = dedup.small_pairs(vectors, load_config().clean.small_threshold)
    assert len(i) == 1 and bunch.target[i[0]] == bunch.target[j[0]] and round(float(dist[0]), 3) == 0.088
    i, j, dist = dedup.small_pairs(vectors, 0.25)
    cross = bunch.target[i] != bunch.target[j]
    assert cross.any() and round(float(dist[cross].min()), 3) == 0.217


def _small_conflict_folder(root: Path) -> Path:
    """28x28 images, labels a and b; an MNIST-like digit (a) has a JPEG q90 copy (a) and a JPEG q75 copy (b)."""
    (root / "img").mkdir(parents=True)
    rows = []
    for k in range(24):
        natural_image(8000 + k, 28).save(root / f"img/pic{k}.png")
        rows.append((f"img/pic{k}.png", "ab"[k % 2]))
    _digit_28(3).save(root / "img/digit.png")
    _jpeg(_digit_28(3), 75).save(root / "img/copy_q75.jpg")
    _jpeg(_digit_28(3), 90).save(root / "img/copy_q90.jpg")
    rows += [("img/digit.png", "a"), ("img/copy_q75.jpg", "b"), ("img/copy_q90.jpg", "a")]
    pd.DataFrame(rows, columns=["image", "label"]).to_csv(root / "train.csv", index=False)
    for t in range(2):
        natural_image(7000 + t, 28).save(root / f"img/test{t}.png")
    pd.DataFrame({"image": [f"img/test{t}.png" for t in range(2)]}).to_csv(root / "test.csv", index=False)
    return root


@pytest.mark.parametrize("policy, dropped_ids", [
    ("drop", {"img/digit.png", "img/copy_q75.jpg", "img/copy_q90.jpg"}),
    ("majority", {"img/copy_q75.jpg"}),
])
def test_small_jpeg_copy_with_another_label_is_resolved_by_the_conflict_policy(tmp_path: Path, policy, dropped_ids):
    data = _small_conflict_folder(tmp_path / "comp")
    ctx = Context(load_config(None, ["clean.workers=1", f"clean.conflicts={policy}"]), data, tmp_path / "work")
    summary = clean.run(ctx)
    dropped = pd.read_csv(ctx.work_dir / "dropped.csv")
    assert set(dropped.id) == dropped_ids and dropped.reason.str.startswith("label conflict").all()
    assert summary["conflicts_dropped"] == len(dropped_ids) and summary["small_pairs"] == 3
    kept = pd.read_csv(ctx.work_dir / "clean.csv")
    assert set(kept.id).isdisjoint(dropped_ids) and len(kept) == 27 - len(dropped_ids)


def test_small_threshold_is_in_the_clean_key(tmp_path: Path):
    data = _small_conflict_folder(tmp_path / "comp")
    assert clean.run(Context(load_config(None, ["clean.workers=1"]), data, tmp_path / "work"))["small_pairs"] == 3
    ctx = Context(load_config(None, ["clean.workers=1", "clean.small_threshold=0"]), data, tmp_path / "work")
    assert clean.run(ctx)["small_pairs"] == 0  # reran: not "up to date"
    assert clean.run(ctx) == {"skipped": True}
