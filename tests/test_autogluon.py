"""The AutoGluon baseline: a real (tiny) MultiModalPredictor fit in .venv-autogluon, on the pipeline's folds."""

import subprocess
from pathlib import Path

import pandas as pd
import pytest

from pipeline.baseline import export_timm
from pipeline.predictions import read_parquet_meta

from .conftest import REPO

OVERRIDES = ("folds.n_splits=2 autogluon.epochs=1 autogluon.image_size=32 autogluon.time_limit=120 "
             "train.epochs=2 train.batch_size=16 train.image_size=16 model.backbones=[resnet10t] predict.tta=[identity]")


@pytest.mark.slow
def test_autogluon_oof_and_test_files_join_the_leaderboard(small_digits: Path, tmp_path: Path):
    work = tmp_path / "work"
    cmd = ["make", "--no-print-directory", "-C", str(REPO), "autogluon", "ensemble", f"DATA={small_digits}", "CONFIG=configs/digits.yaml",
           f"WORK={work}", f"SUBMISSIONS={tmp_path / 'subs'}", f"OVERRIDES={OVERRIDES}"]
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
    import json

    import torch

    folder = export_timm("resnet10t", tmp_path / "ckpt")
    config = json.loads((folder / "config.json").read_text())
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    assert config["architecture"] == "resnet10t" and config["num_features"] == 512
    assert not any(k.startswith("fc.") for k in state)  # headless: AutoGluon adds its own head
