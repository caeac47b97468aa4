"""The training machinery shared by both tracks: reductions, schedules, resume state, devices, errors."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from pipeline import checkpoint, distributed, tune
from pipeline.cli import main
from pipeline.config import TrainConfig, load_config
from pipeline.context import Context
from pipeline.detection.bananas import build_bananas
from pipeline.engine import FoldData, Trainer, predict_proba
from pipeline.metrics import score
from pipeline.runtime import Runtime


class Stalled(torch.nn.Module):
    """A frozen linear classifier plus one trainable shift of all logits: the loss has a gradient path (zero),
    the predictions never change, so the val metric stalls at its first value whatever the lr."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(12, 2).requires_grad_(False)
        self.shift = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return self.linear(x.flatten(1)) + self.shift


def _linear_trainer(run_dir: Path, n: int = 6, model: torch.nn.Module | None = None, **cfg) -> Trainer:
    """A 12-input linear classifier on n rows of 2x2x3 images: fast enough to count updates and lrs."""
    torch.manual_seed(0)
    model = model or torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 2))
    x = np.random.default_rng(0).integers(0, 255, (n, 2, 2, 3), dtype=np.uint8)
    y = np.arange(n) % 2
    data = FoldData(x, y, x, y, 2, {"mean": [0.5] * 3, "std": [0.25] * 3}, "accuracy")
    tcfg = TrainConfig(augment="none", **{"batch_size": 2, "epochs": 2, "warmup_epochs": 0, **cfg})
    optimizer = torch.optim.SGD(model.parameters(), lr=tcfg.lr, momentum=tcfg.momentum)
    return Trainer(model, optimizer, tcfg, data, run_dir, "fp", Runtime(), 0)


def test_sum_across_reduces_on_the_device_the_backend_needs(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert distributed.reduction_device("nccl") == torch.device("cuda", 1)  # NCCL refuses CPU tensors
    assert distributed.reduction_device("gloo") == torch.device("cpu")
    asked, reduced = [], []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda: "nccl")
    monkeypatch.setattr(distributed, "reduction_device", lambda backend: asked.append(backend) or torch.device("cpu"))
    monkeypatch.setattr(dist, "all_reduce", lambda t: reduced.append(t.device) or t.mul_(2))
    assert distributed.sum_across([1.0, 2.5]) == [2.0, 5.0]
    assert asked == ["nccl"] and reduced == [torch.device("cpu")]


def test_cosine_schedule_plans_the_updates_the_loop_makes_with_accumulation(tmp_path: Path):
    """6 rows, batches of 2, accumulate 2: 3 batches -> 2 updates per epoch (the last group has one batch)."""
    trainer = _linear_trainer(tmp_path, accumulate=2, warmup_epochs=0, lr=0.1, min_lr=0.001)
    trainer.fit()
    assert trainer.updates == 4 and trainer.scheduler.t_initial == 4
    lrs = [row["lr"] for row in trainer.history]
    assert lrs[0] == pytest.approx((0.1 + 0.001) / 2)  # half way down the cosine after 2 of 4 updates
    assert lrs[1] == pytest.approx(0.001)


@pytest.mark.parametrize("rows, accumulate, updates", [(10, 3, 2), (14, 3, 3), (8, 2, 2)])
def test_accumulation_makes_one_update_per_group_of_batches(tmp_path: Path, rows: int, accumulate: int, updates: int):
    """rows / 2 batches of 2 (the last dropped when short): ceil(batches / accumulate) optimizer steps per epoch."""
    trainer = _linear_trainer(tmp_path, n=rows, accumulate=accumulate, epochs=1)
    steps = []
    step = trainer.optimizer.step
    trainer.optimizer.step = lambda *a, **k: steps.append(1) or step(*a, **k)
    trainer.fit()
    assert len(steps) == updates == trainer.updates


def test_plateau_lowers_the_lr_by_its_factor_after_patience_and_resumes_exactly(tmp_path: Path, monkeypatch):
    opts = {"epochs": 6, "schedule": "plateau", "plateau_patience": 1, "plateau_factor": 0.5, "lr": 0.1, "momentum": 0.0}
    straight = _linear_trainer(tmp_path / "a", model=Stalled(), **opts)
    straight.fit()
    assert [r["val_accuracy"] for r in straight.history] == [straight.history[0]["val_accuracy"]] * 6  # stalled
    assert [r["lr"] for r in straight.history] == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025, 0.025])
    interrupted = _linear_trainer(tmp_path / "b", model=Stalled(), **opts)
    original = Trainer.train_epoch

    def die_in_epoch_5(self, epoch):
        if epoch == 5:
            raise KeyboardInterrupt
        return original(self, epoch)

    monkeypatch.setattr(Trainer, "train_epoch", die_in_epoch_5)
    with pytest.raises(KeyboardInterrupt):
        interrupted.fit()
    monkeypatch.setattr(Trainer, "train_epoch", original)
    resumed = _linear_trainer(tmp_path / "b", model=Stalled(), **opts)
    resumed.fit()  # one bad epoch was counted before the kill: the lr still drops at epoch 5
    assert [r["lr"] for r in resumed.history] == [r["lr"] for r in straight.history]


