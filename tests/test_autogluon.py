"""The AutoGluon baseline: a real (tiny) MultiModalPredictor fit in .venv-autogluon, on the pipeline's folds."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.context import Context
from pipeline.core.config import load_config
from pipeline.scoring.predictions import read_parquet_meta
from pipeline.stages import autogluon
from pipeline.stages.autogluon import to_pipeline_files
from pipeline.training.autogluon import AUTOGLUON_METRICS, autogluon_problem, export_timm

from .conftest import REPO

AG_PYTHON = REPO / ".venv-autogluon" / "bin" / "python"  # absolute, not resolved: the venv's own symlink
OVERRIDES = ("rounds.plan=[] "  # one round: the demo's pseudo-label round is tested in test_rounds.py
             "folds.n_splits=2 autogluon.epochs=1 autogluon.image_size=32 autogluon.time_limit=120 train.epochs=2 "
             "train.batch_size=16 train.image_size=16 model.backbones=[resnet10t] predict.tta=[identity]")


@pytest.mark.slow
def test_autogluon_oof_and_test_files_join_the_leaderboard(small_digits: Path, tmp_path: Path):
    work = tmp_path / "work"
    cmd = ["make", "--no-print-directory", "-C", str(REPO), "autogluon", "ensemble", f"DATA={small_digits}",
           "CONFIG=configs/digits.yaml", f"WORK={work}", f"SUBMISSIONS={tmp_path / 'subs'}", f"OVERRIDES={OVERRIDES}"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "backbone resnet10t" not in res.stdout and "from a local export (random init, offline)" in res.stdout
    oof = pd.read_parquet(work / "autogluon" / "oof.parquet")
    folds = pd.read_csv(work / "folds.csv", dtype={"id": str})
    assert sorted(oof["id"]) == sorted(folds["id"]) and oof.filter(like="p_").sum(axis=1).round(4).eq(1).all()
    meta = read_parquet_meta(work / "autogluon" / "oof.parquet")
    assert meta["folds_hash"] == pd.read_json(work / "folds.json", typ="series")["folds_hash"]
    board = pd.read_csv(work / "ensemble" / "leaderboard.csv")
    assert "autogluon" in set(board["model"]) and '"autogluon"' in board.loc[board.model == "mean", "weights"].iloc[0]


def test_exported_timm_folder_has_what_autogluon_reads(tmp_path: Path):
    folder = export_timm("resnet10t", tmp_path / "ckpt")
    config = json.loads((folder / "config.json").read_text())
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    assert config["architecture"] == "resnet10t" and config["num_features"] == 512
    assert not any(k.startswith("fc.") for k in state)  # headless: AutoGluon adds its own head
    again = torch.load(export_timm("resnet10t", tmp_path / "again") / "pytorch_model.bin", weights_only=True)
    assert all(torch.equal(state[k], again[k]) for k in state)  # seeded: a refitted fold starts from the same weights


@pytest.mark.parametrize("metric, n_classes, expected", [
    ("accuracy", 10, ("multiclass", "accuracy", "accuracy")),
    ("log_loss", 10, ("multiclass", "log_loss", "log_loss")),
    ("macro_f1", 10, ("multiclass", "f1_macro", "f1_macro")),
    ("roc_auc", 10, ("multiclass", "roc_auc_ovr", "log_loss")),
    ("roc_auc", 2, ("binary", "roc_auc", "roc_auc")),
])
def test_autogluon_evaluates_the_competition_metric(comp_dir: Path, tmp_path: Path, metric: str, n_classes: int,
                                                     expected: tuple):
    assert tuple(autogluon_problem(metric, n_classes).values()) == expected
    ctx = Context(load_config(None, [f"competition.metric={metric}"]), comp_dir, tmp_path / "work")
    job = json.loads(autogluon.job_file(ctx, tmp_path / "out", [0], ["cat", "dog"], "key").read_text())
    assert job["eval_metric"] == autogluon_problem(metric, 2)["eval_metric"]  # not accuracy whatever the metric


@pytest.mark.skipif(not AG_PYTHON.exists(), reason="needs .venv-autogluon (make autogluon creates it)")
def test_every_metric_name_is_one_autogluon_supports():
    """Asked of the installed AutoGluon: a name it does not support it silently replaces by accuracy."""
    pairs = [(problem, *names) for m in AUTOGLUON_METRICS.values() for problem, names in m.items()]
    code = ("import json, sys\nfrom autogluon.multimodal.utils.problem_types import PROBLEM_TYPES_REG as R\n"
            "print(json.dumps([(p, e, v) for p, e, v in json.loads(sys.argv[1]) if e not in\n"
            "    R.get(p).supported_evaluation_metrics or v not in R.get(p).supported_validation_metrics]))")
    res = subprocess.run([str(AG_PYTHON), "-W", "ignore", "-c", code, json.dumps(pairs)], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert len(pairs) == 12 and json.loads(res.stdout.strip().splitlines()[-1]) == []  # 4 regression pairs (tasks)


def test_test_probabilities_are_renormalised_like_oof_ones(comp_dir: Path, tmp_path: Path):
    """float32 CSVs sum to 1 +- 1e-7, and a class missing from a fold has no column: both files are renormalised."""
    ctx = Context(load_config(None, ["folds.n_splits=2"]), comp_dir, tmp_path / "work")
    out = tmp_path / "work" / "autogluon"
    out.mkdir(parents=True)
    classes = ["bird", "cat", "dog"]
    pd.DataFrame({"id": ["a", "b", "c"], "label": ["bird", "cat", "dog"], "y": [0, 1, 2], "fold": [0, 1, 1]}).to_csv(
        tmp_path / "work" / "folds.csv", index=False)
    raw = pd.DataFrame({"cat": [0.30000003, 0.5, 0.2], "dog": [0.70000001, 0.3, 0.6], "id": ["a", "b", "c"],
                        "fold": [0, 1, 1]})  # no bird column; rows sum to 1.00000004, 0.8, 0.8
    raw.to_csv(out / "oof_raw.csv", index=False)
    test_raw = pd.DataFrame({"bird": [0.1, 0.0], "cat": [0.30000003, 0.25], "dog": [0.6, 0.25], "id": ["t1", "t2"]})
    test_raw.to_csv(out / "test_raw.csv", index=False)
    to_pipeline_files(ctx, out, classes, "hash")
    cols = [f"p_{c}" for c in classes]
    oof, test = pd.read_parquet(out / "oof.parquet"), pd.read_parquet(out / "test.parquet")
    np.testing.assert_allclose(oof[cols].sum(axis=1), 1.0, rtol=0, atol=1e-15)
    np.testing.assert_allclose(test[cols].sum(axis=1), 1.0, rtol=0, atol=1e-15)
    np.testing.assert_allclose(test[cols].to_numpy()[1], [0.0, 0.5, 0.5], rtol=0, atol=1e-15)
    np.testing.assert_allclose(oof[cols].to_numpy()[1], [0.0, 0.625, 0.375], rtol=0, atol=1e-15)


@pytest.mark.slow
@pytest.mark.skipif(not AG_PYTHON.exists(), reason="needs .venv-autogluon (make autogluon creates it)")
def test_an_interrupted_fit_reruns_keeping_finished_folds(comp_dir: Path, tmp_path: Path):
    """SIGKILL (stage and AutoGluon) while fold 1 fits; the rerun reuses fold 0 and fits fold 1 afresh
    (AutoGluon itself refuses to fit into the folder the killed run left)."""
    work = tmp_path / "work"
    cmd = [sys.executable, "-m", "pipeline", "autogluon", "--data", str(comp_dir), "--work", str(work),
           "folds.n_splits=2", "autogluon.epochs=1", "autogluon.image_size=16", "autogluon.backbone=resnet10t",
           "autogluon.batch_size=4", "autogluon.time_limit=60", "competition.metric=macro_f1",
           f"autogluon.python={AG_PYTHON}"]
    ag = work / "autogluon"
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 240
        while not ((ag / "fold1.partial" / "predictor").exists() and (ag / "fold0" / "key.txt").exists()):
            assert proc.poll() is None and time.time() < deadline, "the first run ended before fold 1 began"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (ag / "fold1").exists() and not (ag / "oof_raw.csv").exists()
    fold0 = (ag / "fold0" / "held.csv").read_bytes()
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "fold 0 was fitted by an earlier run; reusing" in res.stdout and "fold 1 fitted and predicted" in res.stdout
    assert (ag / "fold0" / "held.csv").read_bytes() == fold0 and not (ag / "fold1.partial").exists()
    assets = json.loads((ag / "fold1" / "predictor" / "assets.json").read_text())
    assert (assets["problem_type"], assets["eval_metric_name"]) == ("binary", "f1_macro")
    oof = pd.read_parquet(ag / "oof.parquet")
    assert sorted(oof["id"]) == sorted(pd.read_csv(work / "folds.csv", dtype={"id": str})["id"])
