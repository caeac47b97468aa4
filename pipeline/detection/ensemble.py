"""The k-fold detection ensemble: each fold model's test-time views, the out-of-fold assembly of one detector
configuration, Weighted Boxes Fusion with thresholds chosen on OOF (fusion.py), the blend of several
configurations and the choice of what to submit, with their leaderboard rows.

Typed arguments only; pipeline/stages/detect.py trains the fold models, caches their views and writes the
artifacts. A configuration's run is a dict (saved as WORK/detect/<name>/detections.pt): its name, split and
test keys, fold keys, view names, and per part ("oof", "val", "test") one detection list per view (OOF) or per
fold model and view (val, test), each list one dict {boxes (pixels), scores, labels} per image.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from pipeline.core.config import DecodeConfig, DetectModelConfig, FusionConfig, ViewsConfig
from pipeline.detection.data import Arrays
from pipeline.detection.fusion import choose, fuse
from pipeline.detection.infer import Detector, map_of
from pipeline.training.runtime import Runtime

log = logging.getLogger(__name__)


def view_names(views: ViewsConfig) -> list[str]:
    """The test-time views fused by WBF: every scale, plain and (views.hflip) mirrored."""
    return [f"x{scale:g}{flip}" for scale in views.scales for flip in (("", "+hflip") if views.hflip else ("",))]


def view_detections(model: torch.nn.Module, decode: DecodeConfig, rt: Runtime, arrays: Arrays, view: str,
                    score_threshold: float, batch_size: int) -> list[dict]:
    """One view's detections (NMS and box voting of one model) in pixels of the original images."""
    scale, flip = float(view[1:].split("+")[0]), view.endswith("+hflip")
    images = arrays.images
    if scale != 1 and len(images):
        side = max(32, round(images.shape[-1] * scale))
        images = F.interpolate(images.float(), size=(side, side), mode="bilinear", antialias=scale < 1,
                               align_corners=False).round().clamp(0, 255).to(torch.uint8)
    found = Detector(model, decode, rt, "none")(images.flip(-1) if flip else images, arrays.sizes, score_threshold,
                                                batch_size * rt.eval_batch_factor)
    if flip:
        for det, (w, _) in zip(found, arrays.sizes.tolist(), strict=True):
            det["boxes"] = torch.stack((w - det["boxes"][:, 2], det["boxes"][:, 1], w - det["boxes"][:, 0],
                                        det["boxes"][:, 3]), 1)
    return found


def configuration_name(name: str | None, model: DetectModelConfig) -> str:
    """The folder and leaderboard name of one detector configuration: detect.folds.name, else the model (and its
    backbone when it has one to choose)."""
    if name:
        return name
    return model.name if model.name in ("tinyssd", "ssdlite") else f"{model.name}-{model.backbone}"


def map_or_nan(detections: list[dict], targets: list[dict]) -> dict:
    """mAP@0.5 and COCO mAP; NaN for a part without images (no holdout)."""
    return map_of(detections, targets) if targets else {"map_50": float("nan"), "map": float("nan")}


def prefixed(prefix: str, scores: dict) -> dict:
    """Leaderboard columns: {map_50: 0.91234} -> {oof_map_50: 0.9123}."""
    return {f"{prefix}_{k}": round(v, 4) for k, v in scores.items()}


def above_score(detections: list[dict], threshold: float) -> list[dict]:
    """The detections scored at least `threshold`, per image."""
    return [{k: v[d["scores"] >= threshold] for k, v in d.items()} for d in detections]


def fuse_chosen(lists: list[list[dict]], sizes: torch.Tensor, choice: dict, max_detections: int) -> list[dict]:
    """WBF with the thresholds and score rule chosen on OOF."""
    return fuse(lists, sizes, choice["iou_thr"], choice["skip_thr"], max_detections, choice["conf_type"])


@dataclass
class FoldModel:
    """What one fold's model gives the ensemble: its held-out images (rows of the training images), its views of
    them, of the holdout and of the test images ({part: {view: detections}}), its key and training seconds."""

    held: np.ndarray
    found: dict[str, dict[str, list[dict]]]
    key: str
    train_seconds: float


def assemble_run(name: str, views: list[str], folds: list[FoldModel], n_images: int, truth: list[dict],
                 val_truth: list[dict], split_key: str, test_key: str) -> dict:
    """One configuration's run from its fold models: each training image's OOF detections per view from the
    model that did not see it, the holdout and test views of every fold model, and its leaderboard rows (each
    fold model on its plain view, then all folds per view)."""
    oof: dict[str, list] = {v: [None] * n_images for v in views}
    board = []
    for k, fm in enumerate(folds):
        for v in views:
            for j, i in enumerate(fm.held):
                oof[v][i] = fm.found["oof"][v][j]
        plain = map_or_nan(fm.found["oof"][views[0]], [truth[i] for i in fm.held])
        board.append({"entry": f"{name} fold{k}", "kind": "model", "views": views[0],
                      "oof_map_50": plain["map_50"], "oof_map": plain["map"],
                      **prefixed("val", map_or_nan(fm.found["val"][views[0]], val_truth)),
                      "train_seconds": round(fm.train_seconds, 1)})
    for v in views:
        board.append({"entry": f"{name} all folds, {v}", "kind": "model (OOF)", "views": v,
                      **prefixed("oof", map_of(oof[v], truth))})
    return {"name": name, "split_key": split_key, "test_key": test_key, "fold_keys": [fm.key for fm in folds],
            "views": views, "oof": [oof[v] for v in views],
            "val": [fm.found["val"][v] for fm in folds for v in views],
            "test": [fm.found["test"][v] for fm in folds for v in views], "board": board}


