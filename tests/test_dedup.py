"""Near-duplicate detection: planted transformations are found, distinct images are not paired."""

import io
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageEnhance

from pipeline import clean, dedup, folds, submission
from pipeline.clean import compute_features
from pipeline.config import load_config
from pipeline.context import Context

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
            base = natural_image(1000 + seed)
            label = ["a", "b"][seed % 2]
            base.save(root / f"img/base{seed}.png")
            fn(base).save(root / f"img/{name}{k}.{'jpg' if 'jpeg' in name else 'png'}")
            rows += [(f"img/base{seed}.png", label), (f"img/{name}{k}.{'jpg' if 'jpeg' in name else 'png'}", label)]
            planted.append((name, rows[-2][0], rows[-1][0]))
            seed += 1
    pd.DataFrame(rows, columns=["image", "label"]).to_csv(root / "train.csv", index=False)
    for t in range(3):
        natural_image(5000 + t).save(root / f"img/test{t}.png")
    pd.DataFrame({"image": [f"img/test{t}.png" for t in range(3)]}).to_csv(root / "test.csv", index=False)
    return root, planted


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
    ctx = Context(load_config(), data, tmp_path / "work")
    summary = clean.run(ctx)
    dropped = pd.read_csv(ctx.work_dir / "dropped.csv").set_index("id")["reason"]
    assert summary["unreadable"] == 2 and summary["flat"] == 1
    assert "cannot decode" in dropped["img/cat_0.png"] and "cannot decode" in dropped["img/cat_1.png"]
    assert dropped["img/dog_0.png"] == "single flat colour"


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
