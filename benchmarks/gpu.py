"""GPU checks in one run: does the engine keep the GPU busy? Training throughput of the engine against a bare
loop at the same precision and memory format (bf16 autocast and channels_last on CUDA), per model, with no
augmentation and with the medium preset on the CPU (loader workers) and on the GPU (train.augment_device=gpu).

Per model, rows:
  bare loop, no augmentation   the ceiling: batches already in host memory, normalised on the device
  engine, no augmentation      pipeline.training.trainer.Trainer.train_epoch, workers as runtime.num_workers=auto
  engine, medium, cpu augment  albumentations in the persistent loader workers
  engine, medium, gpu augment  the uint8 batch goes to the GPU once; pipeline/training/gpu_augment.py there
Printed: img/s (median over interleaved rounds), the ratio to the bare loop (median and spread of the per-round
ratios; the goal is >= 0.9 in every row), mean GPU utilisation while the row ran (nvidia-smi sampled every
100 ms; torch.cuda.utilization would need pynvml, which the environment lacks) and the peak GPU memory of the row
(the other rows' weights included). Then, per row, how often the host waited for the GPU in one epoch, and in one
batch of the medium preset on the GPU (torch.cuda's sync debug mode), with the lines that waited: every wait
empties the GPU's queue of work, which is what starves a fast GPU.

    python benchmarks/gpu.py                      # resnet18, efficientnet_b0, convnext_tiny at 224 px
    python benchmarks/gpu.py --quick              # fewer steps and rounds: a first look in about a minute
    python benchmarks/gpu.py --device cpu --image-size 32 --steps 3 --models resnet18   # the script itself
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from timing import interleaved, median, ratio_text

from pipeline.core.config import TrainConfig
from pipeline.training.gpu_augment import DeviceAugment
from pipeline.training.models import build_model, make_optimizer, param_groups
from pipeline.training.runtime import Runtime, loader_workers
from pipeline.training.trainer import FoldData, Trainer

NORM = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
MODELS = ["resnet18", "efficientnet_b0", "convnext_tiny"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def runtime_for(device: torch.device, workers: int | str) -> Runtime:
    cuda = device.type == "cuda"
    return Runtime(device, autocast=cuda, amp_dtype=torch.bfloat16, channels_last=cuda,
                   num_workers=loader_workers(workers, device))


class Bare:
    """The plain loop: index the uint8 array, normalise on the device, forward, cross-entropy, backward, AdamW."""

    def __init__(self, name: str, images: np.ndarray, labels: np.ndarray, batch: int, rt: Runtime):
        torch.manual_seed(0)
        self.images, self.labels, self.batch, self.rt = images, labels, batch, rt
        self.model = rt.prepare(build_model(name, 10, 3)).train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3, weight_decay=0.05)

    def __call__(self) -> float:
        rt, order = self.rt, np.random.default_rng(0).permutation(len(self.images))
        steps = len(order) // self.batch
        _sync(rt.device)
        t0 = time.perf_counter()
        for s in range(steps):
            idx = np.sort(order[s * self.batch:(s + 1) * self.batch])
            x = rt.to_input(torch.from_numpy(self.images[idx]).permute(0, 3, 1, 2), NORM)
            with rt.autocasting():
                loss = F.cross_entropy(self.model(x).float(), torch.from_numpy(self.labels[idx]).to(rt.device))
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
        _sync(rt.device)
        return steps * self.batch / (time.perf_counter() - t0)


class Engine:
    """One training epoch of pipeline.training.trainer.Trainer as train.py builds it (persistent workers stay up)."""

    def __init__(self, name: str, images: np.ndarray, labels: np.ndarray, batch: int, rt: Runtime, augment: str,
                 where: str, folder: Path):
        torch.manual_seed(0)
        self.rt, self.n = rt, len(images) // batch * batch
        model = rt.prepare(build_model(name, 10, 3))
        cfg = TrainConfig(batch_size=batch, augment=augment, augment_device=where, hflip=augment != "none",
                          epochs=1, warmup_epochs=0, image_size=images.shape[1])
        opt = make_optimizer("adamw", param_groups(model, 1e-3, 0.05, 1.0), 1e-3, 0.9, False)
        data = FoldData(images, labels, images[:0], labels[:0], 10, NORM, "accuracy")
        self.trainer = Trainer(model, opt, cfg, data, folder, "bench", rt, 0)

    def __call__(self) -> float:
        _sync(self.rt.device)
        t0 = time.perf_counter()
        self.trainer.train_epoch(1)
        _sync(self.rt.device)
        return self.n / (time.perf_counter() - t0)


class Utilisation:
    """Mean GPU utilisation (%) while a row runs, from nvidia-smi's own sampling loop (every 100 ms); None off
    CUDA or without nvidia-smi."""

    def __init__(self, device: torch.device):
        self.device, self.samples, self.proc = device, [], None

    def __enter__(self):
        if self.device.type == "cuda" and shutil.which("nvidia-smi"):
            index = self.device.index or 0
            self.proc = subprocess.Popen(["nvidia-smi", f"--id={index}", "--query-gpu=utilization.gpu",
                                          "--format=csv,noheader,nounits", "-lms", "100"],
                                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        return self

    def __exit__(self, *exc):
        if self.proc is not None:
            self.proc.terminate()
            out, _ = self.proc.communicate()
            self.samples = [float(v) for v in out.split() if v.strip().replace(".", "", 1).isdigit()]

    @property
    def mean(self) -> float | None:
        return float(np.mean(self.samples[1:])) if len(self.samples) > 1 else None


def host_syncs(fn, device: torch.device) -> list[str]:
    """Where `fn()` (warmed up already) makes the host wait for the GPU (torch.cuda's sync debug mode): one entry
    per synchronisation, the innermost frame of the pipeline or this script that caused it. A
    synchronisation per batch empties the GPU's queue: the host then prepares the next kernels while the GPU idles."""
    torch.cuda.synchronize(device)
    places: list[str] = []

    def record(*_args, **_kwargs):
        frames = [f for f in traceback.extract_stack()[:-1]
                  if any(part in f.filename for part in ("/pipeline/", "gpu.py"))]
        places.append(f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "?")

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return places


def measure(row, device: torch.device, record: dict) -> float:
    """The row's img/s; its utilisation samples and peak memory go into `record`."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with Utilisation(device) as util:
        speed = row()
    if util.mean is not None:
        record.setdefault("util", []).append(util.mean)
    if device.type == "cuda":
        record["peak"] = max(record.get("peak", 0.0), torch.cuda.max_memory_allocated(device) / 2**30)
    return speed


def bench_model(name: str, args, device: torch.device, folder: Path) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (args.steps * args.batch, args.image_size, args.image_size, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, len(images))
    rt = runtime_for(device, args.workers)
    rows = {"bare loop, no augmentation": Bare(name, images, labels, args.batch, rt),
            "engine, no augmentation": Engine(name, images, labels, args.batch, rt, "none", "cpu", folder),
            "engine, medium, cpu augment": Engine(name, images, labels, args.batch, rt, "medium", "cpu", folder),
            "engine, medium, gpu augment": Engine(name, images, labels, args.batch, rt, "medium", "gpu", folder)}
    for row in rows.values():  # untimed: cudnn autotuning, the allocator, the workers' start
        row()
    syncs = {}
    if device.type == "cuda":  # one more epoch of each row, counting the host's waits for the GPU
        augment = DeviceAugment("medium", args.image_size, True).to(device)
        batch = torch.from_numpy(images[:args.batch]).permute(0, 3, 1, 2).to(device).float().div_(255)
        augment(batch)
        try:
            syncs = {"the medium preset on the GPU": (host_syncs(lambda: augment(batch), device), "batch")}
            syncs.update({r: (host_syncs(rows[r], device), "epoch") for r in rows})
        except RuntimeError as e:  # a diagnostic: the throughput table still comes
            print(f"{name}: host synchronisations not counted: {e}", flush=True)
    records: dict[str, dict] = {r: {} for r in rows}
    speeds = interleaved({r: (lambda r=r: measure(rows[r], device, records[r])) for r in rows}, args.repeats,
                         measure=lambda fn: fn())
    base = speeds["bare loop, no augmentation"]
    print(f"{name} {args.image_size}px batch {args.batch}, {rt.num_workers} workers, "
          f"{'bf16 channels_last' if rt.autocast else 'fp32'}:")
    for r in rows:
        util = records[r].get("util")
        peak = records[r].get("peak")
        print(f"  {r:30s} {median(speeds[r]):8.0f} img/s  {ratio_text(speeds[r], base)} bare"
              f"  GPU {f'{np.mean(util):.0f}%' if util else 'n/a':>4s}"
              f"  peak {f'{peak:.2f} GiB' if peak is not None else 'n/a'}", flush=True)
    for what, (places, unit) in syncs.items():
        where = Counter(places).most_common(4)
        print(f"  host synchronisations, {what}: {len(places)} per {unit}"
              + (f" ({', '.join(f'{place} x{n}' for place, n in where)})" if places else ""), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=40, help="training steps per timed epoch")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds of every row")
    parser.add_argument("--workers", default="auto", help="runtime.num_workers of the engine rows")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--quick", action="store_true", help="10 steps, 2 rounds")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.repeats = min(args.steps, 10), min(args.repeats, 2)
    args.workers = args.workers if args.workers == "auto" else int(args.workers)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    else:
        print(f"cpu ({torch.get_num_threads()} threads), torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            bench_model(name, args, device, Path(tmp))
            if device.type == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
