"""Vectorised box machinery against the course's loop implementations and its printed examples."""

import torch
from torchvision.ops import batched_nms, box_iou

from pipeline.detection.boxes import (
    assign_anchors,
    box_voting,
    center_to_corner,
    corner_to_center,
    mirror_boxes,
    mirror_index,
    multibox_detection,
    multibox_prior,
    multibox_target,
    offset_boxes,
    offset_inverse,
)
from pipeline.detection.reference import assign_anchor_to_bbox as ref_assign
from pipeline.detection.reference import nms as ref_nms
from pipeline.detection.tinyssd import ANCHORS_PER_PIXEL, TinySSD


def _random_boxes(n: int, gen: torch.Generator) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=gen) * 0.7
    wh = torch.rand(n, 2, generator=gen) * 0.3 + 0.02
    return torch.cat((xy, xy + wh), 1)


def test_prior_matches_the_course_shape_and_first_anchors():
    anchors = multibox_prior(561, 728, sizes=[0.75, 0.5, 0.25], ratios=[1, 2, 0.5])
    assert anchors.shape == (1, 2042040, 4)
    boxes = anchors.reshape(561, 728, 5, 4)
    expected = torch.tensor([0.06, 0.07, 0.63, 0.82])  # the course prints boxes[250, 250, 0, :]
    assert torch.allclose(boxes[250, 250, 0], expected, atol=0.005)


def test_corner_center_round_trip():
    boxes = _random_boxes(50, torch.Generator().manual_seed(0))
    assert torch.allclose(center_to_corner(corner_to_center(boxes)), boxes, atol=1e-6)
    anchors = _random_boxes(50, torch.Generator().manual_seed(1))
    assert torch.allclose(offset_inverse(anchors, offset_boxes(anchors, boxes, eps=0)), boxes, atol=1e-5)


def test_the_course_labelling_example():
    gt = torch.tensor([[0, 0.1, 0.08, 0.52, 0.92], [1, 0.55, 0.2, 0.9, 0.88]])
    anchors = torch.tensor([[0, 0.1, 0.2, 0.3], [0.15, 0.2, 0.4, 0.4], [0.63, 0.05, 0.88, 0.98],
                            [0.66, 0.45, 0.8, 0.8], [0.57, 0.3, 0.92, 0.9]])
    offsets, mask, classes = multibox_target(anchors.unsqueeze(0), gt.unsqueeze(0))
    assert classes.tolist() == [[0, 1, 2, 0, 2]]
    assert mask.tolist() == [[0.0] * 4 + [1.0] * 8 + [0.0] * 4 + [1.0] * 4]
    expected = torch.tensor([0, 0, 0, 0, 1.40, 10.0, 2.59, 7.18, -1.20, 0.269, 1.68, -1.57, 0, 0, 0, 0,
                             -0.571, -1.00, 4.17e-6, 0.626])
    assert torch.allclose(offsets[0], expected, atol=0.01)


def test_batched_assignment_equals_the_course_loop_on_random_batches():
    gen = torch.Generator().manual_seed(0)
    anchors = multibox_prior(8, 8, [0.2, 0.35], [1, 2, 0.5]).reshape(-1, 4)
    for _ in range(5):
        counts = torch.randint(1, 6, (4,), generator=gen)
        gt = torch.full((4, 6, 4), 0.0)
        valid = torch.zeros(4, 6, dtype=torch.bool)
        for i, c in enumerate(counts.tolist()):
            gt[i, :c] = _random_boxes(c, gen)
            valid[i, :c] = True
        got = assign_anchors(anchors, gt, valid)
        for i, c in enumerate(counts.tolist()):
            assert torch.equal(got[i], ref_assign(gt[i, :c], anchors))


