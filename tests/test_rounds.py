"""Rounds: leak-free pseudo-labels (fold-k rows from fold-k models only), thresholds, caps, the fold split.

The leak test plants instrumented predictions: each fold-k model of round 1 says class k for every test
image, the all-fold ensemble says the last class. The fold-k model of round 2 must then receive labels
of class k only (a label made by any other fold's model, which saw fold k's rows, would show up as
another class), and with `pseudo.source=all` the last class only.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.cli import main
from pipeline.context import Context
from pipeline.core.config import PseudoConfig, load_config
from pipeline.core.errors import PipelineError
from pipeline.scoring import pseudo
from pipeline.scoring.predictions import prob_columns, write_parquet
from pipeline.stages import clean, rounds
from pipeline.stages import folds as folds_stage
from pipeline.training import fold as fold_module
from pipeline.training.fold import PSEUDO_FOLD

from .conftest import tiny, write_competition

CLASSES = ["a", "b", "c"]
N_FOLDS = 2


def test_auto_threshold_is_the_lowest_confidence_reaching_the_target_precision():
    conf = np.array([0.99, 0.95, 0.9, 0.8, 0.7, 0.6])
    correct = np.array([1, 1, 1, 0, 1, 0], dtype=bool)
    assert pseudo.auto_threshold(conf, correct, 1.0) == 0.9  # rows >= 0.9: 3/3
    assert pseudo.auto_threshold(conf, correct, 0.8) == 0.7  # rows >= 0.7: 4/5; >= 0.6: 4/6 < 0.8
    assert pseudo.auto_threshold(conf[3:], correct[3:], 0.9) == float("inf")  # nothing reaches it: no rows
    tied = np.array([0.9, 0.9, 0.8])  # a threshold keeps every row of its confidence
    assert pseudo.auto_threshold(tied, np.array([1, 0, 1], dtype=bool), 1.0) == float("inf")


def test_select_keeps_confident_rows_and_caps_each_class_most_confident_first():
    probs = pd.DataFrame([[0.9, 0.1, 0.0], [0.8, 0.2, 0.0], [0.7, 0.3, 0.0], [0.1, 0.85, 0.05], [0.4, 0.3, 0.3]],
                         index=["t0", "t1", "t2", "t3", "t4"], columns=prob_columns(CLASSES))
    rows = pseudo.select(probs, CLASSES, 0.75, None)
    assert rows["id"].tolist() == ["t0", "t3", "t1"] and rows["label"].tolist() == ["a", "b", "a"]
    capped = pseudo.select(probs, CLASSES, 0.5, 2)
    assert sorted(capped["id"]) == ["t0", "t1", "t3"]  # t2 ("a", 0.7) is the third "a": over the cap


def _work(tmp_path, source="fold", **pseudo_keys):
    """A competition, its folds.json/folds.csv and one round-1 experiment whose predictions are planted."""
    comp = write_competition(tmp_path / "comp", n_per_class=4, classes=tuple(CLASSES), n_test=5)
    plan = {"experiments": [{"name": "m-r2", "backbone": "d2l_lenet"}], "pseudo": {"source": source, **pseudo_keys}}
    cfg = load_config(None, ["model.backbones=[m]", f"rounds.plan=[{plan}]", "train.image_size=8",
                             f"folds.n_splits={N_FOLDS}", "clean.workers=1", "clean.near_duplicates=false"])
    ctx = Context(cfg, comp, tmp_path / "work")
    clean.run(ctx)
    folds_stage.run(ctx)
    stamp = json.loads((ctx.work_dir / "folds.json").read_text())
    folds = pd.read_csv(ctx.work_dir / "folds.csv", dtype={"id": str, "label": str})
    test_ids = ctx.competition.test["id"].astype(str).to_numpy()
    one_hot = np.eye(len(CLASSES)) * 0.9 + 0.1 / len(CLASSES)
    meta = {"folds_hash": stamp["folds_hash"], "classes": CLASSES}
    per_fold = pd.DataFrame(np.repeat(one_hot[:N_FOLDS], len(test_ids), axis=0), columns=prob_columns(CLASSES))
    per_fold.insert(0, "id", np.tile(test_ids, N_FOLDS))
    per_fold.insert(1, "fold", np.repeat(np.arange(N_FOLDS), len(test_ids)))  # fold-k model: class k
    run = ctx.work_dir / "runs" / "m"
    write_parquet(run / "test_folds.parquet", per_fold, meta)
    everyone = pd.DataFrame(np.repeat(one_hot[-1:], len(test_ids), axis=0), columns=prob_columns(CLASSES))
    everyone.insert(0, "id", test_ids)
    write_parquet(run / "test.parquet", everyone, meta)  # the all-fold ensemble: the last class
    oof = folds[["id", "fold", "label", "y"]].copy()
    oof[prob_columns(CLASSES)] = one_hot[oof["y"]]  # every OOF row right: auto keeps every confidence
    write_parquet(run / "oof.parquet", oof, meta)
    return ctx, stamp


@pytest.mark.parametrize("source", ["fold", "all"])
def test_the_fold_k_model_of_round_2_learns_only_labels_of_fold_k_models(tmp_path, source):
    ctx, stamp = _work(tmp_path, source)
    spec = ctx.cfg.rounds.plan[0]
    rows, thresholds, _ = rounds.build_pseudo(ctx, ["m"], spec.pseudo, list(range(N_FOLDS)), stamp)
    assert thresholds == {0: pytest.approx(0.9333333), 1: pytest.approx(0.9333333)}
    data = ctx.with_pseudo(ctx.training_data(), rows)
    frame = data.frame
    is_pseudo = frame["fold"] == PSEUDO_FOLD
    test_ids = set(ctx.competition.test["id"].astype(str))
    for k in range(N_FOLDS):
        trained = frame[fold_module.training_rows(frame, k) & is_pseudo]
        expected = CLASSES[k] if source == "fold" else CLASSES[-1]
        assert trained["label"].tolist() == [expected] * len(test_ids)  # no label from another fold's model
        assert set(trained["id"]) == test_ids
        assert not (frame["fold"] == k)[is_pseudo].any()  # pseudo rows are never fold k's validation rows
    assert len(data.images) == len(frame)


def test_a_fold_run_key_covers_its_own_pseudo_rows_only(tmp_path):
    ctx, stamp = _work(tmp_path, "fold", threshold=0.5)
    rows, _, _ = rounds.build_pseudo(ctx, ["m"], ctx.cfg.rounds.plan[0].pseudo, [0, 1], stamp)
    plain = ctx.training_data()
    before = ctx.with_pseudo(plain, rows).pseudo_keys
    fewer = rows[~((rows["fold"] == 1) & (rows["id"] == rows["id"].iloc[-1]))]
    after = ctx.with_pseudo(plain, fewer).pseudo_keys
    assert after[0] == before[0] and after[1] != before[1]


def test_caps_and_fixed_thresholds_through_the_stage(tmp_path):
    ctx, stamp = _work(tmp_path, "fold", threshold=0.95)
    rows, _, _ = rounds.build_pseudo(ctx, ["m"], ctx.cfg.rounds.plan[0].pseudo, [0, 1], stamp)
    assert rows.empty  # 0.9333 < 0.95
    capped = PseudoConfig(threshold=0.5, max_per_class=2)
    rows, _, _ = rounds.build_pseudo(ctx, ["m"], capped, [0, 1], stamp)
    assert rows.groupby("fold").size().tolist() == [2, 2]


def test_round_config_is_strict():
    with pytest.raises(PipelineError, match=r"rounds.plan\[0\]: experiment name 'm' is also in model.backbones"):
        load_config(None, ["model.backbones=[m]", "rounds.plan=[{experiments: [m]}]"])
    with pytest.raises(PipelineError, match="unknown config key 'rounds.plan.0.pseudo.treshold'"):
        load_config(None, ["rounds.plan=[{experiments: [x], pseudo: {treshold: 0.9}}]"])
    with pytest.raises(PipelineError, match=r"rounds.plan\[0\].experiments\[0\].*unknown key 'train.epoch'"):
        load_config(None, ["rounds.plan=[{experiments: [{backbone: x, train: {epoch: 1}}]}]"])


@pytest.mark.slow
def test_a_round_trains_on_pseudo_rows_and_scores_competition_rows_only(tmp_path, small_digits, capsys):
    """Through the CLI: round 2's OOF rows are round 1's (no test id), its runs are keyed by their pseudo rows, and
    the ensemble blends both rounds."""
    work = tmp_path / "work"
    args = ["--data", str(small_digits), "--work", str(work), "--no-tuned", "--submissions", str(tmp_path / "subs"),
            *tiny("ensemble.include_other=false")]
    plan = "rounds.plan=[{experiments: [{name: lenet-r2, backbone: d2l_lenet}], pseudo: {threshold: 0.0}}]"
    assert main(["ensemble", *args, plan]) == 0
    first = pd.read_parquet(work / "runs" / "d2l_lenet" / "oof.parquet")["id"]
    second = pd.read_parquet(work / "runs" / "lenet-r2" / "oof.parquet")["id"]
    assert sorted(second) == sorted(first)
    made = pd.read_csv(work / "rounds" / "round2" / "pseudo.csv", dtype={"id": str})
    assert len(made) == 2 * 80 and not set(made["id"]) & set(second)  # threshold 0: every test image, per fold
    assert "lenet-r2" in set(pd.read_csv(work / "ensemble" / "leaderboard.csv")["model"])  # blended with round 1
    stamps = {name: (work / "runs" / name / "fold0" / "best.json") for name in ("d2l_lenet", "lenet-r2")}
    before = {name: path.stat().st_mtime_ns for name, path in stamps.items()}
    capped = plan.replace("threshold: 0.0", "threshold: 0.0, max_per_class: 1")
    assert main(["rounds", *args, capped]) == 0
    after = {name: path.stat().st_mtime_ns for name, path in stamps.items()}
    assert after["d2l_lenet"] == before["d2l_lenet"] and after["lenet-r2"] != before["lenet-r2"]  # new pseudo rows


class _Stop(Exception):
    pass


@pytest.mark.parametrize("source", ["fold", "all"])
def test_soft_pseudo_labels_reach_the_fold_k_trainer_unchanged(tmp_path, monkeypatch, source):
    """labels=soft, temperature 0.5: the fold-k trainer's pseudo targets are the fold-k models' planted probability
    vector, sharpened (p^2 renormalised), and nothing else; the competition rows keep their one-hot labels."""
    ctx, stamp = _work(tmp_path, source, labels="soft", temperature=0.5)
    rows, _, _ = rounds.build_pseudo(ctx, ["m"], ctx.cfg.rounds.plan[0].pseudo, list(range(N_FOLDS)), stamp)
    data = ctx.with_pseudo(ctx.training_data(), rows)
    seen = {}

    def instrumented(model, optimizer, cfg, fold_data, *args, **kwargs):
        seen["data"] = fold_data
        raise _Stop

    monkeypatch.setattr(fold_module, "Trainer", instrumented)
    n_test, frame = len(ctx.competition.test), data.frame
    for k in range(N_FOLDS):
        with pytest.raises(_Stop):
            fold_module.train_fold(ctx.fold_settings(), "d2l_lenet", k, data, name="m-r2")
        targets = seen["data"].train_y
        own = frame[(frame["fold"] != k) & (frame["fold"] != PSEUDO_FOLD)]
        assert targets.shape == (len(own) + n_test, len(CLASSES)) and targets.dtype == np.float32
        planted = np.full(len(CLASSES), 0.1 / len(CLASSES))
        planted[k if source == "fold" else -1] += 0.9  # the fold-k models' vector, or the all-fold ensemble's
        sharp = planted ** 2 / (planted ** 2).sum()
        np.testing.assert_allclose(targets[len(own):], np.tile(sharp, (n_test, 1)), rtol=0, atol=1e-6)
        np.testing.assert_array_equal(targets[:len(own)], np.eye(len(CLASSES))[own["y"].to_numpy()])
    hard = ctx.with_pseudo(ctx.training_data(), rows[pseudo.COLUMNS])
    assert hard.soft is None and hard.pseudo_keys != data.pseudo_keys  # the targets are in the fold's key


def test_soft_targets_train(tmp_path, monkeypatch):
    """The engine learns from probability targets: the loss it minimises is computed against the pseudo rows'
    probability vectors (the fold-0 model's planted one), not against one-hot labels."""
    from pipeline.training import trainer as trainer_module

    seen = []

    def recording_loss(logits, target, weight=None):
        seen.append(target.detach().clone())
        return real_loss(logits, target, weight)

    real_loss = trainer_module.soft_cross_entropy
    monkeypatch.setattr(trainer_module, "soft_cross_entropy", recording_loss)
    ctx, stamp = _work(tmp_path, "fold", labels="soft")
    rows, _, _ = rounds.build_pseudo(ctx, ["m"], ctx.cfg.rounds.plan[0].pseudo, [0], stamp)
    data = ctx.with_pseudo(ctx.training_data(), rows)
    cfg = ctx.cfg.model_copy(update={"train": ctx.cfg.train.model_copy(update={"epochs": 1, "warmup_epochs": 0.0})})
    cfg = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"backend": "none"}),
                                 "runtime": cfg.runtime.model_copy(update={"device": "cpu", "threads": 1})})
    settings = Context(cfg, ctx.data_dir, ctx.work_dir).fold_settings()
    meta = fold_module.train_fold(settings, "d2l_lenet", 0, data, name="m-r2")
    assert meta["epochs_run"] == 1 and np.isfinite(meta["metric"])
    targets = torch.cat(seen).numpy()
    planted = np.full(len(CLASSES), 0.1 / len(CLASSES))
    planted[0] += 0.9  # the fold-0 model's vector (temperature 1: unchanged)
    is_soft = ~np.isclose(targets.max(1), 1.0)
    assert is_soft.sum() == len(ctx.competition.test)  # one batch holds every row: each pseudo row once
    np.testing.assert_allclose(targets[is_soft], np.tile(planted, (is_soft.sum(), 1)), atol=1e-6)