def test_early_stopping_ends_the_run_after_that_many_epochs_without_improvement(tmp_path: Path):
    trainer = _linear_trainer(tmp_path, model=Stalled(), epochs=10, early_stopping=2, lr=0.1)
    result = trainer.fit()
    assert result["epochs_run"] == 3 and len(result["history"]) == 3 and result["epoch"] == 1


def test_with_ema_the_best_checkpoint_holds_the_ema_weights_it_scored(tmp_path: Path):
    trainer = _linear_trainer(tmp_path, epochs=1, lr=0.5, ema=True, ema_decay=0.9)
    trainer.fit()
    best = load_file(str(tmp_path / "best.safetensors"))
    ema, raw = trainer.updater.ema.module.state_dict(), trainer.model.state_dict()
    assert all(torch.equal(best[k], ema[k]) for k in ema)
    assert not torch.allclose(best["1.weight"], raw["1.weight"], atol=1e-3)
    proba = predict_proba(trainer.updater.ema.module, trainer.data.val_x, trainer.data.norm, Runtime(), 4)
    assert trainer.history[0]["val_accuracy"] == score("accuracy", trainer.data.val_y, proba)


def test_mixing_stops_at_mix_off_epoch(tmp_path: Path):
    trainer = _linear_trainer(tmp_path, epochs=3, mixup_alpha=0.4, mix_off_epoch=2)
    calls, per_epoch = [], []
    mix = trainer.mix
    trainer.mix = lambda x, y: calls.append(len(y)) or mix(x, y)
    trainer.on_epoch = lambda epoch, value: per_epoch.append(len(calls))
    trainer.fit()
    assert per_epoch == [3, 3, 3]  # 3 batches mixed in epoch 1, none from epoch 2 on


@pytest.mark.parametrize("clip", [None, 0.01])
def test_gradient_clipping_bounds_the_norm_of_every_update(tmp_path: Path, clip):
    trainer = _linear_trainer(tmp_path, epochs=1, lr=0.1, grad_clip=clip)
    norms = []
    step = trainer.optimizer.step

    def record(*a, **k):
        norms.append(float(torch.nn.utils.get_total_norm([p.grad for p in trainer.model.parameters()])))
        return step(*a, **k)

    trainer.optimizer.step = record
    trainer.fit()
    assert len(norms) == 3
    if clip:
        assert max(norms) == pytest.approx(clip, rel=1e-5)
    else:
        assert min(norms) > 0.1  # what the clipped run bounds


@pytest.mark.parametrize("broken", ["last.pt", "last.safetensors"])
def test_a_truncated_resume_file_restarts_the_run_with_one_line(tmp_path: Path, broken: str, capsys):
    trainer = _linear_trainer(tmp_path)
    trainer.fit()
    path = tmp_path / broken
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    capsys.readouterr()
    assert checkpoint.load_last(tmp_path, "fp") is None
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and "resume state" in lines[0] and "unreadable" in lines[0] and "restarts" in lines[0]
    again = _linear_trainer(tmp_path)
    again.fit()  # restarts from epoch 1 and ends where an uninterrupted run ends
    assert again.history[0]["epoch"] == 1 and [r["train_loss"] for r in again.history] == [r["train_loss"] for r in trainer.history]
    assert checkpoint.load_last(tmp_path, "fp") is not None  # the first epoch rewrote it


def test_out_of_memory_in_a_trial_keeps_its_traceback(comp_dir: Path, tmp_path: Path):
    space = tmp_path / "space.yaml"
    space.write_text("train.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}\n")
    ctx = Context(load_config(None, [f"tune.space={space}"]), comp_dir, tmp_path / "work")

    def oom(cfg, report):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    study = tune.optuna.create_study()
    with pytest.raises(RuntimeError, match="out of memory") as err:
        tune.objective(ctx, tune.load_space(space), oom)(study.ask())
    assert isinstance(err.value.__cause__, torch.OutOfMemoryError) and err.value.__cause__.__traceback__ is not None


def test_a_missing_cuda_device_names_the_key_the_user_set(tmp_path: Path, monkeypatch, capsys):
    data = build_bananas(tmp_path / "bananas", n_train=4, n_val=2, n_test=2, seed=0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["detect", "--data", str(data), "--work", str(tmp_path / "w"), "runtime.device=cuda"]) == 2
    err = capsys.readouterr().err
    assert "runtime.device=cuda but no CUDA device" in err and "train.device" not in err
