"""Detection as a competition track: many objects and classes, auto anchors, box-aware augmentation and mosaic,
grouped folds, WBF fusion and the fold stage end to end (issue 17)."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from ensemble_boxes import weighted_boxes_fusion

from pipeline.cli import main
from pipeline.core.config import CompetitionConfig, DetectDataConfig
from pipeline.core.errors import PipelineError
from pipeline.detection.anchors import auto_anchors, box_shapes
from pipeline.detection.augment import BoxAugment, BoxAugmentSettings
from pipeline.detection.data import box_targets, read_detection
from pipeline.detection.folds import assign_folds, image_groups, main_class
from pipeline.detection.fusion import choose, fuse, wbf
from pipeline.detection.infer import class_table
from pipeline.detection.shapes import CLASSES, DIGITS, build_shapes, digit_pool
from pipeline.detection.tinyssd import TinySSD


def test_shapes_folder_has_many_objects_and_classes_per_image_with_tight_boxes(tmp_path):
    data = build_shapes(tmp_path / "shapes", n_train=30, n_val=6, n_test=5, seed=3)
    train = pd.read_csv(data / "train.csv")
    per_image = train.groupby("image").size()
    assert per_image.min() >= 1 and per_image.max() <= 4 and per_image.max() >= 3
    assert train["label"].nunique() >= 8 and set(train["label"]) <= set(CLASSES)
    side = np.maximum(train["xmax"] - train["xmin"], train["ymax"] - train["ymin"])
    assert side.min() >= 24 and side.max() <= 64
    again = build_shapes(tmp_path / "again", n_train=30, n_val=6, n_test=5, seed=3)
    assert pd.read_csv(again / "train.csv").equals(train)  # deterministic for a seed
    assert sorted(pd.read_csv(data / "test_solution.csv")["image"].unique()) == pd.read_csv(data / "test.csv")[
        "image"].tolist()
    read = read_detection(data, DetectDataConfig(), CompetitionConfig(), seed=0)
    targets = box_targets(read.train, read.classes)
    assert targets.shape == (30, per_image.max(), 5) and int((targets[..., 0] >= 0).sum()) == len(train)
    first = train[train["image"] == read.train.images["image"][0]]
    row = targets[0, :len(first)]
    assert [read.classes[int(c)] for c in row[:, 0]] == first["label"].tolist()
    assert torch.allclose(row[:, 1:] * 128, torch.tensor(first[["xmin", "ymin", "xmax", "ymax"]].to_numpy()).float())


def test_digits_form_has_ten_look_alike_classes_from_disjoint_scans(tmp_path):
    """kind=digits: the classes are the ten digits, every box holds its digit's pixels (tight, 24-64 px before the
    scan's own margin), colours are not a class cue, and train never sees a scan that val or test use."""
    data = build_shapes(tmp_path / "digits", n_train=40, n_val=4, n_test=4, seed=2, kind="digits")
    train = pd.read_csv(data / "train.csv", dtype={"label": str})
    assert set(train["label"]) <= set(DIGITS) and train["label"].nunique() >= 9
    side = np.maximum(train["xmax"] - train["xmin"], train["ymax"] - train["ymin"])
    assert side.min() >= 8 and side.max() <= 64
    train_scans, _ = digit_pool("train")
    test_scans, _ = digit_pool("test")
    assert len(train_scans) + len(test_scans) == 1797
    assert not {s.tobytes() for s in train_scans} & {s.tobytes() for s in test_scans}
    read = read_detection(data, DetectDataConfig(), CompetitionConfig(), seed=0)
    assert read.classes == sorted(set(train["label"]))
    with pytest.raises(ValueError, match="kind"):
        build_shapes(tmp_path / "bad", n_train=1, n_val=0, n_test=1, kind="letters")