def test_assignment_breaks_ties_as_the_course_does():
    """Boxes centred between anchors tie in IoU (and with each other): the course's argmax takes the
    first anchor, then the first box; crowded images make the greedy steps go past the best pairs."""
    anchors = multibox_prior(4, 4, [0.5], [1]).reshape(-1, 4)
    centred = torch.tensor([0.25, 0.25, 0.75, 0.75])
    cases = [centred[None].repeat(3, 1), torch.stack((centred, centred + 0.125, centred - 0.125, centred)),
             torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0], [0.25, 0.0, 0.75, 0.5]])]
    gt, valid = torch.zeros(len(cases), 4, 4), torch.zeros(len(cases), 4, dtype=torch.bool)
    for i, boxes in enumerate(cases):
        gt[i, :len(boxes)], valid[i, :len(boxes)] = boxes, True
    got = assign_anchors(anchors, gt, valid)
    for i, boxes in enumerate(cases):
        assert torch.equal(got[i], ref_assign(boxes, anchors)), i
        assert (got[i] >= 0).sum() >= len(boxes)


def test_padding_rows_are_ignored():
    anchors = multibox_prior(4, 4, [0.3], [1, 2]).reshape(1, -1, 4)
    one = torch.tensor([[[0, 0.1, 0.1, 0.4, 0.4]]])
    padded = torch.tensor([[[0, 0.1, 0.1, 0.4, 0.4], [-1, 0, 0, 0, 0], [-1, 0, 0, 0, 0]]])
    for a, b in zip(multibox_target(anchors, one), multibox_target(anchors, padded), strict=True):
        assert torch.equal(a, b)


def test_the_course_nms_example():
    anchors = torch.tensor([[0.1, 0.08, 0.52, 0.92], [0.08, 0.2, 0.56, 0.95], [0.15, 0.3, 0.62, 0.91],
                            [0.55, 0.2, 0.9, 0.88]])
    cls_probs = torch.tensor([[0.0] * 4, [0.9, 0.8, 0.7, 0.1], [0.1, 0.2, 0.3, 0.9]])
    out = multibox_detection(cls_probs.unsqueeze(0), torch.zeros(1, 16), anchors.unsqueeze(0), nms_threshold=0.5)
    expected = torch.tensor([[0, 0.9, 0.1, 0.08, 0.52, 0.92], [1, 0.9, 0.55, 0.2, 0.9, 0.88],
                             [-1, 0.8, 0.08, 0.2, 0.56, 0.95], [-1, 0.7, 0.15, 0.3, 0.62, 0.91]])
    assert torch.allclose(out[0], expected, atol=1e-6)


def test_batched_class_aware_nms_equals_per_class_loop_nms():
    gen = torch.Generator().manual_seed(3)
    b, a, c = 3, 60, 3
    anchors = _random_boxes(a, gen)
    probs = torch.rand(b, c + 1, a, generator=gen).softmax(1)
    out = multibox_detection(probs, torch.zeros(b, a * 4), anchors, nms_threshold=0.4, pos_threshold=0.0)
    for i in range(b):
        conf, cls = probs[i, 1:].max(0)
        expected = set()
        for k in range(c):
            idx = torch.nonzero(cls == k).reshape(-1)
            expected |= {(k, round(conf[j].item(), 5)) for j in idx[ref_nms(anchors[idx], conf[idx], 0.4)].tolist()}
        got = {(int(r[0]), round(r[1].item(), 5)) for r in out[i] if r[0] >= 0}
        assert got == expected


def test_mirror_index_finds_every_anchor_mirror_image():
    for side in (256, 200):  # 200 px: odd feature maps (25, 12, 6, 3, 1)
        model = TinySSD(1).eval()
        with torch.no_grad():
            anchors = model(torch.zeros(1, 3, side, side))[0][0]
        mirror = mirror_index(model.feature_shapes, ANCHORS_PER_PIXEL)
        assert sorted(mirror.tolist()) == list(range(len(anchors)))
        assert torch.allclose(anchors[mirror], mirror_boxes(anchors), atol=1e-6)


