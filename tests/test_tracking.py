"""MLflow tracking: the runs a real tiny training logs, read back with MLflow's own client."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from pipeline import orchestrate
from pipeline.context import Context
from pipeline.core.artifacts import read_stamp
from pipeline.core.config import load_config
from pipeline.detection.bananas import build_bananas
from pipeline.training import fold as fold_module
from pipeline.training import tracking

from .conftest import REPO, tiny, write_competition

TINY = tiny("train.image_size=8", "train.epochs=2", "train.lr=0.01", "train.batch_size=4", "train.warmup_epochs=1",
             "predict.tta=[identity,hflip]")  # warmup and TTA at their defaults, as these tests had them
COLUMNS = ["train_loss", "train_acc", "val_acc", "val_accuracy", "lr", "seconds"]


def _ctx(tmp_path: Path, *overrides: str) -> Context:
    data = write_competition(tmp_path / "comp", n_per_class=6)
    return Context(load_config(None, [*TINY, *overrides]), data, tmp_path / "w")


def _runs(uri: str, experiment: str = "comp") -> dict:
    """{run name: run} of the experiment, read by MLflow's client."""
    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no MLflow experiment {experiment!r} at {uri}"
    return {r.info.run_name: r for r in client.search_runs([found.experiment_id])}


def _assert_history_logged(client: MlflowClient, run, run_dir: Path) -> None:
    """Each history.csv column is one metric, one value per epoch at step = epoch, equal to the file's."""
    history = pd.read_csv(run_dir / "history.csv")
    assert set(run.data.metrics) == set(COLUMNS)
    for column in COLUMNS:
        logged = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, column))
        assert [s for s, _ in logged] == history["epoch"].tolist(), column
        assert [v for _, v in logged] == pytest.approx(history[column].tolist(), rel=1e-12), column


@pytest.mark.slow
def test_each_fold_is_an_mlflow_run_with_params_metrics_and_curves(tmp_path: Path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    ctx = _ctx(tmp_path)
    orchestrate.run("train", ctx)
    uri = tracking.default_uri(ctx.work_dir)
    assert (ctx.work_dir / "mlflow.db").is_file()
    runs = _runs(uri)
    assert sorted(runs) == ["d2l_lenet-fold0", "d2l_lenet-fold1"]
    client = MlflowClient(tracking_uri=uri)
    for fold in (0, 1):
        run, run_dir = runs[f"d2l_lenet-fold{fold}"], ctx.work_dir / "runs" / "d2l_lenet" / f"fold{fold}"
        params = run.data.params
        keys = (params["backbone"], params["fold"], params["train.lr"], params["train.epochs"])
        assert keys == ("d2l_lenet", str(fold), "0.01", "2")
        assert params["train.image_size"] == "8" and params["model.freeze"] == "[]" and "model.backbones" not in params
        assert run.data.tags["stage"] == "train" and run.data.tags["fold"] == str(fold)
        assert run.data.tags["fingerprint"] == read_stamp(run_dir / "best.json")["fingerprint"]
        assert run.info.status == "FINISHED"
        _assert_history_logged(client, run, run_dir)
        assert sorted(a.path for a in client.list_artifacts(run.info.run_id)) == ["curves.png", "history.csv"]
        local = Path(client.download_artifacts(run.info.run_id, "history.csv", str(tmp_path / f"dl{fold}")))
        assert local.read_bytes() == (run_dir / "history.csv").read_bytes()
    assert (ctx.work_dir / "mlartifacts").is_dir()
    orchestrate.run("train", ctx)  # up to date: nothing trains and nothing more is logged
    again = _runs(uri)
    assert sorted(again) == sorted(runs)
    assert len(client.get_metric_history(again["d2l_lenet-fold0"].info.run_id, "train_loss")) == 2


@pytest.mark.slow
def test_tracking_none_logs_nothing(tmp_path: Path, monkeypatch):
    shared = tmp_path / "shared.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{shared}")
    ctx = _ctx(tmp_path, "tracking.backend=none")
    orchestrate.run("train", ctx)
    assert (ctx.work_dir / "runs" / "d2l_lenet" / "fold1" / "best.json").is_file()
    assert not shared.exists() and not (ctx.work_dir / "mlflow.db").exists()
    assert not list(ctx.work_dir.rglob(tracking.RUN_FILE)) and not (ctx.work_dir / "mlartifacts").exists()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_tracking_server_that_is_down_warns_once_and_training_finishes(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # MLflow's retries would only make the test slow
    monkeypatch.setattr(tracking, "_FAILED", set())
    ctx = _ctx(tmp_path, f"tracking.uri=http://127.0.0.1:{_closed_port()}")
    orchestrate.run("train", ctx)
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("tracking:")]
    assert len(warnings) == 1, warnings
    assert "warning: starting an MLflow run at http://127.0.0.1:" in warnings[0]
    assert warnings[0].endswith("training goes on without tracking")
    for fold in (0, 1):
        run_dir = ctx.work_dir / "runs" / "d2l_lenet" / f"fold{fold}"
        assert (run_dir / "best.json").is_file() and len(pd.read_csv(run_dir / "history.csv")) == 2
        assert not (run_dir / tracking.RUN_FILE).exists()


