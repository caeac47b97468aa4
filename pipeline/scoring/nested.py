"""Honest scores of blends by nested cross-validation over the folds, the leaderboard, and the choice of a row.

Fitted blends and stacks (pipeline/scoring/blend.py) learn from the same OOF rows they would be scored on;
their honest score comes from nested cross-validation: each fold's rows blended by a fit on the other folds'
rows (nested_oof). The leaderboard shows both, so overfitted weights are not rewarded. Fixed blends learn
nothing from the labels, so their OOF score is already honest.

Thresholded metrics (multi-label F-scores, ordinal qwk: metrics.METRICS) cut each row's predictions at
thresholds tuned on OOF (thresholds.DecisionThresholds). Like fitted weights they are nested: a row's honest
score cuts each fold's honest predictions at thresholds fitted on the other folds' honest predictions
(nested_decisions), and its thresholds (fitted on all its honest rows) cut the test predictions. The weights
that made a fold-j row were fitted with fold k among their rows, so fold k's labels reach its thresholds at
second hand; that is the leak every nested blend of nested predictions carries, and it is small next to
fitting on fold k itself.

Picking the best honest row is itself a choice made on the OOF rows: the best of many near-equal honest
scores is an optimistic estimate of what the pick will score. nested_auto_pick scores the `auto` policy
itself: for each fold, the whole leaderboard is rebuilt on the other folds (its fitted rows nested inside
them), the best row is picked there, fitted on those folds and applied to the held-out fold.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.scoring.blend import Blend, BlendSettings, SingleModel, blend_candidates
from pipeline.scoring.tasks import greater_is_better, score
from pipeline.scoring.thresholds import DecisionThresholds


def nested_oof(blend: Blend, P: np.ndarray, y: np.ndarray, folds: np.ndarray) -> np.ndarray:
    """Each fold's rows blended by a fresh copy of `blend` fitted on the other folds' rows only."""
    out = np.zeros(P.shape[1:])
    for k in np.unique(folds):
        held = folds == k
        out[held] = blend.unfitted().fit(P[:, ~held], y[~held]).predict(P[:, held])
    return out


def nested_decisions(cutter: DecisionThresholds, pred: np.ndarray, y: np.ndarray, folds: np.ndarray) -> np.ndarray:
    """Each fold's predictions cut at thresholds fitted on the other folds' rows (unchanged when none apply)."""
    if not cutter.tuned or len(np.unique(folds)) < 2:
        return pred
    out = np.zeros((len(pred), 1 if cutter.metric == "qwk" else pred.shape[1]))
    for k in np.unique(folds):
        held = folds == k
        out[held] = cutter.unfitted().fit(pred[~held], y[~held]).transform(pred[held])
    return out


@dataclass
class BoardRow:
    """One leaderboard row: a single model, a blend or a stack, fitted on all OOF rows (for the test
    predictions), with its thresholds fitted on its honest OOF rows, its in-sample and honest scores, and `oof`
    (its honest out-of-fold predictions)."""

    model: str
    blend: Blend
    cutter: DecisionThresholds
    weights: dict[str, float]
    cv_score: float
    honest_score: float
    oof: np.ndarray

    @property
    def kind(self) -> str:
        return self.blend.kind

    @property
    def how(self) -> str:
        return self.blend.how

    @property
    def thresholds(self) -> float | np.ndarray | None:
        return self.cutter.thresholds_

    def predict(self, P: np.ndarray) -> np.ndarray:
        """The row's blended predictions of new rows (before thresholds)."""
        return self.blend.predict(P)

    def decide(self, P: np.ndarray) -> np.ndarray:
        """The row's blended predictions of new rows, cut at its thresholds (when it has any)."""
        return self.cutter.transform(self.blend.predict(P))

    def summary(self) -> dict:
        """The leaderboard.csv columns."""
        return {"model": self.model, "kind": self.kind, "how": self.how, "weights": self.weights,
                "cv_score": self.cv_score, "honest_score": self.honest_score}


def leaderboard(P: np.ndarray, y: np.ndarray, folds: np.ndarray, names: list[str],
                settings: BlendSettings) -> list[BoardRow]:
    """Every single model, then every blend and stack, with in-sample and honest scores.

    OOF rows of a single fold (one fold trained) leave nothing to fit on while scoring it, so blends that
    learn are then left out."""
    nestable = len(np.unique(folds)) > 1
    entries = [(n, SingleModel(i)) for i, n in enumerate(names)]
    entries += [(b.name, b) for b in blend_candidates(len(names), settings) if nestable or not b.learns]
    rows = []
    for name, blend in entries:
        in_sample = blend.fit(P, y).predict(P)
        honest = nested_oof(blend, P, y, folds) if blend.learns else in_sample
        cutter = DecisionThresholds(settings.metric, settings.thresholds, settings.n_grades).fit(honest, y)
        rows.append(BoardRow(
            model=name, blend=blend, cutter=cutter,
            weights=dict(zip(names, np.round(blend.shares(), 4).tolist(), strict=True)),
            cv_score=score(settings.metric, y, cutter.transform(in_sample)),
            honest_score=score(settings.metric, y, nested_decisions(cutter, honest, y, folds)),
            oof=honest))
    return rows


def chosen_row(rows: list[BoardRow], metric: str, method: str = "auto") -> BoardRow:
    """The row named `method`, or under auto the best honest score (first listed wins ties: the simpler one);
    KeyError for a name not on the leaderboard."""
    if method != "auto":
        for row in rows:
            if row.model == method:
                return row
        raise KeyError(method)
    best = rows[0]
    for row in rows[1:]:
        better = (row.honest_score > best.honest_score if greater_is_better(metric)
                  else row.honest_score < best.honest_score)
        if better:
            best = row
    return best


@dataclass
class NestedPick:
    """The honest score of the `auto` pick: `score` of the pooled held-out predictions `oof`, and `picks`
    (fold -> the row picked without it)."""

    score: float
    picks: dict[int, str]
    oof: np.ndarray


def nested_auto_pick(P: np.ndarray, y: np.ndarray, folds: np.ndarray, names: list[str],
                     settings: BlendSettings) -> NestedPick | None:
    """Honest score of `ensemble.method=auto` itself: for each fold k, the leaderboard of the other folds
    (on their rows alone, fitted rows nested inside them), its auto pick fitted on those rows and applied to
    fold k; the pooled held-out predictions are scored once, as every honest score is.

    None under 3 folds (the other folds must themselves hold 2 folds to nest the fitted rows). Costs about
    k leaderboards."""
    fold_ids = np.unique(folds)
    if len(fold_ids) < 3:
        return None
    out, picks = None, {}
    for k in fold_ids:
        held = folds == k
        chosen = chosen_row(leaderboard(P[:, ~held], y[~held], folds[~held], names, settings), settings.metric)
        part = chosen.decide(P[:, held])
        out = np.zeros((P.shape[1], part.shape[1])) if out is None else out
        out[held] = part
        picks[int(k)] = chosen.model
    return NestedPick(score(settings.metric, y, out), picks, out)
