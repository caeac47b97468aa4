"""Blending out-of-fold probabilities: fixed blends, fitted weights, Caruana selection, honest scores.

Models arrive as one array P of shape (n_models, n_rows, n_classes). Fixed blends (mean,
geometric, rank) learn nothing from the labels, so their OOF score is already honest. Fitted blends
(scipy-optimised weights, Caruana's greedy selection with replacement) learn from the same OOF rows
they would be scored on; their honest score comes from nested cross-validation over the folds:
weights fitted on the other folds' rows, applied to the held-out fold. The leaderboard shows both,
so overfitted weights are not rewarded. A stack (a multinomial logistic regression on every model's
log-probabilities, see fit_stack) is one more fitted row, nested the same way. With
`ensemble.stack_lightgbm` (and lightgbm installed), a LightGBM classifier on the same OOF
probabilities is another: trees find level-2 relations no linear function of the inputs can
express (one model is right exactly when another is unsure, say), at the cost of more variance.

Picking the best honest row is itself a choice made on the OOF rows: the best of many near-equal
honest scores is an optimistic estimate of what the pick will score. nested_pick scores the `auto`
policy itself: for each fold, the whole leaderboard is rebuilt on the other folds (its fitted rows
nested inside them), the best row is picked there, fitted on those folds and applied to the held-out
fold.

Other tasks (pipeline/scoring/tasks.py; the metric tells which) blend their own predictions: sigmoid columns
(multi-label) or one column of numbers. Their rows are mean, rank (each model's ranks averaged, then
mapped onto the mean blend's values per column, so the blend keeps the predictions' scale), fitted weights
and Caruana; the fitted objective `log_loss` is then the binary log-loss of the tags, or the squared error
of the numbers. Geometric blends and the stack are for class probabilities only.

Thresholded metrics (multi-label F-scores, ordinal qwk: metrics.METRICS) cut each row's predictions at
thresholds tuned on OOF (pipeline/scoring/thresholds.py). Like fitted weights they are nested: a row's honest score
cuts each fold's honest predictions at thresholds fitted on the other folds' honest predictions, and its
`thresholds` (fitted on all its honest rows) cut the test predictions. The weights that made a fold-j row
were fitted with fold k among their rows, so fold k's labels reach its thresholds at second hand; that is
the leak every nested blend of nested predictions carries, and it is small next to fitting on fold k itself.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy.optimize import minimize
from scipy.stats import rankdata
from sklearn.linear_model import LogisticRegression

from pipeline.scoring import metrics, thresholds
from pipeline.scoring.tasks import greater_is_better, kind_of, score

EPS = 1e-15
STACK_FLOOR = 1e-6  # probabilities below this are one feature value to the stack (see stack_features)


def combine(P: np.ndarray, weights: np.ndarray, how: str = "linear") -> np.ndarray:
    """(n_rows, n_classes) blend of P with non-negative weights summing to 1."""
    w = np.asarray(weights, dtype=np.float64)
    if how == "linear":
        return np.tensordot(w, P, axes=1)
    if how == "geometric":
        logp = np.tensordot(w, np.log(np.clip(P, EPS, 1)), axes=1)
        out = np.exp(logp - logp.max(1, keepdims=True))
        return out / out.sum(1, keepdims=True)
    if how == "rank":
        ranks = rankdata(P, axis=1) / P.shape[1]  # rank of each row within a (model, class) column
        out = np.tensordot(w, ranks, axes=1)
        return out / out.sum(1, keepdims=True)
    if how == "rank_values":
        return _ranked_onto(np.tensordot(w, rankdata(P, axis=1), axes=1), np.tensordot(w, P, axes=1))
    raise ValueError(f"unknown blend {how}")


def _ranked_onto(score_: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Per column, the sorted `values` handed out in the order of `score_` (ties broken by row): a rank blend
    that stays on the predictions' scale (tags' probabilities, numbers)."""
    out = np.empty_like(values, dtype=np.float64)
    for j in range(values.shape[1]):
        out[np.argsort(score_[:, j], kind="stable"), j] = np.sort(values[:, j])
    return out


def _loss(metric: str, objective: str) -> Callable[[np.ndarray, np.ndarray], float]:
    """Lower-is-better loss of (y, proba) for the chosen objective. Log-loss is computed here rather than by
    scikit-learn, whose input checks cost ~5 ms a call and Caruana calls it rounds x models times per fit
    (blends of normalised rows are normalised, so no renormalisation is needed)."""
    kind = kind_of(metric)
    if objective == "log_loss" and kind == "multi":
        return lambda y, p: float(-(y * np.log(np.clip(p, EPS, 1)) + (1 - y) * np.log(np.clip(1 - p, EPS, 1))).mean())
    if objective == "log_loss" and kind == "value":
        return lambda y, p: float(np.mean((p[:, 0] - y) ** 2))
    if objective == "log_loss":
        return lambda y, p: float(-np.log(np.clip(p[np.arange(len(y)), y], EPS, 1)).mean())
    sign = -1.0 if greater_is_better(metric) else 1.0
    return lambda y, p: sign * score(metric, y, p)


