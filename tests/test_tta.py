from functools import partial

import numpy as np
import pytest
import torch

from pipeline.core.config import load_config
from pipeline.core.errors import PipelineError
from pipeline.scoring.metrics import score
from pipeline.training.inference import view_table
from pipeline.training.runtime import Runtime
from pipeline.training.tta import apply_view, choose_views, merge, nested_views, random_affine, tta_logits

NORM = {"mean": [0.5] * 3, "std": [0.25] * 3}
TO_INPUT = partial(Runtime().to_input, norm=NORM)
VIEWS = ["identity", "hflip", "vflip", "rot90", "rot180", "rot270", "scale1.25", "random0", "random1"]


class _Tiny(torch.nn.Module):
    """Position-sensitive toy network with global pooling, so views give other outputs and any size works."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8 * 4, 4)

    def forward(self, x):
        return self.fc(torch.nn.functional.adaptive_avg_pool2d(self.conv(x), 2).flatten(1))


@pytest.fixture
def images():
    return np.random.default_rng(0).integers(0, 255, (10, 8, 8, 3), dtype=np.uint8)


def test_batched_views_equal_view_by_view(images):
    model = _Tiny()
    together = tta_logits(model, images, VIEWS, TO_INPUT, batch_size=4)
    assert together.shape == (len(VIEWS), 10, 4)
    for i, view in enumerate(VIEWS):
        alone = tta_logits(model, images, [view], TO_INPUT, batch_size=3)  # other batch size too
        np.testing.assert_allclose(together[i], alone[0], atol=1e-5, err_msg=view)
    assert not np.allclose(together[0], together[1])


def test_fixed_views_are_the_geometric_transforms(images):
    x = TO_INPUT(torch.from_numpy(images).permute(0, 3, 1, 2))
    assert torch.equal(apply_view("hflip", x), x.flip(3))
    assert torch.equal(apply_view("rot180", x), x.flip(2).flip(3))
    assert torch.equal(apply_view("rot90", apply_view("rot270", x)), x)
    assert apply_view("scale1.25", x).shape[-1] == 10


def test_random_views_are_seeded_and_differ():
    model, images = _Tiny(), np.random.default_rng(1).integers(0, 255, (6, 8, 8, 3), dtype=np.uint8)
    a = tta_logits(model, images, ["random0", "random1"], TO_INPUT, 6, seed=3)
    b = tta_logits(model, images, ["random0", "random1"], TO_INPUT, 2, seed=3)
    c = tta_logits(model, images, ["random0"], TO_INPUT, 6, seed=4)
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert not np.allclose(a[0], a[1]) and not np.allclose(a[0], c[0])


def test_merges_on_hand_computed_case():
    logits = np.log(np.array([[[0.5, 0.5]], [[0.9, 0.1]]], dtype=np.float32))  # two views, one row
    np.testing.assert_allclose(merge(logits, "mean"), [[0.7, 0.3]], atol=1e-6)
    geo = np.sqrt([0.45, 0.05])
    np.testing.assert_allclose(merge(logits, "geometric"), [geo / geo.sum()], atol=1e-6)


def test_mean_of_logits_is_the_geometric_merge_so_it_is_not_offered():
    """softmax(mean z) = softmax(mean log_softmax z) for any logits: log_softmax subtracts one constant per
    row and view, the mean of those constants is one constant per row, and softmax ignores it."""
    z = np.random.default_rng(0).normal(0, 4, (5, 7, 6)).astype(np.float32) + np.arange(5)[:, None, None] * 3
    mean_of_logits = torch.from_numpy(z).mean(0).softmax(-1).numpy()
    np.testing.assert_allclose(merge(z, "geometric"), mean_of_logits, atol=1e-6)
    refused = r"predict.tta_merge': Input should be 'mean' or 'geometric' \(got 'logits'\)"
    with pytest.raises(PipelineError, match=refused):
        load_config(None, ["predict.tta_merge=logits"])
    with pytest.raises(ValueError, match="use one of mean, geometric"):
        merge(z, "logits")


def test_random_view_ranges_come_from_the_config(images):
    theta = random_affine(2000, seed=0, k=1, degrees=30.0, scale=0.2, shift=0.1)
    zoom = 1 / theta[:, 0, :2].norm(dim=1)  # each row of the rotation part has norm 1 / zoom
    angle = torch.rad2deg(torch.atan2(theta[:, 1, 0], theta[:, 0, 0]))
    assert 0.8 <= zoom.min() < 0.81 and 1.19 < zoom.max() <= 1.2
    assert -30 <= angle.min() < -29.5 and 29.5 < angle.max() <= 30
    assert 0.19 < theta[:, :, 2].abs().max() <= 0.2  # a shift of 0.1 of the side: 0.2 in affine_grid's [-1, 1]
    model = _Tiny()
    still = tta_logits(model, images, ["identity", "random0"], TO_INPUT, 4, degrees=0.0, scale=0.0, shift=0.0)
    np.testing.assert_allclose(still[1], still[0], atol=1e-5)  # zero ranges: the random view is the image itself
    moved = tta_logits(model, images, ["identity", "random0"], TO_INPUT, 4)
    assert not np.allclose(moved[1], moved[0], atol=1e-3)
    cfg = load_config(None, ["predict.tta_random_degrees=30", "predict.tta_random_scale=0.2",
                             "predict.tta_random_shift=0.1"]).predict
    assert (cfg.tta_random_degrees, cfg.tta_random_scale, cfg.tta_random_shift) == (30, 0.2, 0.1)


def _as_logits(proba):
    return np.log(np.asarray(proba, dtype=np.float32))


def test_auto_policy_drops_a_view_that_hurts_oof():
    y = np.array([0, 1, 0, 1, 1, 0])
    good = np.eye(2)[y] * 0.8 + 0.1
    bad = np.eye(2)[1 - y] * 0.9 + 0.05
    per_view = _as_logits(np.stack([good, bad]))
    assert choose_views(per_view, y, "accuracy", "auto") == [0]
    assert choose_views(per_view, y, "accuracy", "all") == [0, 1]
    assert choose_views(per_view[::-1], y, "log_loss", "auto") == [1]


def test_auto_policy_keeps_a_view_that_helps():
    y = np.array([0, 0, 1, 1])
    a = np.array([[0.9, 0.1], [0.45, 0.55], [0.2, 0.8], [0.2, 0.8]])   # weakly wrong on row 1
    b = np.array([[0.45, 0.55], [0.9, 0.1], [0.2, 0.8], [0.2, 0.8]])   # weakly wrong on row 0
    assert choose_views(_as_logits(np.stack([a, b])), y, "accuracy", "auto") == [0, 1]


def test_unknown_view_is_a_config_error():
    with pytest.raises(PipelineError, match="unknown TTA view 'flip'"):
        load_config(None, ["predict.tta=[identity,flip]"])
    assert load_config(None, ["predict.tta=[identity,scale0.9,random3]"]).predict.tta[-1] == "random3"


def _two_class_views(p_true_by_view: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(n_views, n, 2) logits whose probability of the true class y is p_true_by_view."""
    p = np.where(np.eye(2, dtype=bool)[y][None], p_true_by_view[..., None], 1 - p_true_by_view[..., None])
    return _as_logits(p)


