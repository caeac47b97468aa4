"""Training engine: resume, fine-tuning, frozen stages, head lr, Mixup/CutMix, class weights, course nets."""

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline import orchestrate
from pipeline.context import Context
from pipeline.core.config import TrainConfig, load_config
from pipeline.core.errors import PipelineError
from pipeline.data.digits import build_digits
from pipeline.training.augment import mixer, train_transform
from pipeline.training.classic import CLASSIC
from pipeline.training.losses import class_weights, soft_cross_entropy
from pipeline.training.models import (
    build_model,
    freeze,
    head_parameter_names,
    load_pretrained,
    make_optimizer,
    param_groups,
)
from pipeline.training.runtime import Runtime
from pipeline.training.trainer import FoldData, Trainer

from .conftest import REPO, kill_after_epoch

TINY = ["folds.n_splits=2", "train.folds=[0]", "train.image_size=16", "train.batch_size=16",
        "model.backbones=[resnet10t]"]


def _train_cmd(data: Path, work: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pipeline", "train", "--data", str(data),
            "--config", str(REPO / "configs" / "digits.yaml"), "--work", str(work), *TINY, *extra]


@pytest.mark.slow
def test_a_run_killed_mid_epoch_resumes_to_the_same_weights(small_digits: Path, tmp_path: Path):
    epochs = "train.epochs=5"
    subprocess.run(_train_cmd(small_digits, tmp_path / "straight", epochs), check=True, capture_output=True, cwd=REPO,
                   timeout=600)
    run = tmp_path / "killed" / "runs" / "resnet10t" / "fold0"
    kill_after_epoch(_train_cmd(small_digits, tmp_path / "killed", epochs), run / "last.pt")
    assert not (run / "best.json").exists()
    out = subprocess.run(_train_cmd(small_digits, tmp_path / "killed", epochs), check=True, capture_output=True,
                         text=True, cwd=REPO, timeout=600)
    assert "resumes after epoch" in out.stdout
    straight_dir = tmp_path / "straight" / "runs" / "resnet10t" / "fold0"
    for name in ("best.safetensors", "last.safetensors"):
        a, b = load_file(str(straight_dir / name)), load_file(str(run / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    cols = ["epoch", "train_loss", "train_acc", "val_accuracy"]
    pd.testing.assert_frame_equal(pd.read_csv(straight_dir / "history.csv")[cols],
                                  pd.read_csv(run / "history.csv")[cols])


@pytest.mark.slow
def test_fine_tuning_from_a_file_trained_on_another_competition(tmp_path: Path):
    """Train on digits 0-4 ("pretraining"), fine-tune on digits 5-9: body weights arrive, the head is new."""
    full = build_digits(tmp_path / "all", limit=300)
    frames = {name: pd.read_csv(full / name) for name in ("train.csv", "test.csv")}
    solution = pd.read_csv(full.parent / "all_solution.csv")
    for part, keep in (("low", lambda y: y < 5), ("high", lambda y: y >= 5)):
        out = tmp_path / part
        out.mkdir()
        shutil.copytree(full / "images", out / "images")
        frames["train.csv"][keep(frames["train.csv"].label)].to_csv(out / "train.csv", index=False)
        solution[keep(solution.label)][["image"]].to_csv(out / "test.csv", index=False)
    ctx = Context(load_config(REPO / "configs" / "digits.yaml", [*TINY, "train.epochs=1"]), tmp_path / "low",
                  tmp_path / "w1")
    orchestrate.run("train", ctx)
    source = tmp_path / "w1" / "runs" / "resnet10t" / "fold0" / "best.safetensors"
    model = build_model("resnet10t", 5, 1)
    report = load_pretrained(model, source)
    before = load_file(str(source))
    state = model.state_dict()
    assert torch.equal(state["conv1.0.weight"], before["conv1.0.weight"]) and report["loaded"] > 10
    assert set(report["new"]) == {"fc.weight", "fc.bias"}  # same shapes (5 classes), still not copied: a new head
    ctx = Context(load_config(REPO / "configs" / "digits.yaml",
                              [*TINY, "train.epochs=1", f"model.pretrained_path={source}"]),
                  tmp_path / "high", tmp_path / "w2")
    meta = orchestrate.run("train", ctx)
    best = pd.read_json(tmp_path / "w2" / "runs" / "resnet10t" / "fold0" / "best.json", typ="series")
    assert (best["fine_tuned"] and best["norm"]["mean"] == [pytest.approx(0.449)]
            and best["classes"] == ["5", "6", "7", "8", "9"])
    assert list(meta.values())[0] > 0


def test_pretrained_rgb_weights_adapt_to_one_channel(tmp_path: Path):
    rgb = build_model("resnet10t", 10, 3)
    save_file({k: v.contiguous() for k, v in rgb.state_dict().items()}, str(tmp_path / "rgb.safetensors"))
    gray = build_model("resnet10t", 4, 1)
    load_pretrained(gray, tmp_path / "rgb.safetensors")
    expected = rgb.state_dict()["conv1.0.weight"].sum(1, keepdim=True)
    assert torch.allclose(gray.state_dict()["conv1.0.weight"], expected)


def test_unreadable_or_foreign_pretrained_files_are_refused(tmp_path: Path):
    (tmp_path / "bad.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(PipelineError, match="is not a readable state dict"):
        load_pretrained(build_model("resnet10t", 3, 3), tmp_path / "bad.safetensors")
    save_file({"something.else": torch.zeros(3)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(PipelineError, match="none of the 1 tensors"):
        load_pretrained(build_model("resnet10t", 3, 3), tmp_path / "other.safetensors")
    torch.save({"state_dict": {"x": torch.zeros(1)}, "code": print}, tmp_path / "pickled.pth")
    with pytest.raises(PipelineError, match="not a readable"):  # weights_only refuses the pickled function
        load_pretrained(build_model("resnet10t", 3, 3), tmp_path / "pickled.pth")


def test_head_learning_rate_multiplier_in_param_groups():
    model = build_model("resnet10t", 5, 3)
    groups = param_groups(model, lr=0.01, weight_decay=0.05, head_mult=10)
    head = [g for g in groups if g["is_head"]]
    assert {g["lr"] for g in head} == {0.1} and {g["lr"] for g in groups if not g["is_head"]} == {0.01}
    head_params = {id(p) for g in head for p in g["params"]}
    assert head_params == {id(p) for p in model.get_classifier().parameters()}
    assert all(g["weight_decay"] == 0 for g in groups if all(p.ndim <= 1 for p in g["params"]))
    opt = make_optimizer("sgd", groups, 0.01, 0.9, True)
    assert opt.param_groups[0]["nesterov"] and len(opt.param_groups) == len(groups)


def test_frozen_parameters_do_not_change_after_a_step():
    torch.manual_seed(0)
    model = build_model("resnet10t", 3, 3)
    assert freeze(model, ["conv1", "bn1"]) > 0
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith(("conv1", "bn1"))}
    head_before = model.fc.weight.detach().clone()
    opt = make_optimizer("adamw", param_groups(model, 0.1, 0.0, 1.0), 0.1, 0.9, False)
    loss = model(torch.randn(4, 3, 16, 16)).sum()
    loss.backward()
    opt.step()
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], v) for n, v in frozen.items())
    assert not torch.equal(params["fc.weight"], head_before)  # the rest does learn
    with pytest.raises(PipelineError, match="model.freeze"):
        freeze(model, ["no_such_layer"])


def test_mixup_and_cutmix_change_targets_as_specified():
    cfg = TrainConfig(mixup_alpha=0.4, cutmix_alpha=0.0, label_smoothing=0.0)
    np.random.seed(0)
    x, y = torch.rand(8, 3, 16, 16), torch.arange(8) % 4
    mixed, target = mixer(cfg, 4)(x.clone(), y)
    lam = target[0, y[0]].item()  # timm mixes each row with the batch reversed
    assert torch.allclose(mixed, x * lam + x.flip(0) * (1 - lam), atol=1e-5)
    assert torch.allclose(target.sum(1), torch.ones(8))
    cut = TrainConfig(mixup_alpha=0.0, cutmix_alpha=1.0, label_smoothing=0.1)
    np.random.seed(1)
    _, target = mixer(cut, 4)(torch.rand(8, 3, 16, 16), y)
    assert (target > 0).sum(1).min() >= 2 and torch.allclose(target.sum(1), torch.ones(8))  # smoothing spreads mass
    assert mixer(TrainConfig(), 4) is None


def test_class_weights_and_weighted_soft_loss():
    w = class_weights("balanced", np.array([0, 0, 0, 1]), 2)
    assert torch.allclose(w, torch.tensor([4 / 6, 2.0]))
    logits, y = torch.randn(6, 3), torch.tensor([0, 1, 2, 0, 1, 2])
    weight = torch.tensor([1.0, 2.0, 0.5])
    ours = soft_cross_entropy(logits, torch.nn.functional.one_hot(y, 3).float(), weight)
    assert torch.allclose(ours, torch.nn.functional.cross_entropy(logits, y, weight=weight))
    with pytest.raises(PipelineError, match="3 weights for 2 classes"):
        class_weights([1, 2, 3], np.array([0, 1]), 2)


@pytest.mark.parametrize("name", sorted(CLASSIC))
def test_course_nets_follow_classes_channels_and_small_sizes(name):
    model = build_model(name, 7, 1).eval()
    for size in (16, 32):
        assert model(torch.zeros(2, 1, size, size)).shape == (2, 7)
    assert head_parameter_names(model)


def test_small_resnet_keeps_the_input_resolution_in_its_first_stage():
    """d2l_resnet_small's point: a 28 px image keeps 28x28 through its first residual block (an ImageNet stem has
    7x7 left there), then 14x14 and 7x7."""
    model = build_model("d2l_resnet_small", 10, 1).eval()
    x = torch.zeros(1, 1, 28, 28)
    assert model[:4](x).shape == (1, 32, 28, 28) and model[:5](x).shape == (1, 64, 14, 14)
    assert model[:6](x).shape == (1, 128, 7, 7) and model(x).shape == (1, 10)


@pytest.mark.parametrize("preset", ["none", "light", "medium", "heavy"])
def test_augmentation_presets_keep_shape_and_dtype(preset):
    cfg = TrainConfig(augment=preset, image_size=24, transforms=[{"CoarseDropout": {"p": 1.0}}])
    image = np.random.default_rng(0).integers(0, 255, (24, 24, 1), dtype=np.uint8)
    out = train_transform(cfg, seed=0)(image=image)["image"]
    assert out.shape == (24, 24, 1) and out.dtype == np.uint8


def test_unknown_transform_is_a_clear_error():
    with pytest.raises(PipelineError, match="albumentations has no transform 'Blurr'"):
        train_transform(TrainConfig(transforms=[{"Blurr": {}}]), 0)


def _tiny_trainer(tmp_path: Path, **cfg) -> Trainer:
    """A Trainer on 10 tiny random images (5 batches of 2), a linear model, SGD on the CPU."""
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 255, (10, 2, 2, 3), dtype=np.uint8), np.array([0, 1] * 5)
    data = FoldData(x, y, x[:4], y[:4], 2, {"mean": [0.5] * 3, "std": [0.25] * 3}, "accuracy")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 2))
    cfg = TrainConfig(**{"batch_size": 2, "augment": "none", "warmup_epochs": 0, "optimizer": "sgd", "lr": 0.5} | cfg)
    return Trainer(model, torch.optim.SGD(model.parameters(), lr=cfg.lr), cfg, data, tmp_path, "fp", Runtime(), 0)


