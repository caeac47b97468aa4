"""The training machinery shared by both tracks: reductions, schedules, resume state, devices, errors."""

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from pipeline import orchestrate
from pipeline.cli import main
from pipeline.context import Context
from pipeline.core.config import TrainConfig, load_config
from pipeline.detection.bananas import build_bananas
from pipeline.detection.fit import ssd_loss
from pipeline.scoring.metrics import score
from pipeline.stages import tune
from pipeline.training import checkpoint, distributed, runtime, tuning
from pipeline.training.feeding import predict_proba
from pipeline.training.inference import view_logits
from pipeline.training.runtime import Runtime
from pipeline.training.trainer import FoldData, Trainer

from .conftest import REPO, interrupt_in_epoch, kill_after_epoch


class Stalled(torch.nn.Module):
    """A frozen linear classifier plus one trainable shift of all logits: the loss has a gradient path (zero),
    the predictions never change, so the val metric stalls at its first value whatever the lr."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(12, 2).requires_grad_(False)
        self.shift = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return self.linear(x.flatten(1)) + self.shift


def _linear_trainer(run_dir: Path, n: int = 6, model: torch.nn.Module | None = None, rt: Runtime | None = None,
                    **cfg) -> Trainer:
    """A 12-input linear classifier on n rows of 2x2x3 images: fast enough to count updates and lrs."""
    torch.manual_seed(0)
    model = model or torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 2))
    x = np.random.default_rng(0).integers(0, 255, (n, 2, 2, 3), dtype=np.uint8)
    y = np.arange(n) % 2
    data = FoldData(x, y, x, y, 2, {"mean": [0.5] * 3, "std": [0.25] * 3}, "accuracy")
    tcfg = TrainConfig(augment="none", **{"batch_size": 2, "epochs": 2, "warmup_epochs": 0, **cfg})
    optimizer = torch.optim.SGD(model.parameters(), lr=tcfg.lr, momentum=tcfg.momentum)
    return Trainer(model, optimizer, tcfg, data, run_dir, "fp", rt or Runtime(), 0)


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
    opts = {"epochs": 6, "schedule": "plateau", "plateau_patience": 1, "plateau_factor": 0.5, "lr": 0.1,
            "momentum": 0.0}
    straight = _linear_trainer(tmp_path / "a", model=Stalled(), **opts)
    straight.fit()
    assert [r["val_accuracy"] for r in straight.history] == [straight.history[0]["val_accuracy"]] * 6  # stalled
    assert [r["lr"] for r in straight.history] == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025, 0.025])
    interrupted = _linear_trainer(tmp_path / "b", model=Stalled(), **opts)
    interrupt_in_epoch(monkeypatch, Trainer, 5, interrupted.fit)
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
    assert again.history[0]["epoch"] == 1
    assert [r["train_loss"] for r in again.history] == [r["train_loss"] for r in trainer.history]
    assert checkpoint.load_last(tmp_path, "fp") is not None  # the first epoch rewrote it


@pytest.mark.parametrize("killed", ["before the commit", "after the commit"])
def test_a_kill_between_the_checkpoint_writes_resumes_from_the_last_committed_epoch(tmp_path: Path, killed: str,
                                                                                    monkeypatch):
    """The tensors and last.pt cannot be replaced together: a kill after the tensors' write resumes from the epoch
    before (not from scratch), a kill after last.pt's from the new epoch; the next save settles what was left."""
    tensors = {e: {"w": torch.full((3,), float(e))} for e in (1, 2, 3)}
    checkpoint.save_last(tmp_path, tensors[1], {"h": 1}, 1, "fp")

    class Killed(Exception):
        pass

    def kill(*_args, **_kwargs):
        raise Killed

    with monkeypatch.context() as patch:
        if killed == "before the commit":
            patch.setattr(checkpoint, "_torch_save", kill)
        else:
            patch.setattr(checkpoint, "_promote", kill)
        with pytest.raises(Killed):
            checkpoint.save_last(tmp_path, tensors[2], {"h": 2}, 2, "fp")
    assert (tmp_path / "last.next.safetensors").exists()
    resumed = 1 if killed == "before the commit" else 2
    found, state = checkpoint.load_last(tmp_path, "fp")
    assert state["epoch"] == state["h"] == resumed and found["w"].tolist() == [float(resumed)] * 3
    checkpoint.save_last(tmp_path, tensors[3], {"h": 3}, 3, "fp")
    assert not (tmp_path / "last.next.safetensors").exists()
    found, state = checkpoint.load_last(tmp_path, "fp")
    assert state["epoch"] == 3 and found["w"].tolist() == [3.0] * 3


