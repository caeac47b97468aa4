"""The second stage of detection: crops of boxes for an image classifier, and the classifier's probabilities
combined with the detector's boxes.

A detector on look-alike classes often puts its boxes on the objects and names them wrongly; an image
classifier trained on crops of the ground-truth boxes names them better. Here: square crops with context
(torchvision's roi_align, batched on the decoded images), jittered copies of the training boxes (so the
classifier meets boxes as loose as the detector's), a class-agnostic merge of the fused boxes (one box per
object before it is renamed), the combination of classifier and detector per box, and the choice of the rule on
out-of-fold images, nested over folds for the honest figure. Typed arguments only; pipeline/stages/detect.py
trains the classifier with the classification track's fold training.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torchvision.ops import box_iou, roi_align

from pipeline.detection.infer import map_of


def square_regions(boxes: torch.Tensor, margin: float) -> torch.Tensor:
    """(M, 4) xyxy boxes -> the squares around their centres whose side is the longer side plus `margin` of it on
    each side: the object at one scale whatever its aspect, with some context."""
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = (boxes[:, 2:] - boxes[:, :2]).amax(1, keepdim=True).clamp(min=1.0) * (0.5 + margin)
    return torch.cat((centre - half, centre + half), 1)


def crop(images: torch.Tensor, image_index: torch.Tensor, boxes: torch.Tensor, size: int, margin: float,
         chunk: int = 256) -> np.ndarray:
    """(M, size, size, 3) uint8 crops of `boxes` (xyxy in the pixels of `images`, (N, 3, S, S) uint8) of the
    images `image_index`; outside the image is black. In chunks of images, so a large split is never all float."""
    out = np.zeros((len(boxes), size, size, 3), dtype=np.uint8)
    if not len(boxes):
        return out
    regions = square_regions(boxes.float(), margin)
    for start in range(0, len(images), chunk):
        rows = torch.nonzero((image_index >= start) & (image_index < start + chunk)).flatten()
        if not len(rows):
            continue
        rois = torch.cat((image_index[rows, None].float() - start, regions[rows]), 1)
        part = roi_align(images[start:start + chunk].float(), rois, (size, size), 1.0, sampling_ratio=2, aligned=True)
        out[rows.numpy()] = part.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return out


def jittered(boxes: torch.Tensor, copies: int, jitter: float, generator: torch.Generator) -> torch.Tensor:
    """Each box, then `copies` copies of each with its centre moved by up to `jitter` of its size and each side
    scaled by a factor in [exp(-jitter), exp(jitter)]: ((1 + copies) * M, 4), the exact boxes first."""
    if not copies:
        return boxes
    many = boxes.repeat(copies, 1)
    size = many[:, 2:] - many[:, :2]
    shift, scale = (torch.rand(2, many.shape[0], 2, generator=generator) * 2 - 1) * jitter
    centre = (many[:, :2] + many[:, 2:]) / 2 + shift * size
    size = size * torch.exp(scale)
    return torch.cat((boxes, torch.cat((centre - size / 2, centre + size / 2), 1)))


@dataclass
class TrainingCrops:
    """Crops of the ground-truth boxes of the training images (exact and jittered), one row each: the crop, its
    class, its image (row of the training images) and that image's fold."""

    images: np.ndarray  # (M, size, size, 3) uint8
    labels: np.ndarray  # (M,) class index
    image: np.ndarray  # (M,)
    fold: np.ndarray  # (M,)


def training_crops(images: torch.Tensor, targets: torch.Tensor, fold: np.ndarray, size: int, margin: float,
                   copies: int, jitter: float, seed: int) -> TrainingCrops:
    """The crops a classifier learns from: every ground-truth box of `targets` ((N, G, 5) normalised, class -1
    pads) with `copies` jittered copies; a crop belongs to its image's fold."""
    valid = targets[..., 0] >= 0
    image = torch.nonzero(valid)[:, 0]
    side = images.shape[-1]
    boxes, labels = targets[valid][:, 1:] * side, targets[valid][:, 0].long()
    generator = torch.Generator().manual_seed(seed)
    boxes = jittered(boxes, copies, jitter, generator)
    image, labels = image.repeat(1 + copies), labels.repeat(1 + copies)
    return TrainingCrops(crop(images, image, boxes, size, margin), labels.numpy(), image.numpy(),
                         np.asarray(fold)[image.numpy()])


def ranked(detections: list[dict]) -> list[dict]:
    """Each image's detections best first (the order every function here relies on)."""
    out = []
    for d in detections:
        order = torch.argsort(d["scores"], descending=True, stable=True)
        out.append({k: v[order] for k, v in d.items()})
    return out


