import numpy as np
import pytest

from pipeline.scoring import blend, nested
from pipeline.scoring.blend import BlendSettings
from pipeline.scoring.metrics import score


def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _noisy_models(n=600, c=3, noise=(0.6, 1.2, 3.0), seed=0):
    """Models = true one-hot logits + independent noise of growing size."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    truth = np.eye(c)[y] * 2.0
    P = np.stack([_softmax(truth + rng.normal(0, s, (n, c))) for s in noise])
    return P, y, np.arange(n) % 5


def test_fixed_blends_on_hand_computed_case():
    P = np.array([[[0.2, 0.8], [0.6, 0.4]], [[0.4, 0.6], [0.2, 0.8]]])  # 2 models, 2 rows
    np.testing.assert_allclose(blend.MeanBlend().fit(P, None).predict(P), [[0.3, 0.7], [0.4, 0.6]])
    geo = np.sqrt(P[0] * P[1])
    np.testing.assert_allclose(blend.GeometricBlend().fit(P, None).predict(P), geo / geo.sum(1, keepdims=True))
    # ranks within each (model, class) column: model 0 -> [[1,2],[2,1]], model 1 -> [[2,1],[1,2]]; mean 1.5 everywhere
    np.testing.assert_allclose(blend.RankBlend().fit(P, None).predict(P), [[0.5, 0.5], [0.5, 0.5]])


def test_fitted_weights_recover_a_known_optimum():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 4000)
    good = _softmax(np.eye(2)[y] * 2 + rng.normal(0, 0.8, (4000, 2)))
    useless = _softmax(rng.normal(0, 1, (4000, 2)))
    w = blend.WeightedBlend("accuracy", "log_loss").fit(np.stack([useless, good]), y).weights_
    assert w[1] > 0.9 and abs(w.sum() - 1) < 1e-9


def test_weights_match_the_data_generating_mixture():
    """Labels drawn from 0.7*A + 0.3*B: the log-loss optimum is w=(0.7, 0.3)."""
    rng = np.random.default_rng(2)
    A, B = _softmax(rng.normal(0, 2, (20000, 3))), _softmax(rng.normal(0, 2, (20000, 3)))
    mix = 0.7 * A + 0.3 * B
    y = (rng.random(20000)[:, None] > mix.cumsum(1)).sum(1)
    w = blend.optimised_weights(np.stack([A, B]), y, "log_loss", "log_loss")
    np.testing.assert_allclose(w, [0.7, 0.3], atol=0.03)


def test_caruana_prefers_the_better_model_and_counts_sum_to_one():
    P, y, _ = _noisy_models()
    w = blend.CaruanaBlend("accuracy", "log_loss", rounds=20).fit(P, y).weights_
    assert w[0] == w.max() and w[2] <= w[1] and abs(w.sum() - 1) < 1e-9
    assert np.allclose(w * 20, np.round(w * 20))


def _board(P, y, folds, names, metric, **settings):
    return nested.leaderboard(P, y, folds, names, BlendSettings(metric, **settings))


def test_complementary_models_blend_beats_each():
    P, y, folds = _noisy_models(noise=(1.0, 1.0, 1.0))
    rows = _board(P, y, folds, ["a", "b", "c"], "accuracy")
    best_single = max(r.honest_score for r in rows if r.kind == "single")
    assert rows[3].model == "mean" and rows[3].honest_score > best_single
    chosen = nested.chosen_row(rows, "accuracy")
    assert chosen.kind != "single" and chosen.honest_score >= best_single


def test_nested_cv_exposes_weights_fitted_to_noise():
    """Pure-noise models: fitted weights look better in-sample than they are; nested CV says so by a clear
    margin (log-loss 0.724 in-sample, 0.749 honest), and the pick goes to a blend that fitted nothing."""
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 300)
    P = np.stack([_softmax(rng.normal(0, 1, (300, 2))) for _ in range(8)])
    rows = _board(P, y, np.arange(300) % 5, [f"m{i}" for i in range(8)], "log_loss")
    fitted = [row for row in rows if row.kind == "fitted blend"]
    assert [row.model for row in fitted] == ["weights", "caruana"]
    for row in fitted:
        assert row.honest_score - row.cv_score > 0.02  # log-loss: higher is worse
    mean = next(row for row in rows if row.model == "mean")
    assert all(row.cv_score < mean.cv_score < row.honest_score for row in fitted)
    assert nested.chosen_row(rows, "log_loss").model == "mean"


def _rows_seen(P_train: np.ndarray) -> set[int]:
    """Row identities planted in model 0's first column (see _with_row_ids)."""
    return set(np.rint(P_train[0, :, 0] * 1e6).astype(int).tolist())


