"""From network outputs to boxes, scores, submissions, pictures and mAP.

Decoding follows d2l's multibox_detection (one class per anchor: its most likely non-
background class; offsets inverted against the anchors; class-aware NMS) with one change in order:
boxes under the score threshold are dropped before NMS instead of after. The kept set is the same,
since NMS only lets higher-scored boxes suppress lower-scored ones, and NMS has far fewer boxes to
sort. Two additions, both on by default and measured in docs/benchmarks.md: box voting (each kept box
becomes the score-weighted mean of the same-class boxes overlapping it) and mirror-image TTA. mAP
comes from torchmetrics (pycocotools backend), in pixel coordinates of the original images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torchmetrics.detection import MeanAveragePrecision
from torchvision.ops import batched_nms
from torchvision.utils import draw_bounding_boxes, make_grid

from pipeline.core.artifacts import atomic_write
from pipeline.core.config import DecodeConfig
from pipeline.core.errors import PipelineError
from pipeline.data.labels import sort_classes
from pipeline.data.table import read_table
from pipeline.detection.boxes import box_voting, mirror_boxes, mirror_index, offset_inverse
from pipeline.detection.tinyssd import outputs
from pipeline.detection.torchvision_models import TorchvisionDetector, views
from pipeline.scoring.submission import parse_prediction_strings
from pipeline.training.runtime import Runtime

TTA = ("none", "hflip")


class Detector:
    """Turns TinySSD outputs (or a torchvision detector's candidates, torchvision_models.views) into per-image
    detections (boxes in pixels, scores, 0-based classes).

    tta "hflip" also runs the mirror image and averages class probabilities and boxes anchor by
    anchor with the original's (the anchor grid is mirror-symmetric), before any thresholding.
    """

    def __init__(self, model: torch.nn.Module, decode: DecodeConfig, runtime: Runtime, tta: str = "none"):
        self.model, self.decode, self.runtime, self.tta = model, decode, runtime, tta

    def run(self, images: torch.Tensor, first: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(class probabilities (B, A, C + 1), boxes (B, A, 4) in [0, 1]) for a uint8 batch; `first` reuses
        outputs() already computed for these images."""
        if isinstance(self.model, TorchvisionDetector):  # its candidates per anchor, `first` from its candidates()
            return views(self.model, images, self.runtime, self.tta, first)
        probs, boxes = candidates(*(first or outputs(self.model, images, self.runtime)))
        if self.tta == "hflip":
            mirror = mirror_index(self.model.feature_shapes, self.model.anchors_per_pixel).to(probs.device)
            probs_m, boxes_m = candidates(*outputs(self.model, images.flip(-1), self.runtime))
            probs, boxes = (probs + probs_m[:, mirror]) / 2, (boxes + mirror_boxes(boxes_m[:, mirror])) / 2
        return probs, boxes

    def select(self, probs: torch.Tensor, boxes: torch.Tensor, sizes: torch.Tensor,
               score_threshold: float) -> list[dict]:
        """Score filter, class-aware NMS, box voting, the best max_detections per image, pixels."""
        b = len(probs)
        conf, cls = probs[..., 1:].max(-1)  # (B, A)
        image, anchor = (conf >= score_threshold).nonzero(as_tuple=True)
        scores, labels, found = conf[image, anchor], cls[image, anchor], boxes[image, anchor]
        groups = image * probs.shape[-1] + labels
        keep = batched_nms(found, scores, groups, self.decode.nms_threshold)
        # batched_nms sorts by score; regroup by image, best first
        keep = keep[torch.argsort(image[keep], stable=True)]
        first = torch.searchsorted(image[keep], image[keep])
        keep = keep[torch.arange(len(keep), device=keep.device) - first < self.decode.max_detections]
        voting = self.decode.box_voting
        kept = box_voting(found, scores, groups, keep, voting) if voting else found[keep]
        scale = sizes.to(boxes.device, torch.float32).repeat(1, 2)  # (B, 4): w, h, w, h
        pixel = kept * scale[image[keep]]
        counts = torch.bincount(image[keep], minlength=b).tolist()
        return [{"boxes": bx.cpu(), "scores": sc.cpu(), "labels": lb.cpu()}
                for bx, sc, lb in zip(pixel.split(counts), scores[keep].split(counts), labels[keep].split(counts),
                                      strict=True)]

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, sizes: torch.Tensor, score_threshold: float,
                 batch_size: int) -> list[dict]:
        self.model.eval()
        out = []
        for idx in torch.arange(len(images)).split(batch_size):
            out += self.select(*self.run(images[idx]), sizes[idx], score_threshold)
        return out