@pytest.mark.slow
def test_an_interrupted_fold_resumes_into_the_same_mlflow_run_without_repeating_epochs(tmp_path: Path, monkeypatch,
                                                                                         capsys):
    uri = f"sqlite:///{tmp_path / 'store' / 'server.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # the environment points the runs at another store
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # MLflow's own default would put the files in ./mlruns here
    ctx = _ctx(tmp_path, "tracking.experiment=lenets")
    orchestrate.run("folds", ctx)
    data = ctx.training_data()

    def die_in_epoch_2(epoch: int, value: float) -> None:
        if epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fold_module.train_fold(ctx.fold_settings(), "d2l_lenet", 0, data, on_epoch=die_in_epoch_2)
    (first,) = _runs(uri, "lenets").values()
    assert first.info.status == "KILLED" and first.data.metrics == {}
    fold_module.train_fold(ctx.fold_settings(), "d2l_lenet", 0, data)
    assert "d2l_lenet fold 0 resumes after epoch 1" in capsys.readouterr().out
    (run,) = _runs(uri, "lenets").values()
    assert run.info.run_id == first.info.run_id and run.info.status == "FINISHED"
    _assert_history_logged(MlflowClient(tracking_uri=uri), run, ctx.work_dir / "runs" / "d2l_lenet" / "fold0")
    assert not (ctx.work_dir / "mlflow.db").exists() and not (tmp_path / "cwd" / "mlruns").exists()
    assert (tmp_path / "store" / "mlartifacts" / run.info.run_id / "artifacts" / "curves.png").is_file()


def test_logging_again_adds_only_missing_steps_and_a_new_fingerprint_gets_a_new_run(tmp_path: Path):
    settings = tracking.Settings("mlflow", f"sqlite:///{tmp_path / 'm.db'}", "exp", tmp_path / "w")
    rows = [{"epoch": 1, "train_loss": 0.9, "note": "x"}, {"epoch": 2, "train_loss": 0.5, "note": "y"}]
    run_dir = tmp_path / "w" / "runs" / "m" / "fold0"
    first = tracking.start(settings, run_dir, "m-fold0", "fp1", {"train": 1}, {"stage": "train"})
    first.finish(rows[:1], [])  # a process that died after logging epoch 1
    again = tracking.start(settings, run_dir, "m-fold0", "fp1", {"train": 1}, {"stage": "train"})
    again.finish(rows, [])
    again.finish(rows, [])
    client = MlflowClient(tracking_uri=settings.uri)
    assert again.run_id == first.run_id
    logged = client.get_metric_history(first.run_id, "train_loss")
    assert sorted((m.step, m.value) for m in logged) == [(1, 0.9), (2, 0.5)]
    assert set(client.get_run(first.run_id).data.metrics) == {"train_loss"}  # text columns are no metrics
    other = tracking.start(settings, run_dir, "m-fold0", "fp2", {"train": 2}, {"stage": "train"})
    assert other.run_id not in (None, first.run_id)
    assert read_stamp(run_dir / tracking.RUN_FILE)["run_id"] == other.run_id
    experiment = client.get_experiment_by_name("exp").experiment_id
    client.delete_experiment(experiment)  # deleted in the UI: the next training brings it back
    assert tracking.start(settings, run_dir, "m-fold0", "fp3", {}, {}).run_id is not None
    assert client.get_experiment(experiment).lifecycle_stage == "active"


def test_flatten_names_params_by_their_config_keys():
    assert tracking.flatten({"train": {"lr": 0.1, "folds": None}, "model": {"freeze": []}}) == {
        "train.lr": 0.1, "train.folds": None, "model.freeze": []}


RACE = """
import sys
from pathlib import Path
work, name = Path(sys.argv[1]), sys.argv[2]
from pipeline.training import tracking
settings = tracking.Settings("mlflow", None, "exp", work)
run = tracking.start(settings, work / name, name, "fp", {"a": 1}, {})
run.finish([{"epoch": 1, "x": 1.0}], [])
print("run", run.run_id)
"""


@pytest.mark.slow
def test_two_processes_create_a_new_store_at_once(tmp_path: Path):
    """Two tuning processes on a new WORK: both create MLflow's tables in the same SQLite file at the same moment."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {"PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", RACE, str(tmp_path / "w"), name], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env=env) for name in ("a", "b")]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all("tracking:" not in out and "\nrun " in f"\n{out}" for out in outputs), outputs
    assert "None" not in "".join(outputs)
    assert sorted(_runs(tracking.default_uri(tmp_path / "w"), "exp")) == ["a", "b"]


@pytest.mark.slow
def test_the_detection_track_logs_its_training_too(tmp_path: Path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    data = build_bananas(tmp_path / "bananas", n_train=8, n_val=4, n_test=4, seed=1)
    overrides = ["detect.folds.n_splits=1",
                 "detect.train.image_size=64", "detect.train.epochs=2", "detect.train.batch_size=4",
                 "detect.predict.gallery_images=0", "detect.evaluate.tta=none", "runtime.device=cpu"]
    ctx = Context(load_config(None, overrides), data, tmp_path / "w", tmp_path / "subs")
    orchestrate.run("detect", ctx)
    uri = tracking.default_uri(ctx.work_dir)
    (run,) = _runs(uri, "bananas").values()
    assert run.info.run_name == "tinyssd" and run.data.tags["stage"] == "detect" and run.info.status == "FINISHED"
    params = run.data.params
    assert (params["model"], params["detect.train.epochs"], params["detect.train.loss"]) == ("TinySSD", "2", "ssd")
    history = pd.read_csv(ctx.work_dir / "detect" / "history.csv")
    client = MlflowClient(tracking_uri=uri)
    assert set(run.data.metrics) == set(history.columns) - {"epoch"}
    for column in ("train_loss", "map_50"):
        logged = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, column))
        assert [s for s, _ in logged] == [1, 2]
        assert [v for _, v in logged] == pytest.approx(history[column].tolist(), rel=1e-12)
    assert sorted(a.path for a in client.list_artifacts(run.info.run_id)) == ["curves.png", "history.csv"]