def _with_row_ids(P: np.ndarray) -> np.ndarray:
    """A copy of P whose model 0 carries each row's index in its first column (tiny: i * 1e-6)."""
    P = P.copy()
    P[0, :, 0] = np.arange(P.shape[1]) * 1e-6
    return P


def test_nested_oof_fits_each_fold_on_the_other_folds_rows_only():
    P, y, folds = _noisy_models()
    P = _with_row_ids(P)
    seen = []

    class Spy(blend.WeightedAverage):
        def fit(self, P_train, y_train):
            seen.append(_rows_seen(P_train))
            # other weights per fold: a mix-up would show
            self.weights_ = np.eye(len(P_train))[len(seen) % len(P_train)]
            return self

    out = nested.nested_oof(Spy(), P, y, folds)
    for k, rows in enumerate(seen):
        assert rows == set(np.flatnonzero(folds != k).tolist())  # exactly the other folds: no held-out row
        held = folds == k
        np.testing.assert_array_equal(out[held], P[(k + 1) % len(P), held])


def _spy_on_fit(monkeypatch, cls, calls: list) -> None:
    """Record the row identities every fit of `cls` receives (then fit as usual)."""
    real = cls.fit

    def spy(self, P_fit, y_fit):
        calls.append((cls.name, _rows_seen(P_fit)))
        return real(self, P_fit, y_fit)

    monkeypatch.setattr(cls, "fit", spy)


def test_leaderboard_honest_scores_never_fit_on_the_scored_fold(monkeypatch):
    """Through the leaderboard, as the ensemble stage builds it: every fitted blend's honest OOF rows of fold k
    come from a fit that never received a row of fold k."""
    P, y, folds = _noisy_models()
    P = _with_row_ids(P)
    calls = []
    for cls in (blend.WeightedBlend, blend.CaruanaBlend):
        _spy_on_fit(monkeypatch, cls, calls)
    _board(P, y, folds, ["a", "b", "c"], "accuracy")
    everything = set(range(len(y)))
    for name in ("weights", "caruana"):
        fits = [rows for called, rows in calls if called == name]
        assert fits[0] == everything  # the in-sample fit, for the weights shown
        assert sorted(map(sorted, fits[1:])) == sorted(sorted(np.flatnonzero(folds != k)) for k in range(5))
        assert all(not (rows & set(np.flatnonzero(folds == k))) for k, rows in enumerate(fits[1:]))


def test_chosen_row_by_name_and_unknown():
    P, y, folds = _noisy_models()
    rows = _board(P, y, folds, ["a", "b", "c"], "accuracy")
    assert nested.chosen_row(rows, "accuracy", "rank").model == "rank"
    with pytest.raises(KeyError):
        nested.chosen_row(rows, "accuracy", "stacking")


def test_single_model_has_no_blends():
    P, y, folds = _noisy_models(noise=(1.0,))
    rows = _board(P, y, folds, ["only"], "accuracy")
    assert [r.model for r in rows] == ["only"] and rows[0].honest_score == score("accuracy", y, P[0])


def test_the_registry_names_every_blend_row():
    P, y, folds = _planted_level2()
    rows = _board(P, y, folds, ["A", "B"], "accuracy", lightgbm=True)
    for row in rows[2:]:
        assert isinstance(row.blend, blend.BLENDS[row.model]) and row.model == row.blend.name
    assert set(blend.BLENDS) == {r.model for r in rows[2:]}


