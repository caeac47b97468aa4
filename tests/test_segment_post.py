"""Post-processing chosen on OOF: hand-made probability maps whose best threshold and smallest component are
known, the nested figure below the optimistic one when the folds disagree, and the resize to the image's size."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.segmentation.post import choose, drop_small, grid_scores, nested, to_masks


def square(size: int = 32, lo: int = 8, hi: int = 16) -> np.ndarray:
    out = np.zeros((size, size), bool)
    out[lo:hi, lo:hi] = True
    return out


def test_drop_small_keeps_big_components_and_never_links_images():
    masks = np.zeros((2, 10, 10), bool)
    masks[0, :3, :3] = True  # 9 pixels
    masks[0, 8, 8] = True  # 1 pixel
    masks[1, 0, 0] = True  # 1 pixel, right "below" image 0's corner block: must stay its own component
    kept = drop_small(masks, 2)
    assert kept[0, :3, :3].all() and not kept[0, 8, 8] and not kept[1].any()
    assert (drop_small(masks, 0) == masks).all()
    assert not drop_small(masks, 10).any()


def test_grid_picks_the_threshold_and_min_area_that_remove_background_and_a_speck():
    truth = square()[None]
    probs = np.full((1, 32, 32), 102, np.uint8)  # background 0.4
    probs[truth] = 200  # the object 0.78
    probs[0, 28:30, 28:30] = 230  # a 4-pixel speck 0.9, far from the object
    thresholds, areas = [0.3, 0.5, 0.85], [0, 5]
    scores = grid_scores(probs, truth, thresholds, areas)
    assert scores.shape == (3, 2, 1)
    assert scores[1, 0, 0] == pytest.approx(2 * 64 / (68 + 64))  # object + speck
    assert scores[1, 1, 0] == 1.0  # the speck dropped
    assert scores[2, 1, 0] == 0.0 and scores[0, 0, 0] < 0.2
    best = choose(scores, thresholds, areas)
    assert (best.threshold, best.min_area, best.score) == (0.5, 5, 1.0)


def test_nested_scores_each_fold_with_the_choice_of_the_others():
    truth = np.stack([square()] * 4)
    probs = np.zeros((4, 32, 32), np.uint8)
    probs[:2] = 102  # fold 0: background 0.4, object 0.6 -> needs 0.5
    probs[:2][truth[:2]] = 153
    probs[2:] = 25  # fold 1: background 0.1, object 0.4 -> needs 0.35
    probs[2:][truth[2:]] = 102
    fold = np.array([0, 0, 1, 1])
    thresholds, areas = [0.35, 0.5], [0]
    scores = grid_scores(probs, truth, thresholds, areas)
    everything = 2 * 64 / (1024 + 64)  # fold 0 at 0.35: every pixel predicted
    best = choose(scores, thresholds, areas)
    assert best.threshold == 0.35 and best.score == pytest.approx((2 * everything + 2) / 4)
    honest, choices = nested(scores, fold, thresholds, areas)
    assert [c.threshold for c in choices] == [0.35, 0.5]  # fold 0 chosen on fold 1's images, and back
    np.testing.assert_allclose(honest, [everything, everything, 0, 0], rtol=1e-6)
    assert honest.mean() < best.score


def test_to_masks_resizes_to_the_image_and_scales_the_min_area():
    probs = np.zeros((2, 32, 32), np.uint8)
    probs[0][square()] = 255
    probs[1, 2:4, 2:4] = 255  # 4 pixels at 32 x 32, about 12 at 64 x 48
    masks = to_masks(probs, (64, 48), [0.5, 0.5], [3, 3])
    assert masks.shape == (2, 64, 48) and masks.dtype == bool
    assert abs(int(masks[0].sum()) - 64 * 3) <= 16  # the square's area times 3 (64 * 48 / 32**2)
    assert masks[1].sum() > 0
    assert not to_masks(probs, (64, 48), [0.5, 0.5], [3, 5])[1].any()  # 5 pixels at 32 px = 15 here
