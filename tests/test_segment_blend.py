"""Blends of segmentation members chosen on OOF: hand-made probability maps where the right blend is known (two
members each right on half the images, a harmful member), and the nested figure computed without the held fold."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.segmentation.blend import Blended, blend_maps, blend_scores, candidate_weights, choose_blend, nested_blend
from pipeline.segmentation.metrics import dice
from pipeline.segmentation.post import grid_scores, nested

SIZE = 16


def truth(n: int) -> np.ndarray:
    """(n, 1, S, S) uint8: a square per image, placed differently in each."""
    out = np.zeros((n, 1, SIZE, SIZE), np.uint8)
    for i in range(n):
        out[i, 0, i % 4:i % 4 + 8, 2:10] = 1
    return out


def maps(t: np.ndarray, fg: int, bg: int) -> np.ndarray:
    """uint8 probability maps: `fg` on the truth's pixels, `bg` elsewhere."""
    return np.where(t.astype(bool), fg, bg).astype(np.uint8)


class Unreadable:
    """A member that fails the test if any of its pixels is read."""

    shape = (8, 1, SIZE, SIZE)

    def __getitem__(self, index):
        raise AssertionError("a member of weight 0 was read")


def test_candidates_are_singles_then_the_mean_then_the_grid():
    w = candidate_weights(2, 4)
    np.testing.assert_allclose(w, [[1, 0], [0, 1], [0.5, 0.5], [0.25, 0.75], [0.75, 0.25]])
    three = candidate_weights(3, 10)
    assert len(three) == 66 + 1  # the grid's (10+2 choose 2) points, and the mean (1/3 each) which is not on it
    np.testing.assert_allclose(three.sum(1), 1)
    assert (three >= 0).all()
    np.testing.assert_allclose(three[3], [1 / 3] * 3)


def test_two_members_each_right_on_half_the_images_blend_to_beat_both():
    t = truth(8)
    a = np.concatenate([maps(t[:4], 255, 0), maps(t[4:], 102, 153)])  # right on 0-3, inverted (0.4 / 0.6) on 4-7
    b = np.concatenate([maps(t[:4], 102, 153), maps(t[4:], 255, 0)])
    w = candidate_weights(2, 10)
    scores = blend_scores([a, b], t, w, chunk=3)
    assert scores.shape == (len(w), 8, 1)
    assert scores[0].mean() == pytest.approx(0.5) and scores[1].mean() == pytest.approx(0.5)  # each alone
    best = choose_blend(scores)
    np.testing.assert_allclose(w[best], [0.5, 0.5])  # the mean: first of the perfect blends
    assert scores[best].mean() == 1.0
    np.testing.assert_array_equal(Blended([a, b], w[best])[2:6], blend_maps([a[2:6], b[2:6]], w[best]))
    assert (dice(Blended([a, b], w[best])[:] >= 128, t.astype(bool)) == 1).all()


def test_a_harmful_member_gets_weight_zero_and_is_never_read():
    t = truth(8)
    a = maps(t, 140, 115)  # right but unsure (0.55 / 0.45)
    b = maps(t, 0, 255)  # confidently inverted: any weight on it (>= 0.1) pulls the object under 0.5
    w = candidate_weights(2, 10)
    scores = blend_scores([a, b], t, w)
    best = choose_blend(scores)
    np.testing.assert_allclose(w[best], [1, 0])
    means = scores.mean(axis=(1, 2))
    assert means[best] == 1.0 and (means[w[:, 1] > 0] < 1).all()
    blended = Blended([a, Unreadable()], w[best])
    assert blended[3:5] is not None and (blended[:] == a).all()  # weight 1: the member's own maps, exactly


def test_nested_blend_choice_never_sees_the_held_fold():
    """Member a is right on fold 0 and inverted on fold 1, b the reverse. Chosen on all images, either alone
    scores 0.5; a choice that saw the held fold would score it 1. Nested, fold 0 gets the blend chosen on fold 1 (b
    alone) and scores 0, and fold 1 gets a alone and scores 0."""
    t = truth(8)
    fold = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    a = np.concatenate([maps(t[:4], 255, 0), maps(t[4:], 0, 255)])
    b = np.concatenate([maps(t[:4], 0, 255), maps(t[4:], 255, 0)])
    w = candidate_weights(2, 10)
    scores = blend_scores([a, b], t, w)
    assert scores[choose_blend(scores)].mean() == pytest.approx(0.5)
    honest, choices = nested_blend(scores, fold)
    assert choices == {0: 1, 1: 0}
    assert honest.shape == (8, 1) and honest.max() == 0.0
    # the post-processing nested on top: each fold's table is that of its own blend, chosen without it
    thresholds, areas = [0.3, 0.5, 0.7], [0, 16]
    tables = {k: grid_scores(Blended([a, b], w[i]).of_class(0), t[:, 0], thresholds, areas)
              for k, i in choices.items()}
    post, picks = nested(tables, fold, thresholds, areas)
    assert post.max() == 0.0 and len(picks) == 2
    # the same call with one table for every fold (the chosen blend's, a alone): fold 0 scores 1 there
    single, _ = nested(tables[1], fold, thresholds, areas)
    np.testing.assert_allclose(single, [1, 1, 1, 1, 0, 0, 0, 0])
