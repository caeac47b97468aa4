"""Runs at once: wall time of `train` over 4 small runs (2 experiments x 2 folds of digits) with JOBS=1 (one process,
every core's threads) against JOBS=2 (`runtime.parallel_runs=2`: two worker processes, cores // 2 threads each),
interleaved (benchmarks/timing.py), each round from the same prepared WORK (clean, folds and the image cache done,
no runs). The figure includes what a user waits for: the workers' start-up (a Python process importing torch, timm
and the pipeline), which JOBS=1 pays once.

On a machine with GPUs, JOBS=N gives each worker one GPU (CUDA_VISIBLE_DEVICES); run with `--device cuda --jobs N`.

    .venv/bin/python benchmarks/parallel_runs.py [--jobs 2] [--cores 2] [--epochs 3] [--repeats 2] [--model resnet10t]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from timing import interleaved, median, ratio_text

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.data.digits import build_digits  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--cores", type=int, default=len(os.sched_getaffinity(0)),
                    help="threads of the JOBS=1 run")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--images", type=int, default=800)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--model", default="resnet10t")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = build_digits(root / "digits", limit=args.images)
        second = f"{{name: {args.model}-b, backbone: {args.model}, train: {{seed: 1}}}}"
        common = ["folds.n_splits=2", f"train.epochs={args.epochs}", f"train.image_size={args.size}",
                  "train.batch_size=32", f"runtime.device={args.device}", "tracking.backend=none",
                  f"model.backbones=[{args.model},{second}]"]

        def cmd(work: Path, *extra: str) -> list[str]:
            return [sys.executable, "-m", "pipeline", "train", "--data", str(data), "--config",
                    str(REPO / "configs" / "digits.yaml"), "--work", str(work), *common, *extra]

        prepared = root / "prepared"
        subprocess.run(cmd(prepared, "model.backbones=[d2l_lenet]", "train.epochs=1"), cwd=REPO, check=True,
                       capture_output=True)  # clean, folds and the decoded images at this size
        shutil.rmtree(prepared / "runs")

        def one(extra: list[str]):
            def go():
                work = root / "work"
                shutil.rmtree(work, ignore_errors=True)
                shutil.copytree(prepared, work)
                out = subprocess.run(cmd(work, *extra), cwd=REPO, capture_output=True, text=True)
                if out.returncode:
                    raise SystemExit(out.stdout[-3000:] + out.stderr[-3000:])
            return go

        threads = max(1, args.cores // args.jobs)
        times = interleaved({"jobs1": one([f"runtime.threads={args.cores}"]),
                             f"jobs{args.jobs}": one([f"runtime.parallel_runs={args.jobs}"])}, args.repeats)
    base, par = times["jobs1"], times[f"jobs{args.jobs}"]
    print(f"4 runs ({args.model}, {args.images} digits at {args.size} px, {args.epochs} epochs, 2 folds x 2 "
          f"experiments) on {args.device}:")
    print(f"  JOBS=1 ({args.cores} threads): median {median(base):.1f} s  {[round(t, 1) for t in base]}")
    print(f"  JOBS={args.jobs} ({threads} thread(s) each): median {median(par):.1f} s  {[round(t, 1) for t in par]}")
    print(f"  speed-up JOBS={args.jobs} over JOBS=1: {ratio_text(base, par)}")


if __name__ == "__main__":
    main()
