"""The whole chain through make, on a competition folder outside the repo, as a user would run it."""

import re
import subprocess
from pathlib import Path

import pandas as pd
import pytest
from safetensors.torch import load_file

from pipeline.data.digits import solution_path
from pipeline.scoring.submission import score_file

from .conftest import REPO

OVERRIDES = ("rounds.plan=[] "  # one round: the demo's pseudo-label round is tested in test_rounds.py
             "folds.n_splits=2 train.epochs=3 train.batch_size=16 train.warmup_epochs=0.5 train.image_size=16 "
             "model.backbones=[resnet10t,resnet18] predict.tta=[identity,hflip]")


def _make(*targets: str, data: Path, work: Path, subs: Path) -> str:
    cmd = ["make", "--no-print-directory", "-C", str(REPO), *targets, f"DATA={data}", "CONFIG=configs/digits.yaml",
           f"WORK={work}", f"SUBMISSIONS={subs}", f"OVERRIDES={OVERRIDES}"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout


@pytest.mark.slow
def test_folds_train_ensemble_on_an_unseen_folder_then_nothing_is_redone(small_digits: Path, tmp_path: Path):
    work, subs = tmp_path / "work", tmp_path / "subs"
    out = _make("folds", "train", "ensemble", data=small_digits, work=work, subs=subs)
    assert "honest CV accuracy" in out and "epoch 3" in out and "by TTA view" in out
    sub = pd.read_csv(subs / "digits.csv", dtype=str)
    sample = pd.read_csv(small_digits / "sample_submission.csv", dtype=str)
    assert list(sub.columns) == list(sample.columns) and list(sub["image"]) == list(sample["image"])
    # chance is 0.1: a submission in the wrong row order or with shuffled labels scores near it
    assert score_file(subs / "digits.csv", solution_path(small_digits)) > 0.3
    for backbone in ("resnet10t", "resnet18"):
        run = work / "runs" / backbone
        assert (run / "oof.parquet").exists() and (run / "test.parquet").exists()
        for fold in (0, 1):
            assert load_file(str(run / f"fold{fold}" / "best.safetensors"))
            assert (run / f"fold{fold}" / "curves.png").stat().st_size > 0
    assert (work / "config.yaml").exists() and (work / "ensemble" / "leaderboard.csv").exists()
    oof = pd.read_parquet(work / "runs" / "resnet18" / "oof.parquet")
    assert len(oof) == len(pd.read_csv(work / "folds.csv")) and oof.filter(like="p_").sum(axis=1).round(4).eq(1).all()

    board = pd.read_csv(work / "ensemble" / "leaderboard.csv")
    assert ({"resnet10t", "resnet18", "mean", "weights", "caruana"} <= set(board["model"])
            and board["honest_score"].notna().all())
    _run_results_notebook(work)

    mtime = (work / "runs" / "resnet18" / "fold0" / "best.safetensors").stat().st_mtime_ns
    again = _make("folds", "train", "ensemble", data=small_digits, work=work, subs=subs)
    assert not re.search(r"epoch \d+:", again) and "train: resnet18 fold 1 up to date" in again
    assert (work / "runs" / "resnet18" / "fold0" / "best.safetensors").stat().st_mtime_ns == mtime


def _run_results_notebook(work: Path) -> None:
    import os

    import nbformat
    from nbclient import NotebookClient

    os.environ["PIPELINE_WORK"] = str(work)
    try:
        nb = nbformat.read(REPO / "notebooks" / "results.ipynb", as_version=4)
        NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}).execute()
    finally:
        del os.environ["PIPELINE_WORK"]
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert "chosen blend" in "".join(o.get("text", "") for o in outputs)
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 3


@pytest.mark.slow
def test_same_seed_same_config_gives_the_same_oof_predictions(small_digits: Path, tmp_path: Path):
    from pipeline import orchestrate
    from pipeline.context import Context
    from pipeline.core.config import load_config

    overrides = ["folds.n_splits=2", "train.epochs=1", "train.batch_size=32", "train.image_size=16",
                 "model.backbones=[resnet10t]"]
    frames = []
    for name in ("a", "b"):
        ctx = Context(load_config(REPO / "configs" / "digits.yaml", overrides), small_digits, tmp_path / name,
                      tmp_path / f"subs{name}")
        orchestrate.run("predict", ctx)
        frames.append(pd.read_parquet(ctx.work_dir / "runs" / "resnet10t" / "oof.parquet"))
    pd.testing.assert_frame_equal(frames[0], frames[1])