def test_auto_anchors_return_planted_sizes_and_ratios():
    sizes = [0.08, 0.1, 0.13, 0.17, 0.22, 0.29, 0.38, 0.5, 0.65, 0.85]
    for planted in ([2.0, 0.5, 1.0], [0.5, 1.0, 2.0], [1.0, 2.0, 0.5]):  # the commonest first: it meets every size
        ratios = [planted[0]] * 5 + [planted[1]] * 3 + [planted[2]] * 2
        wh = np.array([[s * np.sqrt(r), s / np.sqrt(r)] for s in sizes for r in ratios])
        for seed in range(4):  # k-means' own centre order varies with its seed (seed 3 puts the 30 first)
            per_scale, found = auto_anchors(wh, scales=5, per_scale=2, n_ratios=3, seed=seed)
            assert per_scale == [[0.08, 0.1], [0.13, 0.17], [0.22, 0.29], [0.38, 0.5], [0.65, 0.85]]
            assert found == planted
    targets = torch.tensor([[[0, 0.1, 0.2, 0.3, 0.3], [-1, -1, -1, -1, -1]], [[2, 0, 0, 0.5, 0.25], [1, 0, 0, 1, 1]]])
    assert np.allclose(box_shapes(targets), [[0.2, 0.1], [0.5, 0.25], [1, 1]])
    model = TinySSD(3, per_scale, [1.0, 2.0, 0.5])
    anchors, cls, _ = model(torch.zeros(1, 3, 64, 64))
    assert model.anchors_per_pixel == 4 and cls.shape[1] == anchors.shape[1] == 4 * (8 * 8 + 4 * 4 + 2 * 2 + 1 + 1)
    assert torch.allclose(anchors[0, 0], torch.tensor([0.0625 - 0.04, 0.0625 - 0.04, 0.0625 + 0.04, 0.0625 + 0.04]))


COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255), (0, 255, 255), (128, 0, 0), (0, 128, 0)]


def _planted(side: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Four black images with two solid rectangles each; each rectangle's colour is its class."""
    images, labels, k = torch.zeros(4, 3, side, side, dtype=torch.uint8), torch.full((4, 2, 5), -1.0), 0
    for i in range(4):
        for j in range(2):
            x0, y0 = 8 + j * 28, 10 + i * 5
            images[i, :, y0:y0 + 16, x0:x0 + 20] = torch.tensor(COLOURS[k])[:, None, None]
            labels[i, j] = torch.tensor([k, x0, y0, x0 + 20, y0 + 16]) / torch.tensor([1, side, side, side, side])
            k += 1
    return images, labels


def test_mosaic_keeps_every_visible_box_in_place_and_drops_the_hidden_ones():
    images, labels = _planted()
    aug = BoxAugment(BoxAugmentSettings(hflip=False, mosaic=1.0, min_visibility=0.3), images, labels, seed=0)
    checked = dropped = 0
    for t in range(24):
        image, rows = aug.one(t % 4)
        assert image.shape == (64, 64, 3)
        got = {int(r[0]): np.round(r[1:] * 64).astype(int).tolist() for r in rows}
        assert len(got) == len(rows)  # the three other images are other images: no class twice
        for k, colour in enumerate(COLOURS):
            mask = (image == colour).all(-1)
            if not mask.any():
                assert k not in got
                continue
            ys, xs = np.nonzero(mask)
            visible = mask.sum() / (20 * 16)
            if visible >= 0.3:
                assert got[k] == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], (t, k)
                checked += 1
            else:
                assert k not in got, (t, k, visible)  # albumentations' Mosaic alone keeps these
                dropped += 1
    assert checked > 40 and dropped > 5


