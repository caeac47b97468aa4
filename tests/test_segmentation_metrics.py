"""Dice, IoU and the instance mAP: exact values on hand-computed cases, and the batched mAP against a per-image
loop over objects."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.segmentation.metrics import (
    THRESHOLDS,
    dice,
    instance_map,
    instance_map_labels,
    iou,
    label_objects,
    mean_dice,
    mean_instance_map,
    mean_iou,
    number_instances,
)

from .segmentation_reference import blobs


def _mask(shape, *pixels):
    m = np.zeros(shape, bool)
    for y, x in pixels:
        m[y, x] = True
    return m


# 4x4: truth has 4 pixels, the prediction 5, and they share 3
TRUE_4 = _mask((4, 4), (0, 0), (0, 1), (1, 0), (1, 1))
PRED_4 = _mask((4, 4), (0, 0), (0, 1), (1, 0), (2, 2), (3, 3))


def test_dice_and_iou_of_a_hand_computed_case():
    assert dice(PRED_4, TRUE_4) == pytest.approx(2 * 3 / (4 + 5), abs=1e-15)
    assert iou(PRED_4, TRUE_4) == pytest.approx(3 / 6, abs=1e-15)


def test_empty_masks_follow_kaggle():
    empty = np.zeros((4, 4), bool)
    assert dice(empty, empty) == 1.0
    assert iou(empty, empty) == 1.0
    assert dice(PRED_4, empty) == 0.0
    assert dice(empty, TRUE_4) == 0.0
    assert iou(empty, TRUE_4) == 0.0


def test_per_image_and_class_and_their_mean():
    empty = np.zeros((4, 4), bool)
    # 2 images x 2 classes: (hand case, both empty), (perfect, prediction where truth is empty)
    pred = np.stack([np.stack([PRED_4, empty]), np.stack([TRUE_4, PRED_4])])
    true = np.stack([np.stack([TRUE_4, empty]), np.stack([TRUE_4, empty])])
    np.testing.assert_allclose(dice(pred, true), [[2 / 3, 1.0], [1.0, 0.0]], rtol=0, atol=1e-15)
    np.testing.assert_allclose(iou(pred, true), [[0.5, 1.0], [1.0, 0.0]], rtol=0, atol=1e-15)
    assert mean_dice(pred, true) == pytest.approx((2 / 3 + 1 + 1 + 0) / 4, abs=1e-15)
    assert mean_iou(pred, true) == pytest.approx((0.5 + 1 + 1 + 0) / 4, abs=1e-15)


def test_shapes_must_agree():
    with pytest.raises(ValueError, match="differs"):
        dice(np.zeros((2, 4, 4), bool), np.zeros((2, 4, 5), bool))


def test_thresholds():
    np.testing.assert_allclose(THRESHOLDS, [0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95])


def _instance_cases():
    shape = (6, 6)
    square = _mask(shape, (0, 0), (0, 1), (1, 0), (1, 1))
    three = _mask(shape, (0, 0), (0, 1), (1, 0))
    far = _mask(shape, (4, 4), (4, 5), (5, 4), (5, 5))
    corner = _mask(shape, (0, 5))
    half = square | _mask(shape, (2, 0), (2, 1))  # 6 pixels over the 4 of the square: IoU 4/6
    overlap_half = _mask(shape, (0, 0), (0, 1), (1, 0), (2, 0))  # shares 3 of 4+4-3=5: IoU 0.6
    empty = np.zeros(shape, bool)
    return [
        # (pred, true, expected score)
        (square, square, 1.0),  # exact
        (three, square, 0.5),  # IoU 0.75: hits at 0.5..0.7 (5 of 10), not at 0.75 (strictly above)
        (square | corner, square | far, 1 / 3),  # one match, one missed, one extra at every threshold
        (empty, empty, 1.0),  # no objects at all
        (corner, empty, 0.0),  # only a false positive
        (empty, far, 0.0),  # only a miss
        (half, square, 0.4),  # IoU 0.667: hits at 0.5, 0.55, 0.6, 0.65 (4 of 10)
        (overlap_half, square, 0.2),  # IoU 0.6: hits at 0.5, 0.55 (2 of 10; 0.6 is not above 0.6)
    ]


def test_instance_map_of_hand_computed_images():
    cases = _instance_cases()
    pred = np.stack([c[0] for c in cases])
    true = np.stack([c[1] for c in cases])
    expected = [c[2] for c in cases]
    np.testing.assert_allclose(instance_map(pred, true), expected, rtol=0, atol=1e-12)
    assert mean_instance_map(pred, true) == pytest.approx(np.mean(expected), abs=1e-12)


def test_iou_of_exactly_one_half_is_no_match():
    true = _mask((2, 4), (0, 0), (1, 0))
    pred = _mask((2, 4), (0, 0), (1, 0), (0, 1), (1, 1))  # IoU 2/4 = 0.5, not above 0.5
    assert instance_map(pred[None], true[None])[0] == 0.0


def test_connectivity():
    diagonal = _mask((3, 3), (0, 0), (1, 1))[None]
    assert label_objects(diagonal, connectivity=2)[1] == 1
    assert label_objects(diagonal, connectivity=1)[1] == 2
    # two 1-pixel truths against one diagonal prediction: 4-connectivity matches both, 8-connectivity neither
    assert instance_map(diagonal, diagonal, connectivity=1)[0] == 1.0
    single = _mask((3, 3), (0, 0))[None]
    assert instance_map(single, diagonal, connectivity=1)[0] == 0.5
    assert instance_map(single, diagonal, connectivity=2)[0] == 0.0


def test_objects_never_span_images():
    full = np.ones((3, 4, 4), bool)
    labels, count = label_objects(full)
    assert count == 3
    assert [set(np.unique(labels[i])) for i in range(3)] == [{1}, {2}, {3}]


def test_instance_labels_keep_touching_objects_apart():
    true = np.zeros((1, 4, 4), int)
    true[0, :, :2], true[0, :, 2:] = 1, 7  # two touching halves: one component, two instances
    pred = np.zeros_like(true)
    pred[0, :, :2] = 3
    assert instance_map_labels(pred, true)[0] == 0.5  # one matched, one missed at every threshold
    assert instance_map(pred > 0, true > 0)[0] == 0.0  # as components: one 16-pixel object against an 8-pixel one
    numbered, count = number_instances(np.stack([true[0], pred[0]]))
    assert count == 3
    np.testing.assert_array_equal(numbered[0], np.where(true[0] == 1, 1, 2))


def _loop_instance_map(pred: np.ndarray, true: np.ndarray) -> list[float]:
    """Per image: IoU matrix of its objects, matches above each threshold, one loop step per object pair."""
    from scipy import ndimage
    scores = []
    for p_mask, t_mask in zip(pred, true, strict=True):
        p_lab, n_p = ndimage.label(p_mask, structure=np.ones((3, 3)))
        t_lab, n_t = ndimage.label(t_mask, structure=np.ones((3, 3)))
        ious = np.zeros((n_t, n_p))
        for i in range(n_t):
            for j in range(n_p):
                a, b = t_lab == i + 1, p_lab == j + 1
                ious[i, j] = (a & b).sum() / (a | b).sum()
        per_threshold = []
        for th in THRESHOLDS:
            tp = int((ious > th).sum())
            fp, fn = n_p - tp, n_t - tp
            per_threshold.append(1.0 if tp + fp + fn == 0 else tp / (tp + fp + fn))
        scores.append(float(np.mean(per_threshold)))
    return scores


def test_batched_instance_map_equals_the_per_image_loop():
    rng = np.random.default_rng(0)
    true = np.stack([blobs(rng, (40, 50), int(rng.integers(0, 6))) for _ in range(12)])
    # predictions: the truth shifted by a pixel or two, eroded, with blobs added or removed
    pred = np.roll(true, shift=1, axis=2)
    pred[::3] = np.stack([blobs(rng, (40, 50), 3) for _ in range(len(pred[::3]))])
    pred[1::4] &= rng.random(pred[1::4].shape) < 0.9
    expected = _loop_instance_map(pred, true)
    assert len(set(np.round(expected, 6))) > 3  # the case exercises several different scores
    np.testing.assert_allclose(instance_map(pred, true), expected, rtol=0, atol=1e-12)
