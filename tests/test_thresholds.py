import numpy as np
import pytest
from sklearn.metrics import cohen_kappa_score

from pipeline.scoring import thresholds as th
from pipeline.scoring.metrics import FBETA, midpoints, score


def planted(n=400, k=4, seed=0, cuts=(0.3, 0.7, 0.7, 0.7)):
    """Tags whose scores separate perfectly at `cuts`: negatives below cut - 0.005, positives above cut + 0.005."""
    rng = np.random.default_rng(seed)
    y = rng.random((n, k)) < 0.4
    y[np.arange(n), rng.integers(0, k, n)] = True  # at least one tag per row
    c = np.asarray(cuts)
    pred = np.where(y, c + 0.005 + rng.random((n, k)) * (0.995 - c), rng.random((n, k)) * (c - 0.005))
    return pred, y.astype(np.int8)


@pytest.mark.parametrize("metric", list(FBETA))
def test_per_class_search_recovers_planted_thresholds(metric):
    pred, y = planted()
    t = th.fit_per_class(pred, y, metric)
    assert t.tolist() == [0.3, 0.7, 0.7, 0.7]
    assert score(metric, y, pred, thresholds=t) == 1.0
    g = th.fit_global(pred, y, metric)
    assert 0.3 <= g <= 0.7 and score(metric, y, pred, thresholds=g) < 0.97  # no single cut separates every tag


def test_global_threshold_recovers_a_shared_cut_and_ties_go_to_the_middle():
    pred, y = planted(cuts=(0.6, 0.6, 0.6, 0.6))
    assert th.fit_global(pred, y, "f1_samples") == 0.6
    # a wide gap: every grid value in [0.15, 0.85] separates the tags (a tag is predicted at p >= t): the middle wins
    y = np.array([[1, 0], [0, 1], [1, 1], [0, 0]])
    pred = np.where(y == 1, 0.85, 0.145)
    assert th.fit_global(pred, y, "f1_micro") == 0.5
    assert th.fit_per_class(pred, y, "f1_macro").tolist() == [0.5, 0.5]


@pytest.mark.parametrize("metric", list(FBETA))
def test_fast_candidate_scores_equal_scikit_learn(metric):
    rng = np.random.default_rng(1)
    y = (rng.random((60, 5)) < 0.3).astype(np.int8)  # some rows and tags empty: zero_division cases
    pred = np.clip(y * 0.3 + rng.random((60, 5)) * 0.7, 0, 1)
    t = rng.choice(th.GRID, 5)
    beta, average = FBETA[metric]
    grid = th.GRID[::7]
    fast = th._candidate_scores(pred, y.astype(bool), t, 2, grid, beta, average)
    slow = [score(metric, y, pred, thresholds=np.r_[t[:2], g, t[3:]]) for g in grid]
    np.testing.assert_allclose(fast, slow, rtol=0, atol=1e-12)


def test_per_class_never_scores_below_global():
    rng = np.random.default_rng(2)
    y = (rng.random((300, 6)) < 0.25).astype(np.int8)
    pred = np.clip(y * rng.uniform(0.1, 0.5, 6) + rng.random((300, 6)) * 0.6, 0, 1)
    for metric in FBETA:
        g, t = th.fit_global(pred, y, metric), th.fit_per_class(pred, y, metric)
        assert score(metric, y, pred, thresholds=t) >= score(metric, y, pred, thresholds=g)


def test_nested_thresholds_are_honest_on_noise():
    rng = np.random.default_rng(3)
    y = (rng.random((240, 5)) < 0.3).astype(np.int8)
    pred = rng.random((240, 5))  # no signal: any gain from tuning is overfitting
    folds = np.arange(240) % 4
    honest, t_all, per_fold = th.nested_thresholds(pred, y, folds, "f1_macro")
    in_sample = score("f1_macro", y, pred, thresholds=t_all)
    assert sorted(per_fold) == [0, 1, 2, 3] and t_all.shape == (5,)
    assert in_sample - honest > 0.02, (in_sample, honest)
    # on a planted signal the nested thresholds are the planted ones in every fold: honest = in-sample = 1
    pred, y = planted()
    honest, t_all, per_fold = th.nested_thresholds(pred, y, np.arange(len(y)) % 5, "f2_samples")
    assert honest == 1.0 and set(per_fold.values()) == {1.0} and t_all.tolist() == [0.3, 0.7, 0.7, 0.7]
    honest, g, _ = th.nested_thresholds(pred, y, np.arange(len(y)) % 5, "f1_samples", per_class=False)
    assert isinstance(g, float) and honest < 0.97


