"""Training throughput: the engine vs a bare PyTorch loop, and the decoded-image cache vs decoding
every epoch. Both comparisons run in the same process, same model, data, batch size and threads.

1. Engine (pipeline.training.trainer.Trainer, augmentation off) vs a hand-written loop over the same uint8
   array (normalise, forward, cross-entropy, backward, AdamW step). Prints images/s and the ratio.
2. One training epoch of a small net over N small PNG files: from the decoded-image cache
   (pipeline.data.cache's uint8 array, read by pipeline.training.feeding.ArrayDataset) vs a Dataset that
   decodes and resizes each file when asked.

Each comparison runs `--repeats` interleaved rounds (A B, B A, ...) and prints the median ratio and its
spread (benchmarks/timing.py): one pass of each decided nothing on a shared machine.

    .venv/bin/python benchmarks/train_throughput.py [--model resnet18] [--size 32] [--images 2048] [--repeats 5]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from timing import interleaved, median, ratio_text
from torch.utils.data import DataLoader, Dataset

from pipeline.core.config import TrainConfig
from pipeline.data.images import load_image, resize, to_channels
from pipeline.training import loop
from pipeline.training.feeding import ArrayDataset, collate
from pipeline.training.models import build_model, make_optimizer, param_groups
from pipeline.training.runtime import Runtime
from pipeline.training.trainer import FoldData, Trainer

NORM = {"mean": [0.5] * 3, "std": [0.25] * 3}
CPU = torch.device("cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def engine_epoch(model_name: str, images: np.ndarray, labels: np.ndarray, batch: int, device=CPU, amp: str = "none",
                 compile: bool = False, warm: bool = False) -> float:
    """Engine with the settings train.py gives it: channels_last and pinned memory on cuda, AMP per `amp`."""
    torch.manual_seed(0)
    cuda = device.type == "cuda"
    rt = Runtime(device, autocast=amp != "none" and cuda,
                 amp_dtype=torch.float16 if amp == "float16" else torch.bfloat16, channels_last=cuda)
    model = rt.prepare(build_model(model_name, 10, 3))
    cfg = TrainConfig(batch_size=batch, augment="none", hflip=False, epochs=1, image_size=images.shape[1])
    opt = make_optimizer("adamw", param_groups(model, 1e-3, 0.05, 1.0), 1e-3, 0.9, False)
    data = FoldData(images, labels, images[:0], labels[:0], 10, NORM, "accuracy")
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(model, opt, cfg, data, Path(tmp), "bench", rt, 0,
                          net=torch.compile(model) if compile else None)
        if warm or compile:  # an untimed epoch first: compilation, cudnn autotuning, allocator warm-up
            trainer.train_epoch(1)
        loop.reseed(1)
        trainer.reseed(1, 1)
        _sync(device)
        t0 = time.perf_counter()
        trainer.train_epoch(1)
        _sync(device)
        return len(images) / (time.perf_counter() - t0)


def bare_epoch(model_name: str, images: np.ndarray, labels: np.ndarray, batch: int, device=CPU, amp: str = "none",
               channels_last: bool = False) -> float:
    """The plain loop; on cuda optionally with bf16 autocast and channels_last, to match the engine's settings."""
    torch.manual_seed(0)
    model = build_model(model_name, 10, 3).train().to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    order = np.random.default_rng(0).permutation(len(images))
    _sync(device)
    t0 = time.perf_counter()
    for start in range(0, len(order) - batch + 1, batch):
        idx = order[start:start + batch]
        x = Runtime(device, channels_last=channels_last).to_input(torch.from_numpy(images[idx]).permute(0, 3, 1, 2),
                                                                  NORM)
        with torch.autocast(device.type, dtype=getattr(torch, amp if amp != "none" else "float32"),
                            enabled=amp != "none"):
            loss = F.cross_entropy(model(x), torch.from_numpy(labels[idx]).to(device))
        opt.zero_grad()
        loss.backward()
        opt.step()
    _sync(device)
    return (len(order) // batch * batch) / (time.perf_counter() - t0)


class DecodeEveryTime(Dataset):
    """The plain baseline: open, decode and resize the file on every access."""

    def __init__(self, paths: list[Path], labels: np.ndarray, size: int):
        self.paths, self.labels, self.size = paths, labels, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        img = resize(to_channels(load_image(self.paths[i]), 3), self.size)
        return torch.from_numpy(np.array(img)).permute(2, 0, 1), int(self.labels[i])


def loader_epoch(dataset: Dataset, model: torch.nn.Module, opt, batch: int) -> float:
    t0 = time.perf_counter()
    for x, y in DataLoader(dataset, batch_size=batch, shuffle=True, generator=torch.Generator().manual_seed(0),
                           collate_fn=collate):
        loss = F.cross_entropy(model(Runtime().to_input(x, NORM)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return time.perf_counter() - t0


def cache_vs_decode(n: int, size: int, batch: int, source: int, repeats: int) -> tuple[list[float], list[float]]:
    """Seconds per epoch, per interleaved round: decoding every file vs the cached array."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, n)
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i in range(n):
            path = Path(tmp) / f"{i}.{'png' if i % 2 else 'jpg'}"
            Image.fromarray(rng.integers(0, 255, (source, source, 3), dtype=np.uint8)).save(path)
            paths.append(path)
        model = build_model("d2l_lenet", 10, 3)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        files = DecodeEveryTime(paths, labels, size)
        cache = np.stack([files[i][0].permute(1, 2, 0).numpy() for i in range(n)])  # built once
        times = interleaved({"decode": lambda: loader_epoch(files, model, opt, batch),
                             "cached": lambda: loader_epoch(ArrayDataset(cache, labels), model, opt, batch)},
                            repeats, measure=lambda fn: fn())  # loader_epoch returns its own seconds
    return times["decode"], times["cached"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--source", type=int, default=28, help="side of the PNG/JPEG files of the cache comparison")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds of each comparison")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (args.images, args.size, args.size, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, args.images)
    bare_epoch(args.model, images[: args.batch * 2], labels[: args.batch * 2], args.batch)  # warm-up
    run = (args.model, images, labels, args.batch)
    speeds = interleaved({"bare": lambda: bare_epoch(*run), "engine": lambda: engine_epoch(*run)}, args.repeats,
                         measure=lambda fn: fn())  # each call returns its own img/s
    print(f"{args.model} {args.size}px batch {args.batch}, {torch.get_num_threads()} threads: bare loop "
          f"{median(speeds['bare']):.0f} img/s, engine {median(speeds['engine']):.0f} img/s (medians), "
          f"engine/bare {ratio_text(speeds['engine'], speeds['bare'])}")
    decode, cached = cache_vs_decode(args.images, args.size, args.batch, args.source, args.repeats)
    print(f"d2l_lenet epoch over {args.images} PNG/JPEG files of {args.source}px at {args.size}px: decode every epoch "
          f"{median(decode):.2f} s, cached array {median(cached):.2f} s (medians), "
          f"ratio {ratio_text(decode, cached, 1)}")


if __name__ == "__main__":
    main()
