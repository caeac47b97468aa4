"""Detection training, decoding, mAP, submission and the `detect` stage end to end."""

import re

import pandas as pd
import pytest
import torch
from PIL import Image

from pipeline.cli import main
from pipeline.core.config import DecodeConfig, DetectTrainConfig
from pipeline.core.errors import PipelineError
from pipeline.detection.bananas import build_bananas
from pipeline.detection.boxes import mirror_boxes, multibox_detection
from pipeline.detection.fit import DetectionTrainer, hflip, ssd_loss
from pipeline.detection.infer import (
    Detector,
    candidates,
    map_of,
    prediction_strings,
    score_submission,
)
from pipeline.detection.tinyssd import TinySSD
from pipeline.scoring.submission import parse_prediction_strings
from pipeline.training.loop import CheckpointSaver
from pipeline.training.runtime import Runtime

from .conftest import interrupt_in_epoch


def test_decoding_equals_the_course_multibox_detection_then_threshold():
    """Filtering by score before NMS keeps exactly the boxes the course keeps after NMS."""
    gen = torch.Generator().manual_seed(0)
    b, a, c = 3, 400, 3
    xy = torch.rand(a, 2, generator=gen) * 0.8
    anchors = torch.cat((xy, xy + torch.rand(a, 2, generator=gen) * 0.2 + 0.02), 1)[None]
    logits = torch.randn(b, a, c + 1, generator=gen) * 3
    offsets = torch.randn(b, a * 4, generator=gen) * 0.5
    cfg = DecodeConfig(nms_threshold=0.3, max_detections=1000, box_voting=None)
    sizes = torch.tensor([[1.0, 1.0]] * b)
    ours = Detector(None, cfg, Runtime()).select(*candidates(anchors, logits, offsets), sizes, score_threshold=0.4)
    course = multibox_detection(logits.softmax(-1).permute(0, 2, 1), offsets, anchors, nms_threshold=0.3,
                                pos_threshold=0.0)
    for i in range(b):
        rows = course[i][(course[i, :, 0] >= 0) & (course[i, :, 1] >= 0.4)]
        assert len(rows) == len(ours[i]["scores"]) > 0
        assert torch.allclose(ours[i]["scores"], rows[:, 1]) and torch.equal(ours[i]["labels"], rows[:, 0].long())
        assert torch.allclose(ours[i]["boxes"], rows[:, 2:].clamp(0, 1), atol=1e-6)


def test_max_detections_keeps_the_best_per_image():
    gen = torch.Generator().manual_seed(1)
    anchors = torch.rand(1, 50, 2, generator=gen).repeat(1, 1, 2) + torch.tensor([0, 0, 0.05, 0.05])
    logits = torch.randn(2, 50, 2, generator=gen)
    det = Detector(None, DecodeConfig(max_detections=3, nms_threshold=1.0, box_voting=None), Runtime())
    out = det.select(*candidates(anchors, logits, torch.zeros(2, 200)), torch.tensor([[100.0, 50.0]] * 2), 0.0)
    for i in range(2):
        assert len(out[i]["scores"]) == 3
        assert torch.equal(out[i]["scores"], logits[i].softmax(-1)[:, 1].sort(descending=True).values[:3])
        assert out[i]["boxes"][:, [0, 2]].max() <= 100 and out[i]["boxes"][:, [1, 3]].max() <= 50


def test_box_voting_averages_the_boxes_each_kept_box_suppressed():
    """Two boxes overlap the best one in its image; a box of another image and one of another class do not count."""
    anchors = torch.tensor([[[0.1, 0.1, 0.5, 0.5], [0.12, 0.1, 0.52, 0.5], [0.1, 0.14, 0.5, 0.54],
                             [0.6, 0.6, 0.9, 0.9]]])
    logits = torch.tensor([[[0.0, 3.0, -9], [0.0, 2.0, -9], [0.0, 1.0, -9], [0.0, 2.5, -9]],
                           [[0.0, 3.0, -9], [0.0, -9, 2.0], [0.0, -9, -9], [0.0, -9, -9]]])
    probs = logits.softmax(-1)
    found = candidates(anchors, logits, torch.zeros(2, 16))
    det = Detector(None, DecodeConfig(box_voting=0.5), Runtime()).select(*found, torch.ones(2, 2), 0.05)
    w = probs[0, :3, 1]
    assert torch.allclose(det[0]["boxes"][0], (w[:, None] * anchors[0, :3]).sum(0) / w.sum())
    assert torch.allclose(det[0]["boxes"][1], anchors[0, 3])  # overlaps nothing: unchanged
    assert torch.allclose(det[1]["boxes"], anchors[0, :2]) and det[1]["labels"].tolist() == [0, 1]  # classes vote apart
    plain = Detector(None, DecodeConfig(box_voting=None), Runtime()).select(*found, torch.ones(2, 2), 0.05)
    assert [len(d["scores"]) for d in plain] == [2, 2] and torch.equal(plain[0]["scores"], det[0]["scores"])


