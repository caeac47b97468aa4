"""Experiment tracking: every training run's params, per-epoch metrics and curves in MLflow.

The store defaults to a SQLite file beside the run folders, WORK/mlflow.db (artifacts in WORK/mlartifacts/):
a local file, no server. MLflow keeps its plain-folder store (./mlruns) in maintenance mode and refuses it by
default, so SQLite is its own recommended local store. `MLFLOW_TRACKING_URI`, or the config's uri, points
the runs at a shared server instead. Only the tracking client is installed (mlflow-skinny); the UI comes from a
full MLflow install (docs/training-and-experiments.md, Tracking).

One MLflow run per trained fold (one training of one model). When it is logged, and why:
- The run is created when training starts (RUNNING, with its params and tags), and its id is kept in the fold
  folder (`mlflow.json`, with the training's fingerprint). The metrics are logged when training ends, from the
  loop's history rows, every history column at step = epoch. The loop keeps those rows in `last.pt`, so a run
  that was interrupted and resumed logs each epoch exactly once, with the values the history file holds.
- The history is logged before the fold's stamp (best.json) is written: a process that dies while logging leaves
  the fold unfinished, and the rerun (which resumes at its last epoch and trains nothing) logs what is missing.
- A resumed or repeated training of the same fingerprint reopens the run whose id the fold folder keeps, and
  logs only the steps that run does not hold yet: logging again after a failure part way never duplicates a step.
  A training with another fingerprint starts afresh in the loop, so it gets a new MLflow run.
- Tracking must never break training: a failure (server down, store unwritable) prints one warning line, and the
  run's tracking stops there (a store that failed to start a run is not tried again by this process, so a stage
  whose server is down warns once and does not wait on it for every fold); training and its files go on as usual.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from pipeline.core.artifacts import read_stamp, write_json

log = logging.getLogger(__name__)

_FAILED: set[str] = set()  # stores that failed in this process: the next folds do not wait on them again
RUN_FILE = "mlflow.json"  # in the fold folder: the MLflow run of this training
# A shared server that does not answer must not stall training for MLflow's default of minutes of retries.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}


@dataclass(frozen=True)
class Settings:
    """What tracking needs from the config: the backend, the store and the MLflow experiment's name."""

    backend: str  # "mlflow" or "none"
    uri: str | None  # None: $MLFLOW_TRACKING_URI, else the SQLite file under `work_dir`
    experiment: str
    work_dir: Path

    def resolved_uri(self) -> str:
        return self.uri or os.environ.get("MLFLOW_TRACKING_URI") or default_uri(self.work_dir)

    def artifact_location(self) -> str | None:
        """Where a new experiment keeps its files: beside a SQLite store, in mlartifacts/ (WORK/mlartifacts for the
        default one; MLflow's own default is ./mlruns in whatever folder the command runs from); a server's choice
        otherwise."""
        db = _sqlite_path(self.resolved_uri())
        return (db.resolve().parent / "mlartifacts").as_uri() if db is not None else None


def default_uri(work_dir: Path) -> str:
    return f"sqlite:///{(work_dir.resolve() / 'mlflow.db').as_posix()}"


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{'train': {'lr': 0.1}} -> {'train.lr': 0.1}: MLflow params are flat."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out |= flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def _warn(what: str, exc: BaseException) -> None:
    first = (str(exc).strip().splitlines() or [""])[0][:200]
    log.warning(f"tracking: warning: {what} failed ({type(exc).__name__}: {first}); training goes on without tracking")


class Run:
    """No tracking (tracking.backend none, another rank, or a failure): every call does nothing."""

    run_id: str | None = None

    def finish(self, history: list[dict], artifacts: list[Path]) -> None:
        pass

    def stop(self, exc: BaseException) -> None:
        pass