def test_thresholds_refuse_ranking_metrics_and_bad_shapes():
    pred, y = planted(n=20)
    with pytest.raises(ValueError, match="does not depend on multi-label thresholds"):
        th.fit_per_class(pred, y, "map")
    with pytest.raises(ValueError, match=r"must both be \(n, k\)"):
        th.fit_global(pred[:, 0], y[:, 0], "f1_samples")
    with pytest.raises(ValueError, match="at least two folds"):
        th.nested_thresholds(pred, y, np.zeros(20), "f1_samples")


def miscalibrated(n=600, seed=0):
    """Grades 0..4 predicted on a squeezed scale (0.2 + 0.55 grade + noise): rounding at midpoints mis-grades."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 5, n)
    return 0.2 + 0.55 * y + rng.normal(0, 0.15, n), y


def test_ordinal_cuts_beat_midpoints_on_a_planted_miscalibration():
    pred, y = miscalibrated()
    cuts = th.fit_ordinal(pred, y)
    assert np.all(np.diff(cuts) > 0) and len(cuts) == 4
    # the planted cut points are halfway between squeezed grades: 0.2 + 0.55 (i + 0.5)
    np.testing.assert_allclose(cuts, 0.2 + 0.55 * (np.arange(4) + 0.5), atol=0.08)
    fitted, plain = score("qwk", y, pred, thresholds=cuts), score("qwk", y, pred)
    assert fitted > 0.97 and fitted - plain > 0.05, (fitted, plain)
    assert fitted == pytest.approx(cohen_kappa_score(y, np.digitize(pred, cuts), weights="quadratic"), abs=1e-12)


def test_fast_qwk_equals_scikit_learn():
    rng = np.random.default_rng(5)
    for k in (2, 3, 6):
        y, g = rng.integers(0, k, 200), rng.integers(0, k, 200)
        assert th._qwk(y, g, k) == pytest.approx(cohen_kappa_score(y, g, weights="quadratic"), abs=1e-12)


def test_nested_ordinal_is_honest_and_still_beats_midpoints():
    pred, y = miscalibrated()
    folds = np.arange(len(y)) % 5
    honest, cuts, per_fold = th.nested_ordinal_thresholds(pred, y, folds)
    in_sample, plain = score("qwk", y, pred, thresholds=cuts), score("qwk", y, pred)
    assert plain + 0.05 < honest <= in_sample and len(per_fold) == 5
    rng = np.random.default_rng(4)
    noise, yn = rng.random(300) * 4, rng.integers(0, 5, 300)
    honest, cuts, _ = th.nested_ordinal_thresholds(noise, yn, np.arange(300) % 5)
    assert score("qwk", yn, noise, thresholds=cuts) - honest > 0.05
    # grade probabilities are cut at their expected grade; a missing top grade is kept with n_grades
    proba = np.eye(3)[[0, 1, 1, 0]] * 0.9 + 0.05
    assert th.fit_ordinal(proba, np.array([0, 1, 1, 0]), n_grades=3).shape == (2,)
    np.testing.assert_array_equal(th.fit_ordinal(np.array([0.0, 1.0]), np.array([0, 1]), n_grades=3)[1:],
                                  midpoints(3)[1:])


def test_decision_thresholds_estimator_fits_cuts_and_nests_like_the_functions():
    """DecisionThresholds is fit_multilabel / fit_ordinal behind fit and transform; nested over folds
    (nested.nested_decisions) it scores what nested_thresholds and nested_ordinal_thresholds score."""
    from pipeline.scoring.nested import nested_decisions

    pred, y = planted()
    folds = np.arange(len(y)) % 4
    for policy in ("per_class", "global"):
        per_class = policy == "per_class"
        cutter = th.DecisionThresholds("f1_samples", policy).fit(pred, y)
        np.testing.assert_array_equal(cutter.thresholds_, th.fit_multilabel(pred, y, "f1_samples", per_class))
        assert score("f1_samples", y, cutter.transform(pred)) == score("f1_samples", y, pred, cutter.thresholds_)
        honest, _, _ = th.nested_thresholds(pred, y, folds, "f1_samples", per_class=per_class)
        assert score("f1_samples", y, nested_decisions(cutter, pred, y, folds)) == pytest.approx(honest)
    g, grades = miscalibrated()
    cutter = th.DecisionThresholds("qwk", "per_class", n_grades=5).fit(g, grades)
    np.testing.assert_array_equal(cutter.thresholds_, th.fit_ordinal(g, grades, 5))
    assert cutter.transform(g).shape == (len(g), 1)
    honest, _, _ = th.nested_ordinal_thresholds(g, grades, np.arange(len(g)) % 5, 5)
    assert score("qwk", grades, nested_decisions(cutter, g, grades, np.arange(len(g)) % 5)) == pytest.approx(honest)
    for unfitted in (th.DecisionThresholds("f1_samples", "fixed"), th.DecisionThresholds("accuracy", "per_class")):
        assert unfitted.fit(pred, y).thresholds_ is None and unfitted.transform(pred) is pred
