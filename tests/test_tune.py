"""Optuna tuning: resume, shared storage, failures, pruning, seeding, best.yaml feeding later stages."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from pipeline import orchestrate
from pipeline.context import Context
from pipeline.core.config import load_config
from pipeline.core.errors import PipelineError
from pipeline.stages import tune
from pipeline.training import tuning

from .conftest import REPO


def _space(tmp_path: Path, text: str = "train.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}\n") -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return path


def _tune(ctx: Context, train_fn=None) -> dict:
    """tune.run after its upstream stages (clean, folds), chained as pipeline/orchestrate.py does."""
    for before in orchestrate.chain("tune")[:-1]:
        orchestrate.STAGES[before](ctx)
    return tune.run(ctx, train_fn)


def _ctx(comp_dir: Path, tmp_path: Path, *overrides: str) -> Context:
    cfg = load_config(None, ["folds.n_splits=2", f"tune.space={_space(tmp_path)}", "tune.epochs=3", *overrides])
    return Context(cfg, comp_dir, tmp_path / "work")


def _fake(bad_above: float = 1.0, fail_above: float = 1.0):
    """A fast stand-in for short trainings: good below `bad_above`, diverging above `fail_above`."""

    def fn(cfg, report):
        if cfg.train.lr > fail_above:
            raise FloatingPointError("loss is NaN")
        value = 0.2 if cfg.train.lr > bad_above else 0.9
        for epoch in range(1, cfg.train.epochs + 1):
            report(epoch, value)
        return value

    return fn


def test_study_resumes_and_the_trial_count_continues(comp_dir: Path, tmp_path: Path):
    _tune(_ctx(comp_dir, tmp_path, "tune.n_trials=3"), _fake())
    result = _tune(_ctx(comp_dir, tmp_path, "tune.n_trials=5"), _fake())
    study = optuna.load_study(study_name=None, storage=f"sqlite:///{tmp_path / 'work' / 'optuna.db'}")
    assert len(study.trials) == 5 and result["states"] == {"COMPLETE": 5}
    assert [t.number for t in study.trials] == [0, 1, 2, 3, 4]


def test_failed_trials_do_not_stop_the_study_nor_count_toward_its_budget(comp_dir: Path, tmp_path: Path):
    result = _tune(_ctx(comp_dir, tmp_path, "tune.n_trials=8", "tune.pruner=none"), _fake(fail_above=0.001))
    assert result["states"].get("FAIL", 0) >= 1
    assert result["states"]["COMPLETE"] == 8  # n_trials counts finished trials; failed ones are retried


def test_out_of_memory_fails_the_trial_and_keeps_the_cause(comp_dir: Path, tmp_path: Path):
    def oom(cfg, report):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    expected = r"no trial completed \({'FAIL': 2}\); failures: out of memory: CUDA out of memory"
    with pytest.raises(PipelineError, match=expected):
        _tune(_ctx(comp_dir, tmp_path, "tune.n_trials=2"), oom)  # n_trials failures end the run: no endless retries
    study = optuna.load_study(study_name=None, storage=f"sqlite:///{tmp_path / 'work' / 'optuna.db'}")
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.FAIL] * 2
    out = tmp_path / "work" / "tune"
    assert (out / "trials.csv").exists() and not (out / "best.yaml").exists()


def test_a_rerun_after_a_study_of_failed_trials_runs_the_whole_budget(comp_dir: Path, tmp_path: Path):
    with pytest.raises(PipelineError, match="no trial completed"):
        _tune(_ctx(comp_dir, tmp_path, "tune.n_trials=3"), _fake(fail_above=0.0))
    result = _tune(_ctx(comp_dir, tmp_path, "tune.n_trials=3"), _fake())
    assert result["states"] == {"FAIL": 3, "COMPLETE": 3}


@pytest.mark.parametrize("error", [PipelineError("train.class_weights: 3 weights for 2 classes"),
                                   RuntimeError("mat1 and mat2 shapes cannot be multiplied"), KeyError("epoch")])
def test_config_errors_and_bugs_stop_the_study_with_their_own_message(comp_dir: Path, tmp_path: Path, error: Exception):
    calls = []

    def broken(cfg, report):
        calls.append(cfg.train.lr)
        raise error

    with pytest.raises(type(error), match=str(error.args[0])):
        _tune(_ctx(comp_dir, tmp_path, "tune.n_trials=5"), broken)
    assert len(calls) == 1  # not five failed trials and "no trial completed"


@pytest.mark.parametrize("text, pattern", [
    ("train.lr: {type: float, low: -0.1, high: 0.1}\n",
     r"'train.lr': the value -0.1 is not a valid config \(Input should be greater than 0"),
    ("train.optimizer: {type: categorical, choices: [adamw, lion]}\n",
     r"'train.optimizer': the value 'lion' is not a valid"),
    ("train.epochs: {type: float, low: 1, high: 4}\n",
     r"'train.epochs': the value 1.0 is not a valid config \(Input should be a valid integer"),
    ("train.lr: {type: float, low: 0.1, high: 0.01}\n", r"'train.lr': `low <= high` must hold"),
    ("train.lr: {type: float, low: 0, high: 0.1, log: true}\n", r"'train.lr': `low > 0` must hold for `log=True`"),
    ("train.optimizer: {type: categorical, choices: adamw}\n", r"'train.optimizer': choices must be a list"),
])
def test_an_invalid_search_space_stops_before_the_study(comp_dir: Path, tmp_path: Path, text: str, pattern: str):
    ctx = _ctx(comp_dir, tmp_path, "tune.n_trials=3")
    _space(tmp_path, text)
    with pytest.raises(PipelineError, match=pattern):
        _tune(ctx, _fake())
    assert not (tmp_path / "work" / "optuna.db").exists()  # no study of failed trials to count against a rerun
    _space(tmp_path)
    assert _tune(ctx, _fake())["states"] == {"COMPLETE": 3}


def _separable_competition(root: Path, n_per_class: int = 8) -> Path:
    """Dark versus bright 8x8 images: any sane learning rate separates them within three epochs."""
    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True)
    rows = []
    for label, (lo, hi) in {"dark": (0, 70), "bright": (185, 256)}.items():
        for i in range(n_per_class + 1):
            name = f"img/{label}_{i}.png"
            Image.fromarray(rng.integers(lo, hi, (8, 8, 3), dtype=np.uint8)).save(root / name)
            rows.append((name, label))
    train, test = rows[:n_per_class] + rows[n_per_class + 1:-1], [rows[n_per_class][0], rows[-1][0]]
    pd.DataFrame(train, columns=["image", "label"]).to_csv(root / "train.csv", index=False)
    pd.DataFrame({"image": test}).to_csv(root / "test.csv", index=False)
    return root


def test_a_diverging_learning_rate_fails_its_trials_with_the_real_training(tmp_path: Path):
    """No stand-in: real short trainings, where lr 1e30 sends the loss to NaN (a NaN model would
    otherwise score its argmax-of-NaN predictions and could even be "best")."""
    comp = _separable_competition(tmp_path / "comp")
    space = _space(tmp_path, "train.lr: {type: categorical, choices: [0.1, 1.0e+30]}\n")
    cfg = load_config(None, ["folds.n_splits=2", f"tune.space={space}", "tune.epochs=4", "tune.n_trials=4",
                             "tune.pruner=none", "model.backbones=[d2l_lenet]", "train.image_size=8",
                             "train.batch_size=2", "train.optimizer=sgd", "train.warmup_epochs=0",
                             "train.augment=none"])
    result = _tune(Context(cfg, comp, tmp_path / "work"))
    trials = pd.read_csv(tmp_path / "work" / "tune" / "trials.csv")
    assert set(trials[trials["params_train.lr"] > 1].state) == {"FAIL"}
    assert set(trials[trials["params_train.lr"] < 1].state) == {"COMPLETE"}
    assert result["states"]["COMPLETE"] == 4
    assert result["best_value"] == 1.0
    assert yaml.safe_load((tmp_path / "work" / "tune" / "best.yaml").read_text()) == {"train": {"lr": 0.1}}


def test_pruning_stops_trials_in_a_planted_bad_region(comp_dir: Path, tmp_path: Path):
    _tune(_ctx(comp_dir, tmp_path, "tune.n_trials=16"), _fake(bad_above=0.001))
    trials = pd.read_csv(tmp_path / "work" / "tune" / "trials.csv")
    pruned = trials[trials.state == "PRUNED"]
    assert len(pruned) >= 2 and (pruned["params_train.lr"] > 0.001).all()  # the bad region is cut short ...
    assert (trials[trials["params_train.lr"] <= 0.001].state == "COMPLETE").all()  # ... and the good one never


def test_same_seed_and_budget_give_the_same_trial_parameters(comp_dir: Path, tmp_path: Path):
    runs = []
    for name in ("a", "b"):
        _tune(Context(_ctx(comp_dir, tmp_path, "tune.n_trials=6").cfg, comp_dir, tmp_path / name), _fake())
        runs.append(pd.read_csv(tmp_path / name / "tune" / "trials.csv")["params_train.lr"].tolist())
    assert runs[0] == runs[1]


def test_best_yaml_is_a_valid_config_and_feeds_later_stages(comp_dir: Path, tmp_path: Path):
    result = _tune(_ctx(comp_dir, tmp_path, "tune.n_trials=4"), _fake())
    best = tmp_path / "work" / "tune" / "best.yaml"
    tuned = load_config(None, ["folds.n_splits=2"], tuned=best)
    assert tuned.train.lr == pytest.approx(result["best_params"]["train.lr"])
    cmd = [sys.executable, "-m", "pipeline", "folds", "--data", str(comp_dir), "--work", str(tmp_path / "work"),
           "folds.n_splits=2"]
    used = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    ignored = subprocess.run([*cmd[:-1], "--no-tuned", cmd[-1]], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert "using tuned parameters" in used.stdout and "using tuned parameters" not in ignored.stdout
    assert {"history.png", "importances.png", "parallel.png"} <= {p.name for p in best.parent.glob("*.png")}


def test_list_valued_keys_take_one_choice_per_trial():
    tree = tuning.as_tree({"model.backbones": "resnet18", "train.lr": 0.1})
    assert tree == {"model": {"backbones": ["resnet18"]}, "train": {"lr": 0.1}}


@pytest.mark.parametrize("text, pattern", [
    ("train.lrr: {type: float, low: 0.1, high: 1}\n", "not a config key"),
    ("train.lr: {low: 0.1, high: 1}\n", "needs type"),
    ("train.lr: {type: float, low: 0.1}\n", "float needs high"),
])
def test_bad_search_spaces_are_one_line_errors(tmp_path: Path, text: str, pattern: str):
    with pytest.raises(PipelineError, match=pattern):
        tuning.load_space(_space(tmp_path, text))


@pytest.mark.slow
def test_two_processes_share_one_sqlite_study(small_digits: Path, tmp_path: Path):
    space = _space(tmp_path)
    args = ["--data", str(small_digits), "--config", str(REPO / "configs" / "digits.yaml"), "--work",
            str(tmp_path / "w"), "folds.n_splits=2", "train.image_size=16", "model.backbones=[resnet10t]",
            "tune.epochs=4", "tune.n_trials=4", f"tune.space={space}"]
    subprocess.run([sys.executable, "-m", "pipeline", "folds", *args], check=True, capture_output=True, cwd=REPO,
                   timeout=300)
    procs = [subprocess.Popen([sys.executable, "-m", "pipeline", "tune", *args], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, cwd=REPO) for _ in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    study = optuna.load_study(study_name=None, storage=f"sqlite:///{tmp_path / 'w' / 'optuna.db'}")
    finished = [t for t in study.trials if t.state in tuning.FINISHED]
    assert len(finished) == 4  # exactly, for both processes together (tuning.claim turns a fifth away)
    assert all("tune: trial" in out for out in outputs), "each process ran trials"