def test_out_of_memory_in_a_trial_keeps_its_traceback(comp_dir: Path, tmp_path: Path):
    space = tmp_path / "space.yaml"
    space.write_text("train.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}\n")
    ctx = Context(load_config(None, [f"tune.space={space}"]), comp_dir, tmp_path / "work")

    def oom(cfg, report):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    study = optuna.create_study()
    with pytest.raises(tuning.TrialFailed, match="out of memory") as err:
        tune.objective(ctx, tuning.load_space(space), oom)(study.ask())
    assert isinstance(err.value.__cause__, torch.OutOfMemoryError) and err.value.__cause__.__traceback__ is not None


def test_a_missing_cuda_device_names_the_key_the_user_set(tmp_path: Path, monkeypatch, capsys):
    data = build_bananas(tmp_path / "bananas", n_train=4, n_val=2, n_test=2, seed=0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["detect", "--data", str(data), "--work", str(tmp_path / "w"), "runtime.device=cuda"]) == 2
    err = capsys.readouterr().err
    assert "runtime.device=cuda but no CUDA device" in err and "train.device" not in err


def test_runtime_policy_on_cuda_is_bf16_autocast_and_channels_last_for_both_tracks():
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert runtime.decide(cuda, True, "bfloat16", None, "classification") == (True, torch.bfloat16, True)
    assert runtime.decide(cuda, True, "float16", None, "detection") == (True, torch.float16, True)
    assert runtime.decide(cuda, False, "bfloat16", False, "classification") == (False, torch.bfloat16, False)
    # amp applies on cuda only
    assert runtime.decide(cpu, True, "bfloat16", None, "classification") == (False, torch.bfloat16, False)
    assert runtime.decide(cpu, True, "bfloat16", None, "detection") == (False, torch.bfloat16, True)


def test_training_and_prediction_resolve_the_same_runtime(monkeypatch):
    """train.py, predict.py and detect.py all call runtime.from_config; on a (faked) GPU it autocasts."""
    monkeypatch.setattr(runtime, "pick_device", lambda name, key: torch.device("cuda", 0))
    rt = runtime.from_config(load_config().runtime, "classification")
    decided = (rt.device.type, rt.autocast, rt.amp_dtype, rt.channels_last, rt.grad_scaler)
    assert decided == ("cuda", True, torch.bfloat16, True, False)
    fp16 = runtime.from_config(load_config(None, ["runtime.amp_dtype=float16"]).runtime, "detection")
    assert fp16.grad_scaler and fp16.channels_last


