"""Runs shared by several processes on one WORK: each run (an experiment's fold, an experiment's predictions) is done
under its lock file (core/locks.py), longest first.

Every process walks the same list in the same order (longest expected first: with N processes taking the next free
run, that is the longest-processing-time rule, which keeps the last process from starting a long run while the others
sit idle). A run another process holds is passed over with one line and, unless `wait` is off, come back to at the
end: waiting for its lock, then running it, which finds it finished (its stamp) or, when its holder died, takes the
lock over and resumes from the run's `last` checkpoint. So two `make train` on one WORK never train one run twice,
and both end with every run done. The worker processes of `runtime.parallel_runs` do not wait (the process that
started them checks every run after they end), so a worker never sits idle on another's run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core.locks import Lock, describe
from pipeline.training.fold import FoldSettings, TrainingData, is_trained, train_fold, training_rows


@dataclass(frozen=True)
class Job:
    """One run: its key in the results, its name in messages, its lock file, its expected cost (any unit: only the
    order counts), the call."""

    key: Any
    name: str
    lock: Path
    cost: float
    run: Callable[[], Any]
    done: Callable[[], bool] = lambda: False  # finished already (no worker needs starting for it)


def order(jobs: list[Job]) -> list[Job]:
    """Longest expected first; ties keep the given order (every process must see the same order)."""
    return sorted(jobs, key=lambda j: -j.cost)


def run_jobs(jobs: list[Job], what: str, say: Callable[[str], None] = print, wait: bool = True,
             locking: bool = True) -> dict[str, Any]:
    """{job key: its result} of every job this process ran, or (with `wait`) came back to; `locking` off (one
    torchrun job, whose ranks must all run every job together) runs them in order without locks."""
    results: dict[str, Any] = {}
    if not locking:
        for job in order(jobs):
            results[job.key] = job.run()
        return results
    later: list[Job] = []
    for job in order(jobs):
        lock = Lock(job.lock, what, say)
        if not lock.try_acquire():
            holder = describe(lock.holder() or {})
            say(f"{what}: {job.name} is held by {holder}; "
                + ("coming back to it after the others" if wait else "left to it"))
            later.append(job)
            continue
        try:
            results[job.key] = job.run()
        finally:
            lock.release()
    if wait:
        for job in later:
            with Lock(job.lock, what, say):
                results[job.key] = job.run()
    return results


def fold_job(settings: FoldSettings, backbone: str, name: str, fold: int, data: TrainingData) -> Job:
    """One (experiment, fold) training as a job, keyed (name, fold): locked by <runs>/<experiment>/.fold<k>.lock, its
    expected length epochs x pixels x training rows (a proxy: backbones' speeds differ, but the runs of one portfolio
    mostly differ by size, epochs and rows; a finished run costs nothing either way)."""
    rows = int(training_rows(data.frame, fold).sum())
    cost = settings.train.epochs * settings.train.image_size ** 2 * rows
    return Job((name, fold), f"{name} fold {fold}", settings.runs_root / name / f".fold{fold}.lock", cost,
               lambda: train_fold(settings, backbone, fold, data, name=name),
               lambda: is_trained(settings, backbone, fold, data, name))
