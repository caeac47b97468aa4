import numpy as np
import pytest
from sklearn.metrics import cohen_kappa_score

from pipeline.scoring.metrics import (
    GREATER_IS_BETTER,
    METRICS,
    TASKS,
    default_metric,
    expected_grade,
    is_better,
    metrics_for,
    midpoints,
    score,
    to_grades,
)

Y = np.array([0, 1, 2, 2])
P = np.array([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.2, 0.5, 0.3], [0.1, 0.1, 0.8]])


def test_accuracy_and_macro_f1():
    assert score("accuracy", Y, P) == 0.75
    # per-class F1: class0 1.0, class1 2/3 (tp1 fp1), class2 2/3 (tp1 fn1)
    assert score("macro_f1", Y, P) == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)


def test_log_loss_matches_hand_computation_and_renormalises():
    expected = -np.mean(np.log([0.7, 0.6, 0.3, 0.8]))
    assert score("log_loss", Y, P) == pytest.approx(expected)
    assert score("log_loss", Y, P * 1.0000001) == pytest.approx(expected)


def test_roc_auc_binary_and_one_vs_rest():
    y = np.array([0, 0, 1, 1])
    p = np.array([[0.9, 0.1], [0.6, 0.4], [0.65, 0.35], [0.2, 0.8]])
    assert score("roc_auc", y, p) == 0.75
    # one-vs-rest, macro: class 0 (p 0.7 above 0.1, 0.2, 0.1) 1; class 1 (0.6 above 0.2, 0.5, 0.1) 1;
    # class 2, positives 0.3 and 0.8 against negatives 0.1 and 0.3: 3 wins + 1 tie of 4 pairs = 7/8
    assert score("roc_auc", Y, P) == pytest.approx((1 + 1 + 7 / 8) / 3, abs=1e-15) == 23 / 24


def test_direction():
    assert is_better("accuracy", 0.9, 0.8) and is_better("log_loss", 0.1, 0.2) and is_better("log_loss", 0.3, None)


# ---- registry -------------------------------------------------------------------------------------------

def test_registry_defaults_and_tasks():
    assert [default_metric(t) for t in TASKS] == ["accuracy", "f1_samples", "rmse", "qwk"]
    assert metrics_for("multi_label") == ["f1_samples", "f1_micro", "f1_macro", "f2_samples", "map", "roc_auc_mean"]
    assert metrics_for("regression") == ["rmse", "mae", "r2"] and metrics_for("ordinal") == ["rmse", "mae", "r2", "qwk"]
    assert all(default_metric(t) in metrics_for(t) for t in TASKS)
    assert [m for m, spec in METRICS.items() if spec.thresholded] == ["f1_samples", "f1_micro", "f1_macro",
                                                                     "f2_samples", "qwk"]
    assert not GREATER_IS_BETTER["rmse"] and not GREATER_IS_BETTER["mae"] and GREATER_IS_BETTER["r2"]
    assert GREATER_IS_BETTER["qwk"] and GREATER_IS_BETTER["map"] and is_better("rmse", 0.1, 0.2)
    with pytest.raises(ValueError, match="unknown task"):
        default_metric("segmentation")
    with pytest.raises(ValueError, match="unknown metric"):
        score("f3", Y, P)


def test_single_label_scores_ignore_thresholds():
    assert score("accuracy", Y, P, thresholds=0.9) == score("accuracy", Y, P) == 0.75


# ---- multi-label ----------------------------------------------------------------------------------------

YM = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1]])
PM = np.array([[0.9, 0.2, 0.6], [0.3, 0.7, 0.1], [0.6, 0.4, 0.2], [0.1, 0.2, 0.45]])


def test_multi_label_f_scores_by_hand():
    # decisions at 0.5: [1,0,1] [0,1,0] [1,0,0] [0,0,0]; per sample F1: 1, 1, 2/3 (tp1 fn1), 0 (tp0 fn1)
    assert score("f1_samples", YM, PM) == pytest.approx((1 + 1 + 2 / 3 + 0) / 4)
    # micro: tp 4, fp 0, fn 2 -> 8 / 10
    assert score("f1_micro", YM, PM) == pytest.approx(0.8)
    # macro: tag0 tp2 -> 1; tag1 tp1 fn1 -> 2/3; tag2 tp1 fn1 -> 2/3
    assert score("f1_macro", YM, PM) == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)
    # F2 per sample: (5 tp) / (5 tp + 4 fn + fp): 1, 1, 5/9, 0
    assert score("f2_samples", YM, PM) == pytest.approx((1 + 1 + 5 / 9 + 0) / 4)