class Probe(torch.nn.Module):
    """Records, per forward pass, whether autocast is on and the input's memory format."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 2, 1)
        self.seen = []

    def forward(self, x):
        self.seen.append((torch.is_autocast_enabled("cpu"), x.is_contiguous(memory_format=torch.channels_last)))
        return self.conv(x).mean((2, 3))


@pytest.mark.parametrize("autocast, channels_last", [(True, True), (False, False)])
def test_prediction_and_validation_run_under_the_runtime_policy(autocast: bool, channels_last: bool):
    """The CPU stands in for CUDA: the predict stage's TTA pass and the validation pass use what the Runtime says."""
    rt = Runtime(torch.device("cpu"), autocast=autocast, amp_dtype=torch.bfloat16, channels_last=channels_last)
    images = np.random.default_rng(0).integers(0, 255, (5, 4, 4, 3), dtype=np.uint8)
    norm = {"mean": [0.5] * 3, "std": [0.25] * 3}
    model = Probe()
    view_logits(model, images, ["identity", "hflip"], rt, norm, batch_size=2, seed=0)
    predict_proba(model, images, norm, rt, 2)
    assert len(model.seen) == 6 and {a for a, _ in model.seen} == {autocast}
    if channels_last:  # else the layout as it comes (uint8 NHWC permuted to NCHW is channels-last strided already)
        assert all(cl for _, cl in model.seen)


def test_ssd_loss_on_a_hand_computed_case():
    """1 positive anchor, ratio 3: the 3 highest-loss of 5 negatives count, L1 over the positive's 4 offsets,
    all divided by 1 positive."""
    z = torch.tensor([3.0, 2.0, 1.0, 0.0, -1.0])  # negatives' foreground logits; CE of background = log(1 + e^z)
    cls_preds = torch.zeros(1, 6, 2)
    cls_preds[0, 1:, 1] = z  # anchor 0 (positive, class 1) has logits [0, 0]: CE = log 2
    cls_labels = torch.tensor([[1, 0, 0, 0, 0, 0]])
    bbox_preds = torch.full((1, 24), 5.0)
    bbox_preds[0, :4] = torch.tensor([0.1, -0.2, 0.3, -0.4])
    bbox_labels = torch.zeros(1, 24)
    masks = torch.zeros(1, 24)
    masks[0, :4] = 1
    expected = math.log(2) + math.log(1 + math.e**3) + math.log(1 + math.e**2) + math.log(1 + math.e) + 1.0
    loss = ssd_loss(cls_preds, cls_labels, bbox_preds, bbox_labels, masks, negative_ratio=3)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    two = math.log(2) + math.log(1 + math.e**3) + math.log(1 + math.e**2) + 1.0  # ratio 2: two negatives
    loss = ssd_loss(cls_preds, cls_labels, bbox_preds, bbox_labels, masks, negative_ratio=2)
    assert loss.item() == pytest.approx(two, rel=1e-6)


def _detect_cmd(data: Path, work: Path) -> list[str]:
    return [sys.executable, "-m", "pipeline", "detect", "--data", str(data), "--work", str(work),
            "--submissions", str(work / "subs"),
            "detect.folds.n_splits=1",
            "detect.train.image_size=64", "detect.train.epochs=4", "detect.train.batch_size=8",
            "detect.predict.gallery_images=0"]


@pytest.mark.slow
def test_a_detection_run_killed_mid_epoch_resumes_to_the_same_weights(tmp_path: Path):
    data = build_bananas(tmp_path / "bananas", n_train=96, n_val=8, n_test=4, seed=2)
    subprocess.run(_detect_cmd(data, tmp_path / "straight"), check=True, capture_output=True, cwd=REPO, timeout=600)
    out = tmp_path / "killed" / "detect"
    kill_after_epoch(_detect_cmd(data, tmp_path / "killed"), out / "last.pt")
    assert not (out / "model.safetensors").exists()
    res = subprocess.run(_detect_cmd(data, tmp_path / "killed"), check=True, capture_output=True, text=True, cwd=REPO,
                         timeout=600)
    assert "detect: resumes after epoch 2" in res.stdout or "detect: resumes after epoch 3" in res.stdout
    straight = tmp_path / "straight" / "detect"
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    cols = ["epoch", "train_loss", "train_class_err", "train_bbox_mae", "val_class_err", "map_50"]
    pd.testing.assert_frame_equal(pd.read_csv(straight / "history.csv")[cols], pd.read_csv(out / "history.csv")[cols])


