"""The detection track's config (`detect.*`), one section per part of the stage, so that each step's cache key
is the dump of exactly the sections it reads (pipeline/stages/detect.py):

- train: model, train, augment, anchors (and the training and validation images' key)
- evaluate (detect.folds.n_splits = 1): decode, evaluate
- predict (n_splits = 1): decode, predict
- the fold models' views (n_splits > 1): decode, views, evaluate but its tta (the single model's choice)
- folds and fusion: recomputed on every run from the cached views

The data section names the files; what they hold is keyed by content (the images and boxes), not by name.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from pipeline.core.config.schema import FitConfig, Section, TrainConfig, _own


class DetectDataConfig(Section):
    train_csv: str = Field("train.csv", description="one row per box: image, label, xmin, ymin, xmax, "
                                                    "ymax (pixels); empty label and box: no objects")
    val_csv: str | None = Field("val.csv", description="validation boxes in the same form; when DATA "
                                                       "lacks it, val_fraction of the training images")
    test_csv: str = Field("test.csv", description="images to detect objects in (column image)")
    val_fraction: float = Field(0.1, gt=0, lt=1, description="share of training images held "
                                                             "out when there is no val_csv")


class DetectModelConfig(Section):
    name: Literal["tinyssd", "retinanet", "fcos", "ssdlite"] = Field(
        "tinyssd", description="tinyssd: d2l's; retinanet, fcos: torchvision's on a timm backbone with an FPN; "
                               "ssdlite: torchvision's SSDlite on MobileNetV3 (docs/detection.md)")
    backbone: str = Field("resnet18", description="retinanet, fcos: timm CNN under the FPN (random init; "
                                                  "pretrained_path for weights)")
    fpn_channels: int = Field(128, ge=32, multiple_of=32,
                              description="retinanet, fcos: channels of the FPN levels and the heads "
                                          "(GroupNorm: a multiple of 32; torchvision: 256)")
    pretrained_path: str | None = Field(None, description="local state dict (.safetensors, .pt, .pth) of the whole "
                                                          "detector or of its backbone; null: random init")


class DetectTrainConfig(FitConfig):
    image_size: int = Field(256, ge=64, description="images are decoded once and resized to "
                                                    "image_size x image_size (d2l: 256)")
    epochs: int = _own("epochs", 20, "training epochs")
    batch_size: int = _own("batch_size", 16, "images per update (d2l: 32; 16 learns faster, docs/detection.md)")
    lr: float = _own("lr", 0.01, "SGD learning rate (0.01 suits loss ssd; loss course learns best at 0.05; "
                                 "d2l: 0.2 without momentum)")
    momentum: float = _own("momentum", 0.9, "SGD momentum (d2l: none; 0.9 learns faster, docs/detection.md)")
    weight_decay: float = _own("weight_decay", 5e-4, "SGD weight decay (d2l: 5e-4)")
    schedule: Literal["constant", "cosine"] = Field("cosine", description="learning rate over the epochs: constant "
                                                                          "(d2l) or cosine down to lr/100")
    warmup_epochs: float = Field(1.0, ge=0, description="linear learning-rate warmup from lr/1000 over this many "
                                                        "epochs' updates, then the schedule (torchvision's detection "
                                                        "references: 1000 iterations from lr/1000), at most half "
                                                        "of all updates; 0: none")
    loss: Literal["course", "ssd"] = Field("ssd", description="ssd (the SSD paper's): CE over positives + 3x as many "
                                                              "hard negatives and masked L1, per positive anchor; "
                                                              "course: mean CE over all anchors + mean masked L1")
    negative_ratio: float = Field(3.0, gt=0, description="ssd loss: highest-loss background anchors "
                                                         "kept per positive anchor (the SSD paper: 3)")
    hflip: bool = _own("hflip", True, "random horizontal flips of images and their boxes")
    seed: int = _own("seed", 0, "seed of weights init, batch order, flips, the validation split and the folds")
    patience: int | None = Field(None, ge=1, description="stop after this many epochs without a better validation "
                                                         "mAP@0.5 and keep the best epoch's weights (epochs is then "
                                                         "the most it trains; the schedule still spans epochs); "
                                                         "null: train every epoch, keep the last")
    restart_dead_after: int | None = Field(2, ge=1, description="FCOS: when after this epoch (or the last, if "
                                                              "sooner) validation mAP@0.5 is 0 and the GIoU box loss "
                                                              "is within 1e-4 of 1 (a dead regression ReLU never "
                                                              "learns a box), "
                                                              "restart once from scratch with seed + 1000; null: never")


class DetectAugmentConfig(Section):
    vflip: bool = Field(False, description="random vertical flips of images and their boxes")
    crop_scale: float | None = Field(None, gt=0, le=1, description="random resized crop (albumentations, half the "
                                                                   "images) keeping at least this share of the area; "
                                                                   "null: off")
    scale: float = Field(0.0, ge=0, lt=1, description="random zoom in [1 - scale, 1 + scale] (half the images)")
    shift: float = Field(0.0, ge=0, lt=1, description="random shift up to this share of the side (half the images)")
    colour: float = Field(0.0, ge=0, le=1, description="colour jitter strength: brightness, contrast, saturation "
                                                       "(hue a quarter of it)")
    mosaic: float = Field(0.0, ge=0, le=1, description="probability that a training image becomes a 2x2 mosaic "
                                                       "with three other training images")
    min_visibility: float = Field(0.3, ge=0, le=1, description="after a crop or mosaic, boxes with less than this "
                                                               "share of their area visible are dropped")


# d2l's TinySSD anchors (section 14.7): per scale, fine to coarse, sizes as a share of the image side
TINYSSD_SIZES = [[0.2, 0.272], [0.37, 0.447], [0.54, 0.619], [0.71, 0.79], [0.88, 0.961]]
TINYSSD_RATIOS = [1.0, 2.0, 0.5]


class AnchorsConfig(Section):
    mode: Literal["fixed", "auto"] = Field("fixed", description="fixed: sizes and ratios; auto: k-means of the "
                                                                "training boxes' sizes and aspect ratios (as many "
                                                                "as sizes/ratios)")
    sizes: list[list[float]] = Field(TINYSSD_SIZES, description="TinySSD anchor sizes (share of the side), per "
                                                                "scale (5 scales, fine to coarse, the same count "
                                                                "each; d2l's)")
    ratios: list[float] = Field(TINYSSD_RATIOS, description="anchor aspect ratios w/h; the first meets every "
                                                            "size, the others the first size (d2l's)")


class DecodeConfig(Section):
    nms_threshold: float = Field(0.5, gt=0, le=1, description="IoU above which NMS drops the "
                                                              "lower-scored box of the same class")
    box_voting: float | None = Field(0.5, gt=0, le=1, description="each box NMS keeps becomes the score-weighted mean "
                                                                  "of the same-class boxes overlapping it at IoU >= "
                                                                  "this (tighter boxes); null: NMS boxes as they are")
    max_detections: int = Field(100, ge=1, description="boxes kept per image, best first")


class EvaluateConfig(Section):
    tta: Literal["auto", "none", "hflip"] = Field(
        "auto", description="folds.n_splits = 1: test-time augmentation: hflip averages each anchor's predictions "
                            "with its mirror image's; auto: hflip when it scores a higher validation mAP@0.5")
    map_score_threshold: float = Field(0.01, ge=0, lt=1, description="boxes scored at least this enter mAP (low, "
                                                                     "so the precision-recall curve is complete)")


class DetectPredictConfig(Section):
    score_threshold: float = Field(0.05, ge=0, lt=1, description="submission keeps boxes scored at least "
                                                                 "this (mAP metrics reward a low threshold)")
    gallery_images: int = Field(16, ge=0, description="images drawn in each of gallery_val.png and gallery_test.png")
    gallery_score_threshold: float = Field(0.5, ge=0, lt=1, description="the galleries draw boxes scored at least this")


class DetectFoldsConfig(Section):
    n_splits: int = Field(5, ge=1, description="train one model per fold of the training images (duplicate groups "
                                               "of WORK/clean.csv kept together), OOF detections and a WBF ensemble; "
                                               "1: one model on all of train.csv, validated on val.csv or "
                                               "data.val_fraction")
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
                             description="n_splits > 1: this detector configuration's folder WORK/detect/<name> and "
                                         "its leaderboard rows; every configuration run into the same WORK joins the "
                                         "WBF blend of models (null: the model, or model-backbone)")


class ViewsConfig(Section):
    scales: list[float] = Field([1.0], description="folds.n_splits > 1: input scales of the test-time views fused "
                                                   "by WBF")
    hflip: bool = Field(True, description="folds.n_splits > 1: each scale also runs mirrored, as another WBF view")


class FusionConfig(Section):
    iou: list[float] = Field([0.4, 0.5, 0.6, 0.7], description="WBF IoU thresholds tried on OOF (the best "
                                                                "is used for test)")
    skip: list[float] = Field([0.01, 0.03, 0.1], description="WBF skip_box_thr values tried on OOF: boxes "
                                                             "scored lower do not enter the fusion")
    conf: list[Literal["avg", "max", "box_and_model_avg", "absent_model_aware_avg"]] = Field(
        ["avg", "max"], min_length=1,
        description="WBF fused-box scores tried on OOF (ensemble-boxes' conf_type): avg scales the mean score by "
                    "the share of lists that found the box, max keeps the best score")


class CropTrainConfig(TrainConfig):
    """The classification track's train section with defaults for small crops trained from scratch."""

    image_size: int = Field(64, ge=8, description="crops are resized to image_size x image_size")
    epochs: int = Field(20, ge=1, description="most training epochs per fold")
    # 32, not 64: crops from scratch learn with the number of updates; on 1,500 digits images (fold 0 of 3,
    # 12 epochs at 32 px) validation accuracy 0.75 at 64, 0.81 at 32, 0.81 at 16 for 1.4x the time of 32
    batch_size: int = Field(32, ge=1, description="crops per forward pass")
    lr: float = Field(2e-3, gt=0, description="peak learning rate")
    early_stopping: int | None = Field(4, ge=1, description="stop after this many epochs without a better "
                                                            "validation accuracy; null: never")
    seed: int = Field(0, description="seed of weights init, batch order, augmentation and the boxes' jitter")