@dataclass
class Fusion:
    """WBF of a run's lists with thresholds chosen on OOF: the choice, its OOF scores, its leaderboard rows and
    the scores of every grid point tried."""

    choice: dict
    oof_scores: dict
    rows: list[dict]
    grid: pd.DataFrame


def fuse_run(entry: str, run: dict, sizes: torch.Tensor, truth: list[dict], val_sizes: torch.Tensor,
             val_truth: list[dict], fusion: FusionConfig, max_detections: int,
             val_plain: tuple[str, list[list[dict]]] | None = None) -> Fusion:
    """WBF of the run's OOF views with thresholds chosen on OOF, and its leaderboard rows (OOF and holdout; with
    val_plain (entry, the fold models' plain holdout views) first also that fusion alone on the holdout)."""
    choice, grid = choose(run["oof"], truth, sizes, fusion.iou, fusion.skip, max_detections, tuple(fusion.conf))
    oof_scores = map_of(fuse_chosen(run["oof"], sizes, choice, max_detections), truth)
    tag = f"iou {choice['iou_thr']:g}, skip {choice['skip_thr']:g}, {choice['conf_type']}"
    row = {"entry": f"{entry} ({tag})", "kind": "fusion", "views": "+".join(run["views"]),
           **prefixed("oof", oof_scores)}
    rows = []
    if len(val_sizes):
        row |= prefixed("val", map_of(fuse_chosen(run["val"], val_sizes, choice, max_detections), val_truth))
        if val_plain:
            plain_entry, lists = val_plain
            fused = fuse_chosen(lists, val_sizes, choice, max_detections)
            rows.append({"entry": f"{plain_entry}, {run['views'][0]} ({tag})", "kind": "fusion",
                         "views": run["views"][0], **prefixed("val", map_of(fused, val_truth))})
    rows.append(row)
    return Fusion(choice, oof_scores, rows, grid)


def fold_fusion(run: dict, sizes: torch.Tensor, truth: list[dict], val_sizes: torch.Tensor, val_truth: list[dict],
                fusion: FusionConfig, max_detections: int) -> Fusion:
    """The fusion of one configuration's folds x views (and, on the holdout, of its folds' plain views alone);
    its rows join the run's board and its choice and OOF scores the run."""
    plain = (f"{run['name']} wbf folds", run["val"][::len(run["views"])])  # each fold model's first view
    fused = fuse_run(f"{run['name']} wbf folds x views", run, sizes, truth, val_sizes, val_truth, fusion,
                     max_detections, plain)
    run["board"] += fused.rows
    run |= {"choice": fused.choice, "oof_scores": fused.oof_scores}
    return fused


@dataclass
class Submitted:
    """The fusion chosen for the submission among every configuration's and (several configurations) their
    blend's: the candidate, the fused OOF and test detections, the whole leaderboard, the candidates' count and
    the blend's grid (None with one configuration)."""

    chosen: dict
    oof: list[dict]
    test: list[dict]
    board: list[dict]
    candidates: int
    blend_grid: pd.DataFrame | None


def choose_submission(runs: list[dict], sizes: torch.Tensor, truth: list[dict], val_sizes: torch.Tensor,
                      val_truth: list[dict], test_sizes: torch.Tensor, fusion: FusionConfig,
                      max_detections: int) -> Submitted:
    """The leaderboard of every configuration, their WBF blend when there are several, and the fusion with the
    best OOF mAP@0.5 (with several, a choice on OOF: that figure is selection-optimistic)."""
    board = [row for run in runs for row in run["board"]]
    candidates = list(runs)
    grid = None
    if len(runs) > 1:
        blend = {"name": "wbf models", "views": [f"{r['name']}:{v}" for r in runs for v in r["views"]],
                 **{part: [x for r in runs for x in r[part]] for part in ("oof", "val", "test")}}
        fused = fuse_run("wbf models " + " + ".join(r["name"] for r in runs), blend, sizes, truth, val_sizes,
                         val_truth, fusion, max_detections)
        board += fused.rows
        blend |= {"choice": fused.choice, "oof_scores": fused.oof_scores}
        candidates.append(blend)
        grid = fused.grid
    chosen = max(candidates, key=lambda c: (c["oof_scores"]["map_50"], c["oof_scores"]["map"]))
    return Submitted(chosen, fuse_chosen(chosen["oof"], sizes, chosen["choice"], max_detections),
                     fuse_chosen(chosen["test"], test_sizes, chosen["choice"], max_detections), board,
                     len(candidates), grid)
