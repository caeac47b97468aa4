"""Pseudo-labels: confident test predictions of one round become training rows of the next, leak-free.

The fold-k model of round r+1 validates on fold k's rows, so it may learn only from labels made by
models that never saw those rows: the fold-k models of round r (trained on the other folds), blended
over round r's experiments. The all-fold ensemble (test.parquet) is the mean of every fold model,
and the fold-j models (j != k) trained on fold k's rows: a pseudo-label it makes carries fold k's
labels back into fold k's training set, and round r+1's OOF score on fold k inflates. `source="all"`
builds exactly that naive variant, for measuring the inflation.

Each fold gets its own rows (column `fold`: only that fold's model trains on them), its own
confidence threshold (`auto`: chosen on the OOF rows of the other folds, so not even the threshold
looks at fold k's labels) and its own per-class caps.

Labels are hard (the argmax) or soft (`labels="soft"`): a soft row's training target is the blended
probability vector itself, optionally sharpened by a temperature (p^(1/T), renormalised; T < 1
sharpens), learnt with the soft cross-entropy the trainer uses for Mixup and smoothing. Soft targets
keep what the models were unsure between; selection (threshold, caps) is the same for both forms.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline.core.errors import PipelineError
from pipeline.scoring.predictions import prob_columns

COLUMNS = ["id", "path", "label", "fold", "confidence"]


def auto_threshold(confidence: np.ndarray, correct: np.ndarray, target_precision: float) -> float:
    """The lowest threshold t (one of the confidences) at which the rows with confidence >= t are correct at a rate
    of at least target_precision; inf (no rows) when no t reaches it. Ties are kept together."""
    order = np.argsort(-confidence, kind="stable")
    conf, hits = confidence[order], correct[order].astype(float)
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    last_of_tie = np.r_[conf[1:] != conf[:-1], True]  # a threshold keeps every row of its confidence
    ok = np.flatnonzero(last_of_tie & (precision >= target_precision))
    return float(conf[ok[-1]]) if len(ok) else float("inf")


def blend_oof(oofs: list[pd.DataFrame], classes: list[str]) -> pd.DataFrame:
    """Mean OOF probabilities of the experiments, by id (id, fold, y and the p_ columns)."""
    cols = prob_columns(classes)
    frames = [o.sort_values("id", kind="stable").reset_index(drop=True) for o in oofs]
    if any(not f["id"].equals(frames[0]["id"]) for f in frames[1:]):
        raise PipelineError("pseudo-labels: the previous round's experiments have different OOF rows; "
                            "train them on the same folds (train.folds=null)")
    out = frames[0][["id", "fold", "y"]].copy()
    out[cols] = np.mean([f[cols].to_numpy(np.float64) for f in frames], axis=0)
    return out


def blend_test(tests: list[pd.DataFrame], classes: list[str], fold: int | None) -> pd.DataFrame:
    """Mean test probabilities by id: of the fold-`fold` rows of test_folds frames, or of test.parquet frames
    (fold None)."""
    cols = prob_columns(classes)
    parts = []
    for frame in tests:
        if fold is not None:
            frame = frame[frame["fold"] == fold]
            if frame.empty:
                raise PipelineError(f"pseudo-labels: no fold-{fold} model predictions in test_folds.parquet; "
                                    "train every fold of the previous round (train.folds=null)")
        parts.append(frame.set_index("id")[cols].sort_index())
    if any(not p.index.equals(parts[0].index) for p in parts[1:]):
        raise PipelineError("pseudo-labels: the previous round's test predictions cover different test ids; "
                            "rerun `make predict`")
    return pd.DataFrame(np.mean([p.to_numpy(np.float64) for p in parts], axis=0), index=parts[0].index, columns=cols)


def sharpen(probs: np.ndarray, temperature: float) -> np.ndarray:
    """p^(1/T) renormalised per row: T = 1 leaves the probabilities as they are, T < 1 sharpens them."""
    if temperature == 1.0:
        return probs
    logp = np.log(np.clip(probs, 1e-12, None)) / temperature
    out = np.exp(logp - logp.max(1, keepdims=True))
    return out / out.sum(1, keepdims=True)


def select(probs: pd.DataFrame, classes: list[str], threshold: float, max_per_class: int | None,
           soft: bool = False, temperature: float = 1.0) -> pd.DataFrame:
    """Rows (id, label, confidence) whose top probability reaches threshold, at most max_per_class per class, the
    most confident first (so a common class cannot swamp a rare one). soft: also the p_ columns, the (sharpened)
    probabilities each row is trained towards."""
    values = probs.to_numpy()
    picked = pd.DataFrame({"id": probs.index.to_numpy(), "label": np.asarray(classes, dtype=object)[values.argmax(1)],
                           "confidence": values.max(1)})
    if soft:
        picked[prob_columns(classes)] = sharpen(values.astype(np.float64), temperature)
    picked = picked[picked["confidence"] >= threshold]
    picked = picked.sort_values(["confidence", "id"], ascending=[False, True], kind="stable")
    if max_per_class is not None:
        picked = picked.groupby("label", sort=False).head(max_per_class)
    return picked.reset_index(drop=True)


def make_pseudo(oof: pd.DataFrame, tests: dict[int, pd.DataFrame], classes: list[str], test_paths: pd.Series,
                threshold: float | str, target_precision: float, max_per_class: int | None, labels: str = "hard",
                temperature: float = 1.0) -> tuple[pd.DataFrame, dict[int, float]]:
    """The pseudo rows of every fold (columns COLUMNS, and with labels="soft" the p_ target columns) and each
    fold's threshold.

    oof: the previous round's blended OOF (blend_oof); tests: fold -> the blended test probabilities its model may
    learn from (blend_test); test_paths: test id -> image path. threshold="auto" is chosen per fold k on the OOF
    rows of the other folds."""
    cols = prob_columns(classes)
    conf = oof[cols].to_numpy().max(1)
    correct = oof[cols].to_numpy().argmax(1) == oof["y"].to_numpy()
    soft = labels == "soft"
    columns = COLUMNS + (cols if soft else [])
    parts, thresholds = [], {}
    for k, probs in tests.items():
        other = (oof["fold"] != k).to_numpy()
        t = auto_threshold(conf[other], correct[other], target_precision) if threshold == "auto" else float(threshold)
        thresholds[k] = t
        rows = select(probs, classes, t, max_per_class, soft, temperature).assign(fold=k)
        rows["path"] = test_paths.loc[rows["id"]].to_numpy()
        parts.append(rows[columns])
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=columns), thresholds


def dense_targets(y: np.ndarray, soft: np.ndarray, n_classes: int) -> np.ndarray:
    """(N, C) float32 training targets: the soft row where there is one (no NaN), else the one-hot label."""
    out = np.eye(n_classes, dtype=np.float32)[y]
    has = ~np.isnan(soft).any(1)
    out[has] = soft[has]
    return out
