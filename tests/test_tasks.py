"""Task types (scoring/tasks.py): detection, label reading, folds, heads, blends, submissions, each end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.cli import main
from pipeline.core.config import load_config
from pipeline.core.errors import PipelineError
from pipeline.data import splits as folds
from pipeline.data.competition import read_competition
from pipeline.data.labels import detect_task
from pipeline.scoring import blend, nested, submission, tasks, thresholds
from pipeline.scoring.blend import BlendSettings
from pipeline.training import heads
from pipeline.training.tta import merge

from .task_data import TAGS, make_task_folder

# --- auto detection -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("labels, task, reason", [
    (["a b", "b", "c a", "c"], "multi_label", "2 of 4 labels hold the separator ' '"),
    (["1.5", "2", "3.25", "2"], "regression", "3 distinct values, not all integers"),
    ([str(i) for i in range(30)], "regression", "30 distinct integer values (over 20)"),
    (["0", "1", "2", "1", "0"], "single_label", "3 distinct integer values (set competition.task=ordinal"),
    (["cat", "dog", "cat"], "single_label", "2 classes, no label holds the separator ' '"),
    (["0", "1", "2", "other", "other", "1"], "single_label", "4 classes"),  # class ids and a text class: not numbers
    (["1.5 2", "2.5", "3 4"], "multi_label", "2 of 3 labels hold the separator"),  # half tags: not numbers either
])
def test_auto_detection_decides_from_the_label_column_and_says_why(labels, task, reason):
    got, why = detect_task(pd.Series(labels), " ")
    assert got == task and why.startswith(reason)


def test_auto_detection_prints_its_decision_and_picks_the_task_metric(tmp_path: Path, capsys):
    from pipeline.context import Context

    data = make_task_folder(tmp_path / "comp", "multi_label", n_train=20, n_test=4)
    ctx = Context(load_config(None, []), data, tmp_path / "work")
    assert (ctx.cfg.competition.task, ctx.cfg.competition.metric) == ("multi_label", "f1_samples")
    assert "competition: task multi_label: " in capsys.readouterr().out
    ordinal = Context(load_config(None, ["competition.task=ordinal"]), data, tmp_path / "w2")
    assert ordinal.cfg.competition.metric == "qwk"
    with pytest.raises(PipelineError, match="competition.metric=rmse does not score a multi_label task"):
        Context(load_config(None, ["competition.metric=rmse"]), data, tmp_path / "w3")


# --- reading labels: one-line errors with file and line -------------------------------------------------------

def _folder(tmp_path: Path, task: str, labels: list[str], sample: list[str] | None = None) -> Path:
    root = make_task_folder(tmp_path / task, "multi_label", n_train=len(labels), n_test=2, sample="none")
    train = pd.read_csv(root / "train.csv", dtype=str)
    train["target"] = labels
    train.to_csv(root / "train.csv", index=False)
    if sample is not None:
        test = pd.read_csv(root / "test.csv", dtype=str)
        pd.DataFrame({"image": test["image"], **{c: 0.5 for c in sample}}).to_csv(root / "sample_submission.csv",
                                                                                   index=False)
    return root


@pytest.mark.parametrize("task, labels, message", [
    ("regression", ["1.5", "2", "abc", "3"], r"train.csv line 4: target 'abc' in column 'target' is not a finite"),
    ("regression", ["1.5", "nan", "2", "3"], r"train.csv line 3: empty or missing target 'nan'"),
    ("regression", ["1.5", "2", "", "3"], r"train.csv line 4: empty or missing target ''"),
    ("ordinal", ["1", "2", "2.5", "1"], r"train.csv line 4: grade '2.5' in column 'target' is not an integer"),
    ("multi_label", ["a b", "a", "b c", "b"], r"train.csv line 4: tag 'c' appears in only 1 row"),
])
def test_bad_targets_are_one_line_errors_naming_file_and_line(tmp_path, task, labels, message):
    root = _folder(tmp_path, task, labels)
    cfg = load_config(None, [f"competition.task={task}"]).competition
    with pytest.raises(PipelineError, match=message) as err:
        read_competition(root, cfg)
    assert "\n" not in str(err.value)


def test_a_sample_submission_tag_never_seen_in_train_is_refused(tmp_path):
    root = _folder(tmp_path, "multi_label", ["a b", "a", "b", "a b"], sample=["a", "b", "zebra"])
    with pytest.raises(PipelineError, match="tag column 'zebra' never appears in train.csv's labels"):
        read_competition(root, load_config(None, []).competition)


def test_labels_read_per_task(tmp_path):
    root = _folder(tmp_path, "ordinal", ["3", "1", "10", "1", "3"])
    comp = read_competition(root, load_config(None, ["competition.task=ordinal"]).competition)
    assert comp.classes == ["1", "3", "10"] and comp.train["y"].tolist() == [1, 0, 2, 0, 1]
    comp = read_competition(root, load_config(None, ["competition.task=regression"]).competition)
    assert comp.classes == [] and comp.train["y"].tolist() == [3.0, 1.0, 10.0, 1.0, 3.0]
    root = _folder(tmp_path / "m", "multi_label", ["b a", "a", "b  c", "c"])
    comp = read_competition(root, load_config(None, []).competition)
    assert comp.task == "multi_label" and comp.classes == ["a", "b", "c"]
    assert tasks.multi_hot(comp.train["label"], comp.classes, " ").tolist() == [[1, 1, 0], [1, 0, 0], [0, 1, 1],
                                                                                [0, 0, 1]]


# --- folds ------------------------------------------------------------------------------------------------------

TOLERANCE = 0.05  # largest gap between a fold's tag frequency and the overall one (5 folds, ~800 rows, 6 tags)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_multilabel_folds_keep_groups_together_near_the_global_tag_frequencies(seed):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 4, 400)  # duplicate groups of 1 to 3 images sharing their tags
    groups = np.repeat(np.arange(400), sizes)
    tags = (rng.random((400, 6)) < np.array([0.5, 0.3, 0.2, 0.1, 0.05, 0.6]))[groups].astype(float)
    fold = folds.assign_multilabel_folds(tags, 5, seed, groups)
    assert pd.Series(fold).groupby(groups).nunique().max() == 1
    assert sorted(np.unique(fold)) == [0, 1, 2, 3, 4]
    gaps = np.stack([tags[fold == k].mean(0) - tags.mean(0) for k in range(5)])
    assert np.abs(gaps).max() <= TOLERANCE
    report = folds.fold_report(pd.DataFrame({"fold": fold, "split_group": groups}), tags=tags)
    assert report["max_class_share_deviation"] == round(float(np.abs(gaps).max()), 4)
    assert report["groups_spanning_folds"] == 0


def test_regression_folds_stratify_binned_targets_with_groups():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(150), 2)
    y = np.repeat(rng.gamma(2.0, 10.0, 150), 2)
    bins = folds.strata(y, 5)
    assert len(np.unique(bins)) == 10
    fold = folds.assign_folds(pd.DataFrame({"y": y}), 5, 0, groups, strata=bins)
    assert pd.Series(fold).groupby(groups).nunique().max() == 1
    means = [y[fold == k].mean() for k in range(5)]
    assert max(means) - min(means) < 0.15 * y.mean()  # each fold sees the whole range of targets


# --- heads, TTA, blends -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("loss", ["mse", "huber", "bce_scaled"])
def test_number_heads_learn_scaled_targets_and_predict_on_the_target_scale(loss):
    y = np.array([10.0, 20.0, 30.0, 50.0])
    head = heads.make_head("regression", 0, loss, y)
    u = (torch.tensor(y) - head.center) / head.scale
    logits = torch.logit(u.clamp(1e-6, 1 - 1e-6)) if loss == "bce_scaled" else u
    assert head.activate(logits.view(-1, 1).float()).view(-1).numpy() == pytest.approx(y, rel=1e-4)
    worse = head.loss_value((logits + 0.5).view(-1, 1).float(), torch.tensor(y))
    assert head.loss_value(logits.view(-1, 1).float(), torch.tensor(y)) < worse


def test_tta_merges_numbers_by_their_mean_and_tags_by_mean_probability():
    head = heads.Head("regression", 1, "mse", 5.0, 2.0)
    views = np.array([[[0.0], [1.0]], [[1.0], [-1.0]]])  # two views of two rows
    assert merge(views, "mean", head)[:, 0].tolist() == pytest.approx([6.0, 5.0])
    tags = heads.Head("multi_label", 2, "bce")
    logits = np.array([[[0.0, 2.0]], [[2.0, 0.0]]])
    sig = 1 / (1 + np.exp(-2.0))
    assert merge(logits, "mean", tags)[0].tolist() == pytest.approx([(0.5 + sig) / 2] * 2)
    assert merge(logits, "geometric", tags)[0].tolist() == pytest.approx([sig ** 0 * (1 / (1 + np.exp(-1.0)))] * 2)


def test_blends_of_numbers_keep_the_scale_and_fit_planted_weights():
    rng = np.random.default_rng(0)
    y = rng.normal(50, 10, 300)
    a, b = y + rng.normal(0, 2, 300), y + rng.normal(0, 8, 300)  # a is the better model
    P = np.stack([a, b])[:, :, None]
    rows = {r.model: r for r in nested.leaderboard(P, y, np.arange(300) % 5, ["a", "b"], BlendSettings("rmse"))}
    assert set(rows) == {"a", "b", "mean", "rank", "weights", "caruana"}  # no geometric, no stack for numbers
    rank = blend.RankBlend(on_scale=True).fit(P, y).predict(P)
    assert np.sort(rank[:, 0]) == pytest.approx(np.sort(P.mean(0)[:, 0]))  # the mean blend's values, re-ordered
    w = blend.WeightedBlend("rmse").fit(P, y).weights_  # squared-error optimum: inverse noise variances, 16:1
    assert w[0] == pytest.approx(16 / 17, abs=0.05)
    best = nested.chosen_row(list(rows.values()), "rmse")
    assert best.honest_score <= rows["b"].honest_score and best.model in ("a", "weights", "caruana")


def test_thresholds_are_nested_in_a_rows_honest_score():
    rng = np.random.default_rng(0)
    y = (rng.random((400, 3)) < 0.4).astype(int)
    p = np.clip(0.3 * y + rng.random((400, 3)) * 0.5, 0, 1)  # positives sit above 0.3, so 0.5 misses many
    fold_ids = np.arange(400) % 4
    row = nested.leaderboard(p[None], y, fold_ids, ["m"], BlendSettings("f1_samples", thresholds="per_class"))[0]
    fixed = nested.leaderboard(p[None], y, fold_ids, ["m"], BlendSettings("f1_samples"))[0]
    assert fixed.thresholds is None and row.thresholds.shape == (3,)
    honest, fitted, _ = thresholds.nested_thresholds(p, y, np.arange(400) % 4, "f1_samples", per_class=True)
    assert row.honest_score == pytest.approx(honest) and row.thresholds == pytest.approx(fitted)
    assert row.cv_score > row.honest_score > fixed.honest_score  # tuning helps; in-sample flatters it


# --- submissions --------------------------------------------------------------------------------------------------

def _comp(tmp_path: Path, task: str, sample: str = "labels"):
    root = make_task_folder(tmp_path / f"{task}-{sample}", task, n_train=24, n_test=4, sample=sample)
    return read_competition(root, load_config(None, [f"competition.task={task}"]).competition)


def test_submission_forms_per_task(tmp_path):
    comp = _comp(tmp_path, "multi_label")
    ids = comp.test["id"].to_numpy()
    proba = np.array([[0.9, 0.1, 0.6, 0.2], [0.1, 0.2, 0.3, 0.4], [0.5, 0.5, 0.5, 0.5], [0.0, 0.9, 0.0, 0.0]])
    frame = submission.build(comp, ids, proba, submission.output_kind(comp, "auto"))
    # classes sort as text: east north south west
    assert frame["target"].tolist() == ["east south", "west", "east north south west", "north"]
    submission.validate(frame, comp)
    cut = submission.build(comp, ids, proba, "labels", thresholds=np.array([0.95, 0.05, 0.95, 0.95]))
    assert cut["target"].tolist() == ["north", "north", "north", "north"]
    wide = _comp(tmp_path, "multi_label", "probabilities")
    frame = submission.build(wide, ids, proba, submission.output_kind(wide, "auto"))
    assert list(frame.columns) == ["image", *TAGS] and frame["north"].tolist() == [0.1, 0.2, 0.5, 0.9]
    submission.validate(frame, wide)
    reg = _comp(tmp_path, "regression")
    frame = submission.build(reg, ids, np.array([[1.5], [2.0], [3.25], [0.5]]), "values")
    assert frame["target"].tolist() == [1.5, 2.0, 3.25, 0.5]
    submission.validate(frame, reg)
    ordinal = _comp(tmp_path, "ordinal")
    frame = submission.build(ordinal, ids, np.array([[0.4], [0.6], [1.49], [9.0]]), "values")
    assert frame["target"].tolist() == [ordinal.classes[0], ordinal.classes[1], ordinal.classes[1],
                                        ordinal.classes[-1]]
    submission.validate(frame, ordinal)


@pytest.mark.parametrize("task, column, value, message", [
    ("multi_label", "target", "east zebra", r"line 3: tag 'zebra' \(id '.*'\) is not a tag of train.csv"),
    ("regression", "target", "nan", r"line 3: value 'nan' \(id '.*'\) is not a finite number"),
    ("regression", "target", "many", r"line 3: value 'many' \(id '.*'\) is not a finite number"),
    ("ordinal", "target", "7", r"line 3: grade '7' \(id '.*'\) is not a grade of train.csv"),
    ("multi_label", "north", "1.5", r"line 3: probability '1.5' in column 'north' .* is not a number in \[0, 1\]"),
])
def test_submission_validation_refuses_bad_values(tmp_path, task, column, value, message):
    sample = "probabilities" if column == "north" else "labels"
    comp = _comp(tmp_path, task, sample)
    frame = submission.read_submission(comp.root / "sample_submission.csv")
    if task == "ordinal":
        frame["target"] = comp.classes[0]
    frame.loc[1, column] = value
    with pytest.raises(PipelineError, match=message) as err:
        submission.validate(frame, comp, "sub.csv")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("task", ["multi_label", "regression", "ordinal"])
def test_submission_validation_refuses_a_wrong_row_order(tmp_path, task):
    comp = _comp(tmp_path, task)
    frame = submission.read_submission(comp.root / "sample_submission.csv")
    frame["target"] = {"multi_label": "north", "regression": "1.0"}.get(task) or comp.classes[0]
    with pytest.raises(PipelineError, match="rows are not in sample_submission.csv's order"):
        submission.validate(frame.iloc[::-1].reset_index(drop=True), comp, "sub.csv")


# --- each task end to end through the CLI -------------------------------------------------------------------------

E2E = ["model.backbones=[{name: a, backbone: d2l_lenet, seeds: [1, 2]}]", "folds.n_splits=3", "train.epochs=2",
       "train.image_size=16", "train.batch_size=8", "train.warmup_epochs=0", "train.lr=0.003", "train.hflip=false",
       "runtime.device=cpu", "runtime.threads=1", "clean.workers=1", "predict.tta=[identity]",
       "ensemble.caruana_rounds=5"]


def _by_hand(metric: str, solution: Path, sub: Path) -> float:
    """The submission's score computed here with scikit-learn (rows matched by id)."""
    from sklearn.metrics import cohen_kappa_score, f1_score
    from sklearn.preprocessing import MultiLabelBinarizer

    merged = pd.read_csv(solution).merge(pd.read_csv(sub, keep_default_na=False), on="image", suffixes=("", "_sub"))
    truth, pred = merged["target"], merged["target_sub"]
    if metric == "rmse":
        return float(np.sqrt(np.mean((pred.astype(float) - truth.astype(float)) ** 2)))
    if metric == "qwk":
        return cohen_kappa_score(truth.astype(int), pred.astype(float).round().astype(int), weights="quadratic")
    tags = MultiLabelBinarizer(classes=TAGS)
    return f1_score(tags.fit_transform(truth.str.split()), tags.transform(pred.astype(str).str.split()),
                    average="samples", zero_division=0)


