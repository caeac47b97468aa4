"""The classification track of the shared training loop (pipeline/training/loop.py): one (backbone, fold).

It plugs into the loop what is particular to classification: batches from the decoded-image array
(albumentations per image, a seeded batch order, each rank's share of one process's batches under torchrun), soft-target
cross-entropy (Mixup/CutMix, label smoothing, class weights), the lr schedule (cosine per update or
lower on plateau) and validation on the held-out fold. Other tasks (pipeline/scoring/tasks.py) bring their `Head`:
its loss (BCE on multi-hot tags, mse/huber/bce_scaled on numbers) and activation replace cross-entropy and
softmax; Mixup/CutMix then mix the dense targets as they mix the images. Resume, reseeding, history, best and early
stopping are the loop's.
"""

from __future__ import annotations

import copy
import random
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from timm.scheduler import CosineLRScheduler, PlateauLRScheduler
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate
from tqdm import tqdm

from pipeline.core.config import TrainConfig
from pipeline.core.errors import PipelineError
from pipeline.scoring.tasks import greater_is_better, score
from pipeline.training import distributed, loop, runtime
from pipeline.training.augment import mixer, train_transform
from pipeline.training.gpu_augment import DeviceAugment, choose_device
from pipeline.training.heads import Head
from pipeline.training.runtime import Runtime


class ArrayDataset(Dataset):
    """Rows of the decoded-image cache, augmented with albumentations, returned as uint8 CHW tensors.

    Indices are plain ints or (int, seed) pairs from EpochSampler: a batch of pairs reseeds the augmentation
    from its first pair's seed, so what a batch looks like is decided in the main process, not by the worker
    that happens to build it (and not by that worker's history).
    """

    def __init__(self, images: np.ndarray, targets: np.ndarray, transform=None):
        self.images, self.targets, self.transform = images, targets, transform

    def __len__(self) -> int:
        return len(self.images)

    @property
    def augments(self) -> bool:
        return self.transform is not None and bool(self.transform.transforms)

    def __getitem__(self, i):
        if isinstance(i, tuple):
            i, seed = i
            self._reseed(seed)
        img = np.array(self.images[i])
        if self.augments:
            img = self.transform(image=img)["image"]
        return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1), torch.as_tensor(self.targets[i])

    def _reseed(self, seed: int) -> None:
        """One numpy and one python generator shared by every transform of the pipeline: albumentations'
        set_random_seed gives each transform its own generator with the same seed, whose first draws then
        coincide (a flip with p=0.5 would always come with a crop with p=0.7)."""
        if self.augments:
            self.transform.set_random_state(np.random.default_rng(seed), random.Random(seed))

    def __getitems__(self, indices: list):
        """A whole batch in one read of the array (the DataLoader calls this instead of one item at a time)."""
        if indices and isinstance(indices[0], tuple):
            self._reseed(indices[0][1])
            indices = [i for i, _ in indices]
        if self.augments:
            return tuple(default_collate([self[i] for i in indices]))
        idx = np.asarray(indices)
        order = np.argsort(idx)  # sorted reads are sequential on a memmap
        batch = np.empty((len(idx), *self.images.shape[1:]), dtype=self.images.dtype)
        batch[order] = self.images[idx[order]]
        return (torch.from_numpy(batch).permute(0, 3, 1, 2),
                torch.as_tensor(np.asarray(self.targets)[idx]))


class EpochSampler(Sampler):
    """This rank's shuffled indices of one epoch, each paired with an augmentation seed; both follow from
    (seed, epoch, rank) alone, set in the main process and sent to the workers with every batch.

    torch seeds a worker once, when it starts; a persistent worker carries its generator's state from one
    epoch into the next, which a resumed run (fresh workers) cannot repeat, and the state depends on which
    worker built which batch. With the seeds in the indices, a batch is the same whoever builds it: any
    number of workers, persistent or not, and a resumed run give the batches of one uninterrupted process.
    Under torchrun every rank draws the one-process permutation and keeps its share
    (distributed.shard_order), so step i of all ranks together is one process's batch i.
    """

    def __init__(self, n: int, seed: int, rank: int = 0, world: int = 1, drop_last: bool = False):
        self.n, self.epoch_seed, self.rank, self.world, self.drop_last = n, seed, rank, world, drop_last

    def set_epoch(self, epoch: int, epoch_seed: int) -> None:
        self.epoch_seed = epoch_seed

    def __len__(self) -> int:
        return len(distributed.shard_order(range(self.n), self.rank, self.world, self.drop_last))

    def __iter__(self):
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.epoch_seed)).tolist()
        seeds = np.random.default_rng([self.epoch_seed % 2**63, self.rank]).integers(0, 2**63, self.n).tolist()
        mine = distributed.shard_order(list(zip(order, seeds, strict=True)), self.rank, self.world, self.drop_last)
        return iter(mine)


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


AUTO_BATCH_START = 1024  # train.batch_size=auto halves from here (or from the training rows when fewer)
AUTO_BATCH_CPU = 64  # and on the CPU, which has no device memory to fill, takes this


