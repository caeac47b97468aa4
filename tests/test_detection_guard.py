"""The detector's two guards against a run that never learns a box: the learning-rate warmup, and the restart of
a dead FCOS (its box regression ReLU negative everywhere) from scratch with another seed."""

import json

import pandas as pd
import pytest
import torch

from pipeline.cli import main
from pipeline.core.config import DetectTrainConfig
from pipeline.detection.bananas import build_bananas
from pipeline.detection.fit import WARMUP_FACTOR, DetectionTrainer, dead_reason
from pipeline.detection.tinyssd import TinySSD
from pipeline.detection.torchvision_models import build
from pipeline.stages import detect as detect_stage
from pipeline.training.runtime import Runtime

pytestmark = pytest.mark.usefixtures("one_thread")


def _trainer(tmp_path, **train) -> DetectionTrainer:
    """TinySSD on 12 noise images, 3 updates an epoch."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randint(0, 255, (12, 3, 64, 64), dtype=torch.uint8, generator=gen)
    xy = torch.rand(12, 1, 2, generator=gen) * 0.5
    y = torch.cat((torch.zeros(12, 1, 1), xy, xy + 0.3), -1)
    torch.manual_seed(0)
    cfg = DetectTrainConfig(**{"batch_size": 5, "image_size": 64, "lr": 0.05} | train)
    sizes = torch.tensor([[64.0, 64.0]] * 4)
    return DetectionTrainer(TinySSD(1), cfg, x, y, x[:4], y[:4], sizes, tmp_path, "fp", Runtime())


def test_warmup_rises_linearly_to_the_lr_then_the_cosine_ends_at_a_hundredth(tmp_path):
    trainer = _trainer(tmp_path, epochs=4, warmup_epochs=1)
    updater, lr = trainer.updater, trainer.cfg.lr
    assert trainer.warmup_steps == 3 and updater.lr == pytest.approx(lr * WARMUP_FACTOR)  # before the first update
    seen = []
    for t in range(1, 13):
        updater.scheduler.step_update(t)
        seen.append(updater.lr)
    assert seen[:3] == pytest.approx([lr * WARMUP_FACTOR + t * lr * (1 - WARMUP_FACTOR) / 3 for t in (1, 2, 3)])
    assert seen[2] == pytest.approx(lr) and seen[3] < lr  # the peak when the warmup ends, then the cosine
    assert all(a > b for a, b in zip(seen[2:], seen[3:], strict=False)) and seen[-1] == pytest.approx(lr / 100)
    assert _trainer(tmp_path, epochs=4, warmup_epochs=0).updater.lr == lr  # none: the lr from the first update

    trained = _trainer(tmp_path, epochs=4, warmup_epochs=1)  # a real epoch: its 3 updates are the warmup
    trained.train_epoch(1)
    assert trained.updater.updates == 3 and trained.updater.lr == pytest.approx(lr)


def test_a_dead_fcos_has_a_giou_loss_of_exactly_one_and_no_gradient_to_its_boxes():
    """The failure the guard recognises: FCOS's regression ReLU negative everywhere makes every box a point."""
    torch.manual_seed(0)
    model = build("fcos", 2, 64, "resnet10t", 32)
    reg = model.net.head.regression_head.bbox_reg
    with torch.no_grad():
        reg.bias.fill_(-1e3)
    x = torch.randint(0, 100, (2, 3, 64, 64), dtype=torch.uint8)
    y = torch.tensor([[[0, 0.1, 0.1, 0.5, 0.6]], [[1, 0.4, 0.3, 0.9, 0.8]]])
    losses = model.losses(x, y, Runtime())
    sum(losses.values()).backward()
    assert losses["bbox_regression"].item() == 1.0 and not reg.weight.grad.any() and not reg.bias.grad.any()
    row = {"train_bbox_regression": 1.0, "map_50": 0.0}
    assert "ReLU is dead" in dead_reason(row, "fcos")
    assert dead_reason(row | {"map_50": 0.01}, "fcos") is None  # it found boxes
    assert dead_reason(row | {"train_bbox_regression": 0.9992}, "fcos") is None  # a fresh FCOS's tiny boxes
    assert dead_reason(row, "retinanet") is None  # linear box outputs: a slow start, not a dead end


def _kill_first_attempts(monkeypatch) -> None:
    """FCOS built from a seed below the restart's (detect.RESTART_SEED) gets a dead regression ReLU."""
    real = detect_stage._build

    def dead_first(*args):
        model = real(*args)
        if torch.initial_seed() < detect_stage.RESTART_SEED:
            with torch.no_grad():
                model.net.head.regression_head.bbox_reg.bias.fill_(-1e3)
        return model

    monkeypatch.setattr(detect_stage, "_build", dead_first)