def candidates(anchors: torch.Tensor, cls_logits: torch.Tensor,
               bbox_preds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Network outputs -> (class probabilities (B, A, C + 1), boxes (B, A, 4) clamped to the image)."""
    b, a, _ = cls_logits.shape
    boxes = offset_inverse(anchors.reshape(1, a, 4), bbox_preds.float().reshape(b, a, 4)).clamp(0, 1)
    return cls_logits.float().softmax(-1), boxes


def targets_in_pixels(labels: torch.Tensor, sizes: torch.Tensor) -> list[dict]:
    """(N, G, 5) normalised, padded ground truth -> torchmetrics target dicts in pixels."""
    scale = sizes.float().repeat(1, 2)[:, None, :]
    boxes = labels[..., 1:] * scale
    valid = labels[..., 0] >= 0
    return [{"boxes": boxes[i][valid[i]], "labels": labels[i, valid[i], 0].long()} for i in range(len(labels))]


def mean_average_precision(detections: list[dict], labels: torch.Tensor, sizes: torch.Tensor) -> dict:
    """COCO mAP@[.5:.95] and mAP@0.5 (pycocotools through torchmetrics)."""
    return map_of(detections, targets_in_pixels(labels, sizes))


def map_of(detections: list[dict], targets: list[dict]) -> dict:
    metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend="pycocotools")
    metric.update(detections, targets)
    result = metric.compute()
    return {"map_50": float(result["map_50"]), "map": float(result["map"])}


def class_table(detections: list[dict], targets: list[dict], classes: list[str]) -> pd.DataFrame:
    """Per class: ground-truth boxes, AP@0.5 and COCO AP@[.5:.95] (torchmetrics, pycocotools backend; -1: a
    class without boxes here)."""
    result = {}
    for name, ious in (("ap_50", [0.5]), ("ap", None)):
        metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend="pycocotools", class_metrics=True,
                                      iou_thresholds=ious)
        metric.update(detections, targets)
        out = metric.compute()
        ids = out["classes"].reshape(-1).tolist()
        result[name] = dict(zip(ids, out["map_per_class"].reshape(-1).tolist(), strict=True))
    counts = torch.bincount(torch.cat([t["labels"] for t in targets] + [torch.zeros(0, dtype=torch.long)]),
                            minlength=len(classes)).tolist()
    return pd.DataFrame({"class": classes, "boxes": counts,
                         "ap_50": [round(result["ap_50"].get(i, -1.0), 4) for i in range(len(classes))],
                         "ap": [round(result["ap"].get(i, -1.0), 4) for i in range(len(classes))]})


def prediction_strings(detections: list[dict], classes: list[str]) -> list[str]:
    """'label score xmin ymin xmax ymax ...' per image, best first (empty for an image without boxes)."""
    out = []
    for det in detections:
        names = np.asarray(classes, dtype=object)[det["labels"].numpy()]
        rows = zip(names, det["scores"].tolist(), det["boxes"].numpy().round(1).tolist(), strict=True)
        out.append(" ".join(f"{n} {s:.4f} {b[0]:.1f} {b[1]:.1f} {b[2]:.1f} {b[3]:.1f}" for n, s, b in rows))
    return out


def gallery(images: torch.Tensor, detections: list[dict], sizes: torch.Tensor, classes: list[str], path: Path,
            truth: torch.Tensor | None = None, columns: int = 4) -> Path:
    """A grid of images (as decoded at image_size) with predicted boxes in red and ground truth in green."""
    side = images.shape[-1]
    tiles = []
    for i, det in enumerate(detections):
        img = images[i]
        if truth is not None:
            valid = truth[i, :, 0] >= 0
            img = draw_bounding_boxes(img, truth[i, valid, 1:] * side, colors="lime", width=2) if valid.any() else img
        boxes = det["boxes"] / sizes[i].float().repeat(2) * side
        text = [f"{classes[c]} {s:.2f}" for c, s in zip(det["labels"].tolist(), det["scores"].tolist(), strict=True)]
        tiles.append(draw_bounding_boxes(img, boxes, labels=text, colors="red", width=2) if len(boxes) else img)
    grid = make_grid(torch.stack(tiles), nrow=columns, padding=4, pad_value=255)
    picture = Image.fromarray(grid.permute(1, 2, 0).numpy())
    return atomic_write(Path(path), lambda tmp: picture.save(tmp, format="PNG"))


def submission_frame(images: pd.DataFrame, detections: list[dict], classes: list[str]) -> pd.DataFrame:
    return pd.DataFrame({"image": images["image"].to_numpy(),
                         "PredictionString": prediction_strings(detections, classes)})


def score_submission(submission_csv: Path, solution_csv: Path) -> dict:
    """mAP of a detection submission against a hidden solution (one row per box, as train.csv)."""
    sub, sol = read_table(Path(submission_csv)), read_table(Path(solution_csv))
    for frame, cols, name in ((sub, ["image", "PredictionString"], submission_csv),
                              (sol, ["image", "label", "xmin", "ymin", "xmax", "ymax"], solution_csv)):
        missing = [c for c in cols if c not in frame.columns]
        if missing:
            raise PipelineError(f"{name}: missing column(s) {missing}")
    images = sol["image"].drop_duplicates().tolist()
    absent = sorted(set(images) - set(sub["image"]))
    if absent:
        raise PipelineError(f"{submission_csv}: no row for image '{absent[0]}' ({len(absent)} missing); "
                            "predict every test image")
    classes = sort_classes(sorted(set(sol["label"]) - {""}))
    by_image = dict(zip(sub["image"],
                        [{k: torch.from_numpy(v) for k, v in det.items()} for det in
                         parse_prediction_strings(sub["PredictionString"].tolist(), classes, str(submission_csv))],
                        strict=True))
    boxes = sol[sol["label"] != ""]
    grouped = {k: g for k, g in boxes.groupby("image", sort=False)}
    index = {c: i for i, c in enumerate(classes)}
    targets = []
    for image in images:
        g = grouped.get(image, boxes.iloc[:0])
        targets.append({"boxes": torch.tensor(g[["xmin", "ymin", "xmax", "ymax"]].to_numpy(dtype=np.float32))
                                 .reshape(-1, 4),
                        "labels": torch.tensor([index[v] for v in g["label"]], dtype=torch.long)})
    return map_of([by_image[i] for i in images], targets)
