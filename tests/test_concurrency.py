"""Several processes on one WORK (issue 27): two `predict` chains started together end with the artifacts of one
process, bitwise, each run trained once; `runtime.parallel_runs=2` trains in two workers to the same weights; a
SIGKILLed lock holder's run is taken over by the next process."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from safetensors import safe_open

from .conftest import REPO, tiny, write_competition

pytestmark = pytest.mark.slow

EXPS = "model.backbones=[d2l_lenet,{name: lenet_b, backbone: d2l_lenet, train: {seed: 7}}]"


def _cmd(stage: str, data: Path, work: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pipeline", stage, "--data", str(data), "--work", str(work),
            *tiny(EXPS, "tracking.backend=none", *extra)]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _run(cmd: list[str]) -> str:
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=_env())
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout + out.stderr


def _artifacts(work: Path) -> dict[str, bytes]:
    """Every file of the runs that must be the same however many processes made them: the weights (every tensor's
    bytes, and the metadata as a dict: safetensors writes its keys in a per-process hash order) and the prediction
    tables (the parquet files also record the writer's pyarrow version)."""
    out = {}
    for path in sorted((work / "runs").rglob("*")):
        rel = str(path.relative_to(work))
        if path.suffix == ".safetensors":
            with safe_open(str(path), "pt") as fh:
                out[rel] = (fh.metadata(), {k: fh.get_tensor(k).numpy().tobytes() for k in fh.keys()})
        elif path.suffix == ".parquet":
            out[rel] = pd.read_parquet(path).to_csv(index=False).encode()
    return out


@pytest.fixture(scope="module")
def solo(tmp_path_factory) -> tuple[Path, Path, dict]:
    """One process's chain up to the predictions: (DATA, its WORK, its artifacts)."""
    root = tmp_path_factory.mktemp("solo")
    data = write_competition(root / "comp", n_per_class=6)
    _run(_cmd("predict", data, root / "work"))
    return data, root / "work", _artifacts(root / "work")


def test_two_processes_on_one_work_match_one_process_bitwise_and_train_each_run_once(solo, tmp_path: Path):
    data, _, expected = solo
    work = tmp_path / "work"
    procs = [subprocess.Popen(_cmd("predict", data, work), cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env=_env()) for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    both = outs[0] + outs[1]
    assert expected and _artifacts(work) == expected
    for name in ("d2l_lenet", "lenet_b"):
        for fold in (0, 1):  # trained by one process; the other found it held or up to date
            assert both.count(f"{name} fold {fold} epoch 1") == 1, both[-4000:]
    assert "held by pid" in both or "waiting for pid" in both, both[-4000:]
    assert not list(work.rglob("*.lock")) and not list(work.rglob("*.tmp"))


def test_parallel_runs_train_in_two_workers_to_the_same_weights(solo, tmp_path: Path):
    data, _, expected = solo
    work = tmp_path / "work"
    out = _run(_cmd("train", data, work, "runtime.parallel_runs=2"))
    assert "train: 2 runs at once: w1 cpu x1, w2 cpu x1" in out
    assert "[w1 cpu x1]" in out and "[w2 cpu x1]" in out
    weights = {k: v for k, v in expected.items() if k.endswith(".safetensors")}
    assert weights and _artifacts(work) == weights
    for name in ("d2l_lenet", "lenet_b"):
        for fold in (0, 1):
            assert out.count(f"{name} fold {fold} epoch 1") == 1, out[-4000:]  # in a worker, not again by the parent
            assert f"train: {name} fold {fold} up to date" in out  # the parent's check after the workers


def test_parallel_runs_predict_one_experiment_per_worker_to_the_same_tables(solo, tmp_path: Path):
    data, solo_work, expected = solo
    work = tmp_path / "work"
    shutil.copytree(solo_work, work)
    for path in [*work.glob("runs/*/*.parquet"), *work.glob("runs/*/predict.json")]:
        path.unlink()
    out = _run(_cmd("predict", data, work, "runtime.parallel_runs=2"))
    assert "train: 2 runs at once" not in out  # every run trained already: no training workers
    assert "predict: 2 runs at once: w1 cpu x1, w2 cpu x1" in out
    assert _artifacts(work) == expected


def test_a_sigkilled_lock_holder_is_taken_over_by_the_next_run(solo, tmp_path: Path):
    data, _, _ = solo
    work = tmp_path / "work"
    cmd = _cmd("train", data, work, "train.epochs=40", "model.backbones=[d2l_lenet]", "train.folds=[0]")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
    lock = work / "runs" / "d2l_lenet" / ".fold0.lock"
    last, deadline = work / "runs" / "d2l_lenet" / "fold0" / "last.pt", time.time() + 120
    while proc.poll() is None and time.time() < deadline and not last.exists():
        time.sleep(0.01)
    assert lock.exists(), "the run ended before it could be killed; make it longer"
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert lock.exists() and not (work / "runs" / "d2l_lenet" / "fold0" / "best.json").exists()
    out = _run(cmd)
    assert f"train: took over {lock} from pid {proc.pid}" in out and "its process is gone" in out
    assert "resumes after epoch" in out
    assert (work / "runs" / "d2l_lenet" / "fold0" / "best.json").exists() and not lock.exists()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_cluster():
    """A real Ray cluster on this machine: a head and a second worker node, one CPU each, started here with this
    checkout first on their path (a cluster runs the same code on every machine) and stopped after by their process
    groups (never `ray stop`, which would stop every Ray process of the machine)."""
    import tempfile

    ray_bin = Path(sys.executable).with_name("ray")
    port = _free_port()
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must fit in 107 characters
    # HOME: Ray reads ~/.ray/auth_token when present, which switches its token authentication on for the servers but
    # not for a client that was not told: the test's cluster must not depend on what a user keeps there
    env = {**_env(), "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0", "HOME": temp}
    common = ["--num-cpus=1", "--node-ip-address=127.0.0.1", "--disable-usage-stats"]
    starts = [[str(ray_bin), "start", "--head", f"--port={port}", "--include-dashboard=false", f"--temp-dir={temp}",
               *common],
              [str(ray_bin), "start", f"--address=127.0.0.1:{port}", *common]]
    groups = []
    try:
        for cmd in starts:
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True)
            groups.append(proc.pid)
            out = proc.communicate(timeout=180)[0]
            assert proc.returncode == 0, out[-3000:]
        yield f"127.0.0.1:{port}", env
    finally:
        for pgid in groups:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(temp, ignore_errors=True)


def test_a_ray_cluster_spreads_the_runs_over_its_nodes_to_the_same_weights(solo, ray_cluster, tmp_path: Path):
    data, _, expected = solo
    address, env = ray_cluster
    work = tmp_path / "work"
    cmd = _cmd("train", data, work, f"runtime.cluster={address}", "runtime.parallel_runs=2")
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-3000:]
    assert f"train: 2 Ray tasks on {address}, each 1 CPU(s)" in out, out[-3000:]
    done = [line for line in out.splitlines() if "Ray tasks done on nodes" in line]
    assert done and len(done[0].split("nodes", 1)[1].split(",")) == 2, out[-3000:]  # one task on each node
    weights = {k: v for k, v in expected.items() if k.endswith(".safetensors")}
    assert _artifacts(work) == weights
    assert not list(work.rglob("*.lock")) and not list((work / "locks").glob("cluster-*"))