def _detect(data, work, *extra) -> list[str]:
    return ["detect", "--data", str(data), "--work", str(work), "--submissions", str(work / "subs"),
            "detect.model.name=fcos", "detect.model.backbone=resnet10t", "detect.model.fpn_channels=32",
            "detect.folds.n_splits=1", "detect.train.image_size=64", "detect.train.epochs=3",
            "detect.train.batch_size=2", "detect.train.lr=0.02", "detect.predict.gallery_images=0",
            "runtime.device=cpu", "runtime.threads=1", "tracking.backend=none", *extra]


@pytest.mark.slow
def test_a_dead_fcos_restarts_once_with_another_seed_and_a_killed_restart_resumes(tmp_path, monkeypatch, capsys):
    data = build_bananas(tmp_path / "bananas", n_train=8, n_val=4, n_test=2, seed=1)
    _kill_first_attempts(monkeypatch)
    assert main(_detect(data, tmp_path / "a")) == 0
    printed = capsys.readouterr().out
    warning = "detector restarts from scratch with seed 1000: after epoch 2, validation mAP@0.5 0 and GIoU box loss 1"
    assert printed.count(warning) == 1
    out = tmp_path / "a" / "detect"
    stamp = json.loads((out / "model.json").read_text())
    assert stamp["summary"]["restarted"]["seed"] == 1000 and stamp["model_key"] != stamp["fingerprint"]
    assert json.loads((out / "restart.json").read_text())["epoch"] == 2
    history = pd.read_csv(out / "history.csv")  # the restart's: it learns boxes
    assert len(history) == 3 and history["train_bbox_regression"].iloc[-1] < 0.999
    weights = detect_stage.load_file(str(out / "model.safetensors"))
    assert weights["net.head.regression_head.bbox_reg.bias"].abs().max() < 10  # not the dead first attempt's
    assert main(_detect(data, tmp_path / "a")) == 0
    assert "model up to date" in capsys.readouterr().out
    assert main(["bundle", *_detect(data, tmp_path / "a")[1:]]) == 0  # it packs the restart's weights and keys

    # killed in the restart's third epoch: the rerun goes straight on with the restart, from its last epoch
    original, calls = DetectionTrainer.train_epoch, []

    def die(self, epoch: int):
        calls.append(epoch)
        if len(calls) == 5:  # dead epochs 1 and 2, the restart's epochs 1 and 2, then this
            raise KeyboardInterrupt
        return original(self, epoch)

    monkeypatch.setattr(DetectionTrainer, "train_epoch", die)
    assert main(_detect(data, tmp_path / "b")) == 130  # interrupted
    monkeypatch.setattr(DetectionTrainer, "train_epoch", original)
    capsys.readouterr()
    assert main(_detect(data, tmp_path / "b")) == 0
    printed = capsys.readouterr().out
    assert "restarts from scratch" not in printed and "resumes after epoch 2" in printed
    resumed = detect_stage.load_file(str(tmp_path / "b" / "detect" / "model.safetensors"))
    for k, v in weights.items():
        assert torch.equal(v, resumed[k]), k


@pytest.mark.slow
def test_a_healthy_fcos_does_not_restart(tmp_path, capsys):
    data = build_bananas(tmp_path / "bananas", n_train=8, n_val=4, n_test=2, seed=1)
    assert main(_detect(data, tmp_path / "w")) == 0
    assert "restarts from scratch" not in capsys.readouterr().out
    out = tmp_path / "w" / "detect"
    stamp = json.loads((out / "model.json").read_text())
    assert not (out / "restart.json").exists() and "restarted" not in stamp["summary"]
    assert stamp["model_key"] == stamp["fingerprint"]


def test_a_short_run_warms_up_for_at_most_half_its_updates(tmp_path):
    assert _trainer(tmp_path, epochs=1, warmup_epochs=1).warmup_steps == 1  # 3 updates: not all but the last
    assert _trainer(tmp_path, epochs=2, warmup_epochs=1).warmup_steps == 3  # 6 updates: the epoch asked for


def test_restart_dead_after_is_in_the_key_of_fcos_only():
    from pipeline.core.config import DetectConfig

    for name, changes in (("fcos", True), ("retinanet", False), ("tinyssd", False)):
        keys = {detect_stage.train_key(DetectConfig(model={"name": name}, train={"restart_dead_after": after}),
                                       "data", 0, {}) for after in (2, 3)}
        assert (len(keys) == 2) == changes, name
