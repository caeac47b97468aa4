"""The training machinery shared by both tracks: reductions, schedules, resume state, devices, errors."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from pipeline import checkpoint, distributed, tune
from pipeline.cli import main
from pipeline.config import TrainConfig, load_config
from pipeline.context import Context
from pipeline.detection.bananas import build_bananas
from pipeline.engine import FoldData, Trainer
from pipeline.runtime import Runtime


def _linear_trainer(run_dir: Path, n: int = 6, **cfg) -> Trainer:
    """A 12-input linear classifier on n rows of 2x2x3 images: fast enough to count updates and lrs."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 2))
    x = np.random.default_rng(0).integers(0, 255, (n, 2, 2, 3), dtype=np.uint8)
    y = np.arange(n) % 2
    data = FoldData(x, y, x, y, 2, {"mean": [0.5] * 3, "std": [0.25] * 3}, "accuracy")
    tcfg = TrainConfig(augment="none", **{"batch_size": 2, "epochs": 2, **cfg})
    return Trainer(model, torch.optim.SGD(model.parameters(), lr=tcfg.lr), tcfg, data, run_dir, "fp", Runtime(), 0)


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
