"""Training of one segmentation model on in-memory images and masks: the segmentation track of the shared loop
(pipeline/training/loop.py, which owns reseeding, resume from `last.*`, early stopping and the epoch lines).

Images arrive decoded once and resized to image_size (pipeline/data/cache.py), masks as (N, C, S, S) uint8 at
the same size; batches are cut from those arrays, flipped with their masks, and scored per epoch by the
validation Dice the competition uses (mean over image-class pairs, 1 when both masks are empty).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from segmentation_models_pytorch.losses import DiceLoss
from timm.scheduler import CosineLRScheduler
from tqdm import tqdm

from pipeline.core.config import SegmentTrainConfig
from pipeline.segmentation.infer import predict_views
from pipeline.segmentation.metrics import dice
from pipeline.segmentation.models import NORM
from pipeline.segmentation.post import grid_scores
from pipeline.training import loop
from pipeline.training.runtime import Runtime

# The epoch is picked by the validation Dice after a post-processing like the submission's (per class the best
# threshold and smallest component of a small grid), not by the raw Dice at 0.5: where many masks are empty the
# raw figure rewards predicting nothing, so while a model that is learning still leaves stray pixels on empty images
# it looks worse than the empty model, and early stopping keeps the empty one. The grid is fixed here, not read from
# segment.thresholds, so that changing those thresholds trains nothing.
MONITOR_THRESHOLDS = [0.3, 0.5, 0.7]
MONITOR_MIN_AREAS = [0, 16, 64, 256]  # pixels at image_size, as segment.thresholds.min_area


def post_processed_dice(probs: np.ndarray, truth: np.ndarray) -> float:
    """Mean Dice of uint8 probabilities (N, C, S, S) against bool truth with, per class, the threshold and smallest
    component of the monitor's grid that score best on these images."""
    return float(np.mean([grid_scores(probs[:, c], truth[:, c], MONITOR_THRESHOLDS, MONITOR_MIN_AREAS).mean(-1).max()
                          for c in range(truth.shape[1])]))


def batches_of(order: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """The epoch's batches of row positions; a last batch of one image joins the one before, because BatchNorm
    cannot train on a single image (17 images in batches of 8 would fail in the third step)."""
    batches = list(order.split(batch_size))
    if len(batches) > 1 and len(batches[-1]) == 1:
        batches[-2:] = [torch.cat(batches[-2:])]
    return batches


def flip_batch(images: torch.Tensor, masks: torch.Tensor, flip: torch.Tensor, dim: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip the images (B, C, H, W) and their masks along `dim` (-1: mirror, -2: upside down) where `flip` (B,)."""
    where = flip[:, None, None, None]
    return torch.where(where, images.flip(dim), images), torch.where(where, masks.flip(dim), masks)


def loss_fn(kind: str):
    """logits, targets (float 0/1) -> the training loss: soft Dice per class over the batch (smp's), BCE or both."""
    soft_dice = DiceLoss("multilabel", from_logits=True)
    if kind == "dice":
        return soft_dice
    if kind == "bce":
        return F.binary_cross_entropy_with_logits
    return lambda logits, target: soft_dice(logits, target) + F.binary_cross_entropy_with_logits(logits, target)


@dataclass
class SegmentationTrainer:
    """`fit()` runs the shared loop and returns the history (train_loss, val_dice at 0.5 and val_dice_post, the
    monitored one, per epoch)."""

    model: torch.nn.Module
    cfg: SegmentTrainConfig
    images: np.ndarray  # (N, S, S, 3) uint8, every training image (a memmap: rows are read per batch)
    masks: np.ndarray  # (N, C, S, S) uint8 0/1
    train_rows: np.ndarray  # the rows this model trains on
    val_rows: np.ndarray  # and validates on
    run_dir: Path
    fingerprint: str
    runtime: Runtime

    def __post_init__(self) -> None:
        cfg = self.cfg
        optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        steps = len(batches_of(torch.arange(len(self.train_rows)), cfg.batch_size))
        scheduler = CosineLRScheduler(optimizer, t_initial=cfg.epochs * steps, lr_min=cfg.lr / 100, t_in_epochs=False)
        self.updater = loop.Updater(self.model, optimizer, scheduler, grad_scaler=self.runtime.grad_scaler)
        self.loss = loss_fn(cfg.loss)
        self.progress = loop.Progress()
        self.generator = torch.Generator()

    def reseed(self, epoch: int, epoch_seed: int) -> None:
        self.generator.manual_seed(epoch_seed)

    def _batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = np.sort(self.train_rows[idx.numpy()])  # sorted reads from a memmap; order within a batch is moot
        images = torch.from_numpy(self.images[rows]).permute(0, 3, 1, 2)
        masks = torch.from_numpy(self.masks[rows])
        for enabled, dim in ((self.cfg.hflip, -1), (self.cfg.vflip, -2)):
            if enabled:
                images, masks = flip_batch(images, masks, torch.rand(len(rows), generator=self.generator) < 0.5, dim)
        return images, masks

    def train_epoch(self, epoch: int) -> dict[str, float]:
        self.model.train()
        rt = self.runtime
        order = torch.randperm(len(self.train_rows), generator=self.generator)
        batches = batches_of(order, self.cfg.batch_size)
        total, seen, t0 = 0.0, 0, time.perf_counter()
        bar = tqdm(batches, desc=f"segment: epoch {epoch}/{self.cfg.epochs}", unit="batch", leave=False, disable=None)
        self.updater.start_epoch()
        for i, idx in enumerate(bar, 1):
            images, masks = self._batch(idx)
            with rt.autocasting():
                logits = self.model(rt.to_input(images, NORM))
            loss = self.loss(logits.float(), rt.to_device(masks).float())
            self.updater.backward(loss, i, len(batches))
            total, seen = total + loss.detach() * len(idx), seen + len(idx)
            if not bar.disable and bar.n % 10 == 0:
                bar.set_postfix(loss=f"{total.item() / seen:.4f}", img_s=f"{seen / (time.perf_counter() - t0):.0f}")
        return {"train_loss": float(total) / seen}

    def validate(self) -> dict[str, float]:
        rows = np.sort(self.val_rows)
        probs = predict_views(self.updater.evaluated, self.images[rows], ("identity",), self.cfg.batch_size,
                              self.runtime, combined=True)
        truth = self.masks[rows].astype(bool)
        return {"val_dice": float(dice(probs >= 128, truth).mean()), "val_dice_post": post_processed_dice(probs, truth)}

    def end_epoch(self, epoch: int, monitored: float | None) -> None:
        pass  # the schedule steps per update

    def describe(self, row: dict) -> str:
        return (f"loss {row['train_loss']:.4f} | val Dice {row['val_dice']:.4f}, post-processed "
                f"{row['val_dice_post']:.4f} ({row['seconds']:.0f} s)")

    def fit(self) -> list[dict]:
        """With train.patience: stop after that many epochs without a better val_dice_post and end with the best
        epoch's weights; without it every epoch runs and the last weights stay."""
        saver = loop.CheckpointSaver(self.run_dir, self.fingerprint)
        patience = self.cfg.patience
        self.progress = loop.fit(self, saver, epochs=self.cfg.epochs, seed=self.cfg.seed, label="segment:",
                                 monitor="val_dice_post", early_stopping=patience,
                                 diverged_fix="lower segment.train.lr")
        if patience:
            self.model.load_state_dict(load_file(str(self.run_dir / "best.safetensors")))
        return self.progress.history

    @property
    def best_epoch(self) -> int:
        return self.progress.best_epoch if self.cfg.patience else self.progress.epoch
