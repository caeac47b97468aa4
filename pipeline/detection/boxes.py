"""Box machinery of d2l's SSD chapter, vectorised and batched.

Same semantics as "Dive into Deep Learning" (multibox_prior, assign_anchor_to_bbox, offset_boxes,
multibox_target, offset_inverse, nms, multibox_detection), without Python loops over anchors or
boxes: IoU and NMS come from torchvision.ops, anchor labelling runs for the whole batch at once (its
greedy matching is a loop over the greedy steps, at most the number of ground-truth boxes of the
fullest image, each step a batched argmax). Boxes are (x1, y1, x2, y2) in [0, 1] unless noted.
"""

from __future__ import annotations

import torch
from torchvision.ops import batched_nms, box_iou


def corner_to_center(boxes: torch.Tensor) -> torch.Tensor:
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack(((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1), -1)


def center_to_corner(boxes: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), -1)


def multibox_prior(height: int, width: int, sizes: list[float], ratios: list[float], device=None) -> torch.Tensor:
    """(1, height * width * (len(sizes) + len(ratios) - 1), 4) anchors centred on every pixel."""
    size, ratio = torch.tensor(sizes, device=device), torch.tensor(ratios, device=device)
    cy = (torch.arange(height, device=device) + 0.5) / height
    cx = (torch.arange(width, device=device) + 0.5) / width
    sy, sx = torch.meshgrid(cy, cx, indexing="ij")
    w = torch.cat((size * ratio[0].sqrt(), size[0] * ratio[1:].sqrt())) * height / width
    h = torch.cat((size / ratio[0].sqrt(), size[0] / ratio[1:].sqrt()))
    half = torch.stack((-w, -h, w, h), 1) / 2  # (k, 4)
    centres = torch.stack((sx, sy, sx, sy), -1).reshape(-1, 1, 4)
    return (centres + half).reshape(1, -1, 4)


