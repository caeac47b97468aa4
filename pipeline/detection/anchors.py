"""Anchor sizes and ratios from the training boxes (`detect.anchors.mode=auto`), as YOLO derives its anchors.

TinySSD lays out anchors as d2l's multibox_prior does: per scale, every size at the first
ratio and the first size at the other ratios. auto fits k-means (scikit-learn) to the log box
sizes sqrt(w * h) -- scales x sizes-per-scale centres, smallest to the finest scale -- and to the log
aspect ratios w / h -- ratios centres, the most populated first, since only the first ratio meets
every size. Log space, because a 0.05 error matters for a 0.1 box and not for a 0.9 one.
"""

from __future__ import annotations

import numpy as np
from sklearn.cluster import KMeans


def _centres(values: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """k 1-D k-means centres and their populations; quantiles when there are fewer distinct values than k."""
    if len(np.unique(values)) < k:
        centres = np.quantile(values, (np.arange(k) + 0.5) / k)
        counts = np.ones(k)
    else:
        km = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(values[:, None])
        centres, counts = km.cluster_centers_[:, 0], np.bincount(km.labels_, minlength=k)
    return centres, counts


def auto_anchors(wh: np.ndarray, scales: int = 5, per_scale: int = 2, n_ratios: int = 3,
                 seed: int = 0) -> tuple[list[list[float]], list[float]]:
    """(sizes per scale, ratios) for boxes of normalised width and height wh (N, 2)."""
    wh = np.asarray(wh, dtype=np.float64).reshape(-1, 2)
    wh = wh[(wh > 0).all(1)]
    if not len(wh):
        raise ValueError("auto anchors need at least one box")
    sizes, _ = _centres(np.log(np.sqrt(wh[:, 0] * wh[:, 1])), scales * per_scale, seed)
    sizes = np.sort(np.exp(sizes))
    ratios, counts = _centres(np.log(wh[:, 0] / wh[:, 1]), n_ratios, seed)
    ratios = np.exp(ratios[np.argsort(-counts, kind="stable")])
    per = [[round(float(v), 4) for v in sizes[i * per_scale:(i + 1) * per_scale]] for i in range(scales)]
    return per, [round(float(r), 4) for r in ratios]


def box_shapes(labels) -> np.ndarray:
    """(N, 2) normalised width and height of the real boxes in padded (N, G, 5) targets."""
    rows = np.asarray(labels).reshape(-1, 5)
    rows = rows[rows[:, 0] >= 0]
    return np.stack((rows[:, 3] - rows[:, 1], rows[:, 4] - rows[:, 2]), 1)