def test_box_augmentation_moves_boxes_with_pixels_and_replays_for_a_seed():
    images, labels = _planted()
    flips = BoxAugment(BoxAugmentSettings(hflip=True, vflip=True), images, labels, seed=1)
    for i in range(8):
        image, rows = flips.one(i % 4)
        for r in rows:
            x0, y0, x1, y1 = np.round(r[1:] * 64).astype(int)
            assert (image[y0:y1, x0:x1] == COLOURS[int(r[0])]).all() and len(rows) == 2
    strong = BoxAugmentSettings(crop_scale=0.5, scale=0.2, shift=0.1, colour=0.3, mosaic=0.5)
    aug = BoxAugment(strong, images, labels, seed=0)
    aug.reseed(5)
    first = aug(torch.arange(4))
    aug.reseed(5)
    second = aug(torch.arange(4))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert first[0].shape == (4, 3, 64, 64) and first[1].shape[-1] == 5
    assert not BoxAugmentSettings().active and strong.active


def test_wbf_wrapper_equals_ensemble_boxes_in_pixels_of_a_non_square_image():
    """Two models' boxes on a 200x100 image: the wrapper normalises by width and height, fuses, scales back."""
    a = {"boxes": torch.tensor([[20.0, 10, 120, 60], [150, 70, 190, 95]]), "scores": torch.tensor([0.9, 0.4]),
         "labels": torch.tensor([0, 1])}
    b = {"boxes": torch.tensor([[30.0, 10, 130, 60], [0, 0, 10, 10]]), "scores": torch.tensor([0.6, 0.5]),
         "labels": torch.tensor([0, 1])}
    out = wbf([a, b], 200, 100, iou_thr=0.55, skip_thr=0.0)
    # by hand: the two class-0 boxes fuse to their score-weighted mean, score the mean over 2 models;
    # lone boxes keep their place with half their score
    assert torch.allclose(out["boxes"], torch.tensor([[24.0, 10, 124, 60], [0, 0, 10, 10], [150, 70, 190, 95]]))
    assert torch.allclose(out["scores"], torch.tensor([0.75, 0.25, 0.2])) and out["labels"].tolist() == [0, 1, 1]
    norm = [[[0.1, 0.1, 0.6, 0.6], [0.75, 0.7, 0.95, 0.95]], [[0.15, 0.1, 0.65, 0.6], [0, 0, 0.05, 0.1]]]
    ref_boxes, ref_scores, ref_labels = weighted_boxes_fusion(norm, [[0.9, 0.4], [0.6, 0.5]], [[0, 1], [0, 1]],
                                                              iou_thr=0.55, skip_box_thr=0.0)
    order = np.argsort(-ref_scores, kind="stable")
    assert np.allclose(out["boxes"].numpy(), ref_boxes[order] * [200, 100, 200, 100], atol=1e-4)
    assert np.allclose(out["scores"].numpy(), ref_scores[order])
    assert out["labels"].tolist() == ref_labels[order].tolist()
    assert wbf([a, b], 200, 100, 0.55, skip_thr=0.45)["scores"].tolist() == pytest.approx([0.75, 0.25])  # 0.4 skipped
    empty = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}
    assert len(wbf([empty, empty], 200, 100, 0.5, 0.0)["boxes"]) == 0


def test_fused_scores_by_conf_type_follow_ensemble_boxes_and_are_chosen_on_oof():
    """A true box found by one view of two (0.6) and a false one found by both (0.5): avg halves the true box's
    score and ranks it under the false one (AP 0.5); max keeps 0.6 (AP 1). The grid picks max."""
    truth = [{"boxes": torch.tensor([[10.0, 10, 30, 30]]), "labels": torch.tensor([0])} for _ in range(4)]
    fp = [40.0, 40, 60, 60]
    one = [{"boxes": torch.tensor([[10.0, 10, 30, 30], fp]), "scores": torch.tensor([0.6, 0.5]),
            "labels": torch.tensor([0, 0])}] * 4
    two = [{"boxes": torch.tensor([fp]), "scores": torch.tensor([0.5]), "labels": torch.tensor([0])}] * 4
    sizes = torch.tensor([[64.0, 64.0]] * 4)
    for conf, expected in (("avg", [0.5, 0.3]), ("max", [0.6, 0.5])):
        out = wbf([one[0], two[0]], 64, 64, 0.5, 0.0, conf_type=conf)
        assert out["scores"].tolist() == pytest.approx(expected)
        norm = [(one[0]["boxes"] / 64).tolist(), (two[0]["boxes"] / 64).tolist()]
        _, ref_scores, _ = weighted_boxes_fusion(norm, [[0.6, 0.5], [0.5]], [[0, 0], [0]], iou_thr=0.5,
                                                 skip_box_thr=0.0, conf_type=conf)
        assert sorted(ref_scores.tolist(), reverse=True) == pytest.approx(expected)
    best, grid = choose([one, two], truth, sizes, [0.5], [0.0], confs=("avg", "max"))
    assert best["conf_type"] == "max" and grid["map_50"].round(3).tolist() == [0.5, 1.0]