def test_hflip_tta_gives_mirrored_detections_for_a_mirrored_image():
    """With hflip TTA an image and its mirror image see the same two views: their detections must mirror."""
    torch.manual_seed(0)
    model = TinySSD(2).eval()
    images = torch.randint(0, 255, (2, 3, 96, 96), dtype=torch.uint8)
    detector = Detector(model, DecodeConfig(), Runtime(), tta="hflip")
    with torch.no_grad():
        probs, boxes = detector.run(images)
        probs_m, boxes_m = detector.run(images.flip(-1))
        anchors = model(images.float())[0][0]
    mirror = torch.cdist(mirror_boxes(anchors), anchors).argmin(1)  # found by position, not by mirror_index
    assert torch.allclose(probs_m[:, mirror], probs, atol=1e-5)
    assert torch.allclose(mirror_boxes(boxes_m[:, mirror]), boxes, atol=1e-5)
    plain = Detector(model, DecodeConfig(), Runtime())
    with torch.no_grad():
        assert not torch.allclose(plain.run(images.flip(-1))[0][:, mirror], plain.run(images)[0], atol=1e-5)


def test_hflip_mirrors_images_and_their_boxes_but_not_padding():
    images = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    images[:, :, 2:4, 1:3] = 255  # object at x 1..3, y 2..4 of 8
    labels = torch.tensor([[[0, 1 / 8, 2 / 8, 3 / 8, 4 / 8], [-1, -1, -1, -1, -1]]] * 2)
    out_x, out_y = hflip(images, labels, torch.tensor([True, False]))
    assert out_x[0, 0, 2:4, 5:7].eq(255).all() and out_x[0].sum() == images[0].sum()
    assert torch.allclose(out_y[0, 0], torch.tensor([0, 5 / 8, 2 / 8, 7 / 8, 4 / 8]))
    assert (torch.equal(out_y[0, 1], labels[0, 1]) and torch.equal(out_y[1], labels[1])
            and torch.equal(out_x[1], images[1]))


def test_loss_is_the_course_calc_loss():
    gen = torch.Generator().manual_seed(2)
    cls_preds, cls_labels = torch.randn(2, 6, 3, generator=gen), torch.randint(0, 3, (2, 6), generator=gen)
    bbox_preds, bbox_labels = torch.randn(2, 24, generator=gen), torch.randn(2, 24, generator=gen)
    masks = (torch.rand(2, 24, generator=gen) > 0.5).float()
    course = (torch.nn.CrossEntropyLoss(reduction="none")(cls_preds.reshape(-1, 3),
                                                          cls_labels.reshape(-1)).reshape(2, -1).mean(1)
              + torch.nn.L1Loss(reduction="none")(bbox_preds * masks, bbox_labels * masks).mean(1))
    assert torch.allclose(ssd_loss(cls_preds, cls_labels, bbox_preds, bbox_labels, masks), course.mean())


def test_prediction_strings_round_trip_and_perfect_predictions_score_one():
    truth = [{"boxes": torch.tensor([[10.0, 20.0, 50.0, 60.0], [0, 0, 5, 5]]), "labels": torch.tensor([1, 0])},
             {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}]
    det = [{**t, "scores": torch.tensor([0.9, 0.5])[: len(t["labels"])]} for t in truth]
    strings = prediction_strings(det, ["a", "b"])
    assert strings == ["b 0.9000 10.0 20.0 50.0 60.0 a 0.5000 0.0 0.0 5.0 5.0", ""]
    back = [{k: torch.from_numpy(v) for k, v in d.items()}
            for d in parse_prediction_strings(strings, ["a", "b"], "sub.csv")]
    assert torch.equal(back[0]["labels"], truth[0]["labels"]) and torch.allclose(back[0]["boxes"], truth[0]["boxes"])
    assert map_of(back, truth)["map"] == pytest.approx(1.0)
    with pytest.raises(PipelineError, match="sub.csv line 3: PredictionString needs groups of 6"):
        parse_prediction_strings(["", "a 0.5 1 2 3"], ["a"], "sub.csv")
    with pytest.raises(PipelineError, match="sub.csv line 2: unknown label 'c'"):
        parse_prediction_strings(["c 0.5 1 2 3 4"], ["a"], "sub.csv")


def test_score_submission_against_a_hidden_solution(tmp_path):
    sol = pd.DataFrame([["x.png", "a", 10, 10, 50, 50], ["y.png", "a", 0, 0, 20, 20], ["z.png", "", "", "", "", ""]],
                       columns=["image", "label", "xmin", "ymin", "xmax", "ymax"])
    sol.to_csv(tmp_path / "sol.csv", index=False)
    good = pd.DataFrame({"image": ["x.png", "y.png", "z.png"],
                         "PredictionString": ["a 0.9 10 10 50 50", "a 0.8 0 0 20 20", ""]})
    good.to_csv(tmp_path / "good.csv", index=False)
    assert score_submission(tmp_path / "good.csv", tmp_path / "sol.csv") == {"map_50": pytest.approx(1.0),
                                                                             "map": pytest.approx(1.0)}
    half = good.assign(PredictionString=["a 0.9 10 10 50 50", "a 0.8 40 40 60 60", ""])
    half.to_csv(tmp_path / "half.csv", index=False)
    assert score_submission(tmp_path / "half.csv", tmp_path / "sol.csv")["map_50"] == pytest.approx(0.5, abs=0.01)
    good.iloc[:2].to_csv(tmp_path / "short.csv", index=False)
    with pytest.raises(PipelineError, match="no row for image 'z.png'"):
        score_submission(tmp_path / "short.csv", tmp_path / "sol.csv")