@pytest.mark.slow
@pytest.mark.parametrize("task, metric", [("multi_label", "f1_samples"), ("regression", "rmse"), ("ordinal", "qwk")])
def test_each_task_runs_folds_train_ensemble_through_the_cli(tmp_path, capsys, task, metric):
    data = make_task_folder(tmp_path / "comp", task, n_train=36, n_test=8)
    work, subs = tmp_path / "work", tmp_path / "subs"
    extra = ["competition.task=ordinal"] if task == "ordinal" else []
    for stage in ("folds", "train", "ensemble"):
        assert main([stage, "--data", str(data), "--work", str(work), "--submissions", str(subs), *E2E, *extra]) == 0
    out = capsys.readouterr().out
    assert f"honest CV {metric}" in out
    oof = pd.read_parquet(work / "runs" / "a-s1" / "oof.parquet")
    cols = [f"p_{t}" for t in sorted(TAGS)] if task == "multi_label" else ["pred"]
    assert [c for c in oof.columns if c not in ("id", "fold", "label", "y")] == cols
    assert len(oof) == len(pd.read_csv(work / "folds.csv"))
    board = pd.read_csv(work / "ensemble" / "leaderboard.csv")
    assert {"a-s1", "a-s2", "mean", "rank", "weights", "caruana"} == set(board["model"])
    comp = read_competition(data, load_config(None, [f"competition.task={task}"]).competition)
    sub = submission.read_submission(subs / "comp.csv")
    submission.validate(sub, comp)
    perfect = submission.score_file(data / "solution.csv", data / "solution.csv", metric)
    assert perfect == (0.0 if metric == "rmse" else 1.0)
    got = submission.score_file(subs / "comp.csv", data / "solution.csv", metric)
    assert got == pytest.approx(_by_hand(metric, data / "solution.csv", subs / "comp.csv"), abs=1e-9)
    assert got != perfect  # a tiny model after 2 epochs: not the perfect score the scorer gives the solution itself
    if task != "regression":
        assert "thresholds of" in out  # tuned on OOF, nested