def fit_weights(P: np.ndarray, y: np.ndarray, metric: str, objective: str = "log_loss") -> np.ndarray:
    """Simplex weights minimising the objective: softmax-parametrised, L-BFGS-B with the analytic gradient for
    log-loss (nested CV fits this many times, so no finite differences), Nelder-Mead otherwise."""
    if objective == "log_loss" and kind_of(metric) == "proba":
        return _softmax(minimize(_log_loss_grad, np.zeros(len(P)), args=(P[:, np.arange(len(y)), y],),
                                 jac=True, method="L-BFGS-B").x)
    loss = _loss(metric, objective)
    z = minimize(lambda z: loss(y, combine(P, _softmax(z))), np.zeros(len(P)), method="Nelder-Mead").x
    return _softmax(z)


def _softmax(z: np.ndarray) -> np.ndarray:
    w = np.exp(z - z.max())
    return w / w.sum()


def _log_loss_grad(z: np.ndarray, p_true: np.ndarray) -> tuple[float, np.ndarray]:
    """Log-loss of the linear blend with weights softmax(z), and its gradient in z; p_true (n_models, n_rows)
    holds each model's probability of the true class (a blend of normalised rows stays normalised)."""
    w = _softmax(z)
    q = np.clip(w @ p_true, EPS, None)
    grad_w = -(p_true / q).mean(1)
    return float(-np.log(q).mean()), w * (grad_w - w @ grad_w)


def caruana(P: np.ndarray, y: np.ndarray, metric: str, objective: str = "log_loss", rounds: int = 25) -> np.ndarray:
    """Greedy forward selection with replacement (Caruana et al. 2004); weights are selection counts."""
    loss = _loss(metric, objective)
    counts, running = np.zeros(len(P)), np.zeros(P.shape[1:])
    for step in range(1, rounds + 1):
        trial = [loss(y, (running * (step - 1) + P[m]) / step) for m in range(len(P))]
        best = int(np.argmin(trial))
        counts[best] += 1
        running = (running * (step - 1) + P[best]) / step
    return counts / counts.sum()


def stack_features(P: np.ndarray) -> np.ndarray:
    """(n_rows, n_models * n_classes) log-probabilities, floored at STACK_FLOOR.

    Log-probabilities rather than probabilities: a softmax over a linear function of log-probabilities
    contains every single model (coefficient 1 on its own log-probability of each class gives back its
    probabilities exactly) and every geometric blend, so the stack starts from what the other rows can
    do and the regularisation pulls towards a scaled geometric blend, not towards nothing; probabilities
    as features cannot express even one model's own output. The floor keeps one overconfident miss
    (log 1e-15 = -35) from dominating the fit; below 1e-6 differences are noise anyway. Not
    standardised: every feature has the same scale (a log-probability) and a coefficient keeps its
    meaning (1 = trust this model as it is)."""
    logp = np.log(np.clip(P, STACK_FLOOR, 1.0))
    return logp.transpose(1, 0, 2).reshape(P.shape[1], -1)


def fit_stack(P: np.ndarray, y: np.ndarray, c: float = 1.0) -> LogisticRegression:
    """Multinomial logistic regression (scikit-learn, L2 penalty of strength 1/c) from stack_features to y."""
    return LogisticRegression(C=c, max_iter=2000).fit(stack_features(P), y)


def stack_predict(model: LogisticRegression, P: np.ndarray) -> np.ndarray:
    """(n_rows, n_classes) probabilities; a class absent from the fitting rows gets probability 0."""
    out = np.zeros(P.shape[1:])
    out[:, model.classes_] = model.predict_proba(stack_features(P))
    return out


def stack_shares(model: LogisticRegression, n_models: int) -> np.ndarray:
    """Each model's share of the stack's absolute coefficient mass: which models it leans on (shown as its
    weights on the leaderboard; the stack itself is not a weighted average)."""
    mass = np.abs(model.coef_).reshape(len(model.coef_), n_models, -1).sum(axis=(0, 2))
    return mass / mass.sum() if mass.sum() > 0 else np.full(n_models, 1 / n_models)


def lightgbm_available() -> bool:
    try:
        import lightgbm  # noqa: F401
    except ImportError:
        return False
    return True


