"""Anchor labelling and NMS: the vectorised, batched versions vs the course's loops, same run.

TinySSD's 5,444 anchors (feature maps 32, 16, 8, 4, 1 with 4 anchors per pixel) and a batch of 32
images with 1 to 8 boxes each (and with one each, like the bananas). Labelling:
pipeline.detection.boxes.multibox_target for the batch vs the course's per-image assign_anchor_to_bbox
loop. NMS: torchvision's batched_nms over all images (class-aware) vs the course's Python-loop NMS per
image and class. Both must agree; prints median ratios and their spread over interleaved rounds.

    .venv/bin/python benchmarks/detection.py [--device cuda]
"""

from __future__ import annotations

import argparse

import torch
from timing import interleaved, median, ratio_text, seconds

from pipeline.detection import reference
from pipeline.detection.boxes import assign_anchors, multibox_detection, multibox_prior

SIZES = [[0.2, 0.272], [0.37, 0.447], [0.54, 0.619], [0.71, 0.79], [0.88, 0.961]]
RATIOS = [1, 2, 0.5]


def tinyssd_anchors() -> torch.Tensor:
    return torch.cat([multibox_prior(s, s, sz, RATIOS) for s, sz in zip((32, 16, 8, 4, 1), SIZES, strict=True)],
                     1).reshape(-1, 4)


def batch_boxes(b: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    gt, valid = torch.zeros(b, 8, 4), torch.zeros(b, 8, dtype=torch.bool)
    for i in range(b):
        n = int(torch.randint(1, 9, (1,), generator=gen))
        xy = torch.rand(n, 2, generator=gen) * 0.7
        gt[i, :n] = torch.cat((xy, xy + torch.rand(n, 2, generator=gen) * 0.3 + 0.05), 1)
        valid[i, :n] = True
    return gt, valid


def synced(fn) -> float:
    """Seconds of fn() with the GPU's queue drained before and after."""
    sync()
    return seconds(lambda: (fn(), sync()))


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def labelling(anchors: torch.Tensor, boxes: torch.Tensor, real: torch.Tensor, what: str, repeats: int) -> None:
    b = len(boxes)
    course = lambda: [reference.assign_anchor_to_bbox(boxes[i, real[i]], anchors) for i in range(b)]  # noqa: E731
    batched = lambda: assign_anchors(anchors, boxes, real)  # noqa: E731
    ref, got = course(), batched()
    assert all(torch.equal(got[i], ref[i]) for i in range(b)), "labelling disagrees with the course"
    t = interleaved({"loop": course, "batched": batched}, repeats, measure=synced)
    print(f"anchor labelling, {b} images x {len(anchors)} anchors, {what} each: "
          f"course loop {median(t['loop']) * 1000:.1f} ms, "
          f"batched {median(t['batched']) * 1000:.1f} ms (medians), ratio {ratio_text(t['loop'], t['batched'], 1)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--repeats", type=int, default=10,
                        help="interleaved rounds of labelling (NMS: a third of them)")
    args = parser.parse_args()
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    anchors, b = tinyssd_anchors().to(device), 32
    gt, valid = (t.to(device) for t in batch_boxes(b, gen))
    assign_anchors(anchors, gt, valid)  # warm-up (cuda context, kernels)
    for what, g in (("1-8 boxes", gt.shape[1]), ("1 box (the bananas)", 1)):
        labelling(anchors, gt[:, :g].contiguous(), valid[:, :g].contiguous(), what, args.repeats)
    # one class + background, like the bananas
    probs = torch.rand(b, 2, len(anchors), generator=gen).softmax(1).to(device)
    offsets = (torch.randn(b, len(anchors) * 4, generator=gen) * 0.1).to(device)

    def loop_nms():
        out = []
        for i in range(b):
            boxes = multibox_detection(probs[i:i + 1], offsets[i:i + 1], anchors, nms_threshold=1.1,
                                       pos_threshold=0.0)[0]
            out.append(len(reference.nms(boxes[:, 2:], boxes[:, 1], 0.5)))  # same decoded boxes, loop NMS
        return out

    def batched_nms():
        return multibox_detection(probs, offsets, anchors, nms_threshold=0.5, pos_threshold=0.0)

    counts = (batched_nms()[..., 0] >= 0).sum(1).tolist()
    assert counts == loop_nms(), "NMS keeps other boxes than the course's loop"
    t = interleaved({"loop": loop_nms, "batched": batched_nms}, max(1, args.repeats // 3), measure=synced)
    print(f"NMS + decoding, {b} images x {len(anchors)} boxes: course loop {median(t['loop']):.2f} s, batched "
          f"{median(t['batched']) * 1000:.1f} ms (medians), ratio {ratio_text(t['loop'], t['batched'], 0)}")


if __name__ == "__main__":
    main()
