"""Blends of out-of-fold predictions as small estimators: `fit(P, y)` on OOF rows, `predict(P)` on any rows.

Models arrive as one array P of shape (n_models, n_rows, n_classes). Each blend method is a class with one
interface (the `Blend` base): fixed blends (MeanBlend, GeometricBlend, RankBlend) learn nothing from the
labels, so their OOF score is already honest; fitted blends (WeightedBlend: scipy-optimised weights;
CaruanaBlend: greedy selection with replacement) and the stacks (LogisticStack: a multinomial logistic
regression on every model's log-probabilities; LightGBMStack, with `ensemble.stack_lightgbm` and lightgbm
installed: trees find level-2 relations no linear function of the inputs can express, one model right
exactly when another is unsure, say, at the cost of more variance) learn from the same OOF rows they would
be scored on, so pipeline/scoring/nested.py scores them by nested cross-validation. `BLENDS` maps the
names a config string or the leaderboard uses to these classes; `blend_candidates` lists the ones a task's
leaderboard holds.

Other tasks (pipeline/scoring/tasks.py; the metric tells which) blend their own predictions: sigmoid columns
(multi-label) or one column of numbers. Their rows are mean, rank (each model's ranks averaged, then
mapped onto the mean blend's values per column, so the blend keeps the predictions' scale), fitted weights
and Caruana; the fitted objective `log_loss` is then the binary log-loss of the tags, or the squared error
of the numbers. Geometric blends and the stacks are for class probabilities only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from scipy.optimize import minimize
from scipy.stats import rankdata
from sklearn.linear_model import LogisticRegression

from pipeline.core.errors import PipelineError
from pipeline.scoring.tasks import greater_is_better, kind_of, score

EPS = 1e-15
STACK_FLOOR = 1e-6  # probabilities below this are one feature value to the stack (see stack_features)


@dataclass(frozen=True)
class BlendSettings:
    """What the blends and their nested scores depend on (the stage builds it from `ensemble.*`).

    thresholds: the policy of a thresholded metric's cut points (per_class, global, fixed); n_grades: the
    number of grades of an ordinal task; lightgbm: add the LightGBM stack (when the package imports)."""

    metric: str
    objective: str = "log_loss"
    caruana_rounds: int = 25
    stack_c: float = 1.0
    thresholds: str = "fixed"
    n_grades: int | None = None
    lightgbm: bool = False


# --- blend arithmetic: (n_rows, n_classes) of P under non-negative weights summing to 1 ---------------------------

def linear_blend(P: np.ndarray, weights: np.ndarray) -> np.ndarray:
    return np.tensordot(np.asarray(weights, dtype=np.float64), P, axes=1)


def geometric_blend(P: np.ndarray, weights: np.ndarray) -> np.ndarray:
    logp = np.tensordot(np.asarray(weights, dtype=np.float64), np.log(np.clip(P, EPS, 1)), axes=1)
    out = np.exp(logp - logp.max(1, keepdims=True))
    return out / out.sum(1, keepdims=True)


def rank_blend(P: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted ranks of each row within its (model, class) column, normalised per row into probabilities."""
    ranks = rankdata(P, axis=1) / P.shape[1]
    out = np.tensordot(np.asarray(weights, dtype=np.float64), ranks, axes=1)
    return out / out.sum(1, keepdims=True)


def rank_blend_on_scale(P: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted ranks mapped onto the linear blend's values per column: a rank blend that stays on the
    predictions' scale (tags' probabilities, numbers)."""
    w = np.asarray(weights, dtype=np.float64)
    return _ranked_onto(np.tensordot(w, rankdata(P, axis=1), axes=1), np.tensordot(w, P, axes=1))


def _ranked_onto(order: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Per column, the sorted `values` handed out in the order of `order` (ties broken by row)."""
    out = np.empty_like(values, dtype=np.float64)
    for j in range(values.shape[1]):
        out[np.argsort(order[:, j], kind="stable"), j] = np.sort(values[:, j])
    return out