class DetectClassifierConfig(Section):
    enabled: bool = Field(False, description="folds.n_splits > 1: a second stage names the fused boxes: an image "
                                             "classifier trained on crops of the training boxes, on the detector's "
                                             "folds, combined with the detector by a rule chosen on OOF (nested)")
    backbone: str = Field("resnet10t", description="the crop classifier's timm model")
    pretrained_path: str | None = Field(None, description="local weights to fine-tune the classifier from; "
                                                          "null: random init")
    margin: float = Field(0.15, ge=0, le=1, description="context around each box, as a share of its longer side "
                                                        "on each side of the square crop")
    copies: int = Field(2, ge=0, description="jittered copies of each training box beside the exact one")
    jitter: float = Field(0.1, ge=0, lt=0.5, description="the copies' centre shift and side scaling, as a share "
                                                        "of the box")
    boxes_per_image: int = Field(20, ge=1, description="the best fused boxes of each image that are renamed; the "
                                                       "rest keep the detector's class")
    top_k: int = Field(3, ge=1, description="classes emitted per renamed box (each scored by its share)")
    weights: list[float] = Field([0.0, 0.25, 0.5, 0.75], min_length=1,
                                 description="detector weights tried on OOF in r = (1 - w) classifier + w detector "
                                             "(w = 1, the detector alone, is always a candidate)")
    merge_iou: list[float] = Field([0.55], description="class-agnostic merges of the fused boxes tried on OOF "
                                                       "before renaming (one box per object); unmerged is always "
                                                       "tried")
    train: CropTrainConfig = Field(CropTrainConfig(),
                               description="the classifier's training (the classification track's train section; "
                                           "hflip follows detect.train.hflip)")


