from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.config import load_config
from pipeline.context import Context
from pipeline.ensemble import find_predictions
from pipeline.errors import PipelineError
from pipeline.predictions import prob_columns, write_parquet

CLASSES = ["cat", "dog"]


def _write_model(folder: Path, folds_hash: str, ids=("a", "b", "c", "d"), classes=CLASSES, seed=0):
    rng = np.random.default_rng(seed)
    p = rng.random((len(ids), len(classes)))
    p /= p.sum(1, keepdims=True)
    oof = pd.DataFrame(p, columns=prob_columns(classes))
    oof.insert(0, "id", list(ids))
    oof.insert(1, "fold", [i % 2 for i in range(len(ids))])
    oof.insert(2, "label", ["cat", "dog"] * (len(ids) // 2))
    oof.insert(3, "y", [0, 1] * (len(ids) // 2))
    test = pd.DataFrame(p[:2], columns=prob_columns(classes))
    test.insert(0, "id", ["t1", "t2"])
    meta = {"folds_hash": folds_hash, "classes": list(classes)}
    write_parquet(folder / "oof.parquet", oof.iloc[::-1], meta)  # any row order
    write_parquet(folder / "test.parquet", test, meta)


def _ctx(tmp_path: Path, *overrides: str) -> Context:
    return Context(load_config(None, ["model.backbones=[resnet18]", *overrides]), tmp_path, tmp_path / "work")


def test_other_predictions_in_work_are_blended_and_stale_ones_skipped(tmp_path: Path, capsys):
    work = tmp_path / "work"
    _write_model(work / "runs" / "resnet18", "H")
    _write_model(work / "autogluon", "H", seed=1)
    _write_model(work / "old_split", "OTHER", seed=2)
    _write_model(work / "fewer_rows", "H", ids=("a", "b"), seed=3)
    _write_model(work / "ensemble", "H", seed=4)  # the stage's own output is never an input
    models = find_predictions(_ctx(tmp_path), "H", CLASSES)
    assert list(models) == ["resnet18", "autogluon"]
    assert list(models["resnet18"][0]["id"]) == ["a", "b", "c", "d"]
    out = capsys.readouterr().out
    assert "skipped old_split" in out and "skipped fewer_rows" in out
    assert list(find_predictions(_ctx(tmp_path, "ensemble.include_other=false"), "H", CLASSES)) == ["resnet18"]


def test_a_configured_model_from_another_split_is_an_error(tmp_path: Path):
    _write_model(tmp_path / "work" / "runs" / "resnet18", "OLD")
    with pytest.raises(PipelineError, match="made on another split"):
        find_predictions(_ctx(tmp_path), "NEW", CLASSES)
