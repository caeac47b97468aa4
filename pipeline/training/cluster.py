"""`runtime.cluster` (`make train CLUSTER=ray://head:10001`): the workers of a stage as Ray tasks on a Ray cluster
whose machines all mount WORK and DATA at the same paths.

Each task asks Ray for its resources (`runtime.cluster_cpus` CPUs, one GPU when the runs use CUDA, and
`runtime.cluster_memory_gb`), so Ray places it on a machine with room, and runs `python -m pipeline STAGE` there
on the shared WORK: the run locks (training/schedule.py) hand each run to one task, as they do for the local
workers of training/parallel.py. Ray sets CUDA_VISIBLE_DEVICES for a task that asks for a GPU. Before anything
runs, each task checks that it sees the check file the driver wrote under WORK, so a worker without the shared
disk fails with one line instead of training into its own local folder.

Ray is imported only here and only when a cluster is asked for (its import takes seconds): `make install` installs it
with the dev extras, pinned in constraints.txt; an environment without it gets one line saying how to add it.
Every machine must run the same pipeline code (one checkout on the shared disk, or the same installed version).
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from pipeline.core.errors import PipelineError
from pipeline.training.parallel import WORKER_ENV

TAIL = 40  # lines of a failed task's output shown in the error


def run_task(args: list[str], check: str, token: str, threads: int, index: int, n: int) -> dict:
    """The body of one Ray task (also callable directly): check WORK is visible, then run the stage, printing its
    lines (Ray forwards them to the driver); returns the node, host, exit status and the output's tail."""
    host = socket.gethostname()
    ray = sys.modules.get("ray")  # imported in a Ray worker; called directly (the tests), not worth its import
    node = ray.get_runtime_context().get_node_id()[:8] if ray is not None and ray.is_initialized() else "local"
    try:
        seen = Path(check).read_text() == token
    except OSError:
        seen = False
    if not seen:
        return {"node": node, "host": host, "code": None, "tail": []}
    env = {**os.environ, WORKER_ENV: f"{index}/{n}", "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "pipeline", *args, f"runtime.threads={threads}", "runtime.parallel_runs=1"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    tail: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        print(f"[ray {node} w{index}] {line}", end="", flush=True)
        tail = (tail + [line.rstrip()])[-TAIL:]
    return {"node": node, "host": host, "code": proc.wait(), "tail": tail}


def run_tasks(address: str, args: list[str], n: int, work: Path, threads: int, gpus: float | None,
              memory_gb: float | None, what: str, say: Callable[[str], None] = print) -> list[dict]:
    """n Ray tasks running `python -m pipeline *args` on the cluster at `address` (gpus None: one each when the
    cluster has GPUs); one line for a failure."""
    try:
        import ray
    except ImportError:
        raise PipelineError(f"runtime.cluster={address}: ray is not installed; pip install -c constraints.txt ray "
                            "(or unset runtime.cluster)") from None
    work = Path(work).resolve()
    token = secrets.token_hex(8)
    check = work / "locks" / f"cluster-{token}.check"
    check.parent.mkdir(parents=True, exist_ok=True)
    check.write_text(token)
    try:
        try:
            ray.init(address=address, log_to_driver=True, logging_level="WARNING", configure_logging=False)
        except Exception as exc:  # a wrong address, a cluster that is down, a Ray version mismatch
            raise PipelineError(f"runtime.cluster={address}: cannot connect ({type(exc).__name__}: "
                                f"{str(exc).splitlines()[0] if str(exc) else ''}); start it with `ray start --head` "
                                "or fix the address") from None
        if gpus is None:
            gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
        options = {"num_cpus": threads, "num_gpus": gpus, "max_retries": 0}
        if memory_gb:
            options["memory"] = int(memory_gb * 2**30)
        say(f"{what}: {n} Ray tasks on {address}, each {threads} CPU(s)"
            + (f", {gpus:g} GPU" if gpus else "") + (f", {memory_gb:g} GiB" if memory_gb else ""))
        task = ray.remote(run_task).options(**options)
        results = ray.get([task.remote(args, str(check), token, threads, i + 1, n) for i in range(n)])
        ray.shutdown()
    finally:
        check.unlink(missing_ok=True)
    blind = [r for r in results if r["code"] is None]
    if blind:
        raise PipelineError(f"runtime.cluster: the Ray worker on host {blind[0]['host']} (node {blind[0]['node']}) "
                            f"cannot see WORK {work}; mount it (and DATA) at the same path on every machine")
    failed = [r for r in results if r["code"] != 0]
    if failed:
        say("\n".join(failed[0]["tail"]))
        raise PipelineError(f"{what}: the Ray task on host {failed[0]['host']} (node {failed[0]['node']}) failed "
                            f"(exit {failed[0]['code']}, its last lines above); rerun to resume")
    say(f"{what}: Ray tasks done on nodes " + ", ".join(sorted({r['node'] for r in results})))
    return results
