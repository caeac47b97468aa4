"""Blending out-of-fold probabilities: fixed blends, fitted weights, Caruana selection, honest scores.

Models arrive as one array P of shape (n_models, n_rows, n_classes). Fixed blends (mean,
geometric, rank) learn nothing from the labels, so their OOF score is already honest. Fitted blends
(scipy-optimised weights, Caruana's greedy selection with replacement) learn from the same OOF rows
they would be scored on; their honest score comes from nested cross-validation over the folds:
weights fitted on the other folds' rows, applied to the held-out fold. The leaderboard shows both,
so overfitted weights are not rewarded.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy.optimize import minimize
from scipy.stats import rankdata

from .metrics import GREATER_IS_BETTER, score

EPS = 1e-15


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
    raise ValueError(f"unknown blend {how}")


def _loss(metric: str, objective: str) -> Callable[[np.ndarray, np.ndarray], float]:
    """Lower-is-better loss of (y, proba) for the chosen objective."""
    if objective == "log_loss":
        return lambda y, p: score("log_loss", y, p)
    sign = -1.0 if GREATER_IS_BETTER[metric] else 1.0
    return lambda y, p: sign * score(metric, y, p)


def fit_weights(P: np.ndarray, y: np.ndarray, metric: str, objective: str = "log_loss") -> np.ndarray:
    """Simplex weights minimising the objective: softmax-parametrised, L-BFGS-B for log-loss, Nelder-Mead otherwise."""
    loss = _loss(metric, objective)

    def f(z: np.ndarray) -> float:
        w = np.exp(z - z.max())
        return loss(y, combine(P, w / w.sum()))

    method = "L-BFGS-B" if objective == "log_loss" else "Nelder-Mead"
    z = minimize(f, np.zeros(len(P)), method=method).x
    w = np.exp(z - z.max())
    return w / w.sum()


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


def nested_oof(P: np.ndarray, y: np.ndarray, folds: np.ndarray, fit: Callable, how: str = "linear") -> np.ndarray:
    """Blend of each fold's rows with weights fitted on the other folds' rows only."""
    out = np.zeros(P.shape[1:])
    for k in np.unique(folds):
        held = folds == k
        weights = fit(P[:, ~held], y[~held])
        out[held] = combine(P[:, held], weights, how)
    return out


def candidates(n_models: int, metric: str, objective: str, rounds: int) -> dict[str, tuple[str, Callable | None]]:
    """Blend name -> (how, fit); fit is None for fixed equal-weight blends."""
    if n_models < 2:
        return {}
    return {
        "mean": ("linear", None),
        "geometric": ("geometric", None),
        "rank": ("rank", None),
        "weights": ("linear", lambda P, y: fit_weights(P, y, metric, objective)),
        "caruana": ("linear", lambda P, y: caruana(P, y, metric, objective, rounds)),
    }


def evaluate(P: np.ndarray, y: np.ndarray, folds: np.ndarray, names: list[str], metric: str,
             objective: str = "log_loss", rounds: int = 25) -> list[dict]:
    """Leaderboard rows: every single model, then every blend, with in-sample and honest scores."""
    rows = [{"model": n, "kind": "single", "how": "linear", "weights": _onehot(i, len(names), names),
             "cv_score": score(metric, y, P[i]), "honest_score": score(metric, y, P[i]), "oof": P[i]}
            for i, n in enumerate(names)]
    for blend_name, (how, fit) in candidates(len(names), metric, objective, rounds).items():
        weights = np.full(len(names), 1 / len(names)) if fit is None else fit(P, y)
        in_sample = combine(P, weights, how)
        honest = in_sample if fit is None else nested_oof(P, y, folds, fit, how)
        rows.append({"model": blend_name, "kind": "fitted blend" if fit else "fixed blend", "how": how,
                     "weights": dict(zip(names, np.round(weights, 4).tolist(), strict=True)),
                     "cv_score": score(metric, y, in_sample), "honest_score": score(metric, y, honest), "oof": honest})
    return rows


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
        better = row["honest_score"] > best["honest_score"] if GREATER_IS_BETTER[metric] else row["honest_score"] < best["honest_score"]
        if better:
            best = row
    return best