def _stalled(trainer: Trainer) -> Trainer:
    """The validation metric never improves after epoch 1 (what plateau and early stopping react to)."""
    trainer.validate = lambda: {"val_acc": 0.5, "val_accuracy": 0.5}
    return trainer


def test_plateau_lowers_the_lr_when_the_metric_stalls(tmp_path: Path):
    trainer = _stalled(_tiny_trainer(tmp_path, epochs=4, schedule="plateau", plateau_patience=0, plateau_factor=0.1))
    trainer.fit()
    lrs = [row["lr"] for row in trainer.history]
    assert lrs[0] == pytest.approx(0.5) and lrs[-1] == pytest.approx(0.5 * 0.1 ** 3), lrs


def test_early_stopping_stops_before_the_last_epoch(tmp_path: Path):
    summary = _stalled(_tiny_trainer(tmp_path, epochs=6, early_stopping=2)).fit()
    assert summary["epochs_run"] == 3 and summary["epoch"] == 1  # epoch 1 best, epochs 2-3 without improvement


def test_accumulation_steps_the_optimizer_once_per_group_of_batches(tmp_path: Path):
    plain, accumulated = _tiny_trainer(tmp_path / "a", epochs=2), _tiny_trainer(tmp_path / "b", epochs=2, accumulate=2)
    plain.fit(), accumulated.fit()
    assert (plain.updates, accumulated.updates) == (2 * 5, 2 * 3)  # 5 batches: groups of 2, 2 and the last 1


