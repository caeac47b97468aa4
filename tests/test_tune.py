"""Optuna tuning: resume, shared storage, failures, pruning, seeding, best.yaml feeding later stages."""

import subprocess
import sys
from pathlib import Path

import optuna
import pandas as pd
import pytest

from pipeline import tune
from pipeline.config import load_config
from pipeline.context import Context
from pipeline.errors import PipelineError

from .conftest import REPO


def _space(tmp_path: Path, text: str = "train.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}\n") -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return path


def _ctx(comp_dir: Path, tmp_path: Path, *overrides: str) -> Context:
    cfg = load_config(None, ["folds.n_splits=2", f"tune.space={_space(tmp_path)}", "tune.epochs=3", *overrides])
    return Context(cfg, comp_dir, tmp_path / "work")


def _fake(bad_above: float = 1.0, fail_above: float = 1.0):
    """A fast stand-in for short trainings: good below `bad_above`, failing above `fail_above`."""

    def fn(cfg, report):
        if cfg.train.lr > fail_above:
            raise RuntimeError("loss is NaN")
        value = 0.2 if cfg.train.lr > bad_above else 0.9
        for epoch in range(1, cfg.train.epochs + 1):
            report(epoch, value)
        return value

    return fn


def test_study_resumes_and_the_trial_count_continues(comp_dir: Path, tmp_path: Path):
    tune.run(_ctx(comp_dir, tmp_path, "tune.n_trials=3"), _fake())
    result = tune.run(_ctx(comp_dir, tmp_path, "tune.n_trials=5"), _fake())
    study = optuna.load_study(study_name=None, storage=f"sqlite:///{tmp_path / 'work' / 'optuna.db'}")
    assert len(study.trials) == 5 and result["states"] == {"COMPLETE": 5}
    assert [t.number for t in study.trials] == [0, 1, 2, 3, 4]


def test_failed_trials_do_not_stop_the_study(comp_dir: Path, tmp_path: Path):
    result = tune.run(_ctx(comp_dir, tmp_path, "tune.n_trials=8", "tune.pruner=none"), _fake(fail_above=0.001))
    assert result["states"].get("FAIL", 0) >= 1 and result["states"].get("COMPLETE", 0) >= 1
    assert sum(result["states"].values()) == 8


def test_pruning_stops_trials_in_a_planted_bad_region(comp_dir: Path, tmp_path: Path):
    tune.run(_ctx(comp_dir, tmp_path, "tune.n_trials=16"), _fake(bad_above=0.001))
    trials = pd.read_csv(tmp_path / "work" / "tune" / "trials.csv")
    pruned = trials[trials.state == "PRUNED"]
    assert len(pruned) >= 2 and (pruned["params_train.lr"] > 0.001).all()  # the bad region is cut short ...
    assert (trials[trials["params_train.lr"] <= 0.001].state == "COMPLETE").all()  # ... and the good one never


def test_same_seed_and_budget_give_the_same_trial_parameters(comp_dir: Path, tmp_path: Path):
    runs = []
    for name in ("a", "b"):
        tune.run(Context(_ctx(comp_dir, tmp_path, "tune.n_trials=6").cfg, comp_dir, tmp_path / name), _fake())
        runs.append(pd.read_csv(tmp_path / name / "tune" / "trials.csv")["params_train.lr"].tolist())
    assert runs[0] == runs[1]


def test_best_yaml_is_a_valid_config_and_feeds_later_stages(comp_dir: Path, tmp_path: Path):
    result = tune.run(_ctx(comp_dir, tmp_path, "tune.n_trials=4"), _fake())
    best = tmp_path / "work" / "tune" / "best.yaml"
    assert load_config(None, ["folds.n_splits=2"], tuned=best).train.lr == pytest.approx(result["best_params"]["train.lr"])
    cmd = [sys.executable, "-m", "pipeline", "folds", "--data", str(comp_dir), "--work", str(tmp_path / "work"), "folds.n_splits=2"]
    used = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    ignored = subprocess.run([*cmd[:-1], "--no-tuned", cmd[-1]], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert "using tuned parameters" in used.stdout and "using tuned parameters" not in ignored.stdout
    assert {"history.png", "importances.png", "parallel.png"} <= {p.name for p in best.parent.glob("*.png")}


def test_list_valued_keys_take_one_choice_per_trial():
    assert tune.as_tree({"model.backbones": "resnet18", "train.lr": 0.1}) == {"model": {"backbones": ["resnet18"]}, "train": {"lr": 0.1}}


@pytest.mark.parametrize("text, pattern", [
    ("train.lrr: {type: float, low: 0.1, high: 1}\n", "not a config key"),
    ("train.lr: {low: 0.1, high: 1}\n", "needs type"),
    ("train.lr: {type: float, low: 0.1}\n", "float needs high"),
])
def test_bad_search_spaces_are_one_line_errors(tmp_path: Path, text: str, pattern: str):
    with pytest.raises(PipelineError, match=pattern):
        tune.load_space(_space(tmp_path, text))


@pytest.mark.slow
def test_two_processes_share_one_sqlite_study(small_digits: Path, tmp_path: Path):
    space = _space(tmp_path)
    args = ["--data", str(small_digits), "--config", str(REPO / "configs" / "digits.yaml"), "--work", str(tmp_path / "w"),
            "folds.n_splits=2", "train.image_size=16", "model.backbones=[resnet10t]", "tune.epochs=1", "tune.n_trials=4",
            f"tune.space={space}"]
    subprocess.run([sys.executable, "-m", "pipeline", "folds", *args], check=True, capture_output=True, cwd=REPO, timeout=300)
    procs = [subprocess.Popen([sys.executable, "-m", "pipeline", "tune", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, cwd=REPO) for _ in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    study = optuna.load_study(study_name=None, storage=f"sqlite:///{tmp_path / 'w' / 'optuna.db'}")
    assert 4 <= len(study.trials) <= 5  # MaxTrialsCallback bounds both processes together (one may start as the other ends)
    assert all("tune: trial" in out for out in outputs), "each process ran trials"
