"""Experiments: specs resolve (bare names, overrides, sweeps, derived names), bad specs are one line, an edited
experiment retrains alone, per-fold test predictions average to test.parquet, experiments.csv has one row per
experiment with its differences from the base config."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.cli import main
from pipeline.core.config import load_config
from pipeline.core.errors import PipelineError
from pipeline.core.experiments import resolve, select
from pipeline.scoring.predictions import prob_columns, read_parquet_meta

from .conftest import tiny, write_competition


def _resolve(*overrides: str):
    cfg = load_config(None, list(overrides))
    return resolve(cfg.model, cfg.train, cfg.predict)


def test_bare_backbone_names_are_experiments_without_overrides():
    exps = _resolve("model.backbones=[resnet18, d2l_lenet]", "train.image_size=32")
    assert [(e.name, e.backbone, e.changes) for e in exps] == [("resnet18", "resnet18", {}),
                                                               ("d2l_lenet", "d2l_lenet", {})]
    assert exps[0].train.image_size == 32 and exps[0].model.backbones == ["resnet18"]


def test_overrides_merge_over_the_base_sections_and_are_the_changes():
    (exp,) = _resolve("model.backbones=[{name: r18-48-s1, backbone: resnet18, train: {image_size: 48, seed: 1},"
                      " model: {drop_rate: 0.2}, predict: {tta: [identity]}}]", "train.lr=0.01")
    assert (exp.name, exp.backbone) == ("r18-48-s1", "resnet18")
    resolved = (exp.train.image_size, exp.train.seed, exp.train.lr, exp.model.drop_rate, exp.predict.tta)
    assert resolved == (48, 1, 0.01, 0.2, ["identity"])
    assert exp.changes == {"model.drop_rate": 0.2, "train.image_size": 48, "train.seed": 1, "predict.tta": ["identity"]}
    assert exp.describe_changes() == "model.drop_rate=0.2 train.seed=1 train.image_size=48 predict.tta=[identity]"


def test_an_override_equal_to_the_base_is_no_change():
    (exp,) = _resolve("model.backbones=[{name: a, backbone: resnet18, train: {epochs: 3}}]", "train.epochs=3")
    assert exp.changes == {}


def test_seed_and_size_sweeps_expand_with_derived_names():
    exps = _resolve("model.backbones=[{name: r18, backbone: resnet18, seeds: [0, 1, 2]},"
                    " {backbone: d2l_lenet, image_sizes: [32, 48], seeds: [5, 6], train: {lr: 0.1}}]")
    assert [e.name for e in exps] == ["r18-s0", "r18-s1", "r18-s2", "d2l_lenet-32px-s5", "d2l_lenet-32px-s6",
                                      "d2l_lenet-48px-s5", "d2l_lenet-48px-s6"]
    assert [e.train.seed for e in exps[:3]] == [0, 1, 2]
    assert [(e.train.image_size, e.train.seed, e.train.lr) for e in exps[3:5]] == [(32, 5, 0.1), (32, 6, 0.1)]
    assert exps[6].changes == {"train.lr": 0.1, "train.seed": 6, "train.image_size": 48}


def test_only_selects_experiments_by_name():
    cfg = load_config(None, ["model.backbones=[{name: r, backbone: resnet18, seeds: [0, 1]}, d2l_lenet]",
                             "model.only=[r-s1]"])
    assert [e.name for e in select(resolve(cfg.model, cfg.train, cfg.predict), cfg.model.only)] == ["r-s1"]


@pytest.mark.parametrize("backbones, message", [
    ("[resnet18, {name: resnet18, backbone: resnet10t}]",
     r"^overrides: model.backbones\[1\] \(\{backbone: resnet10t, name: resnet18\}\): experiment name 'resnet18' "
     r"is also made by model.backbones\[0\] \(resnet18\); give one of them another name$"),
    ("[{backbone: resnet18, seeds: [1]}, {name: RESNET18-s1, backbone: d2l_lenet}]",
     r"^overrides: model.backbones\[1\] \(\{backbone: d2l_lenet, name: RESNET18-s1\}\): experiment name 'RESNET18-s1' "
     r"is also made by model.backbones\[0\] \(\{backbone: resnet18, seeds: \[1\]\}\)"),
    ("[{name: r, backbone: resnet18, train: {imagesize: 48}}]",
     r"^overrides: model.backbones\[0\] \(experiment 'r'\): unknown key 'train.imagesize' \(did you mean "
     r"'train.image_size'\?\)$"),
    ("[{name: r, backbone: resnet18, model: {dropout: 0.1}}]",
     r"^overrides: model.backbones\[0\] \(experiment 'r'\): unknown key 'model.dropout'"),
    ("[{name: r, backbone: resnet18, train: {epochs: many}}]",
     r"^overrides: model.backbones\[0\] \(experiment 'r'\): 'train.epochs': Input should be a valid integer"),
    ("[{name: r, backbone: resnet18, seed: [1]}]",
     r"^overrides: model.backbones\[0\]: unknown experiment key 'seed' \(did you mean 'seeds'\?\)$"),
    ("[{name: r}]", r"^overrides: model.backbones\[0\]: the experiment key 'backbone' is missing$"),
    ("[{name: r, backbone: resnet18, seeds: [1], train: {seed: 2}}]", r"give 'seeds' or 'train.seed', not both$"),
    ("[{name: r, backbone: resnet18, image_sizes: [4]}]", r"'image_sizes': Input should be greater than or equal to 8"),
    ("[{name: r, backbone: resnet18, train: {folds: [0]}}]", r"'train.folds' cannot differ per experiment"),
    ("[{name: ../up, backbone: resnet18}]", r"experiment name '../up' is not a safe folder name .*; rename it$"),
    ("[hf-hub:timm/x]", r"experiment name 'hf-hub:timm/x' is not a safe folder name .*; give the entry a name"),
])
def test_bad_specs_are_one_line_errors(backbones: str, message: str):
    with pytest.raises(PipelineError, match=message) as err:
        load_config(None, [f"model.backbones={backbones}"])
    assert "\n" not in str(err.value)


def test_bad_spec_in_a_yaml_file_names_the_file(tmp_path: Path):
    path = tmp_path / "exp.yaml"
    path.write_text("model:\n  backbones:\n    - resnet18\n    - {name: x, backbone: resnet18, train: {lr: -1}}\n")
    with pytest.raises(PipelineError, match=rf"^{path}: model.backbones\[1\] \(experiment 'x'\): 'train.lr': Input "
                                            r"should be greater than 0 \(got -1\)$"):
        load_config(path)


def test_only_must_name_an_experiment():
    with pytest.raises(PipelineError, match=r"model.only: no experiment named 'r18'; the experiments are resnet18, "
                                            r"d2l_lenet$"):
        load_config(None, ["model.backbones=[resnet18, d2l_lenet]", "model.only=[r18]"])


TINY = tiny("train.image_size=8", "ensemble.caruana_rounds=3")  # model.backbones: each test's spec


def _spec(lr_b: float) -> str:
    return (f"model.backbones=[{{name: a, backbone: d2l_lenet}}, "
            f"{{name: b, backbone: d2l_lenet, train: {{image_size: 12, lr: {lr_b}}}}}]")


def _stamps(work: Path) -> dict[str, list[int]]:
    return {name: [(work / "runs" / name / f"fold{k}" / "best.json").stat().st_mtime_ns for k in (0, 1)]
            for name in ("a", "b")}


@pytest.mark.slow
def test_an_edited_experiment_retrains_alone_and_the_tables_follow(tmp_path: Path, capsys):
    data = write_competition(tmp_path / "comp", n_per_class=6, n_test=4)
    work = tmp_path / "work"
    base = ["--data", str(data), "--work", str(work), "--submissions", str(tmp_path / "subs"), "--no-tuned", *TINY]

    assert main(["ensemble", *base, _spec(0.001)]) == 0
    first = capsys.readouterr().out
    before = _stamps(work)
    # the two image sizes got their own decoded caches
    assert sorted(p.name.split("-")[1] for p in (work / "cache").glob("train-*.npy")) == ["12px", "8px"]

    assert main(["train", *base, _spec(0.01)]) == 0
    out = capsys.readouterr().out
    after = _stamps(work)
    assert after["a"] == before["a"] and all(x != y for x, y in zip(after["b"], before["b"], strict=True))
    assert "train: a fold 0 up to date" in out and "train: a fold 1 up to date" in out
    assert "train: b fold 0 up to date" not in out and "train: b fold 1 up to date" not in out

    # EXP=b: only b predicts; a is neither predicted nor retrained
    predicted_a = (work / "runs" / "a" / "predict.json").stat().st_mtime_ns
    assert main(["predict", *base, _spec(0.01), "model.only=[b]"]) == 0
    out = capsys.readouterr().out
    assert "predict: b OOF" in out and "predict: a" not in out and "train: a" not in out
    assert (work / "runs" / "a" / "predict.json").stat().st_mtime_ns == predicted_a

    # per-fold test predictions: same schema and metadata, and their mean is test.parquet
    for name in ("a", "b"):
        run = work / "runs" / name
        test, per_fold = pd.read_parquet(run / "test.parquet"), pd.read_parquet(run / "test_folds.parquet")
        cols = prob_columns(["cat", "dog"])
        assert list(per_fold.columns) == ["id", "fold", *cols] and sorted(per_fold["fold"].unique()) == [0, 1]
        assert read_parquet_meta(run / "test_folds.parquet") == read_parquet_meta(run / "test.parquet")
        mean = per_fold.groupby("id", sort=False)[cols].mean().loc[test["id"]].to_numpy()
        np.testing.assert_allclose(mean, test[cols].to_numpy(), rtol=0, atol=1e-7)
        assert not np.allclose(per_fold[per_fold["fold"] == 0][cols], per_fold[per_fold["fold"] == 1][cols])

    # the ensemble reads both experiments by name and ends with the experiments table
    assert main(["ensemble", *base, _spec(0.01)]) == 0
    out = capsys.readouterr().out
    board = pd.read_csv(work / "ensemble" / "leaderboard.csv")
    assert {"a", "b"} <= set(board["model"])
    table = pd.read_csv(work / "experiments.csv", keep_default_na=False)
    assert list(table["experiment"]) == ["a", "b"] and list(table["backbone"]) == ["d2l_lenet", "d2l_lenet"]
    assert list(table["changes"]) == ["", "train.lr=0.01 train.image_size=12"]
    singles = board.set_index("model")
    for row in table.itertuples():
        oof = read_parquet_meta(work / "runs" / row.experiment / "oof.parquet")["oof_score"]
        assert row.cv_score == pytest.approx(oof, abs=1e-12)
        assert row.honest_score == pytest.approx(singles.loc[row.experiment, "honest_score"], abs=1e-12)
        history = sum(pd.read_csv(work / "runs" / row.experiment / f"fold{k}" / "history.csv")["seconds"].sum()
                      for k in (0, 1))
        assert row.train_seconds == pytest.approx(history, abs=0.051)
        assert (str(row.epochs), row.folds) == ("1", 2) and row.params > 0 and row.trained_at
    assert "ensemble: experiments" in out and "train.lr=0.01 train.image_size=12" in out
    assert "ensemble: experiments" in first
