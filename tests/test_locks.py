"""Lock files on WORK (core/locks.py), the run scheduler (training/schedule.py) and the worker plan
(training/parallel.py): quick, no training."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.core import locks
from pipeline.core.artifacts import HOST
from pipeline.core.errors import PipelineError
from pipeline.core.locks import Lock, read_holder
from pipeline.training import parallel, schedule

from .conftest import REPO


def test_a_held_lock_refuses_a_second_holder_and_names_its_owner(tmp_path: Path):
    path = tmp_path / "locks" / "clean.lock"
    first, second = Lock(path, "clean"), Lock(path, "clean")
    assert first.try_acquire()
    try:
        assert not second.try_acquire()
        holder = read_holder(path)
        assert holder["pid"] == os.getpid() and holder["host"] == HOST and holder["token"] == first.token
        assert f"pid {os.getpid()} on host {HOST}" in locks.describe(holder)
    finally:
        first.release()
    assert not path.exists()
    assert second.try_acquire()
    second.release()


def test_the_heartbeat_thread_refreshes_the_lock(tmp_path: Path):
    lock = Lock(tmp_path / "a.lock", "train", heartbeat_s=0.05)
    assert lock.try_acquire()
    try:
        first = read_holder(lock.path)["heartbeat"]
        deadline = time.time() + 5
        while read_holder(lock.path)["heartbeat"] == first and time.time() < deadline:
            time.sleep(0.02)
        assert read_holder(lock.path)["heartbeat"] > first
        assert read_holder(lock.path)["started"] == pytest.approx(first, abs=0.5)
    finally:
        lock.release()


def _write_holder(path: Path, **fields) -> None:
    now = time.time()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"pid": 1, "host": HOST, "started": now, "heartbeat": now, "token": "x",
                                "what": "train", **fields}))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_dead_owner_on_this_host_is_taken_over_with_one_line(tmp_path: Path):
    path = tmp_path / "fold0.lock"
    _write_holder(path, pid=_dead_pid())
    said = []
    lock = Lock(path, "train", said.append)
    assert lock.try_acquire()
    lock.release()
    assert len(said) == 1 and "took over" in said[0] and "its process is gone" in said[0]


def test_another_hosts_lock_is_taken_over_only_once_its_heartbeat_is_old(tmp_path: Path):
    path = tmp_path / "fold0.lock"
    _write_holder(path, host="elsewhere", pid=os.getpid(), heartbeat=time.time() - 5)
    assert not Lock(path, "train", timeout_s=60).try_acquire()  # alive as far as we can tell: its pid is not ours
    _write_holder(path, host="elsewhere", pid=os.getpid(), heartbeat=time.time() - 120)
    said = []
    lock = Lock(path, "train", said.append, timeout_s=60)
    assert lock.try_acquire()
    lock.release()
    assert "no heartbeat for 120 s" in said[0]


def test_a_lock_file_caught_before_its_content_is_written_is_not_stale_at_once(tmp_path: Path):
    path = tmp_path / "fold0.lock"
    path.write_text("")
    assert locks.stale_reason(path, read_holder(path), 60) is None
    assert "unreadable" in locks.stale_reason(path, read_holder(path), 60, now=time.time() + 120)


def test_a_sigkilled_holder_leaves_a_lock_the_next_process_takes_over(tmp_path: Path):
    path = tmp_path / "fold0.lock"
    code = (f"import time; from pipeline.core.locks import Lock; Lock({str(path)!r}, 'train').try_acquire(); "
            "print('held', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    assert not Lock(path, "train").try_acquire()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    said = []
    lock = Lock(path, "train", said.append)
    assert lock.try_acquire() and f"pid {proc.pid}" in said[0]
    lock.release()


def test_the_scheduler_runs_longest_first_and_comes_back_to_held_runs(tmp_path: Path):
    ran, said = [], []
    other = Lock(tmp_path / "long.lock", "train")
    assert other.try_acquire()

    def job(name: str, cost: float, then=lambda: None) -> schedule.Job:
        return schedule.Job(name, name, tmp_path / f"{name}.lock", cost, lambda: then() or ran.append(name) or name)

    # the other process finishes "long" while this one runs "mid"; the waiting pass then takes it
    result = schedule.run_jobs([job("short", 1), job("long", 3), job("mid", 2, other.release)], "train", said.append)
    assert ran == ["mid", "short", "long"]  # long first in order, but held: come back to after the others
    assert "long is held by pid" in said[0] and "coming back to it" in said[0]
    assert result == {"short": "short", "mid": "mid", "long": "long"}
    assert not list(tmp_path.glob("*.lock"))


def test_a_worker_leaves_held_runs_to_their_holder(tmp_path: Path):
    other = Lock(tmp_path / "a.lock", "train")
    assert other.try_acquire()
    said = []
    try:
        result = schedule.run_jobs([schedule.Job("a", "a", tmp_path / "a.lock", 1, lambda: "ran")], "train",
                                   said.append, wait=False)
    finally:
        other.release()
    assert result == {} and "left to it" in said[0]


def test_workers_get_one_gpu_each_or_a_share_of_the_cores(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    cpu = parallel.plan(2, gpus=0, cores=2)
    assert [(w.threads, w.gpu) for w in cpu] == [(1, None), (1, None)]
    assert all("CUDA_VISIBLE_DEVICES" not in w.env and w.env["OMP_NUM_THREADS"] == "1" for w in cpu)
    gpu = parallel.plan(3, gpus=2, cores=16)
    assert [w.env["CUDA_VISIBLE_DEVICES"] for w in gpu] == ["0", "1", "0"] and gpu[0].threads == 5
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    assert [w.env["CUDA_VISIBLE_DEVICES"] for w in parallel.plan(2, gpus=2, cores=4)] == ["4", "6"]
    assert parallel.plan(4, gpus=0, cores=2)[0].threads == 1
    with pytest.raises(PipelineError, match="parallel_runs"):
        parallel.plan(0, gpus=0, cores=2)


def test_a_ray_task_that_cannot_see_work_runs_nothing_and_says_where_it_ran(tmp_path: Path):
    from pipeline.training import cluster

    result = cluster.run_task(["train"], str(tmp_path / "nowhere" / "x.check"), "token", 1, 1, 1)
    assert result["code"] is None and result["host"] and result["tail"] == []