def test_clipping_bounds_the_gradient_norm_at_each_step(tmp_path: Path):
    def norms_seen(trainer: Trainer) -> list[float]:
        norms, step = [], trainer.optimizer.step

        def recording_step(*args, **kwargs):
            grads = [p.grad for p in trainer.model.parameters() if p.grad is not None]
            norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))
            return step(*args, **kwargs)

        trainer.optimizer.step = recording_step
        trainer.fit()
        return norms

    free, clipped = norms_seen(_tiny_trainer(tmp_path / "a", epochs=1)), norms_seen(
        _tiny_trainer(tmp_path / "b", epochs=1, grad_clip=0.01))
    assert min(free) > 0.01  # without clipping the bound would not hold
    assert len(clipped) == 5 and max(clipped) <= 0.01 + 1e-6, clipped


def test_ema_weights_are_validated_and_saved_as_best(tmp_path: Path):
    trainer = _tiny_trainer(tmp_path, epochs=1, ema=True, ema_decay=0.9)
    trainer.fit()
    best = load_file(str(tmp_path / "best.safetensors"))
    ema, raw = trainer.updater.ema.module.state_dict(), trainer.model.state_dict()
    assert best.keys() == ema.keys() and all(torch.equal(best[k], ema[k]) for k in best)
    assert not torch.allclose(ema["1.weight"], raw["1.weight"])


