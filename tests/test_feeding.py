"""Feeding the accelerator: loader workers, GPU-side augmentation, the batch-size finder, memory records."""

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pipeline import runtime
from pipeline.config import TrainConfig
from pipeline.engine import FoldData, Trainer
from pipeline.runtime import Runtime


def _trainer(run_dir: Path, workers: int, n: int = 24, **cfg) -> Trainer:
    """A linear classifier on n 8x8 RGB images with the light preset: augmentation draws in every batch."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(8 * 8 * 3, 2))
    x = np.random.default_rng(0).integers(0, 255, (n, 8, 8, 3), dtype=np.uint8)
    y = np.arange(n) % 2
    data = FoldData(x, y, x[:6], y[:6], 2, {"mean": [0.5] * 3, "std": [0.25] * 3}, "accuracy")
    tcfg = TrainConfig(augment="light", image_size=8, **{"batch_size": 4, "epochs": 3, "warmup_epochs": 0, **cfg})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return Trainer(model, optimizer, tcfg, data, run_dir, "fp", Runtime(num_workers=workers), 0)


def test_persistent_workers_resume_bit_exact_and_match_the_main_process(tmp_path: Path, monkeypatch):
    """Two persistent workers, killed after epoch 1 and resumed (fresh workers), end with the weights of an
    uninterrupted run, which are also the weights of a run without workers: a batch's augmentation is decided
    in the main process, not by the worker's history."""
    straight = _trainer(tmp_path / "straight", workers=2)
    iterators = []
    straight.on_epoch = lambda epoch, value: iterators.append(straight.loader._iterator)
    straight.fit()
    assert straight.loader.persistent_workers and len(iterators) == 3 and len({id(i) for i in iterators}) == 1
    interrupted = _trainer(tmp_path / "resumed", workers=2)
    original = Trainer.train_epoch

    def die_in_epoch_2(self, epoch):
        if epoch == 2:
            raise KeyboardInterrupt
        return original(self, epoch)

    monkeypatch.setattr(Trainer, "train_epoch", die_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        interrupted.fit()
    monkeypatch.setattr(Trainer, "train_epoch", original)
    resumed = _trainer(tmp_path / "resumed", workers=2)
    resumed.fit()
    main_process = _trainer(tmp_path / "main", workers=0)
    main_process.fit()
    weights = [load_file(str(tmp_path / d / "last.safetensors")) for d in ("straight", "resumed", "main")]
    assert all(torch.equal(weights[0][k], w[k]) for w in weights[1:] for k in weights[0])
    losses = [[r["train_loss"] for r in t.history] for t in (straight, resumed, main_process)]
    assert losses[0] == losses[1] == losses[2] and len(set(losses[0])) == 3


def test_augmentation_differs_between_batches_and_epochs_but_not_between_runs(tmp_path: Path):
    """The per-batch seeds still give every batch and every epoch its own draws."""
    trainer = _trainer(tmp_path, workers=0)
    epochs = []
    for epoch in (1, 2, 1):
        trainer.sampler.set_epoch(epoch, 1000 + epoch)
        epochs.append([x.clone() for x, _ in trainer.loader])
    raw = torch.from_numpy(trainer.data.train_x).permute(0, 3, 1, 2)
    first = torch.cat(epochs[0])
    assert not any(torch.equal(a, b) for a, b in zip(epochs[0], epochs[1], strict=True))
    assert all(torch.equal(a, b) for a, b in zip(epochs[0], epochs[2], strict=True))
    assert sorted(first.sum((1, 2, 3)).tolist()) != sorted(raw.sum((1, 2, 3)).tolist())  # augmented


def test_auto_workers_follow_the_cores_per_gpu(monkeypatch):
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: set(range(16)))
    cuda = torch.device("cuda", 0)
    assert runtime.loader_workers("auto", cuda) == 8  # 15 cores free, capped
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert runtime.loader_workers("auto", cuda) == 3  # 4 cores per GPU, one of them trains
    assert runtime.loader_workers("auto", torch.device("cpu")) == 0
    assert runtime.loader_workers(5, torch.device("cpu")) == 5
