"""The classification losses: cross-entropy on probability targets, and class weights."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.core.errors import PipelineError


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Cross-entropy with probability targets (Mixup, label smoothing) and optional class weights,
    normalised like torch's weighted cross-entropy (by the targets' total weight)."""
    logp = F.log_softmax(logits.float(), dim=1)
    if weight is None:
        return -(target * logp).sum(1).mean()
    return -(target * logp * weight).sum() / (target * weight).sum()


def class_weights(spec, targets: np.ndarray, n_classes: int) -> torch.Tensor | None:
    """None, sklearn-style 'balanced' weights (n / (k * count)), or the given list."""
    if spec == "none":
        return None
    if spec == "balanced":
        counts = np.bincount(targets, minlength=n_classes).astype(np.float64)
        return torch.tensor(len(targets) / (n_classes * np.maximum(counts, 1)), dtype=torch.float32)
    if len(spec) != n_classes:
        raise PipelineError(f"train.class_weights: {len(spec)} weights for {n_classes} classes")
    return torch.tensor(spec, dtype=torch.float32)