# --- fitted weights ---------------------------------------------------------------------------------------------

def blend_loss(metric: str, objective: str) -> Callable[[np.ndarray, np.ndarray], float]:
    """Lower-is-better loss of (y, blended predictions) for the chosen objective. Log-loss is computed here
    rather than by scikit-learn, whose input checks dominate when Caruana calls it rounds x models times per fit
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


def optimised_weights(P: np.ndarray, y: np.ndarray, metric: str, objective: str = "log_loss") -> np.ndarray:
    """Simplex weights minimising the objective: softmax-parametrised, L-BFGS-B with the analytic gradient for
    log-loss (nested CV fits this many times, so no finite differences), Nelder-Mead otherwise."""
    if objective == "log_loss" and kind_of(metric) == "proba":
        return _softmax(minimize(_log_loss_and_gradient, np.zeros(len(P)), args=(P[:, np.arange(len(y)), y],),
                                 jac=True, method="L-BFGS-B").x)
    loss = blend_loss(metric, objective)
    z = minimize(lambda z: loss(y, linear_blend(P, _softmax(z))), np.zeros(len(P)), method="Nelder-Mead").x
    return _softmax(z)


def _softmax(z: np.ndarray) -> np.ndarray:
    w = np.exp(z - z.max())
    return w / w.sum()


def _log_loss_and_gradient(z: np.ndarray, p_true: np.ndarray) -> tuple[float, np.ndarray]:
    """Log-loss of the linear blend with weights softmax(z), and its gradient in z; p_true (n_models, n_rows)
    holds each model's probability of the true class (a blend of normalised rows stays normalised)."""
    w = _softmax(z)
    q = np.clip(w @ p_true, EPS, None)
    grad_w = -(p_true / q).mean(1)
    return float(-np.log(q).mean()), w * (grad_w - w @ grad_w)


def caruana_weights(P: np.ndarray, y: np.ndarray, metric: str, objective: str = "log_loss",
                    rounds: int = 25) -> np.ndarray:
    """Greedy forward selection with replacement (Caruana et al. 2004); weights are selection counts."""
    loss = blend_loss(metric, objective)
    counts, running = np.zeros(len(P)), np.zeros(P.shape[1:])
    for step in range(1, rounds + 1):
        trial = [loss(y, (running * (step - 1) + P[m]) / step) for m in range(len(P))]
        best = int(np.argmin(trial))
        counts[best] += 1
        running = (running * (step - 1) + P[best]) / step
    return counts / counts.sum()


# --- stacks -----------------------------------------------------------------------------------------------------

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


def probability_features(P: np.ndarray) -> np.ndarray:
    """(n_rows, n_models * n_classes) probabilities, model by model."""
    return P.transpose(1, 0, 2).reshape(P.shape[1], -1)


def lightgbm_available() -> bool:
    try:
        import lightgbm  # noqa: F401
    except ImportError:
        return False
    return True


def _equal_shares(mass: np.ndarray, n_models: int) -> np.ndarray:
    return mass / mass.sum() if mass.sum() > 0 else np.full(n_models, 1 / n_models)


# --- the estimators ---------------------------------------------------------------------------------------------

@dataclass
class Blend:
    """One way of turning every model's predictions into one: `fit(P, y)` on OOF rows, then `predict(P)`.

    Class attributes: `name` (the leaderboard row and the `ensemble.method` value), `kind` (the leaderboard's
    kind column), `how` (the blend arithmetic, recorded in the artifacts) and `learns` (whether fit reads the
    labels, so that an honest score needs nested CV)."""

    name: ClassVar[str]
    kind: ClassVar[str] = "fixed blend"
    how: ClassVar[str] = "linear"
    learns: ClassVar[bool] = False

    def fit(self, P: np.ndarray, y: np.ndarray) -> Blend:
        raise NotImplementedError

    def predict(self, P: np.ndarray) -> np.ndarray:
        """(n_rows, n_classes) blended predictions."""
        raise NotImplementedError

    def shares(self) -> np.ndarray:
        """Each model's share of the fitted blend (the leaderboard's weights column)."""
        raise NotImplementedError

    def unfitted(self) -> Blend:
        """A fresh copy with the same settings and nothing fitted (nested CV fits one per fold)."""
        return dataclasses.replace(self)