def fit_lightgbm_stack(P: np.ndarray, y: np.ndarray, seed: int = 0):
    """A LightGBM classifier from every model's OOF probabilities (n_models * n_classes features; trees are
    indifferent to monotone transforms, so no log) to y. Small and regularised: OOF tables are small."""
    from lightgbm import LGBMClassifier

    model = LGBMClassifier(n_estimators=150, learning_rate=0.05, num_leaves=15, min_child_samples=10,
                           subsample=0.8, subsample_freq=1, colsample_bytree=0.8, reg_lambda=1.0,
                           random_state=seed, n_jobs=1, verbose=-1)
    return model.fit(_prob_features(P), y)


def _prob_features(P: np.ndarray) -> np.ndarray:
    return P.transpose(1, 0, 2).reshape(P.shape[1], -1)


def lightgbm_shares(model, n_models: int) -> np.ndarray:
    """Each model's share of the trees' split gain (the leaderboard's weights column for this row)."""
    gain = model.booster_.feature_importance("gain").reshape(n_models, -1).sum(1)
    return gain / gain.sum() if gain.sum() > 0 else np.full(n_models, 1 / n_models)


def apply(P: np.ndarray, params, how: str) -> np.ndarray:
    """(n_rows, n_classes) output of one leaderboard row: a weighted blend, or the fitted stack (logistic or
    LightGBM; a class absent from the fitting rows gets probability 0)."""
    if how == "lightgbm":
        out = np.zeros(P.shape[1:])
        out[:, params.classes_] = params.predict_proba(_prob_features(P))
        return out
    return stack_predict(params, P) if how == "stack" else combine(P, params, how)


def nested_oof(P: np.ndarray, y: np.ndarray, folds: np.ndarray, fit: Callable, how: str = "linear") -> np.ndarray:
    """Blend (or stack) of each fold's rows fitted on the other folds' rows only."""
    out = np.zeros(P.shape[1:])
    for k in np.unique(folds):
        held = folds == k
        params = fit(P[:, ~held], y[~held])
        out[held] = apply(P[:, held], params, how)
    return out


def candidates(n_models: int, metric: str, objective: str, rounds: int, stack_c: float = 1.0,
               lightgbm: bool = False) -> dict[str, tuple[str, Callable | None]]:
    """Blend name -> (how, fit); fit is None for fixed equal-weight blends. lightgbm: add the LightGBM stack
    (when the package imports)."""
    if n_models < 2:
        return {}
    if kind_of(metric) != "proba":
        return {
            "mean": ("linear", None),
            "rank": ("rank_values", None),
            "weights": ("linear", lambda P, y: fit_weights(P, y, metric, objective)),
            "caruana": ("linear", lambda P, y: caruana(P, y, metric, objective, rounds)),
        }
    extra = {"lightgbm_stack": ("lightgbm", fit_lightgbm_stack)} if lightgbm and lightgbm_available() else {}
    return {
        "mean": ("linear", None),
        "geometric": ("geometric", None),
        "rank": ("rank", None),
        "weights": ("linear", lambda P, y: fit_weights(P, y, metric, objective)),
        "caruana": ("linear", lambda P, y: caruana(P, y, metric, objective, rounds)),
        "stack": ("stack", lambda P, y: fit_stack(P, y, stack_c)),
        **extra,
    }


KINDS = {"linear": "fitted blend", "stack": "stack", "lightgbm": "stack"}


def fit_cuts(metric: str, pred: np.ndarray, y: np.ndarray, policy: str, n_grades: int | None = None):
    """Thresholds of a thresholded metric fitted on (pred, y): per tag or one for all tags (multi-label), cut points
    (ordinal); None when the metric has none or the policy is fixed."""
    if policy == "fixed" or not metrics.METRICS[metric].thresholded:
        return None
    if metric == "qwk":
        return thresholds.fit_ordinal(pred, y, n_grades)
    return thresholds.fit_multilabel(pred, y, metric, per_class=policy == "per_class")


def decided(metric: str, pred: np.ndarray, cuts, n_grades: int | None = None) -> np.ndarray:
    """Predictions cut at `cuts` into what the metric's default thresholds score the same way: 0/1 tag decisions,
    or whole grades. Without cuts, the predictions themselves."""
    if cuts is None:
        return pred
    if metric == "qwk":
        return metrics.to_grades(pred, cuts).astype(np.float64).reshape(-1, 1)
    return metrics.decide(pred, cuts).astype(np.float64)


def nested_cuts(metric: str, pred: np.ndarray, y: np.ndarray, folds: np.ndarray, policy: str,
                n_grades: int | None = None) -> np.ndarray:
    """Each fold's predictions cut at thresholds fitted on the other folds' rows (unchanged when none apply)."""
    if policy == "fixed" or not metrics.METRICS[metric].thresholded or len(np.unique(folds)) < 2:
        return pred
    out = np.zeros((len(pred), 1 if metric == "qwk" else pred.shape[1]))
    for k in np.unique(folds):
        held = folds == k
        out[held] = decided(metric, pred[held], fit_cuts(metric, pred[~held], y[~held], policy, n_grades), n_grades)
    return out


