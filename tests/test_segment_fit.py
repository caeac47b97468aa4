"""Training one segmentation model: flips move images and masks together, the loop learns a plain task,
resumes an interrupted run to the same weights, and local pretrained weights load (or refuse in one line)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from pipeline.core.config import SegmentTrainConfig
from pipeline.core.errors import PipelineError
from pipeline.segmentation.fit import SegmentationTrainer, batches_of, flip_batch, loss_fn, post_processed_dice
from pipeline.segmentation.metrics import dice
from pipeline.segmentation.models import create, load_pretrained
from pipeline.training.runtime import Runtime

from .conftest import interrupt_in_epoch

pytestmark = pytest.mark.usefixtures("one_thread")


def bright_squares(n: int, size: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Gray noise with a bright square (class 0) in a random place: an easy task with a known answer."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 90, (n, size, size, 3), dtype=np.uint8)
    masks = np.zeros((n, 1, size, size), np.uint8)
    for i in range(n):
        y, x = rng.integers(0, size - 12, 2)
        images[i, y:y + 12, x:x + 12] = 220
        masks[i, 0, y:y + 12, x:x + 12] = 1
    return images, masks


def trainer(run_dir, epochs: int, seed: int = 0, **train) -> SegmentationTrainer:
    torch.manual_seed(seed)
    images, masks = bright_squares(24)
    cfg = SegmentTrainConfig(image_size=32, epochs=epochs, batch_size=8, lr=3e-3, seed=seed, **train)
    return SegmentationTrainer(create("unet", "resnet18", 1), cfg, images, masks, np.arange(16), np.arange(16, 24),
                               run_dir, "key", Runtime())


def test_flip_batch_moves_images_and_masks_together():
    images = torch.arange(2 * 3 * 2 * 4).reshape(2, 3, 2, 4)
    masks = torch.arange(2 * 1 * 2 * 4).reshape(2, 1, 2, 4)
    flipped, flipped_masks = flip_batch(images, masks, torch.tensor([True, False]), -1)
    assert torch.equal(flipped[0], images[0].flip(-1)) and torch.equal(flipped[1], images[1])
    assert torch.equal(flipped_masks[0], masks[0].flip(-1)) and torch.equal(flipped_masks[1], masks[1])


def test_losses_are_low_for_the_right_answer_and_high_for_the_wrong_one():
    target = torch.zeros(2, 1, 8, 8)
    target[:, :, 2:6, 2:6] = 1
    right, wrong = (target * 2 - 1) * 10, (1 - target * 2) * 10
    for kind in ("dice_bce", "dice", "bce"):
        loss = loss_fn(kind)
        assert float(loss(right, target)) < 0.01 and float(loss(wrong, target)) > 0.99, kind  # soft Dice: at most 1


def test_the_monitor_prefers_a_learner_with_stray_pixels_to_the_empty_model():
    """Half the images are empty: the empty model scores 0.5 at threshold 0.5, a model that finds the squares but
    leaves 2x2 specks on the empty images scores less raw and far more once specks below 16 pixels are dropped."""
    truth = np.zeros((10, 1, 32, 32), bool)
    truth[5:, 0, 8:24, 8:24] = True
    learner = np.zeros(truth.shape, np.uint8)
    learner[5:, 0, 8:22, 8:24] = 230  # 14 of the 16 rows: Dice 0.933
    learner[:5, 0, 3:5, 3:5] = 230
    empty = np.zeros(truth.shape, np.uint8)
    raw = [float(dice(p >= 128, truth).mean()) for p in (empty, learner)]
    assert raw == [0.5, pytest.approx(0.5 * 28 / 30)]
    assert post_processed_dice(empty, truth) == 0.5
    assert post_processed_dice(learner, truth) == pytest.approx(0.5 + 0.5 * 28 / 30)


def test_a_last_batch_of_one_image_joins_the_batch_before(tmp_path):
    assert [len(b) for b in batches_of(torch.arange(17), 8)] == [8, 9]
    assert [len(b) for b in batches_of(torch.arange(18), 8)] == [8, 8, 2]
    fit = trainer(tmp_path, 1, patience=None)
    fit.train_rows = np.arange(17)  # 17 images in batches of 8: BatchNorm fails on a batch of one
    assert fit.fit()[0]["epoch"] == 1


def test_the_trainer_learns_bright_squares(tmp_path):
    fit = trainer(tmp_path, 8, patience=None)
    history = fit.fit()
    assert [h["epoch"] for h in history] == list(range(1, 9))
    assert history[-1]["train_loss"] < history[0]["train_loss"] / 2
    assert history[-1]["val_dice"] > 0.8 > history[0]["val_dice"], [h["val_dice"] for h in history]


def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path, monkeypatch):
    straight = trainer(tmp_path / "a", 3)
    straight.fit()
    interrupted = trainer(tmp_path / "b", 3)
    interrupt_in_epoch(monkeypatch, SegmentationTrainer, 2, interrupted.fit)
    resumed = trainer(tmp_path / "b", 3, seed=5)  # other init weights: everything must come from last.*
    resumed.cfg = straight.cfg
    resumed.fit()
    for k, v in straight.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    assert [h["train_loss"] for h in straight.progress.history] == [h["train_loss"] for h in resumed.progress.history]
    assert resumed.best_epoch == straight.best_epoch


def test_local_pretrained_weights_whole_or_encoder(tmp_path):
    torch.manual_seed(1)
    source = create("unet", "resnet18", 3)
    save_file(source.state_dict(), tmp_path / "whole.safetensors")
    save_file(source.encoder.state_dict(), tmp_path / "encoder.safetensors")
    torch.manual_seed(2)
    model = create("unet", "resnet18", 2)  # another class count: the head keeps its init
    assert "whole model" in load_pretrained(model, tmp_path / "whole.safetensors")
    assert torch.equal(model.encoder.conv1.weight, source.encoder.conv1.weight)
    assert not torch.equal(model.segmentation_head[0].weight[:1], source.segmentation_head[0].weight[:1])
    torch.manual_seed(3)
    other = create("fpn", "resnet18", 2)
    assert "encoder" in load_pretrained(other, tmp_path / "encoder.safetensors")
    assert torch.equal(other.encoder.layer4[0].conv1.weight, source.encoder.layer4[0].conv1.weight)
    save_file({"w": torch.zeros(3)}, tmp_path / "odd.safetensors")
    with pytest.raises(PipelineError, match="fits neither the model nor its encoder"):
        load_pretrained(other, tmp_path / "odd.safetensors")


def test_an_unknown_encoder_is_one_line():
    with pytest.raises(PipelineError, match=r"segment.models: unet on encoder 'resnet_nope' cannot be built"):
        create("unet", "resnet_nope", 2)
