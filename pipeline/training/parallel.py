"""`runtime.parallel_runs=N` (`make train JOBS=N`): N worker processes on one machine, one per device, each running
the same stage on the same WORK; the run locks (training/schedule.py) hand each run to one of them, longest first.

Why processes running the stage again, rather than a pool of functions: every stage that has runs (train, predict,
rounds) already walks its runs under their locks, so a worker is just one more process on WORK; nothing (images,
pseudo rows) is pickled across, and a worker that dies leaves a stale lock the parent takes over when it checks
every run at the end. The same property makes SLURM array jobs and several machines safe.

Devices: with GPUs, worker i sees GPU i mod G alone (CUDA_VISIBLE_DEVICES), and the cores are shared out too (loader
workers). On the CPU each worker gets cores // N torch threads: two training processes each asking for every core
wait on each other's threads (measured on 2 cores: a one-thread epoch of 20 s took 75 s beside a two-thread
training), so the split is what makes N runs at once pay.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from pipeline.core.errors import PipelineError

WORKER_ENV = "PIPELINE_WORKER"  # set in a worker: "i/N"; a worker never starts workers of its own


@dataclass(frozen=True)
class Worker:
    index: int
    threads: int
    gpu: int | None
    env: dict[str, str] = field(default_factory=dict)

    @property
    def label(self) -> str:
        where = f"cuda:{self.gpu}" if self.gpu is not None else "cpu"
        return f"w{self.index} {where} x{self.threads}"


def in_worker() -> bool:
    return bool(os.environ.get(WORKER_ENV))


def plan(n: int, gpus: int, cores: int) -> list[Worker]:
    """N workers: GPU i mod G each when there are GPUs, and cores // N threads each (at least 1)."""
    if n < 1:
        raise PipelineError(f"runtime.parallel_runs={n}: needs at least 1")
    threads = max(1, cores // n)
    workers = []
    for i in range(n):
        gpu = i % gpus if gpus else None
        env = {WORKER_ENV: f"{i + 1}/{n}", "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = _visible(gpu)
        workers.append(Worker(i + 1, threads, gpu, env))
    return workers


def _visible(gpu: int) -> str:
    """The id of the gpu-th visible GPU, in the parent's CUDA_VISIBLE_DEVICES terms when it narrows them."""
    parent = os.environ.get("CUDA_VISIBLE_DEVICES")
    if parent:
        ids = [p.strip() for p in parent.split(",") if p.strip()]
        return ids[gpu % len(ids)]
    return str(gpu)


def run_workers(args: list[str], workers: list[Worker], what: str, say: Callable[[str], None] = print) -> None:
    """Start `python -m pipeline *args runtime.threads=<t>` once per worker, relay each line prefixed with the
    worker's label, wait for all; one line names every worker that failed."""
    say(f"{what}: {len(workers)} runs at once: " + ", ".join(w.label for w in workers))
    procs, relays = [], []
    for w in workers:
        cmd = [sys.executable, "-m", "pipeline", *args, f"runtime.threads={w.threads}", "runtime.parallel_runs=1"]
        proc = subprocess.Popen(cmd, env={**os.environ, **w.env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1)
        relay = threading.Thread(target=_relay, args=(proc, f"[{w.label}] "), daemon=True)
        relay.start()
        procs.append(proc)
        relays.append(relay)
    try:
        codes = [p.wait() for p in procs]
    except BaseException:  # Ctrl-C: end the workers too (their locks go stale and are taken over on the next run)
        for p in procs:
            p.terminate()
        raise
    for r in relays:
        r.join()
    failed = [f"{w.label} (exit {c})" for w, c in zip(workers, codes, strict=True) if c != 0]
    if failed:
        raise PipelineError(f"{what}: worker {', '.join(failed)} failed (its last lines are above, prefixed "
                            f"with its name); rerun to resume, or set runtime.parallel_runs=1")


def _relay(proc: subprocess.Popen, prefix: str) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        sys.stdout.write(prefix + line)
        sys.stdout.flush()
