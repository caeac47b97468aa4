"""The classification track of the shared training loop (pipeline/loop.py): one (backbone, fold).

It plugs into the loop what is particular to classification: batches from the decoded-image array
(albumentations per image, a seeded batch order, a DistributedSampler under torchrun), soft-target
cross-entropy (Mixup/CutMix, label smoothing, class weights), the lr schedule (cosine per update or
lower on plateau) and validation on the held-out fold. Other tasks (pipeline/tasks.py) bring their `Head`:
its loss (BCE on multi-hot tags, mse/huber/bce_scaled on numbers) and activation replace cross-entropy and
softmax; Mixup/CutMix then mix the dense targets as they mix the images. Resume, reseeding, history, best and early
stopping are the loop's.
"""

from __future__ import annotations

import random
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from timm.scheduler import CosineLRScheduler, PlateauLRScheduler
from torch.utils.data import DataLoader, Dataset, DistributedSampler, default_collate
from tqdm import tqdm

from . import distributed, loop
from .augment import mixer, train_transform
from .config import TrainConfig
from .errors import PipelineError
from .runtime import Runtime
from .tasks import Head, greater_is_better, score


class ArrayDataset(Dataset):
    """Rows of the decoded-image cache, augmented with albumentations, returned as uint8 CHW tensors."""

    def __init__(self, images: np.ndarray, targets: np.ndarray, transform=None):
        self.images, self.targets, self.transform = images, targets, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        img = np.array(self.images[i])
        if self.transform is not None and self.transform.transforms:
            img = self.transform(image=img)["image"]
        return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1), torch.as_tensor(self.targets[i])

    def __getitems__(self, indices: list[int]):
        """A whole batch in one read of the array (the DataLoader calls this instead of one item at a time)."""
        if self.transform is not None and self.transform.transforms:
            return tuple(default_collate([self[i] for i in indices]))
        idx = np.asarray(indices)
        order = np.argsort(idx)  # sorted reads are sequential on a memmap
        batch = np.empty((len(idx), *self.images.shape[1:]), dtype=self.images.dtype)
        batch[order] = self.images[idx[order]]
        return (torch.from_numpy(batch).permute(0, 3, 1, 2),
                torch.as_tensor(np.asarray(self.targets)[idx]))


def collate(batch):
    """Batches from ArrayDataset.__getitems__ arrive ready; anything else goes through torch's default."""
    return batch if isinstance(batch, tuple) else default_collate(batch)


@torch.no_grad()
def predict_proba(model: torch.nn.Module, images: np.ndarray, norm: dict, runtime: Runtime,
                  batch_size: int, head: Head | None = None) -> np.ndarray:
    """Class probabilities of uint8 NHWC images (or the head's predictions), with the runtime's autocast and
    memory format."""
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(np.array(images[start:start + batch_size])).permute(0, 3, 1, 2)
        with runtime.autocasting():
            logits = model(runtime.to_input(x, norm))
        out.append((logits.float().softmax(1) if head is None else head.activate(logits)).cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, 0))


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Cross-entropy with probability targets (Mixup, label smoothing) and optional class weights,
    normalised like torch's weighted cross-entropy (by the targets' total weight)."""
    logp = F.log_softmax(logits.float(), dim=1)
    if weight is None:
        return -(target * logp).sum(1).mean()
    return -(target * logp * weight).sum() / (target * weight).sum()


def class_weights(spec, targets: np.ndarray, n_classes: int) -> torch.Tensor | None:
    """None, sklearn-style 'balanced' weights (n / (k * count)), or the given list."""
    if spec == "none":
        return None
    if spec == "balanced":
        counts = np.bincount(targets, minlength=n_classes).astype(np.float64)
        return torch.tensor(len(targets) / (n_classes * np.maximum(counts, 1)), dtype=torch.float32)
    if len(spec) != n_classes:
        raise PipelineError(f"train.class_weights: {len(spec)} weights for {n_classes} classes")
    return torch.tensor(spec, dtype=torch.float32)


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
        self.generator = torch.Generator().manual_seed(self.seed)
        dataset = ArrayDataset(self.data.train_x, self.data.train_y, self.transform)
        drop_last = len(self.data.train_x) > cfg.batch_size * distributed.world_size()
        self.sampler = (DistributedSampler(dataset, shuffle=True, seed=self.seed, drop_last=drop_last)
                        if distributed.world_size() > 1 else None)
        self.loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=self.sampler is None, sampler=self.sampler,
                                 drop_last=drop_last, num_workers=rt.num_workers, pin_memory=rt.device.type == "cuda",
                                 generator=self.generator, worker_init_fn=_seed_worker if rt.num_workers else None,
                                 collate_fn=collate)
        scheduler = self._scheduler(loop.Updater.per_epoch(len(self.loader), cfg.accumulate))
        self.updater = loop.Updater(self.model, self.optimizer, scheduler, per_update=cfg.schedule == "cosine",
                                    accumulate=cfg.accumulate, grad_clip=cfg.grad_clip,
                                    ema_decay=cfg.ema_decay if cfg.ema else None, grad_scaler=rt.grad_scaler)
        head = self.data.head
        self.dense = head is not None and head.task != "single_label"  # targets are rows or numbers, not indices
        if self.dense and cfg.class_weights != "none":
            raise PipelineError(f"train.class_weights: for single_label tasks only; this one is {head.task}")
        self.weights = None if self.dense else class_weights(cfg.class_weights, self.data.train_y,
                                                             self.data.n_classes)
        self.mix = (mixer(cfg, head.n_out, dense=True, smoothing=head.task == "multi_label") if self.dense
                    else mixer(cfg, self.data.n_classes))
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
        self.transform.set_random_seed(epoch_seed + 7919 * distributed.rank())
        self.generator.manual_seed(epoch_seed)
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)

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
            x, y = rt.to_input(x, self.data.norm), y.to(rt.device)
            if self.dense:
                loss, logits, target = self._dense_step(x, y, mixing)
            else:
                if mixing:
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


def _seed_worker(worker_id: int) -> None:
    """DataLoader workers: numpy, random and the augmentation pipeline follow torch's per-worker seed."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
    transform = torch.utils.data.get_worker_info().dataset.transform
    if transform is not None:
        transform.set_random_seed(seed)
