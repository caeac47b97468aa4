import numpy as np
import torch

from pipeline.predict import choose_views, tta_proba


class _Tiny(torch.nn.Module):
    """Position-sensitive toy network, so a flipped view gives other probabilities."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = torch.nn.Linear(3 * 6 * 6, 4)

    def forward(self, x):
        return self.fc(x.flatten(1))


def test_batched_views_equal_view_by_view():
    images = np.random.default_rng(0).integers(0, 255, (10, 6, 6, 3), dtype=np.uint8)
    norm = {"mean": [0.5] * 3, "std": [0.25] * 3}
    model = _Tiny()
    both = tta_proba(model, images, ["identity", "hflip"], norm, torch.device("cpu"), batch_size=4)
    one = tta_proba(model, images, ["identity"], norm, torch.device("cpu"), batch_size=3)
    flip = tta_proba(model, images[:, :, ::-1], ["identity"], norm, torch.device("cpu"), batch_size=7)
    assert both.shape == (2, 10, 4)
    np.testing.assert_allclose(both[0], one[0], atol=1e-6)
    np.testing.assert_allclose(both[1], flip[0], atol=1e-6)
    assert not np.allclose(both[0], both[1])


def test_auto_policy_drops_a_view_that_hurts_oof():
    y = np.array([0, 1, 0, 1, 1, 0])
    good = np.eye(2)[y] * 0.8 + 0.1
    bad = np.eye(2)[1 - y] * 0.9 + 0.05
    per_view = np.stack([good, bad])
    assert choose_views(per_view, y, "accuracy", "auto") == [0]
    assert choose_views(per_view, y, "accuracy", "all") == [0, 1]
    assert choose_views(per_view[::-1], y, "log_loss", "auto") == [1]


def test_auto_policy_keeps_a_view_that_helps():
    y = np.array([0, 0, 1, 1])
    a = np.array([[0.9, 0.1], [0.45, 0.55], [0.2, 0.8], [0.2, 0.8]])   # weakly wrong on row 1
    b = np.array([[0.45, 0.55], [0.9, 0.1], [0.2, 0.8], [0.2, 0.8]])   # weakly wrong on row 0
    assert choose_views(np.stack([a, b]), y, "accuracy", "auto") == [0, 1]