def _planted_level2(n=900, seed=4):
    """3 classes. Model A is right on class-0 rows and says class 2 on the others; model B is right on
    class-1 rows and says class 2 on the others. Truth: 0 if A says 0, 1 if B says 1, else 2 -- a level-2
    relation no non-negative blend expresses (on a class-0 row A says 0 and B says 2 equally surely)."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    says_a, says_b = np.where(y == 0, 0, 2), np.where(y == 1, 1, 2)
    A = _softmax(np.eye(3)[says_a] * 3 + rng.normal(0, 0.5, (n, 3)))
    B = _softmax(np.eye(3)[says_b] * 3 + rng.normal(0, 0.5, (n, 3)))
    return np.stack([A, B]), y, rng.permutation(n) % 5


def test_stack_recovers_a_planted_level2_relation():
    P, y, folds = _planted_level2()
    rows = {r.model: r for r in _board(P, y, folds, ["A", "B"], "accuracy")}
    assert list(rows) == ["A", "B", "mean", "geometric", "rank", "weights", "caruana", "stack"]
    assert rows["stack"].kind == "stack"
    others = max(r.honest_score for name, r in rows.items() if name != "stack")
    assert rows["A"].honest_score == rows["B"].honest_score == score("accuracy", y, P[0])
    assert others < 0.8 and rows["stack"].honest_score > 0.97  # nested CV, by a margin of over 0.17
    assert nested.chosen_row(list(rows.values()), "accuracy").model == "stack"
    shares = rows["stack"].weights
    assert abs(shares["A"] - shares["B"]) < 0.2 and abs(sum(shares.values()) - 1) < 1e-9  # it leans on both
    # the test probabilities: the stack fitted on all OOF rows, applied to new rows of the same relation
    P_new, y_new, _ = _planted_level2(seed=5)
    assert score("accuracy", y_new, rows["stack"].predict(P_new)) > 0.97


def test_stack_regularisation_comes_from_the_config_key():
    """ensemble.stack_c is scikit-learn's C: at 1e-4 the coefficients shrink to almost nothing and the
    honest log-loss goes towards that of a constant (ln 3 = 1.0986; 0.94) instead of 0.004."""
    P, y, folds = _planted_level2()
    loose, tight = blend.LogisticStack(10.0).fit(P, y), blend.LogisticStack(1e-4).fit(P, y)
    assert np.abs(tight.model_.coef_).sum() < 0.05 * np.abs(loose.model_.coef_).sum()
    default = _board(P, y, folds, ["A", "B"], "log_loss")[-1]
    squeezed = _board(P, y, folds, ["A", "B"], "log_loss", stack_c=1e-4)[-1]
    assert default.model == squeezed.model == "stack"
    assert default.honest_score < 0.1 and squeezed.honest_score > 0.9
    from pipeline.core.config import load_config
    assert load_config(None, ["ensemble.stack_c=0.1"]).ensemble.stack_c == 0.1


def test_stack_features_are_floored_log_probabilities_model_by_model():
    P = np.array([[[0.5, 0.5], [1e-9, 1.0]], [[0.25, 0.75], [0.9, 0.1]]])  # 2 models, 2 rows
    np.testing.assert_allclose(blend.stack_features(P), np.log([[0.5, 0.5, 0.25, 0.75], [1e-6, 1.0, 0.9, 0.1]]))


def test_nested_honesty_holds_for_the_stack(monkeypatch):
    """The stack's honest OOF rows of fold k come from a fit that received exactly the other folds' rows."""
    P, y, folds = _noisy_models()
    P = _with_row_ids(P)
    calls = []
    _spy_on_fit(monkeypatch, blend.LogisticStack, calls)
    _board(P, y, folds, ["a", "b", "c"], "accuracy")
    seen = [rows for _, rows in calls]
    assert seen[0] == set(range(len(y)))  # the fit used for the test probabilities
    assert seen[1:] == [set(np.flatnonzero(folds != k).tolist()) for k in range(5)]


def test_auto_pick_nested_is_clearly_below_the_best_honest_score_on_noise():
    """24 pure-noise models (and their blends): the best honest row looks like 0.555 accuracy, but the
    pick made on the other folds scores what noise scores on the held-out one (0.48)."""
    rng = np.random.default_rng(8)
    n, m = 400, 24
    y = rng.integers(0, 2, n)
    P = np.stack([_softmax(rng.normal(0, 1, (n, 2))) for _ in range(m)])
    folds = np.arange(n) % 5
    rows = _board(P, y, folds, [f"m{i}" for i in range(m)], "accuracy", caruana_rounds=5)
    best = nested.chosen_row(rows, "accuracy").honest_score
    result = nested.nested_auto_pick(P, y, folds, [f"m{i}" for i in range(m)], BlendSettings("accuracy",
                                                                                             caruana_rounds=5))
    assert best - result.score > 0.05 and result.score < 0.5
    assert sorted(result.picks) == [0, 1, 2, 3, 4] and len(set(result.picks.values())) > 1


def test_auto_pick_on_each_fold_never_saw_that_fold(monkeypatch):
    """Through the row identities planted in model 0: for held-out fold k, the whole inner leaderboard
    (every score and every fit behind the pick) received exactly the other folds' rows; the pick's
    prediction on fold k is its fit on those rows."""
    P, y, folds = _noisy_models(n=300)
    P = _with_row_ids(P)
    seen, boards, real = [], [], nested.leaderboard

    def spy(P_in, *args, **kwargs):
        seen.append(_rows_seen(P_in))
        boards.append(real(P_in, *args, **kwargs))
        return boards[-1]

    monkeypatch.setattr(nested, "leaderboard", spy)
    result = nested.nested_auto_pick(P, y, folds, ["a", "b", "c"], BlendSettings("accuracy"))
    assert seen == [set(np.flatnonzero(folds != k).tolist()) for k in range(5)]
    for k in range(5):
        chosen = nested.chosen_row(boards[k], "accuracy")
        assert result.picks[k] == chosen.model
        np.testing.assert_allclose(result.oof[folds == k], chosen.predict(P[:, folds == k]))


def test_auto_pick_is_not_nested_under_three_folds():
    P, y, _ = _noisy_models()
    assert nested.nested_auto_pick(P, y, np.arange(len(y)) % 2, ["a", "b", "c"], BlendSettings("accuracy")) is None


def test_one_fold_of_oof_rows_offers_no_fitted_rows():
    """With one trained fold every fit of the nested score would see no rows (before: weights and caruana
    fitted on nothing, with made-up honest scores; the stack could not fit at all)."""
    P, y, _ = _noisy_models()
    rows = _board(P, y, np.zeros(len(y), int), ["a", "b", "c"], "accuracy")
    assert [r.model for r in rows] == ["a", "b", "c", "mean", "geometric", "rank"]


def _xor_level2(n=800, seed=0):
    """Two binary models; the label is 1 exactly when they disagree about class 1 (an XOR of their calls). No
    monotone (logistic) function of the probabilities separates that; two tree splits do."""
    rng = np.random.default_rng(seed)
    a, b = rng.uniform(0.05, 0.95, n), rng.uniform(0.05, 0.95, n)
    y = ((a > 0.5) != (b > 0.5)).astype(int)
    P = np.stack([np.c_[1 - a, a], np.c_[1 - b, b]])
    return P, y, rng.permutation(n) % 5


def test_lightgbm_stack_recovers_a_planted_non_linear_relation():
    P, y, folds = _xor_level2()
    rows = {r.model: r for r in _board(P, y, folds, ["A", "B"], "accuracy", lightgbm=True)}
    assert list(rows)[-2:] == ["stack", "lightgbm_stack"] and rows["lightgbm_stack"].kind == "stack"
    assert rows["stack"].honest_score < 0.65 and rows["lightgbm_stack"].honest_score > 0.95  # nested CV both
    assert nested.chosen_row(list(rows.values()), "accuracy").model == "lightgbm_stack"
    shares = rows["lightgbm_stack"].weights
    assert min(shares.values()) > 0.3 and abs(sum(shares.values()) - 1) < 1e-9  # it needs both models
    P_new, y_new, _ = _xor_level2(seed=5)  # fitted on all OOF rows, applied to new rows of the same relation
    assert score("accuracy", y_new, rows["lightgbm_stack"].predict(P_new)) > 0.95
    assert "lightgbm_stack" not in [r.model for r in _board(P, y, folds, ["A", "B"], "accuracy")]
