"""The training loop of one (backbone, fold): epochs, checkpoints and exact resume.

Every epoch reseeds all randomness from (seed, epoch): torch, numpy (timm's Mixup), the
albumentations pipeline and the batch order. An epoch's result therefore depends only on the
weights and optimizer state it starts from, which `last` stores (weights, EMA weights, optimizer,
scheduler, grad scaler, epoch, best metric, history). A run killed at any point restarts from the
last finished epoch and ends with the same weights and metrics as an uninterrupted run (CPU).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from timm.scheduler import CosineLRScheduler, PlateauLRScheduler
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader, Dataset, DistributedSampler, default_collate
from tqdm import tqdm

from . import checkpoint, distributed
from .augment import mixer, train_transform
from .checkpoint import prefixed, unprefixed
from .config import TrainConfig
from .errors import DivergedError, PipelineError
from .metrics import is_better, score


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
        return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1), int(self.targets[i])

    def __getitems__(self, indices: list[int]):
        """A whole batch in one read of the array (the DataLoader calls this instead of one item at a time)."""
        if self.transform is not None and self.transform.transforms:
            return tuple(default_collate([self[i] for i in indices]))
        idx = np.asarray(indices)
        order = np.argsort(idx)  # sorted reads are sequential on a memmap
        batch = np.empty((len(idx), *self.images.shape[1:]), dtype=self.images.dtype)
        batch[order] = self.images[idx[order]]
        return torch.from_numpy(batch).permute(0, 3, 1, 2), torch.as_tensor(np.asarray(self.targets)[idx], dtype=torch.long)


def collate(batch):
    """Batches from ArrayDataset.__getitems__ arrive ready; anything else goes through torch's default."""
    return batch if isinstance(batch, tuple) else default_collate(batch)


def to_input(x: torch.Tensor, norm: dict, device: torch.device) -> torch.Tensor:
    """uint8 NCHW -> normalised float on device (mean/std kept in the checkpoint metadata)."""
    mean = torch.tensor(norm["mean"], device=device).view(1, -1, 1, 1)
    std = torch.tensor(norm["std"], device=device).view(1, -1, 1, 1)
    out = (x.to(device, non_blocking=True).float().div_(255.0) - mean) / std
    return out.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else out


@torch.no_grad()
def predict_proba(model: torch.nn.Module, images: np.ndarray, norm: dict, device: torch.device, batch_size: int) -> np.ndarray:
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(np.array(images[start:start + batch_size])).permute(0, 3, 1, 2)
        out.append(model(to_input(x, norm, device)).float().softmax(1).cpu())
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