def test_fusion_thresholds_are_chosen_by_oof_map():
    """Two views disagree by a shift: at IoU threshold 0.8 they stay apart (a duplicate false positive per
    image); at 0.3 they fuse onto the truth."""
    truth = [{"boxes": torch.tensor([[10.0, 10, 50, 50]]), "labels": torch.tensor([0])} for _ in range(3)]
    one = [{"boxes": torch.tensor([[6.0, 10, 46, 50]]), "scores": torch.tensor([0.9]), "labels": torch.tensor([0])}]
    two = [{"boxes": torch.tensor([[14.0, 10, 54, 50]]), "scores": torch.tensor([0.8]), "labels": torch.tensor([0])}]
    one, two = one * 3, two * 3
    sizes = torch.tensor([[64.0, 64.0]] * 3)
    best, grid = choose([one, two], truth, sizes, [0.8, 0.3], [0.0])
    assert best == {"iou_thr": 0.3, "skip_thr": 0.0, "conf_type": "avg"} and len(grid) == 2
    assert grid["map"].iloc[1] > grid["map"].iloc[0]
    fused = fuse([one, two], sizes, 0.3, 0.0)
    assert torch.allclose(fused[0]["boxes"], torch.tensor([[(6 * 0.9 + 14 * 0.8) / 1.7, 10, (46 * 0.9 + 54 * 0.8) / 1.7,
                                                            50]]))
    table = class_table(fused, truth, ["a", "b"])
    assert table["boxes"].tolist() == [3, 0] and table["ap_50"].tolist() == [1.0, -1.0]


