"""Batched prediction of per-pixel class probabilities, with flip views undone on the masks.

Probabilities are stored as uint8 (round(p * 255)), at image_size: a quarter of float32's bytes, and the
thresholds the post-processing tries are far coarser than 1/255. Every view of a batch runs in one forward
pass; each view's map is flipped back, rounded to uint8, and views are combined as the rounded mean of those
uint8 maps, the same way whether the views were predicted together (test) or stored apart and combined later
(OOF, where the views are chosen), so a choice on OOF means the same on test.
"""

from __future__ import annotations

from itertools import combinations

import numpy as np
import torch

from pipeline.segmentation.models import NORM
from pipeline.training.runtime import Runtime

FLIPS = {"identity": (), "hflip": (-1,), "vflip": (-2,)}


def view_sets(hflip: bool, vflip: bool) -> list[tuple[str, ...]]:
    """Every set of views to try on OOF: the plain view with any of the enabled flips, plain alone first."""
    extra = [v for v, on in (("hflip", hflip), ("vflip", vflip)) if on]
    return [("identity", *chosen) for r in range(len(extra) + 1) for chosen in combinations(extra, r)]


def to_uint8(probs: torch.Tensor) -> np.ndarray:
    return torch.round(probs.float() * 255).to(torch.uint8).cpu().numpy()


def combine(maps: np.ndarray, axis: int = 1) -> np.ndarray:
    """The rounded mean of uint8 probability maps along `axis` (the views)."""
    if maps.shape[axis] == 1:
        return np.take(maps, 0, axis=axis)
    return np.rint(maps.mean(axis=axis, dtype=np.float32)).astype(np.uint8)


@torch.no_grad()
def predict_views(model: torch.nn.Module, images: np.ndarray, views: tuple[str, ...], batch_size: int,
                  runtime: Runtime, out: np.ndarray | None = None, combined: bool = False) -> np.ndarray:
    """uint8 probabilities of images (N, S, S, 3) uint8 per view, (N, V, C, S, S), or with `combined` their
    combination, (N, C, S, S); written batch by batch into `out` (e.g. a .npy memmap) when given."""
    model.eval()
    batch = batch_size * runtime.eval_batch_factor
    for start in range(0, len(images), batch):
        x = runtime.to_input(torch.from_numpy(np.array(images[start:start + batch])).permute(0, 3, 1, 2),
                             NORM)
        stacked = torch.cat([x.flip(FLIPS[v]) if FLIPS[v] else x for v in views])
        with runtime.autocasting():
            probs = torch.sigmoid(model(stacked).float())
        parts = [p.flip(FLIPS[v]) if FLIPS[v] else p for v, p in zip(views, probs.split(len(x)), strict=True)]
        maps = to_uint8(torch.stack(parts, 1))  # (B, V, C, S, S)
        if out is None:
            n_classes, size = maps.shape[2], maps.shape[-1]
            shape = (len(images), n_classes, size, size) if combined else (len(images), *maps.shape[1:])
            out = np.zeros(shape, np.uint8)
        out[start:start + len(x)] = combine(maps) if combined else maps
    if out is None:  # no images
        raise ValueError("predict_views needs at least one image")
    return out