class DetectConfig(Section):
    data: DetectDataConfig = Field(DetectDataConfig(), description="the detection folder's files")
    model: DetectModelConfig = Field(DetectModelConfig(), description="the detector")
    train: DetectTrainConfig = Field(DetectTrainConfig(), description="training (SGD)")
    augment: DetectAugmentConfig = Field(DetectAugmentConfig(), description="box-aware augmentation of training "
                                                                            "images")
    anchors: AnchorsConfig = Field(AnchorsConfig(), description="TinySSD's anchors")
    decode: DecodeConfig = Field(DecodeConfig(), description="network outputs to boxes: NMS, box voting, "
                                                             "boxes per image")
    evaluate: EvaluateConfig = Field(EvaluateConfig(), description="scoring on validation or OOF images")
    predict: DetectPredictConfig = Field(DetectPredictConfig(), description="submission and galleries")
    folds: DetectFoldsConfig = Field(DetectFoldsConfig(), description="one model per fold and the configuration's "
                                                                      "name in the blend")
    views: ViewsConfig = Field(ViewsConfig(), description="test-time views of each fold model, fused by WBF")
    fusion: FusionConfig = Field(FusionConfig(), description="Weighted Boxes Fusion thresholds tried on OOF")
    classifier: DetectClassifierConfig = Field(DetectClassifierConfig(), description="the second stage: a crop "
                                                                                     "classifier renaming the boxes")


def _flat_keys() -> dict[str, str]:
    """Each key's name without its section (epochs) to its key in the sections (train.epochs): the did-you-mean
    of a flat key. A name in two sections goes to the first; the names that differ are spelled out."""
    flat: dict[str, str] = {}
    for section, field in DetectConfig.model_fields.items():
        for key in field.annotation.model_fields:
            flat.setdefault(key, f"{section}.{key}")
    return flat | {"model": "model.name", "anchors": "anchors.mode", "anchor_sizes": "anchors.sizes",
                   "anchor_ratios": "anchors.ratios", "folds": "folds.n_splits", "name": "folds.name",
                   "tta_scales": "views.scales", "fusion_hflip": "views.hflip", "fusion_iou": "fusion.iou",
                   "fusion_skip": "fusion.skip", "fusion_conf": "fusion.conf"}


FLAT_KEYS = _flat_keys()