def test_folds_never_split_a_duplicate_group(tmp_path):
    images = [f"images/train_{i:03d}.png" for i in range(60)]
    dup = {i: i // 3 for i in range(0, 45)}  # 15 groups of three duplicates, then 15 images on their own
    pd.DataFrame({"id": [images[i] for i in dup], "group": list(dup.values()), "label": "x"}).to_csv(
        tmp_path / "clean.csv", index=False)
    groups = image_groups(images, tmp_path / "clean.csv")
    assert len(np.unique(groups)) == 30
    strata = main_class(60, np.repeat(np.arange(60), 2), np.array(["a", "b", "c", "a"] * 30))
    assert strata[:2].tolist() == ["a", "a"] and strata[1] == "a"  # ties: the first label alphabetically
    fold = assign_folds(groups, strata, 5, seed=0)
    assert set(fold) == set(range(5))
    for g in range(15):
        assert len(set(fold[[3 * g, 3 * g + 1, 3 * g + 2]])) == 1
    assert (image_groups(images, None) == np.arange(60)).all()
    with pytest.raises(PipelineError, match="only 2 independent groups"):
        assign_folds(np.array([0, 0, 1, 1]), np.array(["a"] * 4), 3, 0)


@pytest.mark.slow
def test_detect_folds_train_fuse_and_write_a_leaderboard(tmp_path, capsys):
    """The short multi-object `make detect`: 2 folds of 1 epoch at 64 px; every piece written and consistent."""
    data = build_shapes(tmp_path / "shapes", n_train=24, n_val=6, n_test=6, seed=2)
    work, subs = tmp_path / "work", tmp_path / "subs"
    args = ["detect", "--data", str(data), "--work", str(work), "--submissions", str(subs),
            "detect.train.image_size=64", "detect.train.epochs=1", "detect.train.batch_size=8",
            "detect.folds.n_splits=2", "detect.predict.gallery_images=2", "detect.anchors.mode=auto",
            "detect.augment.mosaic=0.5", "detect.augment.colour=0.2", "detect.fusion.iou=[0.5,0.6]",
            "detect.fusion.skip=[0.01]",
            "runtime.device=cpu", "runtime.threads=1", "tracking.backend=none"]
    assert main(args) == 0
    out = work / "detect"
    printed = capsys.readouterr().out
    assert "anchors from the training boxes" in printed and "leaderboard" in printed
    folds = pd.read_csv(out / "folds.csv")
    assert sorted(folds["fold"].unique()) == [0, 1] and folds["group"].nunique() == 24  # no clean.csv: one per image
    board = pd.read_csv(out / "leaderboard.csv")
    assert board["entry"].tolist()[:2] == ["tinyssd fold0", "tinyssd fold1"]
    assert [e.split(" (iou")[0] for e in board["entry"][4:]] == ["tinyssd wbf folds, x1", "tinyssd wbf folds x views"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["iou_thr"] in (0.5, 0.6) and metrics["views"] == ["x1", "x1+hflip"]
    assert metrics["oof_map_50"] == pytest.approx(board.loc[board["kind"] == "fusion", "oof_map_50"].dropna().iloc[0],
                                                  abs=1e-4)
    assert [r["class"] for r in metrics["per_class"]] == sorted(CLASSES)
    oof = pd.read_csv(out / "oof_detections.csv", keep_default_na=False)
    assert oof["image"].tolist() == folds["image"].tolist()
    sub = pd.read_csv(subs / "shapes.csv", keep_default_na=False)
    assert sub["image"].tolist() == pd.read_csv(data / "test.csv")["image"].tolist()
    for k in range(2):
        assert (out / "tinyssd" / f"fold{k}" / "model.safetensors").exists()
        assert (out / "tinyssd" / f"fold{k}" / "views.pt").exists()
    assert main(args) == 0  # a rerun retrains nothing
    assert capsys.readouterr().out.count("model up to date") == 2

    # A second configuration into the same WORK (same folds): both join one WBF blend and one leaderboard.
    assert main(args + ["detect.train.lr=0.02", "detect.folds.name=ssd-lr2"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("model up to date") == 0 and "2 configurations in" in printed
    board = pd.read_csv(out / "leaderboard.csv")
    assert {"tinyssd fold0", "ssd-lr2 fold0", "ssd-lr2 fold1"} <= set(board["entry"])
    blend = board[board["entry"].str.startswith("wbf models ssd-lr2 + tinyssd (iou")]  # the run at hand first
    assert len(blend) == 1 and blend["views"].iloc[0] == "ssd-lr2:x1+ssd-lr2:x1+hflip+tinyssd:x1+tinyssd:x1+hflip"
    metrics = json.loads((out / "metrics.json").read_text())
    fusions = board[board["entry"].str.contains(r"wbf folds x views|wbf models")]
    assert len(fusions) == 3 and metrics["oof_map_50"] == pytest.approx(fusions["oof_map_50"].max(), abs=1e-4)
    assert metrics["configurations"] == ["ssd-lr2", "tinyssd"]
    # Other folds (another seed) cannot be blended on OOF: that configuration is named and left out.
    assert main(args + ["detect.train.seed=5", "detect.folds.name=other-folds"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("left out of the blend: trained on other folds") == 2
    assert json.loads((out / "metrics.json").read_text())["configurations"] == ["other-folds"]
