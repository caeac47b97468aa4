"""Feeding the accelerator: loader workers, GPU-side augmentation, the batch-size finder, memory records."""

from pathlib import Path

import albumentations as A
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch.overrides import TorchFunctionMode

from pipeline import orchestrate
from pipeline.context import Context
from pipeline.core.artifacts import read_stamp, write_stamp
from pipeline.core.config import TrainConfig, load_config
from pipeline.core.errors import PipelineError
from pipeline.training import runtime
from pipeline.training.augment import PRESETS, _albumentation
from pipeline.training.batch_size import auto_batch_size
from pipeline.training.gpu_augment import DeviceAugment, _module, choose_device
from pipeline.training.runtime import Runtime
from pipeline.training.trainer import FoldData, Trainer

from .conftest import interrupt_in_epoch


def _trainer(run_dir: Path, workers: int, n: int = 24, **cfg) -> Trainer:
    """A linear classifier on n 8x8 RGB images with the light preset: augmentation draws in every batch."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(8 * 8 * 3, 2))
    x = np.random.default_rng(0).integers(0, 255, (n, 8, 8, 3), dtype=np.uint8)
    y = np.arange(n) % 2
    data = FoldData(x, y, x[:6], y[:6], 2, {"mean": [0.5] * 3, "std": [0.25] * 3}, "accuracy")
    tcfg = TrainConfig(image_size=8, **{"augment": "light", "batch_size": 4, "epochs": 3, "warmup_epochs": 0, **cfg})
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
    interrupt_in_epoch(monkeypatch, Trainer, 2, interrupted.fit)
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


def _probe(kind: str, n: int, size: int) -> np.ndarray:
    """n copies of a probe image whose statistics reveal one operation's parameters."""
    if kind == "flat":  # black pixels afterwards: padding (affine) or holes (dropout)
        img = np.full((size, size, 3), 200, np.uint8)
    elif kind == "grey":  # the mean afterwards: brightness/contrast and gamma
        img = np.full((size, size, 3), 128, np.uint8)
    elif kind == "halves":  # left half black: a flip makes the first column white; blur greys the edge
        img = np.zeros((size, size, 3), np.uint8)
        img[:, size // 2:] = 255
    else:  # "coords": x in channel 0, y in channel 1; a crop keeps the range of the coordinates it covers
        ramp = np.linspace(0, 255, size)
        img = np.stack([np.tile(ramp, (size, 1)), np.tile(ramp[:, None], (1, size)), np.full((size, size), 255.0)], -1)
        img = np.round(img).astype(np.uint8)
    return np.repeat(img[None], n, 0)


def _ramp(z: np.ndarray) -> np.ndarray:
    """The share of grey pixels where a black-white edge was blurred: grows with the blur's sigma."""
    return ((z[..., 0] > 0.05) & (z[..., 0] < 0.95)).mean((1, 2))


def _crop_area(z: np.ndarray) -> np.ndarray:
    return np.ptp(z[..., 0], axis=(1, 2)) * np.ptp(z[..., 1], axis=(1, 2))


# (operation's statistic, probe image, image side): side 64 for the affine, so that albumentations' whole-pixel
# translations and the device's sub-pixel ones differ by less than the tolerance
STATISTICS = {"hflip": ({"flipped": lambda z: z[:, :, 0, 0] > 0.5}, "halves", 32),
              "crop": ({"area": _crop_area, "cropped": lambda z: _crop_area(z) < 0.97}, "coords", 64),
              "affine": ({"black": lambda z: (z[..., 0] < 0.4).mean((1, 2))}, "flat", 64),
              "brightness_contrast": ({"mean": lambda z: z.mean((1, 2, 3))}, "grey", 32),
              "gamma": ({"mean": lambda z: z.mean((1, 2, 3))}, "grey", 32),
              "blur": ({"ramp": _ramp, "blurred": lambda z: _ramp(z) > 0}, "halves", 32),
              "dropout": ({"black": lambda z: (z[..., 0] < 0.4).mean((1, 2))}, "flat", 32)}


@pytest.mark.parametrize("op, params", [("hflip", {"p": 0.5})] + [
    pytest.param(op, params, id=f"{preset}-{op}") for preset in ("light", "medium", "heavy")
    for op, params in PRESETS[preset]])
def test_device_augmentation_draws_from_the_distribution_of_albumentations(op: str, params: dict):
    """Every preset operation on 1500 probe images, per image on the CPU (albumentations) and batched on CPU
    tensors (the device version): the mean and spread of a statistic that reveals the operation's parameters
    (flip rate, crop area and rate, padded area, brightness, blur, holes) agree within 4 standard errors plus
    half a grey level (albumentations rounds to uint8)."""
    stats, kind, size = STATISTICS[op]
    x = _probe(kind, 1500, size)
    pipeline = A.Compose([_albumentation(op, params, size)], seed=0)
    cpu = np.stack([pipeline(image=img)["image"] for img in x]).astype(np.float32) / 255
    torch.manual_seed(0)
    device = _module(op, params, size)(torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255)
    device = device.permute(0, 2, 3, 1).numpy()
    for name, statistic in stats.items():
        a, b = statistic(cpu).astype(np.float64), statistic(device).astype(np.float64)
        se = np.sqrt((a.var() + b.var()) / len(a))
        assert abs(a.mean() - b.mean()) < 4 * se + 0.5 / 255, (name, a.mean(), b.mean(), se)
        assert abs(a.std() - b.std()) < 0.1 * max(a.std(), b.std()) + 0.5 / 255, (name, a.std(), b.std())
        assert a.std() > 0  # the statistic moves: the operation is on


class _HostValues(TorchFunctionMode):
    """Records tensors made from host values inside the mode (torch.tensor, as_tensor, from_numpy)."""

    def __init__(self):
        super().__init__()
        self.made: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.tensor, torch.as_tensor, torch.from_numpy):
            self.made.append(func.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("preset", ["light", "medium", "heavy"])
def test_device_augmentation_never_makes_the_host_wait_for_the_device(preset: str):
    """Every preset runs on the "meta" device, which holds no data: a read-back (.item(), bool(), a boolean index,
    nonzero) raises there, and no tensor is made from host values. On a GPU each of those is a copy that waits
    until the queue is empty (kornia 0.9's crop and affine did five per batch, benchmarks/gpu.py)."""
    augment = DeviceAugment(preset, 32, True).to("meta")
    with _HostValues() as mode:
        out = augment(torch.empty(8, 3, 32, 32, device="meta"))
    assert out.shape == (8, 3, 32, 32) and out.device.type == "meta" and mode.made == []


def test_the_input_scaling_makes_its_constants_on_the_device_once():
    """Runtime.to_input's mean and std tensors are made once per device and reused: made per batch from host values,
    each would be a copy to the GPU that waits for its queue (two per batch)."""
    rt = Runtime(device=torch.device("meta"))
    norm = {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.2, 0.2]}
    rt.to_input(torch.empty(4, 3, 8, 8, dtype=torch.uint8, device="meta"), norm)
    with _HostValues() as mode:
        out = rt.to_input(torch.empty(4, 3, 8, 8, dtype=torch.uint8, device="meta"), norm)
    assert mode.made == [] and out.dtype == torch.float32 and out.device.type == "meta"


