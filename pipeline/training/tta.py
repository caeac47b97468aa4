"""Test-time augmentation: views of a batch, run through the network together, merged on probabilities.

Views: identity, hflip, vflip, rot90/rot180/rot270, `scale<f>` (the batch resized by f, e.g.
scale1.15; the network's global pooling takes any size) and `random<k>` (the k-th random weak
augmentation: a small rotation, scale and shift per image within `predict.tta_random_*`, drawn
from a seed and the image's index, so results do not depend on the batch size). Views merge by
the mean of their probabilities or their geometric mean; the mean of logits is the geometric mean
(softmax of the mean logit = softmax of the mean log-probability, as log_softmax only subtracts a
per-row constant), so it is not offered. All same-size views of a batch are stacked into one
forward pass; each scale view is one more pass. Written here rather than taken from `ttach`
because that library loops over views one forward at a time, which is what this module avoids.

Other tasks pass their `heads.Head`: multi-label views merge by the mean of sigmoid probabilities
(geometric: the sigmoid of the mean logit), numbers by the mean of the predicted values.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline.scoring.tasks import greater_is_better, is_better, score
from pipeline.training.heads import Head

FIXED = {
    "identity": lambda x: x,
    "hflip": lambda x: x.flip(-1),
    "vflip": lambda x: x.flip(-2),
    "rot90": lambda x: x.rot90(1, (2, 3)),
    "rot180": lambda x: x.rot90(2, (2, 3)),
    "rot270": lambda x: x.rot90(3, (2, 3)),
}


def random_affine(n: int, seed: int, k: int, degrees: float = 10.0, scale: float = 0.1,
                  shift: float = 0.06) -> torch.Tensor:
    """(n, 2, 3) affine matrices for affine_grid: rotation ±degrees, zoom 1±scale, shift ±shift (a fraction
    of the side)."""
    gen = torch.Generator().manual_seed(seed * 1009 + k)
    u = torch.rand(n, 4, generator=gen) * 2 - 1
    angle, zoom = u[:, 0] * math.radians(degrees), 1 + u[:, 1] * scale
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    tx, ty = u[:, 2] * shift * 2, u[:, 3] * shift * 2  # affine_grid coordinates span [-1, 1]
    return torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)


def apply_view(name: str, x: torch.Tensor, theta: torch.Tensor | None = None) -> torch.Tensor:
    if name in FIXED:
        return FIXED[name](x)
    if name.startswith("scale"):
        return F.interpolate(x, scale_factor=float(name[5:]), mode="bilinear", align_corners=False)
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


@torch.no_grad()
def tta_logits(model, images: np.ndarray, views: list[str], to_input, batch_size: int, seed: int = 0,
               degrees: float = 10.0, scale: float = 0.1, shift: float = 0.06) -> np.ndarray:
    """(n_views, N, n_classes) logits. `to_input` turns a uint8 NCHW batch into the model's input;
    degrees, scale and shift bound the random<k> views (see random_affine)."""
    model.eval()
    thetas = {v: random_affine(len(images), seed, int(v[6:]), degrees, scale, shift)
              for v in views if v.startswith("random")}
    stacked_views = [v for v in views if not v.startswith("scale")]
    out = [[] for _ in views]
    for start in tqdm(range(0, len(images), batch_size), desc="predict", unit="batch", leave=False, disable=None):
        x = to_input(torch.from_numpy(np.array(images[start:start + batch_size])).permute(0, 3, 1, 2))
        end = start + len(x)
        if stacked_views:
            batch = torch.cat([apply_view(v, x, thetas[v][start:end] if v in thetas else None) for v in stacked_views])
            logits = model(batch).float().view(len(stacked_views), len(x), -1).cpu()
            for v, part in zip(stacked_views, logits, strict=True):
                out[views.index(v)].append(part)
        for v in views:
            if v.startswith("scale"):
                out[views.index(v)].append(model(apply_view(v, x)).float().cpu())
    return torch.stack([torch.cat(parts) for parts in out]).numpy()


MERGES = ("mean", "geometric")


def merge(logits: np.ndarray, how: str = "mean", head: Head | None = None) -> np.ndarray:
    """(n_views, N, C) logits -> (N, C) probabilities: mean of probabilities, or their (renormalised) geometric mean;
    a non-single-label head merges its own way (Head.merge)."""
    if head is not None and head.task != "single_label":
        if how not in MERGES:
            raise ValueError(f"unknown TTA merge {how!r}; use one of {', '.join(MERGES)}")
        return head.merge(logits, how)
    t = torch.from_numpy(np.asarray(logits, dtype=np.float32))
    if how == "mean":
        return t.softmax(-1).mean(0).numpy()
    if how == "geometric":
        return t.log_softmax(-1).mean(0).softmax(-1).numpy()
    raise ValueError(f"unknown TTA merge {how!r}; use one of {', '.join(MERGES)}")


def choose_views(logits: np.ndarray, y: np.ndarray, metric: str, policy: str, how: str = "mean",
                 head: Head | None = None) -> list[int]:
    """Indices of the views to merge, decided on out-of-fold rows only.

    auto: start from the best single view and add a view only when the merged OOF score improves
    (greedy forward selection); all: every view.
    """
    if policy == "all":
        return list(range(len(logits)))
    scores = [score(metric, y, merge(lg[None], how, head)) for lg in logits]
    order = sorted(range(len(logits)), key=lambda i: scores[i], reverse=greater_is_better(metric))
    chosen, best = [order[0]], scores[order[0]]
    for i in order[1:]:
        candidate = score(metric, y, merge(logits[chosen + [i]], how, head))
        if is_better(metric, candidate, best):
            chosen, best = chosen + [i], candidate
    return sorted(chosen)


def nested_views(logits: np.ndarray, y: np.ndarray, folds: np.ndarray, metric: str, policy: str,
                 how: str = "mean", head: Head | None = None) -> tuple[np.ndarray, dict[int, list[int]]]:
    """Honest OOF probabilities of the TTA choice: each fold's rows merged over the views chosen on the other
    folds' rows only, and the views chosen per held-out fold.

    choose_views on all OOF rows scores its own choice on the rows it chose on, so that figure is
    selection-optimistic (by little with two views, more with many). The model's oof.parquet still
    holds the views chosen on all rows: those are the views the test predictions use, and a file whose
    rows were merged over different views per fold would describe no model that predicts the test set."""
    out = None
    chosen = {}
    for k in np.unique(folds):
        held = folds == k
        chosen[int(k)] = choose_views(logits[:, ~held], y[~held], metric, policy, how, head)
        part = merge(logits[chosen[int(k)]][:, held], how, head)
        out = np.zeros((logits.shape[1], part.shape[1]), dtype=np.float32) if out is None else out
        out[held] = part
    return out, chosen