@pytest.mark.slow
def test_sgd_with_plateau_ema_accumulation_clipping_mixing_trains_through_the_stage(small_digits: Path,
                                                                                    tmp_path: Path):
    """Every option together through the train stage (each effect has its own test above)."""
    overrides = [*TINY, "model.backbones=[d2l_lenet]", "train.epochs=4", "train.optimizer=sgd", "train.lr=0.05",
                 "train.schedule=plateau", "train.ema=true", "train.ema_decay=0.9", "train.accumulate=2",
                 "train.grad_clip=1.0", "train.class_weights=balanced", "train.label_smoothing=0.1",
                 "train.mixup_alpha=0.2", "train.cutmix_alpha=1.0", "train.mix_off_epoch=3", "train.early_stopping=1",
                 "train.augment=medium"]
    ctx = Context(load_config(REPO / "configs" / "digits.yaml", overrides), small_digits, tmp_path / "w")
    orchestrate.run("train", ctx)
    meta = pd.read_json(tmp_path / "w" / "runs" / "d2l_lenet" / "fold0" / "best.json", typ="series")
    history = pd.read_csv(tmp_path / "w" / "runs" / "d2l_lenet" / "fold0" / "history.csv")
    assert meta["ema"] and 1 <= meta["epochs_run"] <= 4 and len(history) == meta["epochs_run"]
    assert np.isfinite(history["train_loss"]).all()


@pytest.mark.slow
def test_ddp_with_two_cpu_processes_trains_and_rank0_alone_writes(small_digits: Path, tmp_path: Path):
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "pipeline", "train",
           "--data", str(small_digits), "--config", str(REPO / "configs" / "digits.yaml"),
           "--work", str(tmp_path / "w"), *TINY, "train.epochs=2"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "distributed over 2 processes (gloo)" in out.stdout
    assert out.stdout.count("resnet10t fold 0 epoch 1:") == 1 and out.stdout.count("resnet10t fold 0 epoch 2:") == 1
    run = tmp_path / "w" / "runs" / "resnet10t" / "fold0"
    assert ((run / "best.safetensors").exists() and (run / "best.json").exists()
            and len(pd.read_csv(run / "history.csv")) == 2)
    assert not list(run.glob(".*.tmp"))


def test_a_wrapper_that_refuses_bool_is_used_as_the_forward_net(tmp_path: Path):
    """torch.compile's wrapper raises on len()/bool(); the trainer must take it as given (train.compile=true)."""

    class Wrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def __len__(self):
            raise TypeError("no len")

        def forward(self, x):
            return self.inner(x)

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 2))
    x, y = np.zeros((4, 2, 2, 3), dtype=np.uint8), np.array([0, 1, 0, 1])
    data = FoldData(x, y, x, y, 2, {"mean": [0.5] * 3, "std": [0.25] * 3}, "accuracy")
    net = Wrapper(model)
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1),
                      TrainConfig(batch_size=2, augment="none", epochs=1), data, tmp_path, "fp", Runtime(), 0, net=net)
    assert trainer.net is net
    trainer.fit()
