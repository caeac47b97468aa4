"""The training machinery both tracks share: optimizer updates, checkpoints, and the epoch loop.

A track (classification's trainer.Trainer, detection's detection.fit.DetectionTrainer) plugs in what
differs -- one training epoch and one evaluation, as timm splits train_one_epoch from validate --
and this module owns the rest, once:

- `Updater`: one optimizer update per `accumulate` backward passes (grad scaler for float16,
  clipping, step, EMA, per-update learning rate), and the state it needs to resume.
- `CheckpointSaver` (after timm's): `last.*` written atomically every epoch, `best` when the
  monitored metric improves; only the writing rank writes.
- `fit`: reseeds torch, numpy, random and the track's own generators from (seed, epoch) at the
  start of every epoch, resumes from `last`, keeps the history rows, prints one line per epoch,
  tracks the best epoch, stops early, and calls the per-epoch callback (Optuna's report-and-prune).

Because every epoch depends only on the state it starts from, which `last` stores, a run killed at
any point resumes from its last finished epoch and ends with the same weights and history as an
uninterrupted run (CPU).
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from timm.utils import ModelEmaV3

from pipeline.core.errors import DivergedError
from pipeline.training import checkpoint


class Updater:
    """Optimizer updates of one model: a step every `accumulate` backward passes (and on an epoch's last batch)."""

    STATE = ("optimizer", "scheduler", "scaler", "updates")

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler, *, per_update: bool = True,
                 accumulate: int = 1, grad_clip: float | None = None, ema_decay: float | None = None,
                 grad_scaler: bool = False):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler  # a timm scheduler
        self.per_update = per_update  # stepped here after every update; else by the track (e.g. on plateau)
        self.accumulate, self.grad_clip = accumulate, grad_clip
        self.ema = ModelEmaV3(model, decay=ema_decay) if ema_decay else None
        self.scaler = torch.amp.GradScaler("cuda", enabled=grad_scaler)
        self.updates = 0

    @staticmethod
    def per_epoch(batches: int, accumulate: int) -> int:
        """Updates in an epoch of `batches` batches: the last, partial group of batches steps too."""
        return max(1, -(-batches // accumulate))

    def start_epoch(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor, batch: int, batches: int) -> None:
        """Accumulate the gradient of batch `batch` (1-based) of `batches`; update when a group is complete."""
        self.scaler.scale(loss / self.accumulate).backward()
        if batch % self.accumulate == 0 or batch == batches:
            self.step()

    def step(self) -> None:
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.optimizer)
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.updates += 1
        if self.ema is not None:
            self.ema.update(self.model, step=self.updates)
        if self.per_update:
            self.scheduler.step_update(self.updates)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    @property
    def evaluated(self) -> torch.nn.Module:
        """The weights that are validated and kept as best: the EMA's when on."""
        return self.ema.module if self.ema is not None else self.model

    def tensors(self) -> dict[str, torch.Tensor]:
        out = checkpoint.prefixed("model", self.model)
        if self.ema is not None:
            out.update(checkpoint.prefixed("ema", self.ema.module))
        return out

    def _scheduler_state(self) -> dict:
        """timm's PlateauLRScheduler saves only the best metric, not torch's counters of bad epochs and cooldown
        (a resumed run would lower the lr later than an uninterrupted one): those are kept too."""
        state = self.scheduler.state_dict()
        plateau = getattr(self.scheduler, "lr_scheduler", None)
        return state | {"plateau": plateau.state_dict()} if plateau is not None else state

    def state(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self._scheduler_state(),
                "scaler": self.scaler.state_dict(), "updates": self.updates}

    def load(self, tensors: dict[str, torch.Tensor], state: dict) -> None:
        self.model.load_state_dict(checkpoint.unprefixed("model", tensors))
        if self.ema is not None:
            self.ema.module.load_state_dict(checkpoint.unprefixed("ema", tensors))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if "plateau" in state["scheduler"]:
            self.scheduler.lr_scheduler.load_state_dict(state["scheduler"]["plateau"])
        self.scaler.load_state_dict(state["scaler"])
        self.updates = state["updates"]


@dataclass
class CheckpointSaver:
    """`last.*` (resume state, atomic) and `best.safetensors` of one run folder; `writes` False on other ranks."""

    run_dir: Path
    fingerprint: str
    writes: bool = True

    def save_last(self, tensors: dict[str, torch.Tensor], state: dict, epoch: int) -> None:
        if self.writes:
            checkpoint.save_last(self.run_dir, tensors, state, epoch, self.fingerprint)

    def load_last(self, say: Callable[[str], None] = print) -> tuple[dict[str, torch.Tensor], dict] | None:
        return checkpoint.load_last(self.run_dir, self.fingerprint, say)

    def save_best(self, module: torch.nn.Module) -> None:
        if self.writes:
            checkpoint.save_weights(self.run_dir / "best.safetensors", module)


class Track(Protocol):
    """What a track plugs into `fit`."""

    updater: Updater

    def reseed(self, epoch: int, epoch_seed: int) -> None: ...  # the track's own generators (augmentation, batch order)

    def train_epoch(self, epoch: int) -> dict[str, float]: ...  # history columns, e.g. train_loss

    def validate(self) -> dict[str, float]: ...  # history columns of the evaluated weights

    def end_epoch(self, epoch: int, monitored: float | None) -> None: ...  # e.g. a plateau scheduler's step

    def describe(self, row: dict) -> str: ...  # the epoch's printed line, after "<label> epoch <n>: "


@dataclass
class Progress:
    """What the loop carries from epoch to epoch (stored in last.pt with the track's state)."""

    epoch: int = 0
    best: float | None = None
    best_epoch: int = 0
    bad_epochs: int = 0
    history: list[dict] = field(default_factory=list)


class TimeUp(Exception):
    """A time limit (`make auto`'s budget) came before the next epoch could finish. `last` holds the run as after
    its last epoch, so the same command with more time resumes it."""


_limit: dict[str, float | None] = {"deadline": None}  # time.time() by which a fit must stop; set by `time_limit`


@contextlib.contextmanager
def time_limit(deadline: float | None):
    """Every fit inside stops at the end of an epoch when the next one would end after `deadline` (raising TimeUp):
    a process-wide setting rather than a config key, since it changes when a run stops, not what it computes."""
    before = _limit["deadline"]
    _limit["deadline"] = deadline
    try:
        yield
    finally:
        _limit["deadline"] = before


def _time_is_up(label: str, epoch: int, next_epoch_seconds: float) -> None:
    deadline = _limit["deadline"]
    if deadline is not None and time.time() + next_epoch_seconds > deadline:
        when = f"stopped after epoch {epoch}" if epoch else "not started"
        raise TimeUp(f"{label.rstrip(':')}: {when}: the time limit comes before another epoch could end")


def reseed(epoch_seed: int) -> None:
    torch.manual_seed(epoch_seed)
    np.random.seed(epoch_seed % 2**32)
    random.seed(epoch_seed)


def _improved(value: float, best: float | None, greater_is_better: bool) -> bool:
    return best is None or (value > best if greater_is_better else value < best)


PROGRESS = ("epoch", "best", "best_epoch", "bad_epochs", "history")


def _resume(track: Track, saver: CheckpointSaver, label: str, say: Callable[[str], None]) -> Progress:
    """The progress stored in `last` (and the track's weights and optimizer loaded from it), or a fresh start."""
    found = saver.load_last(say)
    if found is None:
        return Progress()
    tensors, state = found
    missing = [k for k in (*Updater.STATE, *PROGRESS) if k not in state]
    if missing:  # written by an older version of this loop
        say(f"{label}: resume state lacks {missing}; training restarts from epoch 1")
        return Progress()
    track.updater.load(tensors, state)
    say(f"{label} resumes after epoch {state['epoch']}")
    return Progress(*(state[k] for k in PROGRESS))


def fit(track: Track, saver: CheckpointSaver, *, epochs: int, seed: int, label: str, monitor: str | None = None,
        greater_is_better: bool = True, early_stopping: int | None = None,
        on_epoch: Callable[[int, float], None] | None = None, say: Callable[[str], None] = print,
        diverged_fix: str = "lower the learning rate") -> Progress:
    """Train `track` to `epochs` (or until `early_stopping` epochs without a better `monitor`), resuming from
    `last` when it belongs to this run. `monitor` names the history column that picks `best`; None keeps no best.
    `say` prints (a no-op on the ranks that do not print). A non-finite training loss raises DivergedError
    (with `diverged_fix` as the advice) before the epoch is validated or saved: the predictions of NaN weights
    would otherwise score like any others, and `last` keeps the epoch before it."""
    progress = _resume(track, saver, label, say)
    last_seconds = 0.0
    while progress.epoch < epochs and not (early_stopping and progress.bad_epochs >= early_stopping):
        _time_is_up(label, progress.epoch, last_seconds)
        progress.epoch += 1
        epoch_seed = seed * 1000 + progress.epoch
        reseed(epoch_seed)
        track.reseed(progress.epoch, epoch_seed)
        t0 = time.perf_counter()
        row = {"epoch": progress.epoch, **track.train_epoch(progress.epoch)}
        loss = row.get("train_loss")
        if loss is not None and not math.isfinite(loss):
            raise DivergedError(f"{label.rstrip(':')}: the training loss is {loss} in epoch {progress.epoch} "
                                f"(diverged); {diverged_fix}")
        row |= track.validate()
        value = row[monitor] if monitor else None
        if on_epoch is not None and value is not None:
            on_epoch(progress.epoch, value)
        track.end_epoch(progress.epoch, value)
        last_seconds = time.perf_counter() - t0
        row |= {"lr": track.updater.lr, "seconds": last_seconds}
        progress.history.append(row)
        if value is not None:
            if _improved(value, progress.best, greater_is_better):
                progress.best, progress.best_epoch, progress.bad_epochs = value, progress.epoch, 0
                saver.save_best(track.updater.evaluated)
            else:
                progress.bad_epochs += 1
        state = {**track.updater.state(), "best": progress.best, "best_epoch": progress.best_epoch,
                 "bad_epochs": progress.bad_epochs, "history": progress.history}
        saver.save_last(track.updater.tensors(), state, progress.epoch)
        say(f"{label} epoch {progress.epoch}: {track.describe(row)}")
    return progress