def test_augment_device_gpu_runs_the_batched_preset_in_training_on_cpu_tensors(tmp_path: Path):
    """augment_device=gpu on the CPU: the loader hands over raw uint8 batches and the device preset augments them
    (the same code path as on CUDA); train.transforms have no device version and are refused in one line."""
    trainer = _trainer(tmp_path / "gpu", workers=0, augment_device="gpu", augment="heavy")
    assert trainer.device_augment is not None and trainer.loader.dataset.transform is None
    calls = []
    forward = trainer.device_augment.forward
    trainer.device_augment.forward = lambda x: calls.append((x.dtype, float(x.max()))) or forward(x)
    result = trainer.fit()
    assert len(calls) == 18 and {c[0] for c in calls} == {torch.float32} and max(c[1] for c in calls) <= 1.0
    assert np.isfinite(result["history"][-1]["train_loss"])
    assert _trainer(tmp_path / "cpu", workers=0, augment_device="auto").device_augment is None  # auto on cpu
    with pytest.raises(PipelineError, match="train.augment_device=gpu: train.transforms"):
        _trainer(tmp_path / "x", workers=0, augment_device="gpu", transforms=[{"ToGray": {"p": 0.1}}])


def test_auto_picks_the_gpu_only_when_the_cpu_path_cannot_keep_up():
    where, line = choose_device(cpu_img_s=900, workers=4, gpu_img_s=6000)
    assert where == "gpu" and line == ("augmentation on gpu: the cpu path gives 4 x 900 = 3600 img/s, "
                                       "the GPU trains 6000 img/s without it")
    assert choose_device(cpu_img_s=2000, workers=4, gpu_img_s=6000)[0] == "cpu"
    assert choose_device(cpu_img_s=900, workers=0, gpu_img_s=800)[0] == "cpu"  # the main process alone keeps up