class MlflowRun(Run):
    """One fold's MLflow run; any MLflow error turns it into a no-op after one warning line."""

    def __init__(self, client, run_id: str, logged: dict[str, int]):
        self.client, self.run_id, self.logged = client, run_id, logged  # logged: metric -> last step held

    def finish(self, history: list[dict], artifacts: list[Path]) -> None:
        """Every history column (but epoch) at step = epoch for the steps not logged yet, the files, FINISHED."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, float(value), now, int(row["epoch"])) for row in history for key, value in row.items()
                   if key != "epoch" and _number(value) and int(row["epoch"]) > self.logged.get(key, 0)]
        try:
            for i in range(0, len(metrics), 1000):  # MLflow's limit per batch
                self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])
                for m in metrics[i:i + 1000]:
                    self.logged[m.key] = max(m.step, self.logged.get(m.key, 0))
            for path in artifacts:
                if path.exists():
                    self.client.log_artifact(self.run_id, str(path))
            self.client.set_terminated(self.run_id, "FINISHED")
        except Exception as exc:  # noqa: BLE001 -- tracking never breaks training
            _warn(f"logging to MLflow run {self.run_id}", exc)

    def stop(self, exc: BaseException) -> None:
        """Training stopped on `exc`: KILLED for an interrupt or a pruned trial, else FAILED (a resume reopens it)."""
        status = "FAILED" if isinstance(exc, Exception) and type(exc).__name__ != "TrialPruned" else "KILLED"
        try:
            self.client.set_terminated(self.run_id, status)
        except Exception as err:  # noqa: BLE001 -- tracking never hides the training's own error
            _warn(f"marking MLflow run {self.run_id} {status}", err)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and not math.isnan(value)


def start(settings: Settings, run_dir: Path, name: str, fingerprint: str, params: dict[str, Any],
          tags: dict[str, str]) -> Run:
    """The MLflow run of the training in `run_dir`: reopened when `run_dir` keeps one of this fingerprint and
    store, else created with `params` and `tags`. Returns a no-op Run when tracking is off or MLflow fails."""
    uri = settings.resolved_uri()
    if settings.backend == "none" or uri in _FAILED:
        return Run()
    try:
        return _start(settings, run_dir, name, fingerprint, params, tags)
    except Exception as exc:  # noqa: BLE001 -- tracking never breaks training
        _FAILED.add(uri)
        _warn(f"starting an MLflow run at {uri}", exc)
        return Run()


def _start(settings: Settings, run_dir: Path, name: str, fingerprint: str, params: dict[str, Any],
           tags: dict[str, str]) -> Run:
    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    for logger in ("mlflow", "alembic"):  # not their INFO lines about creating the database (set after the import)
        logging.getLogger(logger).setLevel(logging.WARNING)
    uri = settings.resolved_uri()
    with _store_lock(uri):
        client = MlflowClient(tracking_uri=uri)
        client.search_experiments(max_results=1)  # opens the store: a new SQLite file gets its tables here
    kept = read_stamp(run_dir / RUN_FILE) or {}
    if kept.get("fingerprint") == fingerprint and kept.get("tracking_uri") == uri:
        run = _existing(client, kept.get("run_id"))
        if run is not None:
            client.update_run(run.info.run_id, status="RUNNING")
            return MlflowRun(client, run.info.run_id, _logged_steps(client, run))
    experiment_id = _experiment(client, settings.experiment, settings.artifact_location())
    run = client.create_run(experiment_id, run_name=name, tags={**tags, "fingerprint": fingerprint})
    values = [Param(k, json.dumps(v) if isinstance(v, list | dict) else str(v)) for k, v in params.items()]
    for i in range(0, len(values), 100):  # MLflow's limit of params per batch
        client.log_batch(run.info.run_id, params=values[i:i + 100])
    write_json(run_dir / RUN_FILE, {"run_id": run.info.run_id, "tracking_uri": uri, "fingerprint": fingerprint})
    return MlflowRun(client, run.info.run_id, {})


def _store_lock(uri: str):
    """A lock beside a SQLite store while it is opened: two processes that create its tables at once (two tuning
    processes on a new WORK) would otherwise collide in MLflow's schema migrations."""
    db = _sqlite_path(uri)
    if db is None:
        return contextlib.nullcontext()
    db.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(f"{db}.lock")


def _sqlite_path(uri: str) -> Path | None:
    """The file of a SQLite store URI (sqlite:///relative or sqlite:////absolute), else None."""
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def _existing(client, run_id: str | None):
    """The kept run, unless it was deleted (or its store was emptied)."""
    from mlflow.exceptions import MlflowException

    if not run_id:
        return None
    try:
        run = client.get_run(run_id)
    except MlflowException:
        return None
    return run if run.info.lifecycle_stage == "active" else None


def _logged_steps(client, run) -> dict[str, int]:
    return {key: max(m.step for m in client.get_metric_history(run.info.run_id, key)) for key in run.data.metrics}


def _experiment(client, name: str, artifact_location: str | None) -> str:
    """The experiment's id, created when missing (another process may create it at the same moment)."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage == "deleted":  # deleted in the UI: its name stays taken until restored
            client.restore_experiment(found.experiment_id)
        return found.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except MlflowException:
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id
