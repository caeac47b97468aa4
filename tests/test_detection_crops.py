"""The second stage of detection (pipeline/detection/crops.py): crops, jitter, the class-agnostic merge, the
combination of classifier and detector, and the rule chosen on OOF with its nested figure."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.cli import main
from pipeline.detection.crops import (
    agnostic_merge,
    choose_rule,
    combine,
    crop,
    jittered,
    ranked,
    square_regions,
    training_crops,
    with_votes,
)
from pipeline.detection.shapes import build_shapes


def _dets(boxes, scores, labels) -> dict:
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "scores": torch.tensor(scores, dtype=torch.float32), "labels": torch.tensor(labels, dtype=torch.long)}


def test_square_regions_centre_the_longer_side_with_margin():
    regions = square_regions(torch.tensor([[10.0, 20.0, 30.0, 60.0]]), 0.1)  # 20 x 40 box, centre (20, 40)
    assert regions.tolist() == [pytest.approx([-4.0, 16.0, 44.0, 64.0])]  # side 40 * 1.2 = 48


def test_crops_take_the_box_pixels_of_their_own_image():
    images = torch.zeros(3, 3, 64, 64, dtype=torch.uint8)
    images[1, :, 16:32, 16:32] = 200  # a square in image 1 only
    images[2, 0] = 50
    boxes = torch.tensor([[16.0, 16.0, 32.0, 32.0], [16.0, 16.0, 32.0, 32.0], [0.0, 0.0, 64.0, 64.0]])
    out = crop(images, torch.tensor([1, 0, 2]), boxes, 8, 0.0, chunk=2)  # chunks of 2 images: index 2 in chunk 2
    assert out.shape == (3, 8, 8, 3) and out.dtype == np.uint8
    assert (out[0] == 200).all() and (out[1] == 0).all()
    assert (out[2, ..., 0] == 50).all() and (out[2, ..., 1:] == 0).all()
    wide = crop(images, torch.tensor([1]), boxes[:1], 16, 0.5)  # margin 0.5: the square fills the middle half
    assert (wide[0, 4:12, 4:12] == 200).all() and (wide[0, :2] == 0).all()


def test_jittered_copies_follow_the_exact_boxes_within_the_jitter():
    boxes = torch.tensor([[10.0, 10.0, 30.0, 50.0], [0.0, 0.0, 8.0, 8.0]])
    out = jittered(boxes, 3, 0.1, torch.Generator().manual_seed(0))
    assert out.shape == (8, 4) and torch.equal(out[:2], boxes)
    source = boxes.repeat(3, 1)
    size = source[:, 2:] - source[:, :2]
    centre_shift = ((out[2:, :2] + out[2:, 2:]) - (source[:, :2] + source[:, 2:])) / 2
    assert (centre_shift.abs() <= 0.1 * size + 1e-5).all()
    scale = (out[2:, 2:] - out[2:, :2]) / size
    assert ((scale >= np.exp(-0.1) - 1e-5) & (scale <= np.exp(0.1) + 1e-5)).all()
    assert not torch.equal(out[2:4], boxes)  # the copies moved
    assert torch.equal(jittered(boxes, 0, 0.1, torch.Generator()), boxes)


def test_training_crops_carry_their_images_class_and_fold():
    images = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    targets = torch.full((2, 2, 5), -1.0)
    targets[0, 0] = torch.tensor([3, 0.0, 0.0, 0.5, 0.5])
    targets[1, 0] = torch.tensor([1, 0.5, 0.5, 1.0, 1.0])
    targets[1, 1] = torch.tensor([2, 0.0, 0.5, 0.5, 1.0])
    crops = training_crops(images, targets, np.array([4, 7]), 8, 0.1, 2, 0.1, 0)
    assert len(crops.images) == 9  # 3 boxes x (1 + 2 copies)
    assert crops.labels.tolist() == [3, 1, 2] * 3
    assert crops.image.tolist() == [0, 1, 1] * 3 and crops.fold.tolist() == [4, 7, 7] * 3


def test_agnostic_merge_makes_one_box_per_object_with_score_weighted_votes():
    dets = ranked([_dets([[0, 0, 10, 10], [50, 50, 60, 60], [0, 0, 10, 12]], [0.8, 0.5, 0.2], [1, 0, 2])])
    merged = agnostic_merge(dets, 0.5, 3)[0]
    assert merged["scores"].tolist() == pytest.approx([0.8, 0.5])
    assert merged["votes"].tolist() == [pytest.approx([0.0, 0.8, 0.2]), pytest.approx([1.0, 0.0, 0.0])]
    assert merged["boxes"][0].tolist() == pytest.approx([0, 0, 10, 10.4])  # (0.8 * 10 + 0.2 * 12) / 1.0
    assert len(agnostic_merge(dets, 0.95, 3)[0]["boxes"]) == 3  # no pair overlaps that much
    assert len(agnostic_merge([_dets([], [], [])], 0.5, 3)[0]["boxes"]) == 0


def test_combine_with_full_detector_weight_is_the_detector_and_zero_weight_renames():
    det = ranked([_dets([[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]], [0.9, 0.6, 0.3], [1, 2, 0])])
    boxes = with_votes(det, 3)
    probs = [np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]], dtype=np.float32)]  # the first two boxes renamed
    same = combine(boxes, probs, 1.0, 3)[0]
    assert torch.equal(same["labels"], det[0]["labels"]) and torch.equal(same["scores"], det[0]["scores"])
    renamed = combine(boxes, probs, 0.0, 2)[0]
    # box 0: class 0 (0.9 * 0.7) and class 1 (0.9 * 0.2); box 1: class 2 (0.6 * 0.8) and one of the 0.1s; box 2
    # (not renamed) keeps class 0 at 0.3
    assert renamed["scores"][:3].tolist() == pytest.approx([0.63, 0.48, 0.3])
    assert renamed["labels"][:3].tolist() == [0, 2, 0]
    assert len(renamed["scores"]) == 5
    half = combine(boxes, probs, 0.5, 1)[0]
    assert half["labels"].tolist() == [1, 2, 0]  # box 0: 0.5 * 0.2 + 0.5 = 0.6 beats 0.35
    assert half["scores"].tolist() == pytest.approx([0.54, 0.6 * 0.9, 0.3])
    assert len(combine(boxes, probs, 0.0, 3, max_detections=4)[0]["scores"]) == 4


def test_rule_is_chosen_on_oof_and_the_nested_figure_is_chosen_on_the_other_folds():
    truth = [{"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0]]), "labels": torch.tensor([i % 2])} for i in range(4)]
    right = [_dets([[0, 0, 10, 10]], [0.9], [t["labels"].item()]) for t in truth]
    wrong = [_dets([[0, 0, 10, 10]], [0.9], [1 - t["labels"].item()]) for t in truth]
    fold = np.array([0, 0, 1, 1])
    # rule a is right on fold 0's images only, rule b on fold 1's: each fold's rule, chosen on the other fold,
    # is wrong on it
    a, b = (0.0, None), (1.0, None)
    candidates = {a: right[:2] + wrong[2:], b: wrong[:2] + right[2:]}
    choice = choose_rule(candidates, truth, fold)
    assert choice.rule == a  # a tie on all images: the earlier candidate
    assert choice.nested_rules == ["detector alone", "classifier w 0"]
    assert choice.nested["map_50"] == pytest.approx(0.0)
    assert choice.oof["map_50"] == pytest.approx(choice.grid.loc[0, "oof_map_50"], abs=1e-4)
    assert 0.2 < choice.oof["map_50"] < 0.8
    best = choose_rule({a: wrong, b: right}, truth, fold)
    assert best.rule == b and best.nested["map_50"] == pytest.approx(1.0) and best.oof["map_50"] == pytest.approx(1.0)


@pytest.mark.slow
def test_detect_with_the_crop_classifier_renames_boxes_and_keys_each_part(tmp_path, capsys):
    """2 folds of a 1-epoch detector, a 2-epoch classifier on 16 px crops: its rows, rules and per-class table;
    w = 1 unmerged reproduces the detector's fusion; a rerun trains nothing and a new margin retrains only the
    classifier."""
    data = build_shapes(tmp_path / "shapes", n_train=24, n_val=6, n_test=6, seed=2)
    work, subs = tmp_path / "work", tmp_path / "subs"
    args = ["detect", "--data", str(data), "--work", str(work), "--submissions", str(subs),
            "detect.train.image_size=64", "detect.train.epochs=1", "detect.train.batch_size=8",
            "detect.folds.n_splits=2", "detect.predict.gallery_images=0", "detect.fusion.iou=[0.5]",
            "detect.fusion.skip=[0.01]", "detect.fusion.conf=[avg]", "detect.classifier.enabled=true",
            "detect.classifier.train.image_size=16", "detect.classifier.train.epochs=2",
            "detect.classifier.weights=[0.0,0.5]", "detect.classifier.merge_iou=[0.5]",
            "runtime.device=cpu", "runtime.threads=1", "tracking.backend=none"]
    assert main(args) == 0
    out = work / "detect"
    board = pd.read_csv(out / "leaderboard.csv")
    detector = board[board["entry"].str.startswith("tinyssd wbf folds x views")].iloc[0]
    second = board[board["kind"] == "classifier"].iloc[0]
    assert board["kind"].tolist()[-2:] == ["classifier", "classifier (nested)"]
    rules = pd.read_csv(out / "crops" / "rules.csv")
    assert len(rules) == 6 and set(rules["weight"]) == {0.0, 0.5, 1.0}  # 3 weights x (unmerged, merged at 0.5)
    alone = rules[rules["rule"] == "detector alone"].iloc[0]
    assert alone["oof_map_50"] == pytest.approx(detector["oof_map_50"], abs=1e-4)
    assert second["oof_map_50"] == pytest.approx(rules["oof_map_50"].max(), abs=1e-4)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["classifier"]["rule"] in rules["rule"].tolist()
    assert metrics["oof_map_50"] == pytest.approx(second["oof_map_50"], abs=1e-4)
    assert len(metrics["classifier"]["nested_rules"]) == 2
    per_class = pd.read_csv(out / "per_class.csv")
    assert list(per_class.columns) == ["class", "boxes", "detector_ap_50", "detector_ap", "classifier_ap_50",
                                       "classifier_ap", "val_detector_ap_50", "val_classifier_ap_50"]
    for k in range(2):
        assert json.loads((out / "crops" / "runs" / "resnet10t" / f"fold{k}" / "best.json").read_text())["fold"] == k
    sub = pd.read_csv(subs / "shapes.csv", keep_default_na=False)
    assert sub["image"].tolist() == pd.read_csv(data / "test.csv")["image"].tolist()
    probs = (out / "crops" / "probs.pt").stat().st_mtime_ns
    capsys.readouterr()
    assert main(args) == 0  # a rerun trains and predicts nothing
    printed = capsys.readouterr().out
    assert printed.count("model up to date") == 2 and printed.count("train: resnet10t fold") == 2
    assert printed.count("up to date (accuracy") == 2 and (out / "crops" / "probs.pt").stat().st_mtime_ns == probs
    assert main(args + ["detect.classifier.margin=0.3"]) == 0  # the crops change: the classifier alone retrains
    printed = capsys.readouterr().out
    assert printed.count("model up to date") == 2 and "up to date (accuracy" not in printed