def agnostic_merge(detections: list[dict], iou: float, n_classes: int) -> list[dict]:
    """One box per object whatever its class: greedy clusters of boxes overlapping the best unclaimed box by at
    least `iou`, merged into their score-weighted mean box with the best score and, as `votes`, the score-weighted
    share of each class among them. Boxes here come ranked (ranked())."""
    out = []
    for d in detections:
        boxes, scores, labels = d["boxes"].float(), d["scores"].float(), d["labels"].long()
        free = torch.ones(len(boxes), dtype=torch.bool)
        overlaps = box_iou(boxes, boxes) if len(boxes) else torch.zeros(0, 0)
        merged, best, votes = [], [], []
        for i in range(len(boxes)):
            if not free[i]:
                continue
            members = free & (overlaps[i] >= iou)
            members[i] = True
            free &= ~members
            weight = scores[members]
            merged.append((boxes[members] * weight[:, None]).sum(0) / weight.sum().clamp(min=1e-12))
            best.append(scores[i])
            votes.append(torch.zeros(n_classes).index_add_(0, labels[members], weight) / weight.sum().clamp(min=1e-12))
        if merged:
            out.append({"boxes": torch.stack(merged), "scores": torch.stack(best), "votes": torch.stack(votes)})
        else:
            out.append({"boxes": boxes.reshape(0, 4), "scores": scores, "votes": torch.zeros(0, n_classes)})
    return out


def with_votes(detections: list[dict], n_classes: int) -> list[dict]:
    """The detections as agnostic_merge's form without merging: each box votes for its own class alone."""
    return [{"boxes": d["boxes"].float(), "scores": d["scores"].float(),
             "votes": torch.nn.functional.one_hot(d["labels"].long(), n_classes).float()} for d in detections]


def combine(boxes: list[dict], probs: list[np.ndarray], weight: float, top_k: int, max_detections: int = 100,
            floor: float = 0.01) -> list[dict]:
    """Per box, the class distribution r = (1 - weight) * classifier + weight * detector votes; each of its
    `top_k` classes with r >= floor becomes one detection scored score * r (several hypotheses per box: mAP
    counts each class apart), the best `max_detections` per image. probs[i] holds the classifier's probabilities
    of image i's first boxes (the renamed ones); boxes after them keep the detector's votes. weight 1 on unmerged
    boxes is the detector."""
    out = []
    for d, p in zip(boxes, probs, strict=True):
        votes = d["votes"].clone()
        n = len(p)
        if n:
            votes[:n] = (1 - weight) * torch.as_tensor(p, dtype=torch.float32) + weight * votes[:n]
        top = votes.topk(min(top_k, votes.shape[1]), dim=1) if len(votes) else None
        if top is None:
            out.append({"boxes": d["boxes"].reshape(0, 4), "scores": d["scores"][:0], "labels": torch.zeros(0).long()})
            continue
        values, classes = top
        keep = values >= floor
        rows = torch.nonzero(keep)[:, 0]
        scores = d["scores"][rows] * values[keep]
        order = torch.argsort(scores, descending=True, stable=True)[:max_detections]
        out.append({"boxes": d["boxes"][rows][order], "scores": scores[order], "labels": classes[keep][order]})
    return out


def rule_name(weight: float, merge_iou: float | None) -> str:
    if weight == 1 and merge_iou is None:
        return "detector alone"
    return f"classifier w {weight:g}" + (f", agnostic merge iou {merge_iou:g}" if merge_iou is not None else "")


@dataclass
class RuleChoice:
    """The rule chosen on every OOF image, its OOF score, the nested (honest) OOF score of the rule chosen on the
    other folds for each fold, and every rule's OOF scores."""

    rule: tuple[float, float | None]
    oof: dict
    nested: dict
    nested_rules: list[str]
    grid: pd.DataFrame


def choose_rule(candidates: dict[tuple[float, float | None], list[dict]], truth: list[dict], fold: np.ndarray
                ) -> RuleChoice:
    """The rule of best OOF mAP@0.5 (ties: the earlier candidate), and the honest figure: for each fold, the rule
    best on the other folds' images applied to its images, scored on all images together."""
    keys = list(candidates)
    scores = {k: map_of(candidates[k], truth) for k in keys}
    rule = max(keys, key=lambda k: (scores[k]["map_50"], scores[k]["map"], -keys.index(k)))
    nested: list[dict | None] = [None] * len(truth)
    picked = []
    for k in np.unique(fold):
        rest = np.nonzero(fold != k)[0]
        inner = {key: map_of([candidates[key][i] for i in rest], [truth[i] for i in rest])["map_50"] for key in keys}
        best = max(keys, key=lambda key: (inner[key], -keys.index(key)))
        picked.append(rule_name(*best))
        for i in np.nonzero(fold == k)[0]:
            nested[i] = candidates[best][i]
    grid = pd.DataFrame([{"rule": rule_name(*k), "weight": k[0], "merge_iou": k[1],
                          "oof_map_50": round(scores[k]["map_50"], 4), "oof_map": round(scores[k]["map"], 4)}
                         for k in keys])
    return RuleChoice(rule, scores[rule], map_of(nested, truth), picked, grid)