def _tiny_trainer(tmp_path, epochs: int, fp: str = "fp") -> DetectionTrainer:
    gen = torch.Generator().manual_seed(3)
    x = torch.randint(0, 255, (12, 3, 64, 64), dtype=torch.uint8, generator=gen)
    xy = torch.rand(12, 1, 2, generator=gen) * 0.5
    y = torch.cat((torch.zeros(12, 1, 1), xy, xy + 0.3), -1)
    torch.manual_seed(0)
    cfg = DetectTrainConfig(epochs=epochs, batch_size=5, image_size=64, lr=0.05)
    sizes = torch.tensor([[64.0, 64.0]] * 4)
    return DetectionTrainer(TinySSD(1), cfg, x, y, x[:4], y[:4], sizes, tmp_path, fp, Runtime())


def test_a_killed_run_resumes_to_the_same_weights_and_history(tmp_path, monkeypatch):
    straight = _tiny_trainer(tmp_path / "a", 3)
    straight.fit()
    interrupted = _tiny_trainer(tmp_path / "b", 3)
    interrupt_in_epoch(monkeypatch, DetectionTrainer, 3, interrupted.fit)
    resumed = _tiny_trainer(tmp_path / "b", 3)
    resumed.fit()
    assert resumed.epoch == 3 and len(resumed.history) == 3
    for k, v in straight.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    assert [h["train_loss"] for h in straight.history] == [h["train_loss"] for h in resumed.history]
    assert CheckpointSaver(tmp_path / "b", "another config").load_last() is None  # another config's: not used


@pytest.mark.slow
def test_detect_stage_learns_bananas_writes_pictures_and_a_valid_submission(tmp_path, capsys):
    """The short `make detect`: a small banana set at 128 px; the model must learn to find them."""
    data = build_bananas(tmp_path / "bananas", n_train=192, n_val=32, n_test=16, seed=1)
    work, subs = tmp_path / "work", tmp_path / "subs"
    args = ["detect", "--data", str(data), "--work", str(work), "--submissions", str(subs),
            "detect.train.image_size=128", "detect.train.epochs=10", "detect.train.batch_size=16",
            "detect.predict.gallery_images=8", "detect.folds.n_splits=1"]
    loose = args + ["detect.predict.gallery_score_threshold=0.05"]  # a short run scores low: draw its boxes too
    assert main(loose) == 0
    out = work / "detect"
    history = pd.read_csv(out / "history.csv")
    assert len(history) == 10 and history["train_loss"].iloc[-1] < history["train_loss"].iloc[0] / 2
    metrics = pd.read_json(out / "metrics.json", typ="series")
    # 10 short epochs: far from the full run's numbers (here about 0.5), far above an untrained net's (~0.001)
    assert metrics["map_50"] > 0.3 and metrics["map_50"] > 10 * history["map_50"].iloc[0], metrics.to_dict()
    assert metrics["tta"] in ("none", "hflip") and metrics["map_50"] == max(metrics["map_50_by_tta"].values())
    assert metrics["val_class_err"] < 0.01 and metrics["val_bbox_mae"] < history["val_bbox_mae"].iloc[0]
    # the process's peak memory so far (pytest's too, so no tight bound here; box voting's test bounds the cause)
    printed = re.search(r"peak memory (\d+\.\d) GB", capsys.readouterr().out)
    # the line rounds to 0.1 GB: 1.95 may print either way of 2.0
    assert metrics["peak_rss_gb"] > 0.1 and printed and abs(float(printed[1]) - metrics["peak_rss_gb"]) <= 0.05 + 1e-9
    for name in ("curves.png", "gallery_val.png", "gallery_test.png"):
        with Image.open(out / name) as im:
            assert im.width > 256 and im.height > 100
    sub = pd.read_csv(subs / "bananas.csv", keep_default_na=False)
    assert sub["image"].tolist() == pd.read_csv(data / "test.csv")["image"].tolist()
    maps = score_submission(subs / "bananas.csv", data / "test_solution.csv")
    assert maps["map_50"] > 0.15, maps  # 16 test images; about 0.35 here
    capsys.readouterr()
    # a threshold only: predictions redone, no training
    assert main(loose + ["detect.predict.score_threshold=0.5"]) == 0
    assert "model up to date" in capsys.readouterr().out
    strict = pd.read_csv(subs / "bananas.csv", keep_default_na=False)
    count = lambda frame: sum(len(s.split()) // 6 for s in frame["PredictionString"])  # noqa: E731
    assert count(strict) <= count(sub)
