"""The classification track of the shared training loop (pipeline/training/loop.py): one (backbone, fold).

It plugs into the loop what is particular to classification: batches from the decoded-image array
(feeding.py: albumentations per image, a seeded batch order, each rank's share of one process's batches under
torchrun; or the preset on the device, augment_device.py), soft-target cross-entropy (losses.py; Mixup/CutMix,
label smoothing, class weights), the lr schedule (cosine per update or lower on plateau) and validation on the
held-out fold. Other tasks (pipeline/scoring/tasks.py) bring their `Head`: its loss (BCE on multi-hot tags,
mse/huber/bce_scaled on numbers) and activation replace cross-entropy and softmax; Mixup/CutMix then mix the dense
targets as they mix the images. Resume, reseeding, history, best and early stopping are the loop's.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from timm.scheduler import CosineLRScheduler, PlateauLRScheduler
from tqdm import tqdm

from pipeline.core.config import TrainConfig
from pipeline.core.errors import PipelineError
from pipeline.scoring.tasks import greater_is_better, score
from pipeline.training import distributed, feeding, loop
from pipeline.training.augment import mixer, train_transform
from pipeline.training.augment_device import device_augment
from pipeline.training.feeding import ArrayDataset, EpochSampler, predict_proba
from pipeline.training.heads import Head
from pipeline.training.losses import class_weights, soft_cross_entropy
from pipeline.training.runtime import Runtime


@dataclass
class FoldData:
    train_x: np.ndarray
    train_y: np.ndarray
    val_x: np.ndarray
    val_y: np.ndarray
    n_classes: int
    norm: dict
    metric: str
    head: Head | None = None  # None: single_label (softmax, cross-entropy)


@dataclass
class Trainer:
    """One (backbone, fold) run; `run_dir` holds last.* and best.*. `fit()` runs the shared loop."""

    model: torch.nn.Module  # the plain module: its state_dict is what checkpoints hold
    optimizer: torch.optim.Optimizer
    cfg: TrainConfig
    data: FoldData
    run_dir: Path
    fingerprint: str
    runtime: Runtime
    seed: int
    desc: str = ""
    net: torch.nn.Module | None = None  # what runs the forward pass: the model, or its DDP / compiled wrapper
    on_epoch: Callable[[int, float], None] | None = None  # e.g. Optuna's report-and-prune

    def __post_init__(self) -> None:
        cfg, rt = self.cfg, self.runtime
        self.net = self.net if self.net is not None else self.model  # not `or`: a compiled module refuses bool()
        self.transform = train_transform(cfg, self.seed)
        self.device_augment = device_augment(cfg, rt, self.transform, self.model, self.data.train_x, self.data.norm,
                                             lambda line: distributed.say(f"train: {self.desc}: {line}"))
        dataset = ArrayDataset(self.data.train_x, self.data.train_y,
                               None if self.device_augment is not None else self.transform)
        drop_last = len(self.data.train_x) > cfg.batch_size * distributed.world_size()
        self.sampler = EpochSampler(len(dataset), self.seed, distributed.rank(), distributed.world_size(), drop_last)
        self.loader = feeding.loader(dataset, cfg.batch_size, self.sampler, drop_last, self.seed, rt)
        scheduler = self._scheduler(loop.Updater.per_epoch(len(self.loader), cfg.accumulate))
        self.updater = loop.Updater(self.model, self.optimizer, scheduler, per_update=cfg.schedule == "cosine",
                                    accumulate=cfg.accumulate, grad_clip=cfg.grad_clip,
                                    ema_decay=cfg.ema_decay if cfg.ema else None, grad_scaler=rt.grad_scaler)
        head = self.data.head
        self.dense = head is not None and head.task != "single_label"  # targets are rows or numbers, not indices
        if self.dense and cfg.class_weights != "none":
            raise PipelineError(f"train.class_weights: for single_label tasks only; this one is {head.task}")
        soft = not self.dense and np.ndim(self.data.train_y) == 2  # soft pseudo-labels: (N, classes) probabilities
        hard_y = self.data.train_y.argmax(1) if soft else self.data.train_y
        self.weights = None if self.dense else class_weights(cfg.class_weights, hard_y, self.data.n_classes)
        if self.dense:
            self.mix = mixer(cfg, head.n_out, dense=True, smoothing=head.task == "multi_label")
        else:  # soft rows arrive smoothed (train_epoch) and are mixed as they are
            self.mix = mixer(cfg, self.data.n_classes, dense=soft, smoothing=not soft)
        self.progress = loop.Progress()

    def _scheduler(self, steps: int):
        cfg = self.cfg
        if cfg.schedule == "plateau":
            mode = "max" if greater_is_better(self.data.metric) else "min"
            # loop.Updater saves the counters timm's deprecation note says are lost: a resumed run lowers the lr
            # when an uninterrupted one does
            warnings.filterwarnings("ignore", "PlateauLRScheduler is deprecated", FutureWarning)
            return PlateauLRScheduler(self.optimizer, decay_rate=cfg.plateau_factor, patience_t=cfg.plateau_patience,
                                      mode=mode, warmup_t=int(round(cfg.warmup_epochs)), warmup_lr_init=cfg.lr * 0.01,
                                      lr_min=cfg.min_lr)
        return CosineLRScheduler(self.optimizer, t_initial=cfg.epochs * steps, lr_min=cfg.min_lr,
                                 warmup_t=int(cfg.warmup_epochs * steps), warmup_lr_init=cfg.lr * 0.01,
                                 t_in_epochs=False)

    # what tests and benchmarks read
    @property
    def history(self) -> list[dict]:
        return self.progress.history

    @property
    def updates(self) -> int:
        return self.updater.updates

    @property
    def scheduler(self):
        return self.updater.scheduler

    # --- the track's part of the loop -------------------------------------------------------
    def reseed(self, epoch: int, epoch_seed: int) -> None:
        self.sampler.set_epoch(epoch, epoch_seed)  # batch order and augmentation; the workers keep no state

    def train_epoch(self, epoch: int) -> dict[str, float]:
        cfg, rt = self.cfg, self.runtime
        self.net.train()
        mixing = self.mix is not None and (cfg.mix_off_epoch == 0 or epoch < cfg.mix_off_epoch)
        weight = None if self.weights is None else self.weights.to(rt.device)
        total, correct, seen, t0 = 0.0, 0, 0, time.perf_counter()
        bar = tqdm(self.loader, desc=f"{self.desc} epoch {epoch}/{cfg.epochs}", unit="batch", leave=False,
                   disable=None if distributed.is_main() else True)
        self.updater.start_epoch()
        for i, (x, y) in enumerate(bar, 1):
            if self.device_augment is not None:  # the uint8 batch crosses once, then the preset runs on the device
                x = rt.to_input(self.device_augment(rt.to_device(x).float().div_(255)), self.data.norm, divisor=1)
            else:
                x = rt.to_input(x, self.data.norm)
            y = y.to(rt.device, non_blocking=True)
            if self.dense:
                loss, logits, target = self._dense_step(x, y, mixing)
            else:
                if y.ndim == 2:  # probability targets, smoothed like one-hot ones (and mixed as they are)
                    target = y.float() * (1 - cfg.label_smoothing) + cfg.label_smoothing / self.data.n_classes
                    if mixing:
                        x, target = self.mix(x, target)
                elif mixing:
                    x, target = self.mix(x, y)
                else:
                    target = F.one_hot(y, self.data.n_classes).float()
                    target = target * (1 - cfg.label_smoothing) + cfg.label_smoothing / self.data.n_classes
                with rt.autocasting():
                    logits = self.net(x)
                loss = soft_cross_entropy(logits, target, weight)
            self.updater.backward(loss, i, len(self.loader))
            total = total + loss.detach().float() * len(y)  # device tensors: no host sync per batch
            if not self.dense:  # train_acc: single_label only (nan otherwise)
                correct = correct + (logits.argmax(1) == target.argmax(1)).sum()
            seen += len(y)
            if i % 20 == 0 and not bar.disable:  # the bar's numbers need a sync; not every batch
                bar.set_postfix(loss=f"{total.item() / seen:.3f}", acc=f"{float(correct) / seen:.3f}",
                                lr=f"{self.updater.lr:.2e}", img_s=f"{seen / (time.perf_counter() - t0):.0f}")
        total, correct, seen = distributed.sum_across([float(total), float(correct), seen])
        return {"train_loss": total / seen, "train_acc": float("nan") if self.dense else correct / seen}

    def _dense_step(self, x: torch.Tensor, y: torch.Tensor, mixing: bool):
        """(loss, logits, target) of a multi-label or number batch: targets mixed like the images, head's loss."""
        head = self.data.head
        target = y.float().view(len(y), -1)
        if mixing:
            x, target = self.mix(x, target)
        if head.task == "multi_label" and not mixing and self.cfg.label_smoothing:
            target = target * (1 - self.cfg.label_smoothing) + 0.5 * self.cfg.label_smoothing  # as timm's Mixup
        with self.runtime.autocasting():
            logits = self.net(x)
        return head.loss_value(logits, target if head.task == "multi_label" else target.view(-1)), logits, target

    def validate(self) -> dict[str, float]:
        """Metrics of the evaluated weights (the EMA's when on) on the held-out fold."""
        batch = self.cfg.batch_size * self.runtime.eval_batch_factor
        proba = predict_proba(self.updater.evaluated, self.data.val_x, self.data.norm, self.runtime, batch,
                              self.data.head if self.dense else None)
        metric = self.data.metric
        y = self.data.val_y
        acc = float("nan") if self.dense else score("accuracy", y, proba)
        return {"val_acc": acc, f"val_{metric}": score(metric, y, proba)}

    def end_epoch(self, epoch: int, monitored: float | None) -> None:
        if self.cfg.schedule == "plateau":
            self.updater.scheduler.step(epoch, monitored)

    def describe(self, row: dict) -> str:
        metric = self.data.metric
        if self.dense:
            return f"loss {row['train_loss']:.4f} val {metric} {row[f'val_{metric}']:.4f}"
        return f"loss {row['train_loss']:.4f} acc {row['train_acc']:.4f} val {metric} {row[f'val_{metric}']:.4f}"

    def fit(self) -> dict:
        """Train to the last epoch (or early stop), resuming when possible; returns the best epoch's summary."""
        metric = self.data.metric
        saver = loop.CheckpointSaver(self.run_dir, self.fingerprint, writes=distributed.is_main())
        self.progress = loop.fit(self, saver, epochs=self.cfg.epochs, seed=self.seed, label=f"train: {self.desc}",
                                 monitor=f"val_{metric}", greater_is_better=greater_is_better(metric),
                                 early_stopping=self.cfg.early_stopping, on_epoch=self.on_epoch, say=distributed.say,
                                 diverged_fix="lower train.lr or set train.grad_clip")
        p = self.progress
        return {"epoch": p.best_epoch, "metric": p.best, "epochs_run": p.epoch, "history": p.history}