def auto_batch_size(model: torch.nn.Module, optimizer: torch.optim.Optimizer, data: FoldData, rt: Runtime,
                    say: Callable[[str], None] = print, steps: int = 2, trial: bool | None = None) -> int:
    """train.batch_size=auto: the largest batch whose training steps fit in GPU memory (runtime.find_batch_size).
    The steps are real (forward, backward, optimizer step: AdamW's state counts) and then undone: the model's
    and the optimizer's states are restored, so the run starts from the weights it would have started from.
    `trial` (default: on CUDA) runs the search; off it, the CPU default applies."""
    rows = len(data.train_x)
    if not (rt.device.type == "cuda" if trial is None else trial):
        batch = min(AUTO_BATCH_CPU, rows)
        say(f"train: batch_size auto: {batch} on the cpu (no GPU memory to fill)")
        return batch
    weights = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    state = copy.deepcopy(optimizer.state_dict())
    model.train()

    def try_batch(batch: int) -> None:
        idx = np.arange(batch) % rows
        x = rt.to_input(torch.from_numpy(np.array(data.train_x[idx])).permute(0, 3, 1, 2), data.norm)
        y = torch.as_tensor(np.asarray(data.train_y)[idx] % data.n_classes, device=rt.device)
        try:
            for _ in range(steps):
                with rt.autocasting():
                    loss = F.cross_entropy(model(x).float(), y)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        finally:
            optimizer.zero_grad(set_to_none=True)
            del x, y

    try:
        return runtime.find_batch_size(try_batch, min(AUTO_BATCH_START, rows), say)
    finally:
        model.load_state_dict(weights)
        optimizer.load_state_dict(state)


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
        self.device_augment = self._device_augment()
        dataset = ArrayDataset(self.data.train_x, self.data.train_y,
                               None if self.device_augment is not None else self.transform)
        drop_last = len(self.data.train_x) > cfg.batch_size * distributed.world_size()
        self.sampler = EpochSampler(len(dataset), self.seed, distributed.rank(), distributed.world_size(), drop_last)
        self.loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=self.sampler, drop_last=drop_last,
                                 collate_fn=collate, generator=torch.Generator().manual_seed(self.seed),
                                 **loader_options(rt))  # its own generator: the loader's draw of the workers'
        # base seed (once with persistent workers) must not move torch's global one, which the epochs reseed
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

    def _device_augment(self) -> DeviceAugment | None:
        """The preset batched on the training device (train.augment_device gpu, or auto when measured faster),
        else None (albumentations in the loader)."""
        cfg = self.cfg
        where = cfg.augment_device
        if where == "auto":
            where = "cpu"
            if self.runtime.device.type == "cuda" and cfg.augment != "none" and not cfg.transforms:
                where, line = choose_device(self._cpu_augment_img_s(), self.runtime.num_workers,
                                            self._gpu_train_img_s())
                distributed.say(f"train: {self.desc}: {line}")
        if where == "cpu" or cfg.augment == "none":
            return None
        if cfg.transforms:
            raise PipelineError("train.augment_device=gpu: train.transforms are albumentations transforms (per image, "
                                "cpu only); set train.augment_device=cpu or move them into a preset")
        return DeviceAugment(cfg.augment, cfg.image_size, cfg.hflip).to(self.runtime.device)

    def _cpu_augment_img_s(self, n: int = 64) -> float:
        """Images per second of the albumentations preset on one core (the main process), over n training images."""
        images = self.data.train_x[:n]
        t0 = time.perf_counter()
        for img in images:
            self.transform(image=np.array(img))
        return len(images) / max(time.perf_counter() - t0, 1e-9)

    def _gpu_train_img_s(self, steps: int = 3) -> float:
        """Images per second of forward + backward passes at the configured batch on the device, without
        augmentation, on a copy of the network (the model's weights and normalisation statistics stay as
        they are)."""
        rt, batch = self.runtime, min(self.cfg.batch_size, len(self.data.train_x))
        copied = copy.deepcopy(self.model).train()
        x = rt.to_input(torch.from_numpy(np.array(self.data.train_x[:batch])).permute(0, 3, 1, 2), self.data.norm)
        seconds = []
        for _ in range(steps + 1):  # the first is a warm-up: cudnn's algorithm search, the allocator
            t0 = time.perf_counter()
            with rt.autocasting():
                copied(x).float().mean().backward()
            if rt.device.type == "cuda":
                torch.cuda.synchronize(rt.device)
            seconds.append(time.perf_counter() - t0)
        return batch * steps / max(sum(seconds[1:]), 1e-9)

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


def loader_options(rt: Runtime) -> dict:
    """DataLoader keywords of the runtime's workers: persistent (started once per run, not per epoch; what a
    batch holds comes from EpochSampler, so their state does not matter), a few batches prefetched each,
    pinned batches on CUDA (copied with non_blocking=True by Runtime.to_input)."""
    workers = rt.num_workers
    if workers:
        # One OpenCV thread (albumentations' kernels), set here in the parent so that the forked workers inherit
        # it: the workers are the parallelism, and OpenCV's own pool (as many threads as cores) would oversubscribe
        # the cores. Calling cv2.setNumThreads in a forked worker hangs once the parent has used OpenCV's pool
        # (the child inherits a pool whose threads did not survive the fork). The parent does no augmentation
        # while it has workers.
        cv2.setNumThreads(1)
    return {"num_workers": workers, "persistent_workers": workers > 0, "prefetch_factor": 4 if workers else None,
            "pin_memory": rt.device.type == "cuda", "worker_init_fn": _init_worker if workers else None}


def _init_worker(worker_id: int) -> None:
    """numpy's and python's global generators follow torch's per-worker seed, for any transform that uses them
    (the pipeline's own are reseeded per batch by ArrayDataset). Threads: loader_options."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
