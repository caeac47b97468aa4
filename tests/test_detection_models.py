"""torchvision's detectors as detect.model choices: training and exact resume through the shared trainer,
decoding equal to torchvision's own in the original images' pixels, mirror TTA, pretrained files, the stage."""

import pandas as pd
import pytest
import timm
import torch
from safetensors.torch import save_file

from pipeline.cli import main
from pipeline.core.config import DecodeConfig, DetectTrainConfig
from pipeline.core.errors import PipelineError
from pipeline.detection.bananas import build_bananas
from pipeline.detection.boxes import mirror_boxes
from pipeline.detection.fit import DetectionTrainer
from pipeline.detection.infer import Detector
from pipeline.detection.tinyssd import TinySSD
from pipeline.detection.torchvision_models import KINDS, build, load_pretrained
from pipeline.training import checkpoint
from pipeline.training.runtime import Runtime

from .conftest import interrupt_in_epoch

SMALL = {"backbone": "resnet10t", "fpn_channels": 32}  # the smallest FPN detectors: these tests are about plumbing


pytestmark = pytest.mark.usefixtures("one_thread")


def _squares(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n 64x64 noise images, each with one or two bright squares of 16-32 px, and their (n, 2, 5) boxes in [0, 1]."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 100, (n, 3, 64, 64), dtype=torch.uint8, generator=gen)
    y = torch.full((n, 2, 5), -1.0)
    for i in range(n):
        for j in range(1 + i % 2):
            side = int(torch.randint(16, 33, (1,), generator=gen))
            x0, y0 = (int(v) for v in torch.randint(0, 64 - side, (2,), generator=gen))
            x[i, :, y0:y0 + side, x0:x0 + side] = 230
            y[i, j] = torch.tensor([j, x0 / 64, y0 / 64, (x0 + side) / 64, (y0 + side) / 64])
    return x, y


def _model(kind: str, seed: int = 0, classes: int = 2):
    torch.manual_seed(seed)
    return build(kind, classes, 64, **SMALL)


def _trainer(kind: str, run_dir, epochs: int) -> DetectionTrainer:
    """One batch of 3 an epoch, validated on the same 3 (one batch shape: CPU convolutions are set up per shape)."""
    x, y = _squares(3, seed=1)
    cfg = DetectTrainConfig(epochs=epochs, batch_size=3, image_size=64)
    sizes = torch.tensor([[64.0, 64.0]] * 3)
    return DetectionTrainer(_model(kind), cfg, x, y, x, y, sizes, run_dir, "fp", Runtime())


@pytest.mark.parametrize("kind", KINDS)
def test_each_detector_trains_and_a_killed_run_resumes_to_the_same_weights(kind, tmp_path, monkeypatch):
    straight = _trainer(kind, tmp_path / "a", 2)
    before = {k: v.clone() for k, v in straight.model.state_dict().items()}
    straight.fit()
    history = pd.DataFrame(straight.history)
    terms = {"retinanet": ["classification", "bbox_regression"], "ssdlite": ["bbox_regression", "classification"],
             "fcos": ["bbox_ctrness", "bbox_regression", "classification"]}[kind]
    assert sorted(c[6:] for c in history if c.startswith("train_") and c != "train_loss") == sorted(terms)
    assert history["train_loss"].tolist() == pytest.approx(history[[f"train_{t}" for t in terms]].sum(axis=1).tolist())
    assert {"map_50", "map"} <= set(history) and "val_class_err" not in history  # TinySSD's anchors' metrics only
    assert any(not torch.equal(v, before[k]) for k, v in straight.model.state_dict().items())

    interrupt_in_epoch(monkeypatch, DetectionTrainer, 2, lambda: _trainer(kind, tmp_path / "b", 2).fit())
    resumed = _trainer(kind, tmp_path / "b", 2)
    resumed.fit()
    for k, v in straight.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    assert straight.history[-1]["train_loss"] == resumed.history[-1]["train_loss"]


@pytest.mark.parametrize("kind", KINDS)
def test_decoding_equals_torchvisions_own_in_the_original_images_pixels(kind):
    """One class (so the per-anchor class is the only one): the track's decoding (score filter, class-aware NMS,
    max_detections) of the dense candidates keeps exactly torchvision's postprocess detections, rescaled from the
    network's 64 px to each image's own width and height."""
    model = _model(kind, classes=1).eval()
    head = model.net.head.classification_head
    plain = head.forward

    def spread(features):  # untrained heads score anchors alike (RetinaNet: 0.01): distinct logits, no ties
        out = plain(features)
        order = torch.randperm(out.shape[1], generator=torch.Generator().manual_seed(0))  # the same in every call
        last = torch.arange(out.shape[2]) == out.shape[2] - 1  # the class's logit (SSD: not the background's)
        return out + torch.linspace(0, 6, out.shape[1])[order][None, :, None] * last

    head.forward = spread
    x, _ = _squares(2, seed=2)
    sizes = torch.tensor([[128.0, 96.0], [50.0, 200.0]])
    threshold = 0.2
    cfg = DecodeConfig(nms_threshold=0.5, box_voting=None, max_detections=50)
    ours = Detector(model, cfg, Runtime())(x, sizes, threshold, batch_size=2)
    net = model.net
    net.score_thresh, net.nms_thresh, net.detections_per_img = threshold, 0.5, 50
    with torch.no_grad():
        theirs = net(list(x.float() / 255))
    for mine, tv, (w, h) in zip(ours, theirs, sizes.tolist(), strict=True):
        assert 0 < len(mine["scores"]) == len(tv["scores"])
        assert torch.allclose(mine["scores"], tv["scores"])
        assert torch.equal(mine["labels"], tv["labels"] - model.label_offset)
        assert torch.allclose(mine["boxes"], tv["boxes"] * torch.tensor([w, h, w, h]) / 64, atol=1e-3)
        assert mine["boxes"][:, 2].max() <= w and mine["boxes"][:, 3].max() <= h


def test_hflip_tta_gives_mirrored_detections_for_a_mirrored_image():
    """Both views' candidates are merged: an image and its mirror image see the same two views."""
    model = _model("fcos").eval()
    x, _ = _squares(2, seed=3)
    cfg = DecodeConfig(box_voting=0.5)
    sizes = torch.tensor([[64.0, 64.0]] * 2)
    tta = Detector(model, cfg, Runtime(), tta="hflip")
    plain, mirrored = tta(x, sizes, 0.05, 2), tta(x.flip(-1), sizes, 0.05, 2)
    for a, b in zip(plain, mirrored, strict=True):
        assert len(a["scores"]) > 0 and torch.allclose(a["scores"], b["scores"], atol=1e-5)
        assert torch.allclose(a["boxes"], mirror_boxes(b["boxes"] / 64) * 64, atol=1e-3)
    single = Detector(model, cfg, Runtime())(x, sizes, 0.05, 2)
    assert [len(d["scores"]) for d in single] != [len(d["scores"]) for d in plain] or not all(
        torch.allclose(s["boxes"], p["boxes"]) for s, p in zip(single, plain, strict=True))


def test_pretrained_path_loads_a_detector_or_a_backbone_and_refuses_a_file_that_fits_neither(tmp_path):
    saved = _model("retinanet", seed=1)
    checkpoint.save_weights(tmp_path / "model.safetensors", saved)  # a run's own model.safetensors ("net." keys)
    fresh = _model("retinanet", seed=2)
    assert "whole retinanet detector" in load_pretrained(fresh, tmp_path / "model.safetensors")
    assert all(torch.equal(v, saved.state_dict()[k]) for k, v in fresh.state_dict().items())

    # torchvision's own files have bare keys; another class count keeps the class layers' random init
    five = _model("retinanet", seed=1, classes=5)
    torch.save(five.net.state_dict(), tmp_path / "five.pth")  # 5 class outputs, not 2
    fresh = _model("retinanet", seed=2)
    init = fresh.net.head.classification_head.cls_logits.weight.clone()
    assert "2 tensor(s) shaped for another class count" in load_pretrained(fresh, tmp_path / "five.pth")
    assert torch.equal(fresh.net.head.classification_head.cls_logits.weight, init)
    assert torch.equal(fresh.net.head.regression_head.bbox_reg.weight, five.net.head.regression_head.bbox_reg.weight)

    # an ImageNet-style classifier state dict of the backbone (its classifier head is not used)
    torch.manual_seed(4)
    classifier = timm.create_model("resnet10t", pretrained=False)
    torch.save({"state_dict": classifier.state_dict()}, tmp_path / "resnet10t.pth")
    fresh = _model("fcos", seed=2)
    assert "resnet10t backbone of fcos" in load_pretrained(fresh, tmp_path / "resnet10t.pth")
    assert torch.equal(fresh.net.backbone.body.layer4[0].conv1.weight, classifier.layer4[0].conv1.weight)

    save_file(timm.create_model("resnet18", pretrained=False).state_dict(), str(tmp_path / "resnet18.safetensors"))
    with pytest.raises(PipelineError, match=r"fits neither the fcos detector \(no tensor backbone.body.conv1.0.weight"
                                            r"\) nor its resnet10t backbone \(no tensor conv1.0.weight\)") as err:
        load_pretrained(_model("fcos"), tmp_path / "resnet18.safetensors")
    assert "\n" not in str(err.value)
    with pytest.raises(PipelineError, match="does not fit TinySSD"):
        load_pretrained(TinySSD(2), tmp_path / "model.safetensors")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(PipelineError, match="junk.pt is not a readable state dict"):
        load_pretrained(TinySSD(2), tmp_path / "junk.pt")
    with pytest.raises(PipelineError, match="missing.pt not found; fix the path"):
        load_pretrained(TinySSD(2), tmp_path / "missing.pt")


@pytest.mark.slow
def test_detect_stage_with_a_torchvision_detector_submits_and_keys_the_model_choice(tmp_path, capsys):
    data = build_bananas(tmp_path / "bananas", n_train=6, n_val=3, n_test=3, seed=1)
    work, subs = tmp_path / "work", tmp_path / "subs"
    base = ["detect", "--data", str(data), "--work", str(work), "--submissions", str(subs), "detect.model.name=ssdlite",
            "detect.folds.n_splits=1", "detect.train.image_size=64", "detect.train.epochs=1",
            "detect.train.batch_size=3", "detect.predict.gallery_images=2",
            "runtime.device=cpu", "runtime.threads=1"]
    assert main(base) == 0
    history = pd.read_csv(work / "detect" / "history.csv")
    assert {"train_classification", "train_bbox_regression", "map_50"} <= set(history)
    manifest = pd.read_json(subs / "bananas.manifest.json", typ="series")
    sub = pd.read_csv(subs / "bananas.csv", keep_default_na=False)
    assert sub["image"].tolist() == pd.read_csv(data / "test.csv")["image"].tolist()
    assert manifest["model"] == "SSDlite"
    capsys.readouterr()
    torch.save(TinySSD(1).state_dict(), tmp_path / "tiny.pt")
    # not read by ssdlite: not keyed
    assert main(base + ["detect.model.backbone=resnet34", "detect.model.fpn_channels=64"]) == 0
    assert "model up to date" in capsys.readouterr().out
    assert main(base + ["detect.model.name=tinyssd", f"detect.model.pretrained_path={tmp_path / 'tiny.pt'}"]) == 0
    out = capsys.readouterr().out
    assert "initialised from the whole tinyssd detector" in out and "model up to date" not in out
    (tmp_path / "moved.pt").write_bytes((tmp_path / "tiny.pt").read_bytes())  # the key holds its bytes, not its path
    assert main(base + ["detect.model.name=tinyssd", f"detect.model.pretrained_path={tmp_path / 'moved.pt'}"]) == 0
    assert "model up to date" in capsys.readouterr().out
    assert main(base + [f"detect.model.pretrained_path={tmp_path / 'tiny.pt'}"]) == 2  # a TinySSD file for SSDlite
    err = capsys.readouterr().err
    assert err.startswith("error: detect.model.pretrained_path=") and "fits neither the ssdlite detector" in err
    assert err.count("\n") == 1