# --- tuning and the AutoGluon baseline --------------------------------------------------------------------------

@pytest.mark.parametrize("task, direction", [("multi_label", "MAXIMIZE"), ("regression", "MINIMIZE")])
def test_tuning_follows_the_task_metrics_direction(tmp_path, task, direction):
    from pipeline.context import Context
    from pipeline.stages import tune

    data = make_task_folder(tmp_path / "comp", task, n_train=24, n_test=4)
    args = ["clean.workers=1", "folds.n_splits=2", *(["competition.task=ordinal"] if task == "ordinal" else [])]
    assert main(["folds", "--data", str(data), "--work", str(tmp_path / "work"), *args]) == 0
    study = tune.open_study(Context(load_config(None, args), data, tmp_path / "work"))
    assert study.direction.name == direction


def test_autogluon_runs_numbers_as_regression_and_refuses_multi_label(tmp_path):
    from pipeline.stages.autogluon import autogluon_problem

    assert autogluon_problem("rmse", 0, "regression") == {"problem_type": "regression", "eval_metric": "rmse",
                                                          "validation_metric": "rmse"}
    assert autogluon_problem("qwk", 4, "ordinal")["problem_type"] == "regression"
    with pytest.raises(PipelineError, match="multi_label tasks are not supported: AutoGluon's MultiModalPredictor"):
        autogluon_problem("f1_samples", 4, "multi_label")
    data = make_task_folder(tmp_path / "comp", "multi_label", n_train=20, n_test=4)
    code = main(["autogluon", "--data", str(data), "--work", str(tmp_path / "work"), "clean.workers=1",
                 "folds.n_splits=2"])
    assert code == 2 and not (tmp_path / "work" / "autogluon").exists()  # refused before any work