def batched_box_iou(boxes: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """(B, G, A) IoU of each image's G boxes with A anchors; the same arithmetic as torchvision's box_iou.

    box_iou on the batch's flattened boxes gives the same pairs, but through (N, M, 2) intermediates
    and a permute; here anchors run along the last, contiguous axis, which the CPU vectorises.
    """
    ax1, ay1, ax2, ay2 = anchors.T.contiguous()[:, None, None, :].unbind(0)  # each (1, 1, A)
    bx1, by1, bx2, by2 = boxes[..., None].unbind(2)  # each (B, G, 1)
    inter = ((torch.minimum(ax2, bx2) - torch.maximum(ax1, bx1)).clamp(min=0)
             * (torch.minimum(ay2, by2) - torch.maximum(ay1, by1)).clamp(min=0))
    return inter / ((ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter)


def assign_anchors(anchors: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor,
                   iou_threshold: float = 0.5) -> torch.Tensor:
    """Ground-truth index per anchor (-1: background) for a batch, with d2l's rule.

    anchors (A, 4); gt (B, G, 4); valid (B, G) marks real boxes (padding is ignored). First every
    anchor takes its best box when IoU >= threshold; then, greedily, the globally best remaining
    (anchor, box) pair is fixed and its row and column are discarded, until every box has one.
    """
    b, a = len(gt), len(anchors)
    iou = torch.where(valid[..., None], batched_box_iou(gt, anchors), -1.0)  # (B, G, A)
    best_iou, best_box = iou.max(dim=1)
    assign = torch.where(best_iou >= iou_threshold, best_box, -1)
    steps = min(int(valid.sum(1).max().item()) if gt.shape[1] else 0, a)  # one greedy step per box of the fullest image
    if steps == 0:
        return assign
    # The greedy steps only need each box's `steps` best anchors: before a box is matched at most
    # steps - 1 anchors are taken, so its best free anchor is among them. Integer keys order pairs as
    # d2l's argmax does: by IoU (a float >= 0 read as int32 grows with it), then smaller anchor.
    order = a - 1 - torch.arange(a, device=anchors.device)
    key = torch.where(valid[..., None], iou.clamp(min=0).view(torch.int32).long() * a + order, -1)
    top, cand = key.topk(steps, dim=2)  # (B, G, steps): the best anchors of each box
    rows, taken = torch.arange(b, device=anchors.device), torch.full((b, steps), -1, device=anchors.device)
    for step in range(steps):
        free = (cand[..., None] != taken[:, None, None, :step]).all(-1)
        best, flat = torch.where(free, top, -1).reshape(b, -1).max(1)  # first of equal keys: the smaller box
        box, anchor = flat // steps, cand.reshape(b, -1).gather(1, flat[:, None])[:, 0]
        live = best >= 0  # images whose boxes are all matched already stop here
        assign[rows[live], anchor[live]] = box[live]
        taken[:, step] = torch.where(live, anchor, -1)
        top[rows[live], box[live]] = -1
    return assign


def offset_boxes(anchors: torch.Tensor, assigned: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """d2l's offsets: 10 * centre shift / anchor size, 5 * log size ratio."""
    ca, cb = corner_to_center(anchors), corner_to_center(assigned)
    xy = 10 * (cb[..., :2] - ca[..., :2]) / ca[..., 2:]
    wh = 5 * torch.log(eps + cb[..., 2:] / ca[..., 2:])
    return torch.cat((xy, wh), -1)


def offset_inverse(anchors: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    ca = corner_to_center(anchors)
    xy = offsets[..., :2] * ca[..., 2:] / 10 + ca[..., :2]
    wh = torch.exp(offsets[..., 2:] / 5) * ca[..., 2:]
    return center_to_corner(torch.cat((xy, wh), -1))


def multibox_target(anchors: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training targets for a batch: (offsets (B, A*4), mask (B, A*4), classes (B, A), 0 = background).

    anchors (1, A, 4) or (A, 4); labels (B, G, 5) rows [class, x1, y1, x2, y2], class < 0 for padding.
    """
    anchors = anchors.reshape(-1, 4)
    valid = labels[..., 0] >= 0
    assign = assign_anchors(anchors, labels[..., 1:], valid)  # (B, A)
    matched = assign >= 0
    idx = assign.clamp(min=0)
    boxes = torch.gather(labels[..., 1:], 1, idx[..., None].expand(-1, -1, 4))
    classes = torch.where(matched, torch.gather(labels[..., 0], 1, idx).long() + 1, torch.zeros_like(idx))
    mask = matched[..., None].expand(-1, -1, 4).float()
    offsets = offset_boxes(anchors.expand_as(boxes), boxes) * mask
    return offsets.reshape(len(labels), -1), mask.reshape(len(labels), -1), classes


def multibox_detection(cls_probs: torch.Tensor, offset_preds: torch.Tensor, anchors: torch.Tensor,
                       nms_threshold: float = 0.5, pos_threshold: float = 0.009) -> torch.Tensor:
    """(B, A, 6) rows [class, confidence, x1, y1, x2, y2]; class -1 for suppressed or background.

    cls_probs (B, C + 1, A) with background first; offset_preds (B, A * 4). NMS is class-aware and
    batched over images and classes (torchvision's batched_nms); kept rows come first, by score.
    """
    b, _, a = cls_probs.shape
    anchors = anchors.reshape(-1, 4)
    conf, cls = cls_probs[:, 1:, :].max(1)  # (B, A)
    boxes = offset_inverse(anchors.expand(b, -1, -1), offset_preds.reshape(b, a, 4))
    group = torch.arange(b, device=cls.device)[:, None] * cls_probs.shape[1] + cls  # (image, class) pairs
    keep = batched_nms(boxes.reshape(-1, 4), conf.reshape(-1), group.reshape(-1), nms_threshold)
    kept = torch.zeros(b * a, dtype=torch.bool, device=cls.device)
    kept[keep] = True
    kept = kept.reshape(b, a)
    # kept first, by score
    order = torch.argsort(torch.where(kept, conf + 2, conf), dim=1, descending=True, stable=True)
    cls = torch.where(kept, cls, torch.full_like(cls, -1))
    low = conf < pos_threshold
    cls = torch.where(low, torch.full_like(cls, -1), cls)
    conf = torch.where(low, 1 - conf, conf)
    out = torch.cat((cls[..., None].float(), conf[..., None], boxes), -1)
    return torch.gather(out, 1, order[..., None].expand(-1, -1, 6))


def mirror_boxes(boxes: torch.Tensor) -> torch.Tensor:
    """Left-right mirror of (..., 4) corner boxes in [0, 1]: x1, x2 -> 1 - x2, 1 - x1."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack((1 - x2, y1, 1 - x1, y2), -1)


def mirror_index(shapes: list[tuple[int, int]], per_pixel: int) -> torch.Tensor:
    """For anchors laid out as multibox_prior makes them (scales concatenated, each in (row, column,
    anchor) order), the index of each anchor's mirror image: same row and anchor, column w - 1 - j.
    Grids of pixel-centred anchors are mirror-symmetric, so a mirrored input's predictions can be
    brought back anchor by anchor."""
    parts, start = [], 0
    for h, w in shapes:
        parts.append(torch.arange(h * w * per_pixel).reshape(h, w, per_pixel).flip(1).reshape(-1) + start)
        start += h * w * per_pixel
    return torch.cat(parts)


def box_voting(boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor, keep: torch.Tensor,
               iou_threshold: float, max_elements: int = 1 << 22) -> torch.Tensor:
    """The kept boxes (indices `keep`) replaced by the score-weighted mean of the candidates of their
    group (image, class) that overlap them at IoU >= iou_threshold, themselves included.

    Box voting (Gidaris & Komodakis, 2015): NMS keeps the highest-scored box, which is often not the
    best placed one; the mean of its overlapping neighbours is tighter. Neither torchvision nor
    timm has it, and the ensemble-boxes package loops over boxes in Python, hence this version.
    Each kept box meets only the candidates of its own group: candidates sorted by group, kept boxes
    taken in group order, in chunks whose IoU matrix (kept boxes x their groups' candidates, groups
    kept apart by shifting their boxes, the trick batched_nms uses) stays under `max_elements`.
    Comparing every kept box with every candidate of a batch instead took 6.6 GB for 50 validation
    images of an untrained TinySSD (32 x 5,444 candidates). Boxes in [0, 1]; a kept box that overlaps
    nothing (zero area) stays.
    """
    order = torch.argsort(groups, stable=True)
    by_group = groups[order]
    kept_order = torch.argsort(groups[keep], stable=True)
    kept = keep[kept_order]
    lo = torch.searchsorted(by_group, groups[kept], side="left").tolist()
    hi = torch.searchsorted(by_group, groups[kept], side="right").tolist()
    shifted = boxes + groups.to(boxes.dtype)[:, None] * 2
    out = torch.empty((len(keep), 4), dtype=boxes.dtype, device=boxes.device)
    start = 0
    while start < len(kept):
        end = start + 1  # grow the chunk while its IoU matrix stays within max_elements (one kept box always fits)
        while end < len(kept) and (end + 1 - start) * (hi[end] - lo[start]) <= max_elements:
            end += 1
        part, cand = kept[start:end], order[lo[start]:hi[end - 1]]
        weight = (box_iou(shifted[part], shifted[cand]) >= iou_threshold) * scores[cand]
        total = weight.sum(1, keepdim=True)
        out[kept_order[start:end]] = torch.where(total > 0, weight @ boxes[cand] / total.clamp(min=1e-12),
                                                 boxes[part])
        start = end
    return out
