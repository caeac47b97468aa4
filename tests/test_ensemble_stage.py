import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.context import Context
from pipeline.core.config import load_config
from pipeline.core.errors import PipelineError
from pipeline.scoring.predictions import prob_columns, write_parquet

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
    models = _ctx(tmp_path).find_predictions("H", CLASSES)
    assert list(models) == ["resnet18", "autogluon"]
    assert list(models["resnet18"][0]["id"]) == ["a", "b", "c", "d"]
    out = capsys.readouterr().out
    assert "skipped old_split" in out and "skipped fewer_rows" in out
    assert list(_ctx(tmp_path, "ensemble.include_other=false").find_predictions("H", CLASSES)) == ["resnet18"]


def test_a_configured_model_from_another_split_is_an_error(tmp_path: Path):
    _write_model(tmp_path / "work" / "runs" / "resnet18", "OLD")
    with pytest.raises(PipelineError, match="made on another split"):
        _ctx(tmp_path).find_predictions("NEW", CLASSES)


def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _planted(says_a, says_b, rng):
    """Probabilities of models A and B that say the given classes, with noise."""
    return [_softmax(np.eye(3)[says] * 3 + rng.normal(0, 0.5, (len(says), 3))) for says in (says_a, says_b)]


def _planted_stack_work(tmp_path: Path) -> Path:
    """A 3-class competition and two models' files with the level-2 relation of tests/test_blend.py: A is
    right on class-0 rows (says 2 elsewhere), B on class-1 rows (says 2 elsewhere); test rows a, b, c, a."""
    from tests.conftest import write_competition

    data = write_competition(tmp_path / "comp", n_per_class=2, classes=("a", "b", "c"), n_test=4)
    work, rng, n = tmp_path / "work", np.random.default_rng(0), 300
    work.mkdir()
    (work / "folds.json").write_text(json.dumps({"folds_hash": "H", "classes": ["a", "b", "c"]}))
    y, truth, folds = np.arange(n) % 3, np.array([0, 1, 2, 0]), rng.permutation(n) % 5
    oof, test = _planted(np.where(y == 0, 0, 2), np.where(y == 1, 1, 2), rng), \
        _planted(np.where(truth == 0, 0, 2), np.where(truth == 1, 1, 2), rng)
    meta = {"folds_hash": "H", "classes": ["a", "b", "c"]}
    tta = {"A": {"oof_score": 0.70, "oof_score_nested": 0.68}, "B": {}}  # B: chose no views on OOF (no figures)
    for name, p_oof, p_test in zip("AB", oof, test, strict=True):
        frame = pd.DataFrame(p_oof, columns=prob_columns(meta["classes"]))
        for i, (col, values) in enumerate({"id": [f"r{i}" for i in range(n)], "fold": folds,
                                           "label": np.array(["a", "b", "c"])[y], "y": y}.items()):
            frame.insert(i, col, values)
        tframe = pd.DataFrame(p_test, columns=prob_columns(meta["classes"]))
        tframe.insert(0, "id", [f"img/test_{i}.png" for i in range(4)])
        write_parquet(work / "runs" / name / "oof.parquet", frame, {**meta, **tta[name]})
        write_parquet(work / "runs" / name / "test.parquet", tframe, meta)
    return data


def test_the_stack_is_a_leaderboard_row_chosen_on_its_honest_score_and_predicts_test(tmp_path: Path, capsys):
    from pipeline.stages import ensemble

    data = _planted_stack_work(tmp_path)

    def run(*overrides):
        cfg = load_config(None, ["model.backbones=[A,B]", *overrides])
        return ensemble.run(Context(cfg, data, tmp_path / "work", submissions_dir=tmp_path / "subs"))

    out = run()
    board = pd.read_csv(tmp_path / "work" / "ensemble" / "leaderboard.csv").set_index("model")
    assert board.loc["stack", "kind"] == "stack" and out["chosen"] == "stack"
    assert board.loc["stack", "honest_score"] > 0.97 > 0.8 > board.drop(index="stack")["honest_score"].max()
    assert out["auto_pick_nested_score"] > 0.97 and set(out["auto_picks_by_fold"].values()) == {"stack"}
    stamp = json.loads((tmp_path / "work" / "ensemble" / "weights.json").read_text())
    assert stamp["auto_pick_nested_score"] == out["auto_pick_nested_score"]
    printed = capsys.readouterr().out
    assert f"auto pick, nested: {out['auto_pick_nested_score']:.4f}" in printed
    assert f"(the auto pick itself, nested: {out['auto_pick_nested_score']:.4f}); submission written" in printed
    assert pd.read_csv(out["submission"])["label"].tolist() == ["a", "b", "c", "a"]  # the stack on test rows
    assert stamp["tta_optimism"] == {"A": pytest.approx(0.02)}  # predict's in-sample minus nested TTA score
    assert "selection-optimistic by about the nested TTA gap: A +0.0200" in printed
    named = run("ensemble.method=mean")  # by name: no auto pick to nest
    assert named["chosen"] == "mean" and named["auto_pick_nested_score"] is None
    assert pd.read_csv(named["submission"])["label"].tolist() != ["a", "b", "c", "a"]