def test_validation_batches_hold_batch_size_times_eval_batch_factor(tmp_path: Path):
    class Sizes(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear, self.eval_batches = torch.nn.Linear(12, 2), []

        def forward(self, x):
            if not self.training:
                self.eval_batches.append(len(x))
            return self.linear(x.flatten(1))

    model = Sizes()
    _linear_trainer(tmp_path, n=14, model=model, rt=Runtime(eval_batch_factor=3), epochs=1).fit()
    assert model.eval_batches == [6, 6, 2]  # batch_size 2 x 3
    assert load_config(None, ["runtime.eval_batch_factor=3"]).runtime.eval_batch_factor == 3


def test_the_orchestrator_chains_upstream_stages_once_each():
    assert orchestrate.chain("ensemble") == ["clean", "folds", "train", "predict", "rounds", "ensemble"]
    assert orchestrate.chain("tune") == ["clean", "folds", "tune"] and orchestrate.chain("detect") == ["detect"]
    assert set(orchestrate.STAGES) == set(orchestrate.UPSTREAM)


def test_the_orchestrator_merges_tuned_parameters_except_for_tune(comp_dir: Path, tmp_path: Path, capsys):
    (tmp_path / "w" / "tune").mkdir(parents=True)
    (tmp_path / "w" / "tune" / "best.yaml").write_text("train:\n  lr: 0.0123\n")
    assert orchestrate.context("train", None, [], comp_dir, tmp_path / "w").cfg.train.lr == 0.0123
    assert "using tuned parameters" in capsys.readouterr().out
    assert orchestrate.context("train", None, [], comp_dir, tmp_path / "w", use_tuned=False).cfg.train.lr == 1e-3
    assert orchestrate.context("tune", None, [], comp_dir, tmp_path / "w").cfg.train.lr == 1e-3
    overridden = orchestrate.context("train", None, ["train.lr=0.5"], comp_dir, tmp_path / "w")
    assert overridden.cfg.train.lr == 0.5  # overrides come after the tuned parameters


def _finished_run(run_dir: Path, weights: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    from pipeline.core.artifacts import write_stamp

    run_dir.mkdir(parents=True)
    save_file(weights, str(run_dir / "best.safetensors"))
    write_stamp(run_dir / "best.json", "fp", folds_hash="h", classes=["a", "b"], backbone="d2l_lenet", in_chans=1,
                drop_rate=0.0)


def test_load_checkpoint_names_damaged_or_foreign_weights_and_keeps_code_errors(tmp_path, monkeypatch):
    from pipeline.core.errors import PipelineError
    from pipeline.training.models import build_model

    good = build_model("d2l_lenet", 2, 1).state_dict()
    _finished_run(tmp_path / "ok", good)
    model, meta = checkpoint.load_checkpoint(tmp_path / "ok", "h", ["a", "b"])
    assert meta["backbone"] == "d2l_lenet" and torch.equal(model.state_dict()["0.weight"], good["0.weight"])

    _finished_run(tmp_path / "truncated", good)
    path = tmp_path / "truncated" / "best.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(PipelineError, match=r"best.safetensors: unreadable .* rerun `make train`"):
        checkpoint.load_checkpoint(tmp_path / "truncated", "h", ["a", "b"])

    _finished_run(tmp_path / "foreign", build_model("d2l_lenet", 3, 1).state_dict())  # a 3-class head
    with pytest.raises(PipelineError, match=r"not this model's weights \(0 tensors missing, 2 unexpected"):
        checkpoint.load_checkpoint(tmp_path / "foreign", "h", ["a", "b"])

    def bug(*args, **kwargs):
        raise KeyError("a bug in our own code")

    monkeypatch.setattr(checkpoint, "load_file", bug)  # a code error is not "delete the run folder"
    with pytest.raises(KeyError, match="a bug in our own code"):
        checkpoint.load_checkpoint(tmp_path / "ok", "h", ["a", "b"])