@dataclass
class WeightedAverage(Blend):
    """A blend defined by one weight per model; the subclasses differ in how they choose the weights and in
    the arithmetic (`combine`) that applies them."""

    def __post_init__(self) -> None:
        self.weights_: np.ndarray | None = None

    def combine(self, P: np.ndarray, weights: np.ndarray) -> np.ndarray:
        return linear_blend(P, weights)

    def predict(self, P: np.ndarray) -> np.ndarray:
        return self.combine(P, self.weights_)

    def shares(self) -> np.ndarray:
        return self.weights_


@dataclass
class SingleModel(WeightedAverage):
    """One model on its own: weight 1 on it (its leaderboard row)."""

    index: int = 0
    kind: ClassVar[str] = "single"

    def fit(self, P: np.ndarray, y: np.ndarray) -> SingleModel:
        self.weights_ = np.eye(len(P))[self.index]
        return self

    def predict(self, P: np.ndarray) -> np.ndarray:
        return P[self.index]


@dataclass
class MeanBlend(WeightedAverage):
    """Equal weights, arithmetic mean."""

    name: ClassVar[str] = "mean"

    def fit(self, P: np.ndarray, y: np.ndarray) -> MeanBlend:
        self.weights_ = np.full(len(P), 1 / len(P))
        return self


@dataclass
class GeometricBlend(MeanBlend):
    """Equal weights, normalised geometric mean of the probabilities."""

    name: ClassVar[str] = "geometric"
    how: ClassVar[str] = "geometric"

    def combine(self, P: np.ndarray, weights: np.ndarray) -> np.ndarray:
        return geometric_blend(P, weights)


@dataclass
class RankBlend(MeanBlend):
    """Equal weights on each model's ranks: normalised into probabilities (class probabilities) or, with
    `on_scale`, mapped onto the mean blend's values (tags, numbers)."""

    on_scale: bool = False
    name: ClassVar[str] = "rank"

    @property
    def how(self) -> str:  # type: ignore[override]
        return "rank_values" if self.on_scale else "rank"

    def combine(self, P: np.ndarray, weights: np.ndarray) -> np.ndarray:
        return rank_blend_on_scale(P, weights) if self.on_scale else rank_blend(P, weights)


@dataclass
class WeightedBlend(WeightedAverage):
    """Simplex weights optimised for the objective (optimised_weights)."""

    metric: str = "log_loss"
    objective: str = "log_loss"
    name: ClassVar[str] = "weights"
    kind: ClassVar[str] = "fitted blend"
    learns: ClassVar[bool] = True

    def fit(self, P: np.ndarray, y: np.ndarray) -> WeightedBlend:
        self.weights_ = optimised_weights(P, y, self.metric, self.objective)
        return self


@dataclass
class CaruanaBlend(WeightedAverage):
    """Caruana's greedy selection with replacement; weights are selection counts (caruana_weights)."""

    metric: str = "log_loss"
    objective: str = "log_loss"
    rounds: int = 25
    name: ClassVar[str] = "caruana"
    kind: ClassVar[str] = "fitted blend"
    learns: ClassVar[bool] = True

    def fit(self, P: np.ndarray, y: np.ndarray) -> CaruanaBlend:
        self.weights_ = caruana_weights(P, y, self.metric, self.objective, self.rounds)
        return self