def test_nested_tta_score_is_lower_when_a_view_helps_on_one_fold_only():
    """5 folds of 20 rows. identity is weakly wrong on 6 rows of fold 0 and right elsewhere; hflip is right on
    fold 0 and surely wrong on one row of each other fold. On all rows hflip alone wins (96 right vs 94) and
    the greedy keeps it alone: in-sample 0.96. Chosen without fold 0, identity wins (80/80 vs 76/80) and
    costs fold 0 its 6 rows; chosen without fold k > 0, hflip wins and costs 1 row: nested 0.90."""
    y, folds = np.arange(100) % 2, np.arange(100) // 20
    identity, hflip = np.full(100, 0.9), np.full(100, 0.9)
    identity[:6] = 0.45
    hflip[[20, 40, 60, 80]] = 0.05
    logits = _two_class_views(np.stack([identity, hflip]), y)
    chosen = choose_views(logits, y, "accuracy", "auto")
    assert chosen == [1] and score("accuracy", y, merge(logits[chosen])) == 0.96
    nested, by_fold = nested_views(logits, y, folds, "accuracy", "auto")
    assert by_fold == {0: [0], 1: [1], 2: [1], 3: [1], 4: [1]}
    assert score("accuracy", y, nested) == 0.90
    table = view_table(logits, chosen, ["identity", "hflip"], y, "accuracy", "mean", nested)
    assert table["kept (hflip)"] == 0.96 and table["kept, nested (chosen on the other folds)"] == 0.90


def test_nested_tta_score_equals_in_sample_when_one_view_dominates():
    rng = np.random.default_rng(0)
    y, folds = rng.integers(0, 2, 200), np.arange(200) % 5
    logits = _two_class_views(np.stack([np.full(200, 0.8), rng.random(200), rng.random(200)]), y)
    chosen = choose_views(logits, y, "accuracy", "auto")
    nested, by_fold = nested_views(logits, y, folds, "accuracy", "auto")
    assert chosen == [0] and all(v == [0] for v in by_fold.values())
    np.testing.assert_array_equal(nested, merge(logits[chosen]))
    assert nested_views(logits, y, folds, "accuracy", "all")[1] == {k: [0, 1, 2] for k in range(5)}


def test_tta_choice_for_each_fold_never_sees_that_fold(monkeypatch):
    """Row identities planted in view 0's logits: the choice for held-out fold k receives exactly the other
    folds' rows."""
    import pipeline.training.tta as tta

    y, folds = np.arange(60) % 2, np.arange(60) % 3
    logits = _two_class_views(np.stack([np.full(60, 0.8), np.full(60, 0.7)]), y)
    logits[0, :, 0] = np.arange(60) * 1e-3
    seen, real = [], tta.choose_views

    def spy(lg, *args, **kwargs):
        seen.append(set(np.rint(lg[0, :, 0] * 1e3).astype(int).tolist()))
        return real(lg, *args, **kwargs)

    monkeypatch.setattr(tta, "choose_views", spy)
    tta.nested_views(logits, y, folds, "accuracy", "auto")
    assert seen == [set(np.flatnonzero(folds != k).tolist()) for k in range(3)]
