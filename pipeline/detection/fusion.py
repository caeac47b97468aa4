"""Weighted Boxes Fusion of several detection lists per image (ensemble-boxes), and its thresholds.

ensemble-boxes works on boxes normalised to [0, 1]; our detections are in pixels of each image,
so the wrapper divides by the image's width and height on the way in and multiplies on the way
out (the place where such code usually goes wrong: a width/height swap fuses the wrong boxes on
any non-square image). The IoU and skip thresholds are chosen on out-of-fold detections by mAP@0.5,
never on test (choose()).
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import torch
from ensemble_boxes import weighted_boxes_fusion
from tqdm import tqdm

from pipeline.detection.infer import map_of

EMPTY = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}


def wbf(lists: list[dict], width: float, height: float, iou_thr: float, skip_thr: float,
        max_detections: int = 100, conf_type: str = "avg") -> dict:
    """One image: detections {boxes (pixels), scores, labels} from several models or views -> fused, best first.
    conf_type: how ensemble-boxes scores a fused box; avg (its default) scales the mean score by the share of
    lists that found the box, max keeps the best score."""
    scale = np.array([width, height, width, height], dtype=np.float64)
    boxes = [(d["boxes"].double().numpy() / scale).clip(0, 1).tolist() for d in lists]
    scores = [d["scores"].double().numpy().tolist() for d in lists]
    labels = [d["labels"].numpy().tolist() for d in lists]
    if not any(boxes):
        return dict(EMPTY)
    with warnings.catch_warnings():  # ensemble-boxes warns once per zero-area box it skips: pages of one fact
        warnings.simplefilter("ignore", UserWarning)
        fused, fscores, flabels = weighted_boxes_fusion(boxes, scores, labels, iou_thr=iou_thr,
                                                        skip_box_thr=skip_thr, conf_type=conf_type)
    order = np.argsort(-fscores, kind="stable")[:max_detections]
    return {"boxes": torch.from_numpy(np.asarray(fused, dtype=np.float64).reshape(-1, 4)[order] * scale).float(),
            "scores": torch.from_numpy(np.asarray(fscores, dtype=np.float64)[order]).float(),
            "labels": torch.from_numpy(np.asarray(flabels)[order].astype(np.int64))}


def fuse(views: list[list[dict]], sizes: torch.Tensor, iou_thr: float, skip_thr: float,
         max_detections: int = 100, conf_type: str = "avg") -> list[dict]:
    """Per image, WBF of the V lists (each N images long); sizes (N, 2) width, height in pixels."""
    return [wbf([v[i] for v in views], float(sizes[i, 0]), float(sizes[i, 1]), iou_thr, skip_thr, max_detections,
                conf_type) for i in range(len(sizes))]


def choose(views: list[list[dict]], targets: list[dict], sizes: torch.Tensor, ious: list[float], skips: list[float],
           max_detections: int = 100, confs: tuple[str, ...] = ("avg",)) -> tuple[dict, pd.DataFrame]:
    """The (iou_thr, skip_thr, conf_type) of the grid with the best mAP@0.5 on these (OOF) detections (ties: COCO
    mAP, then the first in the grid), and the whole grid's scores."""
    rows = []
    for conf in confs:
        for iou in tqdm(ious, desc=f"detect: WBF thresholds on OOF ({conf})", leave=False, disable=None):
            for skip in skips:
                fused = fuse(views, sizes, iou, skip, max_detections, conf)
                rows.append({"conf_type": conf, "iou_thr": iou, "skip_thr": skip, **map_of(fused, targets)})
    grid = pd.DataFrame(rows)
    best = grid.iloc[int(np.lexsort((-grid["map"].to_numpy(), -grid["map_50"].to_numpy()))[0])]
    return {"iou_thr": float(best["iou_thr"]), "skip_thr": float(best["skip_thr"]),
            "conf_type": str(best["conf_type"])}, grid
