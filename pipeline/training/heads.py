"""The network's output per task (scoring/tasks.py says what each task means): size, loss, activation.

The scaling a regression head learnt with (`Head.center`, `Head.scale`, from the fold's training targets) is stored
in the checkpoint's best.json, so prediction turns logits into numbers exactly as validation did.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Head:
    """The network's output for a task: size, loss and activation. For regression and ordinal the head predicts
    (target - center) / scale (mse, huber) or sigmoid^-1((target - center) / scale) (bce_scaled)."""

    task: str = "single_label"
    n_out: int = 0
    loss: str = "ce"
    center: float = 0.0
    scale: float = 1.0

    def to_meta(self) -> dict:
        return asdict(self)

    @classmethod
    def from_meta(cls, meta: dict | None, n_classes: int) -> Head:
        return cls(**meta) if meta else cls("single_label", n_classes, "ce")

    def activate(self, logits: torch.Tensor) -> torch.Tensor:
        """(N, n_out) logits -> (N, n_columns) predictions."""
        logits = logits.float()
        if self.task == "single_label":
            return logits.softmax(-1)
        if self.task == "multi_label":
            return logits.sigmoid()
        z = logits.sigmoid() if self.loss == "bce_scaled" else logits
        return self.center + self.scale * z

    def loss_value(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Loss of the non-single-label tasks (single_label keeps losses.soft_cross_entropy). Targets: multi-hot
        (mixed ones too) or numbers on the target's scale."""
        logits = logits.float()
        if self.task == "multi_label":
            return F.binary_cross_entropy_with_logits(logits, target.float())
        u = ((target.float() - self.center) / self.scale).view(-1, 1)
        if self.loss == "bce_scaled":
            return F.binary_cross_entropy_with_logits(logits, u.clamp(0, 1))
        if self.loss == "huber":
            return F.huber_loss(logits, u, delta=1.0)
        return F.mse_loss(logits, u)

    def merge(self, logits: np.ndarray, how: str = "mean") -> np.ndarray:
        """(n_views, N, n_out) logits -> (N, n_columns) predictions: mean of the views' predictions; geometric on
        sigmoid outputs is the sigmoid of the mean logit; numbers are always averaged."""
        t = torch.from_numpy(np.asarray(logits, dtype=np.float32))
        if how == "geometric" and self.task == "multi_label":
            return t.mean(0).sigmoid().numpy()
        return torch.stack([self.activate(v) for v in t]).mean(0).numpy()


def pooled(head: Head, logits: np.ndarray) -> tuple[np.ndarray, Head]:
    """Logits of one fold's model, ready to pool with other folds' rows: a number head's scaling is learnt per fold,
    so its (n_views, N, 1) logits become predicted values, merged by an identity head (center 0, scale 1, mse);
    class and tag logits are returned as they are, with the head."""
    if head.task in ("single_label", "multi_label"):
        return logits, head
    t = torch.from_numpy(np.asarray(logits, dtype=np.float32))
    values = torch.stack([head.activate(v) for v in t]).numpy()
    return values, Head(head.task, 1, "mse", 0.0, 1.0)


def make_head(task: str, n_classes: int, loss: str, train_targets: np.ndarray) -> Head:
    """The head of a task; for numbers the scaling comes from the fold's training targets."""
    if task == "single_label":
        return Head(task, n_classes, "ce")
    if task == "multi_label":
        return Head(task, n_classes, "bce")
    t = np.asarray(train_targets, dtype=np.float64)
    if loss == "bce_scaled":
        low, high = float(t.min()), float(t.max())
        return Head(task, 1, loss, low, (high - low) or 1.0)
    return Head(task, 1, loss, float(t.mean()), float(t.std()) or 1.0)
