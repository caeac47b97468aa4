import numpy as np
import pytest

from pipeline.metrics import is_better, score

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
