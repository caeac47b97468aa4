"""d2l's loop implementations, kept as the yardstick for tests and benchmarks/detection.py.

Not used by the pipeline: boxes.py computes the same results without Python loops over anchors
or boxes.
"""

from __future__ import annotations

import torch
from torchvision.ops import box_iou


def assign_anchor_to_bbox(gt: torch.Tensor, anchors: torch.Tensor, iou_threshold: float = 0.5) -> torch.Tensor:
    """One image: ground-truth index per anchor (-1 background), as in d2l."""
    jaccard = box_iou(anchors, gt)
    n_anchors, n_gt = jaccard.shape
    out = torch.full((n_anchors,), -1, dtype=torch.long, device=anchors.device)
    max_ious, indices = jaccard.max(1)
    keep = max_ious >= iou_threshold
    out[keep] = indices[keep]
    for _ in range(n_gt):
        idx = torch.argmax(jaccard)
        box, anc = idx % n_gt, idx // n_gt
        out[anc] = box
        jaccard[:, box] = -1
        jaccard[anc, :] = -1
    return out


def nms(boxes: torch.Tensor, scores: torch.Tensor, threshold: float) -> list[int]:
    """d2l's NMS: keep the best box, drop those overlapping it, repeat."""
    order, keep = torch.argsort(scores, descending=True).tolist(), []
    while order:
        i = order.pop(0)
        keep.append(i)
        if order:
            ious = box_iou(boxes[i:i + 1], boxes[order])[0]
            order = [o for o, v in zip(order, ious.tolist(), strict=True) if v <= threshold]
    return keep