@dataclass
class _Stack(Blend):
    """A level-2 classifier from every model's predictions to y; a class absent from the fitting rows gets
    probability 0."""

    kind: ClassVar[str] = "stack"
    learns: ClassVar[bool] = True

    def __post_init__(self) -> None:
        self.model_ = None
        self.n_models_ = 0

    def features(self, P: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def predict(self, P: np.ndarray) -> np.ndarray:
        out = np.zeros(P.shape[1:])
        out[:, self.model_.classes_] = self.model_.predict_proba(self.features(P))
        return out


@dataclass
class LogisticStack(_Stack):
    """Multinomial logistic regression (scikit-learn, L2 penalty of strength 1/c) from stack_features to y."""

    c: float = 1.0
    name: ClassVar[str] = "stack"
    how: ClassVar[str] = "stack"

    def features(self, P: np.ndarray) -> np.ndarray:
        return stack_features(P)

    def fit(self, P: np.ndarray, y: np.ndarray) -> LogisticStack:
        self.model_, self.n_models_ = LogisticRegression(C=self.c, max_iter=2000).fit(stack_features(P), y), len(P)
        return self

    def shares(self) -> np.ndarray:
        """Each model's share of the absolute coefficient mass: which models the stack leans on (it is not a
        weighted average)."""
        mass = np.abs(self.model_.coef_).reshape(len(self.model_.coef_), self.n_models_, -1).sum(axis=(0, 2))
        return _equal_shares(mass, self.n_models_)


@dataclass
class LightGBMStack(_Stack):
    """A LightGBM classifier from every model's probabilities (trees are indifferent to monotone transforms,
    so no log). Small and regularised: OOF tables are small."""

    seed: int = 0
    name: ClassVar[str] = "lightgbm_stack"
    how: ClassVar[str] = "lightgbm"

    def features(self, P: np.ndarray) -> np.ndarray:
        return probability_features(P)

    def fit(self, P: np.ndarray, y: np.ndarray) -> LightGBMStack:
        from lightgbm import LGBMClassifier

        model = LGBMClassifier(n_estimators=150, learning_rate=0.05, num_leaves=15, min_child_samples=10,
                               subsample=0.8, subsample_freq=1, colsample_bytree=0.8, reg_lambda=1.0,
                               random_state=self.seed, n_jobs=1, verbose=-1)
        self.model_, self.n_models_ = model.fit(probability_features(P), y), len(P)
        return self

    def shares(self) -> np.ndarray:
        """Each model's share of the trees' split gain."""
        gain = self.model_.booster_.feature_importance("gain").reshape(self.n_models_, -1).sum(1)
        return _equal_shares(gain, self.n_models_)


BLENDS: dict[str, type[Blend]] = {cls.name: cls for cls in (MeanBlend, GeometricBlend, RankBlend, WeightedBlend,
                                                            CaruanaBlend, LogisticStack, LightGBMStack)}


def blend_candidates(n_models: int, settings: BlendSettings) -> list[Blend]:
    """The blends a leaderboard of n_models holds, unfitted, in leaderboard order (none for one model)."""
    if n_models < 2:
        return []
    fitted = [WeightedBlend(settings.metric, settings.objective),
              CaruanaBlend(settings.metric, settings.objective, settings.caruana_rounds)]
    if kind_of(settings.metric) != "proba":
        return [MeanBlend(), RankBlend(on_scale=True), *fitted]
    lightgbm = [LightGBMStack()] if settings.lightgbm and lightgbm_available() else []
    return [MeanBlend(), GeometricBlend(), RankBlend(), *fitted, LogisticStack(settings.stack_c), *lightgbm]


def refit_chosen(chosen: str, P: np.ndarray, y: np.ndarray, names: list[str], settings: BlendSettings) -> Blend:
    """The leaderboard row `chosen` (a model's name or a blend's), fitted on all OOF rows as the ensemble fits it."""
    if chosen in names:
        return SingleModel(names.index(chosen)).fit(P, y)
    for candidate in blend_candidates(len(names), settings):
        if candidate.name == chosen:
            return candidate.fit(P, y)
    raise PipelineError(f"WORK/ensemble/weights.json: chosen row '{chosen}' is no longer a blend of these models; "
                        "run `make ensemble` again")
