"""Decision thresholds tuned on out-of-fold predictions, with honest (nested) scores.

Multi-label F-scores (f1_samples, f1_micro, f1_macro, f2_samples) depend on where tag probabilities
are cut. `fit_global` picks one threshold for every tag on a grid; `fit_per_class` runs a coordinate
search from there: tag by tag, the threshold that maximises the whole metric with the others held,
until a round changes nothing. Ordinal QWK depends on where a continuous grade is cut into grades;
`fit_ordinal` is the "OptimizedRounder" of the APTOS/PANDA solutions: sorted cut points starting at
the midpoints, moved one at a time to the candidate (between its neighbours) with the best QWK.
`DecisionThresholds` wraps both as one estimator for any metric: `fit(pred, y)` then `transform(pred)`
into the decisions the metric's default thresholds score the same way.

Thresholds chosen on the same OOF rows they are scored on overstate the score, like fitted blend
weights (pipeline/scoring/blend.py). The `nested_*` functions fit on the other folds and apply to the
held-out fold; the pooled held-out decisions are scored once, as every honest score is.

Ties (a plateau of equally good thresholds) go to the middle of the tied candidates: the choice farthest
from the edges where the score drops is the one most likely to hold on new rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.scoring.metrics import FBETA, METRICS, decide, expected_grade, midpoints, qwk, score, to_grades

GRID = np.round(np.arange(1, 100) / 100, 2)  # 0.01 .. 0.99
TOL = 1e-12  # scores this close are ties
MAX_CANDIDATES = 200  # cut-point candidates per ordinal step (quantiles of the grades between the neighbours)


def _check_multilabel(metric: str) -> tuple[float, str]:
    if metric not in FBETA:
        thresholded = ", ".join(FBETA)
        raise ValueError(f"metric {metric} does not depend on multi-label thresholds; tune for one of {thresholded}")
    return FBETA[metric]


def _f(tp, fp, fn, beta: float) -> np.ndarray:
    """F-beta from counts, 1 where there is nothing to find and nothing found (scikit-learn's zero_division=1)."""
    b2 = beta * beta
    num = (1 + b2) * tp
    den = num + b2 * fn + fp
    return np.where(den > 0, num / np.where(den > 0, den, 1), 1.0)


def _middle_of_best(scores: np.ndarray) -> int:
    best = np.flatnonzero(scores >= scores.max() - TOL)
    return int(best[len(best) // 2])


def _counts(y: np.ndarray, decisions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return decisions & y, decisions & ~y, ~decisions & y


def _candidate_scores(pred: np.ndarray, y: np.ndarray, thresholds: np.ndarray, j: int, grid: np.ndarray,
                      beta: float, average: str) -> np.ndarray:
    """The metric for every grid value of tag j's threshold, the other tags' thresholds held. Written on counts
    rather than by calling scikit-learn per grid value (one call per value and tag per round would be ~1e3x
    slower); tests check that it equals metrics.score."""
    others = np.arange(y.shape[1]) != j
    tp, fp, fn = _counts(y[:, others], pred[:, others] >= thresholds[others])
    dj = pred[:, j, None] >= grid[None, :]  # (n, G)
    yj = y[:, j, None]
    tpj, fpj, fnj = dj & yj, dj & ~yj, ~dj & yj
    if average == "samples":
        return _f(tp.sum(1)[:, None] + tpj, fp.sum(1)[:, None] + fpj, fn.sum(1)[:, None] + fnj, beta).mean(0)
    if average == "micro":
        return _f(tp.sum() + tpj.sum(0), fp.sum() + fpj.sum(0), fn.sum() + fnj.sum(0), beta)
    rest = _f(tp.sum(0), fp.sum(0), fn.sum(0), beta).sum()
    return (rest + _f(tpj.sum(0), fpj.sum(0), fnj.sum(0), beta)) / y.shape[1]


def _as_bool(y: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y, pred = np.asarray(y).astype(bool), np.asarray(pred, dtype=np.float64)
    if y.shape != pred.shape or y.ndim != 2:
        raise ValueError(f"multi-label y {y.shape} and pred {pred.shape} must both be (n, k)")
    return y, pred


def fit_global(pred: np.ndarray, y: np.ndarray, metric: str, grid: np.ndarray = GRID) -> float:
    """One threshold for every tag: the grid value with the best metric."""
    beta, average = _check_multilabel(metric)
    y, pred = _as_bool(y, pred)
    scores = []
    for t in grid:
        tp, fp, fn = _counts(y, pred >= t)
        if average == "samples":
            scores.append(_f(tp.sum(1), fp.sum(1), fn.sum(1), beta).mean())
        elif average == "micro":
            scores.append(_f(tp.sum(), fp.sum(), fn.sum(), beta))
        else:
            scores.append(_f(tp.sum(0), fp.sum(0), fn.sum(0), beta).mean())
    return float(grid[_middle_of_best(np.asarray(scores))])


def fit_per_class(pred: np.ndarray, y: np.ndarray, metric: str, grid: np.ndarray = GRID,
                  start: float | np.ndarray | None = None, rounds: int = 5) -> np.ndarray:
    """One threshold per tag by coordinate search from `start` (default: the best global threshold): each
    tag in turn gets the grid value maximising the whole metric, until a round changes nothing. The metric
    never decreases from step to step, so the result scores at least as well as the start."""
    beta, average = _check_multilabel(metric)
    y, pred = _as_bool(y, pred)
    grid = np.asarray(grid, dtype=np.float64)
    t0 = fit_global(pred, y, metric, grid) if start is None else start
    thresholds = np.broadcast_to(np.asarray(t0, dtype=np.float64), (y.shape[1],)).copy()
    for _ in range(rounds):
        before = thresholds.copy()
        for j in range(y.shape[1]):
            scores = _candidate_scores(pred, y, thresholds, j, grid, beta, average)
            on_grid = np.flatnonzero(grid == thresholds[j])
            current = (scores[on_grid[0]] if len(on_grid) else
                       _candidate_scores(pred, y, thresholds, j, thresholds[j:j + 1], beta, average)[0])
            if scores.max() >= current - TOL:  # a start off the grid may beat every grid value: then it stays
                thresholds[j] = grid[_middle_of_best(scores)]
        if np.array_equal(before, thresholds):
            break
    return thresholds


def fit_multilabel(pred: np.ndarray, y: np.ndarray, metric: str, per_class: bool = True,
                   grid: np.ndarray = GRID) -> float | np.ndarray:
    """Per-tag thresholds (per_class) or one global threshold."""
    return fit_per_class(pred, y, metric, grid) if per_class else fit_global(pred, y, metric, grid)


def _folds(folds: np.ndarray) -> np.ndarray:
    ks = np.unique(folds)
    if len(ks) < 2:
        raise ValueError("nested thresholds need at least two folds")
    return ks


def nested_thresholds(pred: np.ndarray, y: np.ndarray, folds: np.ndarray, metric: str, per_class: bool = True,
                      grid: np.ndarray = GRID) -> tuple[float, float | np.ndarray, dict[int, float]]:
    """(honest score, thresholds fitted on all rows, {fold: held-out score}): for each fold, thresholds fitted
    on the other folds cut its rows; the pooled held-out decisions are scored once."""
    y, pred = _as_bool(y, pred)
    folds = np.asarray(folds)
    decisions = np.zeros(pred.shape, dtype=np.float64)
    per_fold = {}
    for k in _folds(folds):
        held = folds == k
        t = fit_multilabel(pred[~held], y[~held], metric, per_class, grid)
        decisions[held] = pred[held] >= t
        per_fold[int(k)] = score(metric, y[held], pred[held], thresholds=t)
    honest = score(metric, y, decisions, thresholds=0.5)
    return honest, fit_multilabel(pred, y, metric, per_class, grid), per_fold


def _n_grades(y: np.ndarray, n_grades: int | None) -> int:
    k = int(y.max()) + 1 if n_grades is None else int(n_grades)
    if k < 2:
        raise ValueError("ordinal thresholds need at least two grades")
    return k


def _qwk(y: np.ndarray, grades: np.ndarray, k: int) -> float:
    """Quadratic weighted kappa of integer grades 0..k-1 from one bincount. The search scores hundreds of cut
    positions per fit and nested CV fits once per fold; scikit-learn's cohen_kappa_score spends ~1 ms a call on
    input checks (tests check that this equals it)."""
    observed = np.bincount(y * k + grades, minlength=k * k).reshape(k, k).astype(np.float64)
    expected = np.outer(observed.sum(1), observed.sum(0)) / observed.sum()
    weights = np.subtract.outer(np.arange(k), np.arange(k)) ** 2.0
    den = (weights * expected).sum()
    return 1.0 - (weights * observed).sum() / den if den > 0 else float("nan")


def fit_ordinal(pred: np.ndarray, y: np.ndarray, n_grades: int | None = None, rounds: int = 5) -> np.ndarray:
    """K-1 sorted cut points maximising QWK, by coordinate search from the midpoints. QWK is piecewise constant
    in the cuts, which stalls Nelder-Mead's simplex on flat steps; a search over the candidate positions between
    a cut's neighbours (midway between observed grades) sees every step. QWK never decreases step to step."""
    y = np.asarray(y).astype(np.int64).ravel()
    g = expected_grade(pred)
    k = _n_grades(y, n_grades)
    cuts = midpoints(k)
    best = _qwk(y, to_grades(g, cuts), k)
    for _ in range(rounds):
        before = cuts.copy()
        for i in range(len(cuts)):
            lo = cuts[i - 1] if i > 0 else -np.inf
            hi = cuts[i + 1] if i + 1 < len(cuts) else np.inf
            vals = np.unique(g[(g > lo) & (g < hi)])
            if len(vals) < 2:
                continue
            cand = (vals[:-1] + vals[1:]) / 2
            if len(cand) > MAX_CANDIDATES:
                cand = cand[np.linspace(0, len(cand) - 1, MAX_CANDIDATES).round().astype(int)]
            scores = np.array([_qwk(y, to_grades(g, np.concatenate([cuts[:i], [c], cuts[i + 1:]])), k) for c in cand])
            if scores.max() > best + TOL:
                cuts[i], best = cand[_middle_of_best(scores)], float(scores.max())
        if np.array_equal(before, cuts):
            break
    return cuts


def nested_ordinal_thresholds(pred: np.ndarray, y: np.ndarray, folds: np.ndarray, n_grades: int | None = None
                              ) -> tuple[float, np.ndarray, dict[int, float]]:
    """(honest QWK, cut points fitted on all rows, {fold: held-out QWK}), nested as nested_thresholds."""
    y = np.asarray(y).astype(np.int64).ravel()
    folds, g = np.asarray(folds), expected_grade(pred)
    k = _n_grades(y, n_grades)
    grades = np.zeros(len(y), dtype=np.int64)
    per_fold = {}
    for f in _folds(folds):
        held = folds == f
        cuts = fit_ordinal(g[~held], y[~held], k)
        grades[held] = to_grades(g[held], cuts)
        per_fold[int(f)] = qwk(y[held], g[held], cuts)
    return qwk(y, grades, midpoints(k)), fit_ordinal(g, y, k), per_fold



@dataclass
class DecisionThresholds:
    """A thresholded metric's cut points as an estimator: `fit(pred, y)` tunes them (per tag or one for all tags
    for multi-label F-scores, cut points for ordinal qwk), `transform(pred)` cuts predictions at them.

    policy: per_class, global or fixed (`ensemble.thresholds`); n_grades: the grades of an ordinal task. Under
    `fixed`, or for a metric without thresholds, fit learns nothing and transform returns the predictions."""

    metric: str
    policy: str = "fixed"
    n_grades: int | None = None

    def __post_init__(self) -> None:
        self.thresholds_: float | np.ndarray | None = None

    @property
    def tuned(self) -> bool:
        """Whether fit tunes anything (a thresholded metric under a policy other than fixed)."""
        return self.policy != "fixed" and METRICS[self.metric].thresholded

    def fit(self, pred: np.ndarray, y: np.ndarray) -> DecisionThresholds:
        if not self.tuned:
            self.thresholds_ = None
        elif self.metric == "qwk":
            self.thresholds_ = fit_ordinal(pred, y, self.n_grades)
        else:
            self.thresholds_ = fit_multilabel(pred, y, self.metric, per_class=self.policy == "per_class")
        return self

    def transform(self, pred: np.ndarray) -> np.ndarray:
        """Predictions cut at the fitted thresholds into what the metric's default thresholds score the same way:
        0/1 tag decisions, or whole grades (one column). Without thresholds, the predictions themselves."""
        if self.thresholds_ is None:
            return pred
        if self.metric == "qwk":
            return to_grades(pred, self.thresholds_).astype(np.float64).reshape(-1, 1)
        return decide(pred, self.thresholds_).astype(np.float64)

    def unfitted(self) -> DecisionThresholds:
        return DecisionThresholds(self.metric, self.policy, self.n_grades)