def evaluate(P: np.ndarray, y: np.ndarray, folds: np.ndarray, names: list[str], metric: str,
             objective: str = "log_loss", rounds: int = 25, stack_c: float = 1.0, cuts: str = "fixed",
             n_grades: int | None = None, lightgbm: bool = False) -> list[dict]:
    """Leaderboard rows: every single model, then every blend and the stack, with in-sample and honest scores.

    Each row keeps `params` (what `apply` needs: weights, or the stack fitted on all rows, for the test
    probabilities) and `oof` (its honest out-of-fold probabilities). OOF rows of a single fold (one fold
    trained) leave nothing to fit on while scoring it, so fitted rows are then left out.

    `cuts` (ensemble.thresholds) tunes a thresholded metric's thresholds: `thresholds` of a row are fitted on its
    honest OOF (they cut the test predictions), its cv_score uses them on the rows they were fitted on, and its
    honest_score cuts each fold at thresholds fitted on the other folds (nested_cuts)."""
    rows = []
    for i, n in enumerate(names):
        t = fit_cuts(metric, P[i], y, cuts, n_grades)
        rows.append({"model": n, "kind": "single", "how": "linear", "weights": _onehot(i, len(names), names),
                     "params": np.eye(len(names))[i], "thresholds": t,
                     "cv_score": score(metric, y, decided(metric, P[i], t, n_grades)),
                     "honest_score": score(metric, y, nested_cuts(metric, P[i], y, folds, cuts, n_grades)),
                     "oof": P[i]})
    nestable = len(np.unique(folds)) > 1
    for blend_name, (how, fit) in candidates(len(names), metric, objective, rounds, stack_c, lightgbm).items():
        if fit is not None and not nestable:
            continue
        params = np.full(len(names), 1 / len(names)) if fit is None else fit(P, y)
        in_sample = apply(P, params, how)
        honest = in_sample if fit is None else nested_oof(P, y, folds, fit, how)
        shown = (stack_shares(params, len(names)) if how == "stack"
                 else lightgbm_shares(params, len(names)) if how == "lightgbm" else params)
        t = fit_cuts(metric, honest, y, cuts, n_grades)
        rows.append({"model": blend_name, "kind": KINDS[how] if fit else "fixed blend", "how": how,
                     "weights": dict(zip(names, np.round(shown, 4).tolist(), strict=True)), "params": params,
                     "thresholds": t, "cv_score": score(metric, y, decided(metric, in_sample, t, n_grades)),
                     "honest_score": score(metric, y, nested_cuts(metric, honest, y, folds, cuts, n_grades)),
                     "oof": honest})
    return rows


def nested_pick(P: np.ndarray, y: np.ndarray, folds: np.ndarray, names: list[str], metric: str,
                objective: str = "log_loss", rounds: int = 25, stack_c: float = 1.0, cuts: str = "fixed",
                n_grades: int | None = None, lightgbm: bool = False) -> dict | None:
    """Honest score of `ensemble.method=auto` itself: for each fold k, the leaderboard of the other folds
    (evaluate on their rows alone, fitted rows nested inside them), its auto pick fitted on those rows and
    applied to fold k; the pooled held-out predictions are scored once, as every honest score is.

    Returns {"score", "picks" (fold -> row picked without it), "oof"}, or None under 3 folds (the other
    folds must themselves hold 2 folds to nest the fitted rows). Costs about k times `evaluate`."""
    fold_ids = np.unique(folds)
    if len(fold_ids) < 3:
        return None
    out, picks = None, {}
    for k in fold_ids:
        held = folds == k
        inner = evaluate(P[:, ~held], y[~held], folds[~held], names, metric, objective, rounds, stack_c, cuts, n_grades,
                         lightgbm)
        chosen = pick(inner, metric)
        part = decided(metric, apply(P[:, held], chosen["params"], chosen["how"]), chosen.get("thresholds"), n_grades)
        out = np.zeros((P.shape[1], part.shape[1])) if out is None else out
        out[held] = part
        picks[int(k)] = chosen["model"]
    return {"score": score(metric, y, out), "picks": picks, "oof": out}


def _onehot(i: int, n: int, names: list[str]) -> dict:
    return {name: float(j == i) for j, name in enumerate(names)}


def pick(rows: list[dict], metric: str, method: str = "auto") -> dict:
    """The requested row, or under auto the best honest score (first listed wins ties: the simpler one)."""
    if method != "auto":
        for row in rows:
            if row["model"] == method:
                return row
        raise KeyError(method)
    best = rows[0]
    for row in rows[1:]:
        better = (row["honest_score"] > best["honest_score"] if greater_is_better(metric)
                  else row["honest_score"] < best["honest_score"])
        if better:
            best = row
    return best
