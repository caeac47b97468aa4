"""The clean stage on a segmentation folder: duplicate groups for the segment stage's folds, mask conflicts of
duplicates, empty-mask shares, unreadable images, its cache key, and the segment stage running it first."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline import orchestrate
from pipeline.cli import main
from pipeline.core.errors import PipelineError
from pipeline.segmentation.data import is_segmentation_folder
from pipeline.segmentation.generate import CLASSES, build_masks
from pipeline.segmentation.rle import decode

EXACT, NEAR, OTHER, CORRUPT = "images/copy.png", "images/near.jpg", "images/other_mask.png", "images/corrupt.jpg"
FLAT = ("images/flat_a.png", "images/flat_b.png")


def _train(data: Path) -> pd.DataFrame:
    return pd.read_csv(data / "train.csv", dtype=str, keep_default_na=False)


def planted(root: Path, corrupt: bool = True) -> tuple[Path, dict[str, str]]:
    """A generated folder (12 train images at 64 px) with planted copies of three training images that hold objects:
    a pixel-identical copy with the same masks, a JPEG re-encode with a 4-level brightness shift and the same masks,
    and a pixel-identical copy of an image holding two or more classes with the first one's mask emptied; with
    `corrupt`, a truncated JPEG (its header still reads, its pixels do not; reading a PNG's EXIF decodes its pixels,
    so the reader itself would refuse a truncated PNG); then two black images with empty masks."""
    data = build_masks(root, n_train=12, n_test=4, seed=0, size=64)
    train = _train(data)
    held = (train[list(CLASSES)] != "").sum(axis=1)
    several = train[held >= 2]["ImageId"].iloc[0]
    holding = [i for i in train[held >= 1]["ImageId"] if i != several]
    src = {EXACT: holding[0], NEAR: holding[1], OTHER: several}
    cleared = next(c for c in CLASSES if train.set_index("ImageId").loc[several, c])
    shutil.copy(data / src[EXACT], data / EXACT)
    with Image.open(data / src[NEAR]) as im:
        Image.fromarray(np.clip(np.asarray(im, np.int16) + 4, 0, 255).astype(np.uint8)).save(data / NEAR, quality=92)
    shutil.copy(data / src[OTHER], data / OTHER)
    rows = [train[train.ImageId == src[EXACT]].assign(ImageId=EXACT),
            train[train.ImageId == src[NEAR]].assign(ImageId=NEAR),
            train[train.ImageId == src[OTHER]].assign(ImageId=OTHER, **{cleared: ""})]
    if corrupt:
        src[CORRUPT] = holding[2]
        with Image.open(data / holding[2]) as im:
            im.save(data / CORRUPT, quality=92)
        raw = (data / CORRUPT).read_bytes()
        (data / CORRUPT).write_bytes(raw[:len(raw) // 2])
        rows.append(train[train.ImageId == holding[2]].assign(ImageId=CORRUPT))
    for flat in FLAT:  # two black images with empty masks: kept, and not copies of each other
        Image.fromarray(np.zeros((64, 64), np.uint8)).save(data / flat)
        rows.append(pd.DataFrame({"ImageId": [flat], **{c: [""] for c in CLASSES}}))
    pd.concat([train, *rows]).to_csv(data / "train.csv", index=False)
    return data, src


def clean(data: Path, work: Path, *overrides: str) -> int:
    return main(["clean", "--data", str(data), "--work", str(work), "clean.workers=1", *overrides])


def test_groups_conflicts_empty_shares_and_unreadable_images(tmp_path, caplog):
    data, src = planted(tmp_path / "masks")
    work = tmp_path / "work"
    assert clean(data, work) == 0
    assert "clean: 1 training image cannot be decoded, e.g. train.csv line 17: " in caplog.text
    assert f"1 duplicate pair of training images with masks that disagree (Dice below clean.mask_conflict_dice=0.8): " \
           f"{src[OTHER]} ~ {OTHER}" in caplog.text
    table = pd.read_csv(work / "clean.csv", dtype={"id": str})
    assert list(table.columns) == ["id", "classes", "group", "path"]
    train = _train(data)
    assert sorted(table["id"]) == sorted(set(train["ImageId"]) - {CORRUPT})  # every readable training image
    group = dict(zip(table["id"], table["group"], strict=True))
    for copy in (EXACT, NEAR, OTHER):
        assert group[copy] == group[src[copy]], copy
    together = {group[c] for c in (EXACT, NEAR, OTHER)}
    assert len(together) == 3  # three distinct groups of two
    assert table["group"].value_counts().max() == 2
    assert (table["group"].value_counts() == 2).sum() == 3  # every other image is a group of its own
    classes = table.set_index("id")["classes"]  # the copy holds its source's classes but the first
    assert classes[OTHER] == "+".join(classes[src[OTHER]].split("+")[1:])

    dropped = pd.read_csv(work / "dropped.csv", keep_default_na=False)
    assert dropped["id"].tolist() == [CORRUPT]
    assert "cannot decode image" in dropped["reason"].iloc[0]

    dup = pd.read_csv(work / "duplicates.csv", keep_default_na=False)
    assert len(dup) == 3
    pair = {tuple(sorted((r.id_a, r.id_b))): r for r in dup.itertuples()}
    exact = pair[tuple(sorted((src[EXACT], EXACT)))]
    near = pair[tuple(sorted((src[NEAR], NEAR)))]
    other = pair[tuple(sorted((src[OTHER], OTHER)))]
    assert (exact.kind, exact.mask_dice, exact.mask_conflict) == ("exact", 1.0, False)
    assert (near.kind, near.mask_dice, near.mask_conflict) == ("near", 1.0, False)
    assert (other.kind, other.mask_dice, other.mask_conflict) == ("exact", 0.0, True)
    first_held = next(c for c in CLASSES if train.set_index("ImageId").loc[src[OTHER], c])
    assert other.conflict_classes == first_held  # the other classes' masks agree

    shares = pd.read_csv(work / "empty_masks.csv")
    n = len(train)  # every image of train.csv, the unreadable one too (its masks read)
    expected = [(train[c] == "").sum() / n for c in CLASSES]
    assert shares["class"].tolist() == list(CLASSES)
    assert shares["images"].tolist() == [n] * 3
    assert shares["empty"].tolist() == [int((train[c] == "").sum()) for c in CLASSES]
    assert shares["empty_share"].tolist() == pytest.approx(expected, abs=1e-6)
    stamp = json.loads((work / "clean.json").read_text())
    assert stamp["empty_share"] == pytest.approx(dict(zip(CLASSES, expected, strict=True)), abs=1e-6)
    assert (stamp["mask_conflicts"], stamp["unreadable"], stamp["kept"], stamp["duplicate_groups"]) == (1, 1, n - 1, 3)
    assert stamp["flat"] == 2 and group[FLAT[0]] != group[FLAT[1]]  # kept, each its own example


def test_cache_key_is_the_images_masks_and_clean_keys(tmp_path, caplog):
    data, src = planted(tmp_path / "masks", corrupt=False)
    work = tmp_path / "work"
    assert clean(data, work) == 0
    stamp = (work / "clean.json").read_text()
    caplog.clear()
    assert clean(data, work, "clean.workers=2", "clean.conflicts=majority") == 0  # keys that change nothing here
    assert "clean: up to date" in caplog.text
    assert (work / "clean.json").read_text() == stamp
    assert clean(data, work, "clean.mask_conflict_dice=0.0") == 0  # a Dice of 0 is not below 0
    assert json.loads((work / "clean.json").read_text())["mask_conflicts"] == 0
    assert clean(data, work) == 0
    assert json.loads((work / "clean.json").read_text())["mask_conflicts"] == 1
    train = _train(data)  # the conflicting copy gets its source's masks: a change of masks reruns clean
    train.loc[train.ImageId == OTHER, list(CLASSES)] = train.loc[train.ImageId == src[OTHER], list(CLASSES)].to_numpy()
    train.to_csv(data / "train.csv", index=False)
    caplog.clear()
    assert clean(data, work) == 0
    assert "clean: up to date" not in caplog.text
    assert json.loads((work / "clean.json").read_text())["mask_conflicts"] == 0


def test_index_png_masks_are_read_and_keyed(tmp_path, caplog):
    """The same folder with its masks as index PNGs (masks/<stem>.png, 0 background, 1.. the classes): the shares
    come from the PNGs, and a changed mask file reruns clean."""
    data, _ = planted(tmp_path / "masks", corrupt=False)
    train = _train(data)
    (data / "masks").mkdir()
    for row in train.itertuples(index=False):
        index = np.zeros((64, 64), np.uint8)
        for c, cls in enumerate(CLASSES):
            index[decode(getattr(row, cls), (64, 64))] = c + 1
        Image.fromarray(index).save(data / "masks" / f"{Path(row.ImageId).stem}.png")
    train[["ImageId"]].to_csv(data / "train.csv", index=False)
    work = tmp_path / "work"
    assert clean(data, work) == 0
    shares = pd.read_csv(work / "empty_masks.csv")
    assert shares["empty"].tolist() == [int((train[c] == "").sum()) for c in CLASSES]
    assert json.loads((work / "clean.json").read_text())["mask_conflicts"] == 1
    caplog.clear()
    assert clean(data, work) == 0
    assert "clean: up to date" in caplog.text
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(data / "masks" / f"{Path(OTHER).stem}.png")
    caplog.clear()
    assert clean(data, work) == 0
    assert "clean: up to date" not in caplog.text
    shares = pd.read_csv(work / "empty_masks.csv")
    emptied = train.ImageId == OTHER
    assert shares["empty"].tolist() == [int(((train[c] == "") | emptied).sum()) for c in CLASSES]


def test_bad_input_is_one_line_naming_the_row(tmp_path):
    data, _ = planted(tmp_path / "masks", corrupt=False)
    work = tmp_path / "work"
    test = pd.read_csv(data / "test.csv", dtype=str)
    raw = (data / test["ImageId"].iloc[1]).read_bytes()
    (data / test["ImageId"].iloc[1]).write_bytes(raw[:len(raw) // 2])
    ctx = orchestrate.context("clean", None, ["clean.workers=1"], data, tmp_path / "work")
    with pytest.raises(PipelineError, match=r"test.csv line 3: .*test_00001.png: cannot decode image .*; every test "
                                            r"image must be readable: replace the file$"):
        orchestrate.run("clean", ctx)
    (data / test["ImageId"].iloc[1]).write_bytes(raw)
    (data / EXACT).write_bytes(b"not an image")  # the header does not read: the reader names the row
    with pytest.raises(PipelineError, match=r"train.csv line 14: .*copy.png: cannot decode image .*; replace the "
                                            r"file or remove the row$"):
        orchestrate.run("clean", ctx)
    ctx = orchestrate.context("clean", None, ["clean.embeddings=true"], data, work)
    with pytest.raises(PipelineError, match=r"clean.embeddings=true: .*set clean.embeddings=false"):
        orchestrate.run("clean", ctx)


def test_segmentation_folders_are_told_from_classification_ones(tmp_path):
    data = build_masks(tmp_path / "masks", n_train=4, n_test=2, seed=0, size=32)
    assert is_segmentation_folder(data)
    assert orchestrate.chain("segment") == ["clean", "segment"]
    cls = tmp_path / "cls"
    cls.mkdir()
    pd.DataFrame({"image": ["a.png", "b.png"], "label": ["cat", "dog"]}).to_csv(cls / "train.csv", index=False)
    pd.DataFrame({"image": ["c.png"]}).to_csv(cls / "test.csv", index=False)
    assert not is_segmentation_folder(cls)
    # numeric multi-label tags look like runs, but the column is named as a label
    pd.DataFrame({"image": ["a.png", "b.png"], "labels": ["1 2", "3 7"]}).to_csv(cls / "train.csv", index=False)
    assert not is_segmentation_folder(cls)
    pd.DataFrame({"image": ["a.png", "b.png"], "ship": ["1 2", ""]}).to_csv(cls / "train.csv", index=False)
    assert is_segmentation_folder(cls)
    pd.DataFrame({"image": ["a.png", "b.png"], "ship": ["1 2", "big"]}).to_csv(cls / "train.csv", index=False)
    assert not is_segmentation_folder(cls)
    pd.DataFrame({"image": ["a.png", "b.png"]}).to_csv(cls / "train.csv", index=False)
    assert not is_segmentation_folder(cls)
    (cls / "masks").mkdir()
    assert is_segmentation_folder(cls)


def test_segment_runs_clean_first_and_keeps_each_group_in_one_fold(tmp_path, caplog, one_thread):
    data, src = planted(tmp_path / "masks")
    work, subs = tmp_path / "work", tmp_path / "subs"
    args = ["segment", "--data", str(data), "--work", str(work), "--submissions", str(subs), "runtime.threads=1",
            "clean.workers=1", "segment.train.image_size=32", "segment.train.epochs=1", "segment.train.batch_size=32",
            "segment.folds.n_splits=2", "segment.predict.gallery_images=0", "segment.views.hflip=false",
            "tracking.backend=none"]
    with caplog.at_level("WARNING"):
        assert main(args) == 0
    assert (work / "clean.csv").is_file()
    assert "segment: 1 training images the clean stage could not decode are left out" in caplog.text
    folds = pd.read_csv(work / "segment" / "folds.csv", dtype={"image": str})
    assert CORRUPT not in set(folds["image"]) and len(folds) == len(_train(data)) - 1
    fold = dict(zip(folds["image"], folds["fold"], strict=True))
    group = dict(zip(folds["image"], folds["group"], strict=True))
    for copy in (EXACT, NEAR, OTHER):
        assert group[copy] == group[src[copy]] and fold[copy] == fold[src[copy]], copy
    assert folds.groupby("group")["fold"].nunique().max() == 1
    assert folds["group"].nunique() == len(folds) - 3
    stamp = (work / "clean.json").read_text()
    caplog.clear()
    assert main(args) == 0  # clean is up to date, and so is every fold model
    assert "clean: up to date" in caplog.text and "segment: epoch" not in caplog.text
    assert (work / "clean.json").read_text() == stamp
    caplog.clear()  # a clean key: clean reruns, the near pair is no longer a group, and the folds follow
    assert main([*args, "clean.near_duplicates=false"]) == 0
    assert "clean: up to date" not in caplog.text
    folds = pd.read_csv(work / "segment" / "folds.csv", dtype={"image": str})
    group = dict(zip(folds["image"], folds["group"], strict=True))
    assert group[NEAR] != group[src[NEAR]] and group[EXACT] == group[src[EXACT]]
    assert folds["group"].nunique() == len(folds) - 2


@pytest.mark.parametrize("stage", ["folds", "train", "ensemble", "bundle"])
def test_classification_stages_on_a_mask_folder_are_one_line(tmp_path, stage, capsys):
    data = build_masks(tmp_path / "masks", n_train=6, n_test=2, seed=0, size=32)
    assert main([stage, "--data", str(data), "--work", str(tmp_path / "work")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {data}: its train.csv holds masks, and `{stage}` belongs to the classification track; "
                   f"run `make segment DATA={data}` (or `make auto DATA={data}`)"]
    assert not (tmp_path / "work" / "folds.csv").exists()