def test_box_voting_equals_a_loop_over_kept_boxes():
    gen = torch.Generator().manual_seed(5)
    boxes, scores = _random_boxes(300, gen), torch.rand(300, generator=gen)
    groups = torch.randint(0, 4, (300,), generator=gen)
    keep = batched_nms(boxes, scores, groups, 0.5)
    voted = box_voting(boxes, scores, groups, keep, 0.6, max_elements=200)  # many small chunks
    assert torch.equal(voted, box_voting(boxes, scores, groups, keep, 0.6, max_elements=1))  # one kept box a chunk
    assert torch.allclose(voted, box_voting(boxes, scores, groups, keep, 0.6), atol=1e-6)  # one chunk
    for row, k in zip(voted, keep.tolist(), strict=True):
        near = [j for j in range(300)
                if groups[j] == groups[k] and box_iou(boxes[k:k + 1], boxes[j:j + 1]).item() >= 0.6]
        expected = (scores[near, None] * boxes[near]).sum(0) / scores[near].sum()
        assert torch.allclose(row, expected, atol=1e-6)


def test_tinyssd_outputs_the_course_shapes():

    anchors, cls, bbox = TinySSD(num_classes=1).eval()(torch.zeros(2, 3, 256, 256))
    assert anchors.shape == (1, 5444, 4) and cls.shape == (2, 5444, 2) and bbox.shape == (2, 21776)
    offsets, mask, classes = multibox_target(anchors,
                                             torch.tensor([[[0, 0.1, 0.1, 0.5, 0.6]], [[0, 0.4, 0.3, 0.9, 0.8]]]))
    assert offsets.shape == bbox.shape and classes.shape == cls.shape[:2] and classes.max() == 1


def test_banana_competition_is_deterministic_and_boxes_are_tight(tmp_path):
    import numpy as np
    import pandas as pd
    from PIL import Image

    from pipeline.detection.bananas import SIZE, build_bananas

    a = build_bananas(tmp_path / "a", n_train=6, n_val=2, n_test=2, seed=1)
    b = build_bananas(tmp_path / "b", n_train=6, n_val=2, n_test=2, seed=1)
    train = pd.read_csv(a / "train.csv")
    assert train.equals(pd.read_csv(b / "train.csv")) and len(train) == 6 and set(train.label) == {"banana"}
    assert (a / "images" / "train_0003.png").read_bytes() == (b / "images" / "train_0003.png").read_bytes()
    assert ((train.xmin >= 0) & (train.ymin >= 0) & (train.xmax <= SIZE) & (train.ymax <= SIZE)).all()
    assert ((train.xmax - train.xmin) >= 20).all() and list(pd.read_csv(a / "test.csv").columns) == ["image"]
    row = train.iloc[0]
    img = np.asarray(Image.open(a / row.image)).astype(int)
    inside = img[row.ymin:row.ymax, row.xmin:row.xmax]
    yellow = (inside[..., 0] > 150) & (inside[..., 1] > 120) & (inside[..., 2] < 140)
    assert yellow[:, 0].any() or yellow[:, 1].any()  # the object reaches the box's left edge ...
    assert yellow[0, :].any() or yellow[1, :].any()  # ... and its top edge: the box is tight


def test_box_voting_compares_kept_boxes_with_their_own_groups_only(monkeypatch):
    """Memory: the IoU matrices cover a kept box's own group (image, class), within max_elements, never the
    whole batch's candidates (6.6 GB for 50 validation images of an untrained TinySSD before)."""
    from pipeline.detection import boxes as boxes_module

    gen = torch.Generator().manual_seed(7)
    n, n_groups = 4000, 40
    boxes, scores = _random_boxes(n, gen), torch.rand(n, generator=gen)
    groups = torch.randint(0, n_groups, (n,), generator=gen)
    keep = batched_nms(boxes, scores, groups, 0.5)
    sizes, real_iou = [], boxes_module.box_iou

    def recording_iou(a, b):
        sizes.append(a.shape[0] * b.shape[0])
        return real_iou(a, b)

    monkeypatch.setattr(boxes_module, "box_iou", recording_iou)
    budget = 3 * int(torch.bincount(groups).max())  # room for a few kept boxes of the biggest group
    voted = box_voting(boxes, scores, groups, keep, 0.6, max_elements=budget)
    assert max(sizes) <= budget and sum(sizes) < len(keep) * n / 10
    monkeypatch.setattr(boxes_module, "box_iou", real_iou)
    assert torch.allclose(voted, box_voting(boxes, scores, groups, keep, 0.6, max_elements=1 << 30), atol=1e-6)