def test_multi_label_thresholds_scalar_and_per_tag():
    # at 0.4 every positive is found; row 2 gains tag1 (0.4 >= 0.4) and row 3 tag2: all perfect
    assert score("f1_samples", YM, PM, thresholds=0.4) == 1.0
    # per tag: tag2 at 0.7 loses row 0's 0.6 -> row 0 F1 2/3; others at 0.4
    assert score("f1_samples", YM, PM, thresholds=[0.4, 0.4, 0.7]) == pytest.approx((2 / 3 + 1 + 1 + 0) / 4)
    assert score("f1_samples", np.zeros((2, 3)), np.zeros((2, 3))) == 1.0  # nothing to find, nothing found
    with pytest.raises(ValueError, match="thresholds of shape"):
        score("f1_samples", YM, PM, thresholds=[0.5, 0.5])


def test_multi_label_ranking_metrics():
    # AP per tag: tag0 1 (positives 0.9, 0.6 on top); tag1 positives 0.7 (rank 1), 0.4 (rank 2) -> 1;
    # tag2 positives 0.6 (rank 1), 0.45 (rank 2) -> 1
    assert score("map", YM, PM) == 1.0 == score("roc_auc_mean", YM, PM)
    p = PM.copy()
    p[3, 2] = 0.15  # tag2 ranks +0.6 -0.2 +0.15 -0.1: AP (1/1 + 2/3) / 2 = 5/6; AUC 3 of 4 pairs
    assert score("map", YM, p, thresholds=0.9) == pytest.approx((1 + 1 + 5 / 6) / 3)
    assert score("roc_auc_mean", YM, p) == pytest.approx((1 + 1 + 0.75) / 3)
    y = YM.copy()
    y[:, 1] = 1  # a tag with no negative row: left out of the AUC mean, still in mAP
    assert score("roc_auc_mean", y, PM) == 1.0


# ---- regression and ordinal -----------------------------------------------------------------------------

def test_regression_metrics_by_hand():
    y, p = np.array([1.0, 2.0, 3.0, 4.0]), np.array([1.5, 2.0, 2.0, 4.0])
    assert score("rmse", y, p) == pytest.approx(np.sqrt((0.25 + 1) / 4))
    assert score("mae", y, p[:, None]) == pytest.approx(1.5 / 4)
    assert score("r2", y, p) == pytest.approx(1 - 1.25 / 5)
    with pytest.raises(ValueError, match=r"\(n,\) or \(n, 1\)"):
        score("rmse", y, np.ones((4, 2)))


def test_qwk_equals_scikit_learn_on_random_grades():
    rng = np.random.default_rng(0)
    for _ in range(5):
        y, g = rng.integers(0, 5, 300), rng.integers(0, 5, 300)
        assert score("qwk", y, g) == pytest.approx(cohen_kappa_score(y, g, weights="quadratic"), abs=1e-12)
    y = rng.integers(0, 5, 300)
    cont = np.clip(y + rng.normal(0, 0.8, 300), -1, 5.5)
    assert score("qwk", y, cont) == pytest.approx(cohen_kappa_score(y, np.clip(np.rint(cont), 0, 4).astype(int),
                                                                    weights="quadratic"), abs=1e-12)
    cuts = [0.3, 1.1, 2.5, 3.2]
    assert score("qwk", y, cont, thresholds=cuts) == pytest.approx(
        cohen_kappa_score(y, np.digitize(cont, cuts), weights="quadratic"), abs=1e-12)


def test_ordinal_grades_and_probabilities():
    assert to_grades([-0.2, 0.49, 0.5, 1.7, 9.0], midpoints(3)).tolist() == [0, 0, 1, 2, 2]
    proba = np.array([[0.1, 0.8, 0.1], [0.0, 0.2, 0.8]])  # expected grades 1.0 and 1.8
    assert expected_grade(proba) == pytest.approx([1.0, 1.8])
    assert score("qwk", np.array([1, 2]), proba) == 1.0
    # grade 2 missing from y_true: pass the cut points for 3 grades, or a prediction of 2 is clipped to 1
    assert score("qwk", np.array([0, 1, 0, 1]), np.array([0, 2, 0, 1]), thresholds=midpoints(3)) == pytest.approx(
        cohen_kappa_score([0, 1, 0, 1], [0, 2, 0, 1], weights="quadratic"))
    with pytest.raises(ValueError, match="outside"):
        score("qwk", np.array([0, 3]), np.array([0.0, 1.0]), thresholds=[0.5])
