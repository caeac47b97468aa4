"""Segmentation metrics on batches of bool masks, the way Kaggle scores them.

- `dice`, `iou`: one value per image and class over the last two axes (height, width), so (N, H, W)
  masks give (N,) and (N, C, H, W) give (N, C). When truth and prediction are both empty the value is 1,
  when just one is empty it is 0 (Severstal, Understanding Clouds). `mean_dice` and `mean_iou` average
  over images and classes alike.
- `instance_map`: the Data Science Bowl 2018 / TGS Salt score. Objects are the connected components of
  each mask (or given instance labels); at each IoU threshold 0.5, 0.55, ..., 0.95 a true object and a
  predicted one match when their IoU is above the threshold, and the image scores TP / (TP + FP + FN)
  averaged over the thresholds; an image with no true and no predicted objects scores 1. The value is the
  mean over images.

Above 0.5 IoU a true object can match at most one predicted object (two predictions overlapping it by more
than half each would overlap each other), so counting pairs above each threshold is the matching; no
assignment problem is solved. All images of a batch are labelled and compared in one pass: scipy labels the
(N, H, W) stack with a structure that never connects neighbouring images, so object ids are unique across
the batch and every count is one `np.bincount`.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

THRESHOLDS = np.round(np.arange(0.5, 0.951, 0.05), 2)


def _overlap(pred: np.ndarray, true: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(intersection, pixels of pred + pixels of true) per image and class, over the last two axes."""
    pred, true = np.asarray(pred, dtype=bool), np.asarray(true, dtype=bool)
    if pred.shape != true.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from truth shape {true.shape}")
    inter = np.count_nonzero(pred & true, axis=(-2, -1))
    total = np.count_nonzero(pred, axis=(-2, -1)) + np.count_nonzero(true, axis=(-2, -1))
    return inter, total