def test_batch_size_finder_halves_on_a_planted_out_of_memory():
    tried, said = [], []

    def step(batch: int) -> None:
        tried.append(batch)
        if batch > 100:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (planted)")

    assert runtime.find_batch_size(step, 1024, said.append) == 64
    assert tried == [1024, 512, 256, 128, 64]
    assert said == ["train: batch_size auto: 64 (128 ran out of GPU memory)"]
    assert runtime.find_batch_size(lambda b: None, 256, said.append) == 256
    assert said[-1] == "train: batch_size auto: 256 (the largest tried)"

    def never(batch: int) -> None:
        raise torch.cuda.OutOfMemoryError("planted")

    with pytest.raises(PipelineError, match="one image does not fit in GPU memory"):
        runtime.find_batch_size(never, 4, said.append)


def test_auto_batch_size_trial_steps_are_undone(tmp_path: Path, monkeypatch):
    """The finder's real training steps (here on the CPU, with an out-of-memory planted above 8 images) leave
    the weights and the optimizer as they were; the CPU default applies when no GPU is asked for."""
    trainer = _trainer(tmp_path, workers=0)
    model = trainer.model
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    forward, seen = model.forward, []

    def planted(x):
        seen.append(len(x))
        if len(x) > 8:
            raise torch.cuda.OutOfMemoryError("planted")
        return forward(x)

    monkeypatch.setattr(model, "forward", planted)
    said = []
    assert auto_batch_size(model, opt, trainer.data, Runtime(), said.append, trial=True) == 6
    assert seen == [24, 12, 6, 6] and said == ["train: batch_size auto: 6 (12 ran out of GPU memory)"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and not opt.state
    assert auto_batch_size(model, opt, trainer.data, Runtime(), said.append) == 24  # cpu: min(64, rows)
    assert said[-1] == "train: batch_size auto: 24 on the cpu (no GPU memory to fill)"


def test_train_stage_records_batch_size_augment_device_and_peak_memory(comp_dir: Path, tmp_path: Path, capsys):
    """The train stage with batch_size auto and the device preset (on CPU tensors) writes what it chose and the
    run's peak memory into best.json (no GPU: peak_gpu_gb null)."""
    overrides = ["folds.n_splits=2", "train.folds=[0]", "train.image_size=16", "train.epochs=1", "train.augment=heavy",
                 "model.backbones=[d2l_lenet]", "train.batch_size=auto", "train.augment_device=gpu",
                 "tracking.backend=none"]
    ctx = Context(load_config(None, overrides), comp_dir, tmp_path / "w")
    orchestrate.run("train", ctx)
    meta = read_stamp(tmp_path / "w" / "runs" / "d2l_lenet" / "fold0" / "best.json")
    assert meta["batch_size"] == 4 and meta["augment_device"] == "gpu" and meta["num_workers"] == 0  # 4 train rows
    assert meta["peak_gpu_gb"] is None and meta["peak_rss_gb"] > 0.1
    assert "train: batch_size auto: 4 on the cpu (no GPU memory to fill)" in capsys.readouterr().out
    run = tmp_path / "w" / "runs" / "d2l_lenet" / "fold0"
    (run / "best.json").unlink()  # as if killed before the end: the rerun resumes from last.pt
    write_stamp(run / "batch_size.json", meta["fingerprint"], batch_size=3)  # what the run started with
    orchestrate.run("train", ctx)
    assert read_stamp(run / "best.json")["batch_size"] == 3  # kept, not searched again
    assert "train: batch_size auto: 3 (kept from the run's start)" in capsys.readouterr().out