@dataclass
class Trainer:
    """Owns the model, optimizer, schedule, EMA and the loop; `run_dir` holds last.* and best.*."""

    model: torch.nn.Module  # the plain module: its state_dict is what checkpoints hold
    optimizer: torch.optim.Optimizer
    cfg: TrainConfig
    data: FoldData
    run_dir: Path
    fingerprint: str
    device: torch.device
    seed: int
    desc: str = ""
    net: torch.nn.Module | None = None  # what runs the forward pass: the model, or its DDP / compiled wrapper
    on_epoch: Callable[[int, float], None] | None = None  # e.g. Optuna's report-and-prune
    history: list = field(default_factory=list)

    def __post_init__(self) -> None:
        self.net = self.net if self.net is not None else self.model  # not `or`: a compiled module refuses bool()
        self.transform = train_transform(self.cfg, self.seed)
        self.generator = torch.Generator().manual_seed(self.seed)
        dataset = ArrayDataset(self.data.train_x, self.data.train_y, self.transform)
        drop_last = len(self.data.train_x) > self.cfg.batch_size * distributed.world_size()
        self.sampler = (DistributedSampler(dataset, shuffle=True, seed=self.seed, drop_last=drop_last)
                        if distributed.world_size() > 1 else None)
        self.loader = DataLoader(dataset, batch_size=self.cfg.batch_size, shuffle=self.sampler is None, sampler=self.sampler,
                                 drop_last=drop_last, num_workers=self.cfg.num_workers, pin_memory=self.device.type == "cuda",
                                 generator=self.generator, worker_init_fn=_seed_worker if self.cfg.num_workers else None,
                                 collate_fn=collate)
        self.updates_per_epoch = max(1, len(self.loader) // self.cfg.accumulate)
        self.scheduler = self._scheduler()
        self.ema = ModelEmaV3(self.model, decay=self.cfg.ema_decay) if self.cfg.ema else None
        fp16 = self.cfg.amp and self.device.type == "cuda" and self.cfg.amp_dtype == "float16"
        self.scaler = torch.amp.GradScaler("cuda", enabled=fp16)
        self.amp = self.cfg.amp and self.device.type == "cuda"
        self.weights = class_weights(self.cfg.class_weights, self.data.train_y, self.data.n_classes)
        self.mix = mixer(self.cfg, self.data.n_classes)
        self.epoch, self.updates, self.best, self.best_epoch, self.bad_epochs = 0, 0, None, 0, 0

    def _scheduler(self):
        steps, cfg = self.updates_per_epoch, self.cfg
        if cfg.schedule == "plateau":
            mode = "max" if is_better(self.data.metric, 1.0, 0.0) else "min"
            return PlateauLRScheduler(self.optimizer, decay_rate=cfg.plateau_factor, patience_t=cfg.plateau_patience, mode=mode,
                                      warmup_t=int(round(cfg.warmup_epochs)), warmup_lr_init=cfg.lr * 0.01, lr_min=cfg.min_lr)
        return CosineLRScheduler(self.optimizer, t_initial=cfg.epochs * steps, lr_min=cfg.min_lr, warmup_t=int(cfg.warmup_epochs * steps),
                                 warmup_lr_init=cfg.lr * 0.01, t_in_epochs=False)

    # --- checkpoints ------------------------------------------------------------------------
    def save_last(self) -> None:
        if not distributed.is_main():
            return
        tensors = prefixed("model", self.model)
        if self.ema is not None:
            tensors.update(prefixed("ema", self.ema.module))
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                 "updates": self.updates, "best": self.best, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs,
                 "history": self.history}
        checkpoint.save_last(self.run_dir, tensors, state, self.epoch, self.fingerprint)

    def resume(self) -> bool:
        """Continue from last.* when both files exist, belong to this config and agree on the epoch."""
        found = checkpoint.load_last(self.run_dir, self.fingerprint)
        if found is None:
            return False
        tensors, state = found
        self.model.load_state_dict(unprefixed("model", tensors))
        if self.ema is not None:
            self.ema.module.load_state_dict(unprefixed("ema", tensors))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        for key in ("epoch", "updates", "best", "best_epoch", "bad_epochs", "history"):
            setattr(self, key, state[key])
        return True

    def save_best(self, model: torch.nn.Module) -> None:
        if distributed.is_main():
            checkpoint.save_weights(self.run_dir / "best.safetensors", model)

    # --- the loop ---------------------------------------------------------------------------
    def _reseed(self, epoch: int) -> None:
        epoch_seed = self.seed * 1000 + epoch
        torch.manual_seed(epoch_seed)
        np.random.seed(epoch_seed % 2**32)
        random.seed(epoch_seed)
        self.transform.set_random_seed(epoch_seed + 7919 * distributed.rank())
        self.generator.manual_seed(epoch_seed)
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)

    def _step(self) -> None:
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.optimizer)
        if self.cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.updates += 1
        if self.ema is not None:
            self.ema.update(self.model, step=self.updates)
        if self.cfg.schedule == "cosine":
            self.scheduler.step_update(self.updates)

    def train_epoch(self) -> tuple[float, float]:
        self.net.train()
        mixing = self.mix is not None and (self.cfg.mix_off_epoch == 0 or self.epoch < self.cfg.mix_off_epoch)
        weight = None if self.weights is None else self.weights.to(self.device)
        total, correct, seen, t0 = 0.0, 0, 0, time.perf_counter()
        bar = tqdm(self.loader, desc=f"{self.desc} epoch {self.epoch}/{self.cfg.epochs}", unit="batch", leave=False,
                   disable=None if distributed.is_main() else True)
        self.optimizer.zero_grad(set_to_none=True)
        for i, (x, y) in enumerate(bar, 1):
            x, y = to_input(x, self.data.norm, self.device), y.to(self.device)
            if mixing:
                x, target = self.mix(x, y)
            else:
                target = F.one_hot(y, self.data.n_classes).float()
                target = target * (1 - self.cfg.label_smoothing) + self.cfg.label_smoothing / self.data.n_classes
            with torch.autocast(self.device.type, dtype=getattr(torch, self.cfg.amp_dtype), enabled=self.amp):
                logits = self.net(x)
            loss = soft_cross_entropy(logits, target, weight)
            self.scaler.scale(loss / self.cfg.accumulate).backward()
            if i % self.cfg.accumulate == 0 or i == len(self.loader):
                self._step()
            total = total + loss.detach().float() * len(y)  # device tensors: no host sync per batch
            correct = correct + (logits.argmax(1) == target.argmax(1)).sum()
            seen += len(y)
            if i % 20 == 0 and not bar.disable:  # the bar's numbers need a sync; not every batch
                bar.set_postfix(loss=f"{total.item() / seen:.3f}", acc=f"{correct.item() / seen:.3f}",
                                lr=f"{self.optimizer.param_groups[0]['lr']:.2e}", img_s=f"{seen / (time.perf_counter() - t0):.0f}")
        total, correct, seen = distributed.sum_across([float(total), float(correct), seen])
        return total / seen, correct / seen

    def fit(self) -> dict:
        """Train to the last epoch (or early stop), resuming when possible; returns the best epoch's summary."""
        if self.resume() and distributed.is_main():
            print(f"train: {self.desc} resumes after epoch {self.epoch}")
        metric = self.data.metric
        while self.epoch < self.cfg.epochs and not (self.cfg.early_stopping and self.bad_epochs >= self.cfg.early_stopping):
            self.epoch += 1
            self._reseed(self.epoch)
            t0 = time.perf_counter()
            loss, acc = self.train_epoch()
            if not np.isfinite(loss):
                raise DivergedError(f"train: {self.desc}: the training loss is {loss} in epoch {self.epoch} (diverged); "
                                    "lower train.lr or set train.grad_clip")
            evaluated = self.ema.module if self.ema is not None else self.model
            proba = predict_proba(evaluated, self.data.val_x, self.data.norm, self.device, self.cfg.batch_size * 2)
            val = score(metric, self.data.val_y, proba)
            if self.on_epoch is not None:
                self.on_epoch(self.epoch, val)
            if self.cfg.schedule == "plateau":
                self.scheduler.step(self.epoch, val)
            self.history.append({"epoch": self.epoch, "train_loss": loss, "train_acc": acc, "val_acc": score("accuracy", self.data.val_y, proba),
                                 f"val_{metric}": val, "lr": self.optimizer.param_groups[0]["lr"], "seconds": time.perf_counter() - t0})
            if is_better(metric, val, self.best):
                self.best, self.best_epoch, self.bad_epochs = val, self.epoch, 0
                self.save_best(evaluated)
            else:
                self.bad_epochs += 1
            self.save_last()
            if distributed.is_main():
                print(f"train: {self.desc} epoch {self.epoch}: loss {loss:.4f} acc {acc:.4f} val {metric} {val:.4f}")
        return {"epoch": self.best_epoch, "metric": self.best, "epochs_run": self.epoch, "history": self.history}


def _seed_worker(worker_id: int) -> None:
    """DataLoader workers: numpy, random and the augmentation pipeline follow torch's per-worker seed."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
    transform = torch.utils.data.get_worker_info().dataset.transform
    if transform is not None:
        transform.set_random_seed(seed)