def dice(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """2|P∩T| / (|P| + |T|) per image (and class); 1 where both masks are empty."""
    inter, total = _overlap(pred, true)
    return np.where(total == 0, 1.0, 2.0 * inter / np.maximum(total, 1))


def iou(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """|P∩T| / |P∪T| per image (and class); 1 where both masks are empty."""
    inter, total = _overlap(pred, true)
    union = total - inter
    return np.where(union == 0, 1.0, inter / np.maximum(union, 1))


def mean_dice(pred: np.ndarray, true: np.ndarray) -> float:
    """Dice averaged over every image and class."""
    return float(dice(pred, true).mean())


def mean_iou(pred: np.ndarray, true: np.ndarray) -> float:
    """IoU averaged over every image and class."""
    return float(iou(pred, true).mean())


def label_objects(masks: np.ndarray, connectivity: int = 2) -> tuple[np.ndarray, int]:
    """Connected components of (N, H, W) bool masks, numbered 1..K across the whole batch (0 = background).

    connectivity 1 joins pixels that share an edge, 2 also those that share a corner (skimage's default for
    2-D, the one the Data Science Bowl kernels used)."""
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim != 3:
        raise ValueError(f"masks must be (N, H, W), got shape {masks.shape}")
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = ndimage.generate_binary_structure(2, connectivity)  # nothing links image i to image i+1
    labels, count = ndimage.label(masks, structure=structure)
    return labels, int(count)


def number_instances(instances: np.ndarray) -> tuple[np.ndarray, int]:
    """Given instance labels (N, H, W) ints (0 = background, ids per image), the same objects numbered 1..K
    across the batch."""
    instances = np.asarray(instances)
    if instances.ndim != 3:
        raise ValueError(f"instance labels must be (N, H, W), got shape {instances.shape}")
    if (instances < 0).any():
        raise ValueError("instance labels must be >= 0 (0 = background)")
    image = np.broadcast_to(np.arange(len(instances), dtype=np.int64)[:, None, None], instances.shape)
    keys = np.where(instances > 0, image * (int(instances.max()) + 1) + instances, -1)
    _, numbered = np.unique(keys, return_inverse=True)
    numbered = numbered.reshape(instances.shape)
    has_background = (keys == -1).any()
    numbered = numbered if has_background else numbered + 1  # np.unique puts -1 (background) first when present
    return numbered, int(numbered.max())


def instance_precision(pred_labels: np.ndarray, n_pred: int, true_labels: np.ndarray, n_true: int,
                       thresholds: np.ndarray = THRESHOLDS) -> np.ndarray:
    """(N, len(thresholds)) TP / (TP + FP + FN) per image and threshold, from batch-numbered object labels
    (`label_objects` or `number_instances`); 1 for an image with no true and no predicted objects."""
    n_images = len(true_labels)
    image = np.broadcast_to(np.arange(n_images)[:, None, None], true_labels.shape)
    image_of_true = np.zeros(n_true + 1, dtype=np.int64)
    image_of_true[true_labels.ravel()] = image.ravel()
    image_of_pred = np.zeros(n_pred + 1, dtype=np.int64)
    image_of_pred[pred_labels.ravel()] = image.ravel()
    true_area = np.bincount(true_labels.ravel(), minlength=n_true + 1)
    pred_area = np.bincount(pred_labels.ravel(), minlength=n_pred + 1)
    true_count = np.bincount(image_of_true[1:], minlength=n_images)
    pred_count = np.bincount(image_of_pred[1:], minlength=n_images)

    both = (true_labels > 0) & (pred_labels > 0)
    pair = true_labels[both].astype(np.int64) * (n_pred + 1) + pred_labels[both]
    pair, inter = np.unique(pair, return_counts=True)
    t, p = pair // (n_pred + 1), pair % (n_pred + 1)
    pair_iou = inter / (true_area[t] + pred_area[p] - inter)

    hits = pair_iou[:, None] > np.asarray(thresholds)[None, :]  # (pairs, thresholds)
    tp = np.zeros((n_images, len(thresholds)), dtype=np.int64)
    np.add.at(tp, image_of_true[t], hits.astype(np.int64))
    fp = pred_count[:, None] - tp
    fn = true_count[:, None] - tp
    denominator = tp + fp + fn
    return np.where(denominator == 0, 1.0, tp / np.maximum(denominator, 1))


def instance_map(pred: np.ndarray, true: np.ndarray, connectivity: int = 2,
                 thresholds: np.ndarray = THRESHOLDS) -> np.ndarray:
    """Per-image score of (N, H, W) bool masks: the precision over IoU thresholds of their connected
    components, averaged over the thresholds. Its mean is the competition score."""
    pred_labels, n_pred = label_objects(pred, connectivity)
    true_labels, n_true = label_objects(true, connectivity)
    if pred_labels.shape != true_labels.shape:
        raise ValueError(f"prediction shape {pred_labels.shape} differs from truth shape {true_labels.shape}")
    return instance_precision(pred_labels, n_pred, true_labels, n_true, thresholds).mean(axis=1)


def mean_instance_map(pred: np.ndarray, true: np.ndarray, connectivity: int = 2) -> float:
    """The Data Science Bowl / TGS score of a batch: `instance_map` averaged over images."""
    return float(instance_map(pred, true, connectivity).mean())


def instance_map_labels(pred_instances: np.ndarray, true_instances: np.ndarray,
                        thresholds: np.ndarray = THRESHOLDS) -> np.ndarray:
    """`instance_map` for objects given as instance labels (N, H, W) ints, 0 = background (the Data Science
    Bowl's one mask per nucleus, or a model's instance output), where touching objects stay apart."""
    pred_labels, n_pred = number_instances(pred_instances)
    true_labels, n_true = number_instances(true_instances)
    if pred_labels.shape != true_labels.shape:
        raise ValueError(f"prediction shape {pred_labels.shape} differs from truth shape {true_labels.shape}")
    return instance_precision(pred_labels, n_pred, true_labels, n_true, thresholds).mean(axis=1)
