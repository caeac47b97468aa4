"""`make auto`'s plan for a detection folder: the detect keys from the data's profile, measured speeds and a budget.

Pure functions of their arguments (no files, no clock, no device), unit-tested with made-up profiles. The rules:

- image size: the images' own side (a multiple of 32), capped per device (CPU_SIZE_CAP, CUDA_SIZE_CAP), and
  lowered for large objects to the size at which the 10th-percentile box still spans MIN_BOX_PIXELS; small
  objects (under SMALL_BOX_PIXELS at the planned size) train without mosaic, which would halve them again;
- detector: FCOS on a timm backbone; on the CPU resnet10t with a 64-channel FPN, on CUDA the largest of
  CUDA_BACKBONES whose 5-fold plan still gets GOOD_EPOCHS (128-channel FPN);
- folds: 5 when each fold model gets GOOD_EPOCHS, else 3 when it gets FLOOR_EPOCHS, else 1 model;
- epochs: the most that fit (up to MAX_EPOCHS), with train.patience so validation mAP@0.5 decides when to stop;
- the crop classifier (with 2 or more classes and folds): CLASSIFIER_SHARE of the training time when that buys it
  CROP_MIN_EPOCHS and leaves the detector its epochs threshold; crops at CROP_SIZE of the device;
- every estimate is the measured step time times training/planning.py's CALIBRATION (loading, augmentation,
  checkpoints), plus the fixed costs below; the estimated total is at most the budget, `reserve` of it kept for
  estimation error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from pipeline.core.config.detect import CropTrainConfig, DetectClassifierConfig, DetectDataConfig
from pipeline.training.planning import CALIBRATION

CPU_SIZE_CAP, CUDA_SIZE_CAP = 512, 1024  # a 512 px FCOS step on two cores is seconds per image already
MIN_SIZE = 64  # detect.train.image_size's least value
MIN_BOX_PIXELS = 32  # FCOS's finest level has a stride of 8: a box of 32 px covers 4x4 of its points
SMALL_BOX_PIXELS = 16  # under this at the planned size a mosaic's halving would leave a box of one or two points
CPU_DETECTOR = ("resnet10t", 64)  # (backbone, FPN channels): configs/detect-small.yaml's, measured on 2 cores
CUDA_BACKBONES = ("resnet34", "resnet18", "resnet10t")  # largest first, each with a 128-channel FPN
CUDA_FPN = 128
BATCH_SIZE = 16  # detect.train.batch_size the learning rate 0.01 was tuned at (docs/detection.md)
GOOD_EPOCHS = 8  # 5 folds (or the larger CUDA backbone) only when each fold model gets this many epochs
FLOOR_EPOCHS = 3  # 3 folds only when each gets this many; below it one model on all the training images
MAX_EPOCHS = 30
PATIENCE = 4  # epochs without a better validation mAP@0.5 before a detector stops
CLASSIFIER_SHARE = 0.3  # of the training time, for the crop classifier's fold trainings
CROP_MIN_EPOCHS, CROP_MAX_EPOCHS = 4, 20
CROP_SIZE = {"cpu": 32, "cuda": 64}
CROP_BACKBONE = "resnet10t"
# the configuration's defaults, read from its models so that a changed default cannot leave a stale copy here
CROP_BATCH = CropTrainConfig.model_fields["batch_size"].default
CROP_COPIES = DetectClassifierConfig.model_fields["copies"].default  # each training box gives 1 + copies crops
BOXES_NAMED = DetectClassifierConfig.model_fields["boxes_per_image"].default  # fused boxes per image renamed
HOLDOUT_SHARE = DetectDataConfig.model_fields["val_fraction"].default  # one model without val.csv holds this out
# seconds: a fold run's model building and files; a fold epoch's checkpoint writes; a crop classifier fold run's
# set-up (the classification track's fold training); the stage's reading and writing (leaderboard, galleries)
RUN_OVERHEAD, EPOCH_OVERHEAD, CROP_RUN_OVERHEAD, STAGE_OVERHEAD = 3.0, 0.2, 5.0, 10.0
# Weighted Boxes Fusion per image and grid point, from configs/detect-small.yaml's run: 12 points on 1,700 images
# (OOF and holdout) took about 3 minutes on one CPU thread
FUSION_SECONDS = 0.01
CPU_FUSION = {"iou": [0.6, 0.7], "skip": [0.03, 0.1], "conf": ["avg"]}  # 4 points: the ones detect-small kept
CUDA_FUSION = {"iou": [0.5, 0.6, 0.7], "skip": [0.03, 0.1], "conf": ["avg", "max"]}
PARTS = ("detector", "views and fusion", "crop classifier", "stage", "reserve")  # the estimate's parts, as printed
VIEWS = 2  # each fold model's test-time views: the plain images and their mirror (views.hflip)


@dataclass(frozen=True)
class DetectionProfile:
    """What the planner knows of a detection folder and a machine."""

    images: int  # training images (every one is out of fold once)
    val_images: int  # val.csv's images (0 without one)
    test_images: int
    classes: int
    boxes: int  # training boxes
    image_side: int  # median of the images' longer sides
    box_p10: float  # 10th percentile of a box's sqrt(w h / (W H)): its side as a share of the image's
    box_median: float
    device: str  # cpu or cuda

    @property
    def boxes_per_image(self) -> float:
        return self.boxes / max(1, self.images)


@dataclass(frozen=True)
class DetectionPlan:
    backbone: str
    fpn_channels: int
    image_size: int
    n_splits: int
    epochs: int
    patience: int
    mosaic: float
    classifier_epochs: int  # 0: no crop classifier
    crop_size: int
    fusion: dict
    seconds: dict[str, float]  # estimated seconds per part
    notes: list[str] = field(default_factory=list)

    @property
    def total_seconds(self) -> float:
        return sum(self.seconds.values())


def image_size(profile: DetectionProfile) -> int:
    """The planned side: the images' own (a multiple of 32), capped per device, lowered while the 10th-percentile
    box keeps MIN_BOX_PIXELS."""
    own = max(MIN_SIZE, 32 * math.ceil(profile.image_side / 32))
    cap = CUDA_SIZE_CAP if profile.device == "cuda" else CPU_SIZE_CAP
    needed = 32 * math.ceil(MIN_BOX_PIXELS / max(profile.box_p10, 1e-6) / 32)
    return max(MIN_SIZE, min(own, cap, needed))


def small_objects(profile: DetectionProfile, size: int) -> bool:
    return profile.box_p10 * size < SMALL_BOX_PIXELS


def detectors(device: str) -> list[tuple[str, int]]:
    """(backbone, FPN channels) the plan may choose from on this device, the first most worth training."""
    if device == "cuda":
        return [(b, CUDA_FPN) for b in CUDA_BACKBONES]
    return [CPU_DETECTOR]


def _epoch_seconds(profile: DetectionProfile, n_splits: int, speed: tuple[float, float]) -> float:
    """One fold model's epoch: its training images' steps and its validation images' decoding and mAP."""
    train_s, validate_s = speed
    if n_splits == 1:
        held = profile.val_images or round(HOLDOUT_SHARE * profile.images)
        trained = profile.images - (0 if profile.val_images else held)
    else:
        held, trained = profile.images / n_splits, profile.images * (n_splits - 1) / n_splits
    return (trained * train_s + held * validate_s) * CALIBRATION + EPOCH_OVERHEAD


def _after_training(profile: DetectionProfile, n_splits: int, speed: tuple[float, float], fusion: dict) -> float:
    """The views of every fold model (its OOF images, the holdout, the test images) and the WBF grid on OOF; one
    model: its two TTA options on the holdout and the test images."""
    validate_s = speed[1]
    if n_splits == 1:
        held = profile.val_images or round(HOLDOUT_SHARE * profile.images)
        return (2 * held + profile.test_images) * validate_s * CALIBRATION
    seen = profile.images + n_splits * (profile.val_images + profile.test_images)
    points = len(fusion["iou"]) * len(fusion["skip"]) * len(fusion["conf"])
    return seen * VIEWS * validate_s * CALIBRATION + FUSION_SECONDS * points * (profile.images + profile.val_images)


def _classifier_seconds(profile: DetectionProfile, n_splits: int, crop_speed: tuple[float, float],
                        epochs: int) -> float:
    """The crop classifier's fold trainings (each fold trains on the other folds' crops and validates on its own)
    and the naming of the fused boxes (OOF once, the holdout and test by every fold model, plain and mirrored)."""
    train_s, predict_s = crop_speed
    crops = profile.boxes * (1 + CROP_COPIES)
    per_epoch = crops * ((n_splits - 1) * train_s + predict_s) * CALIBRATION
    named = BOXES_NAMED * (profile.images + n_splits * (profile.val_images + profile.test_images)) * VIEWS
    return epochs * per_epoch + n_splits * CROP_RUN_OVERHEAD + named * predict_s * CALIBRATION


def _fitting_epochs(room: float, n_splits: int, epoch_s: float) -> int:
    return max(0, math.floor((room / n_splits - RUN_OVERHEAD) / epoch_s))


def plan(profile: DetectionProfile, speeds: dict[str, tuple[float, float]], budget_s: float, *,
         crop_speed: tuple[float, float] | None = None, reserve: float = 0.1) -> DetectionPlan:
    """The detect keys for `budget_s` seconds of training, views, fusion and naming from now.

    `speeds` maps a backbone of `detectors(profile.device)` to its measured (training, validation) seconds per image
    at `image_size(profile)`; backbones without a speed are left out. `crop_speed`: the crop classifier's measured
    (training, prediction) seconds per crop at CROP_SIZE; None: no classifier. When not even one model's single
    epoch fits, the plan has 1 epoch and a total over the budget (the caller says so).
    """
    size = image_size(profile)
    fusion = CUDA_FUSION if profile.device == "cuda" else CPU_FUSION
    candidates = [(b, c) for b, c in detectors(profile.device) if b in speeds]
    if not candidates:
        raise ValueError("no detector backbone has a measured speed")
    room = budget_s * (1 - reserve) - STAGE_OVERHEAD
    notes = []
    chosen = None
    for backbone, channels in candidates:  # largest first: the first that keeps GOOD_EPOCHS on 5 folds
        speed = speeds[backbone]
        epochs5 = _fitting_epochs(room - _after_training(profile, 5, speed, fusion), 5,
                                  _epoch_seconds(profile, 5, speed))
        if epochs5 >= GOOD_EPOCHS:
            chosen = (backbone, channels)
            break
    if chosen is None:
        chosen = min(candidates, key=lambda c: speeds[c[0]][0])
    backbone, channels = chosen
    speed = speeds[backbone]
    if len(candidates) > 1 and backbone != candidates[0][0]:
        notes.append(f"backbone {backbone}: {candidates[0][0]} would train fewer than {GOOD_EPOCHS} epochs per fold")
    n_splits, epochs = 1, 0
    for k, wanted in ((5, GOOD_EPOCHS), (3, FLOOR_EPOCHS), (1, 1)):
        after = _after_training(profile, k, speed, fusion)
        epochs = _fitting_epochs(room - after, k, _epoch_seconds(profile, k, speed))
        if epochs >= wanted or k == 1:
            n_splits = k
            break
        notes.append(f"folds: not {k}: each of {k} fold models would train {epochs} epoch(s), not {wanted}")
    epochs = min(MAX_EPOCHS, max(1, epochs))
    after = _after_training(profile, n_splits, speed, fusion)
    classifier_epochs = 0
    crop_size = CROP_SIZE.get(profile.device, CROP_SIZE["cpu"])
    if crop_speed and profile.classes >= 2 and n_splits > 1:
        share = CLASSIFIER_SHARE * (room - after)
        fixed = _classifier_seconds(profile, n_splits, crop_speed, 0)
        per_epoch = _classifier_seconds(profile, n_splits, crop_speed, 1) - fixed
        crop_epochs = min(CROP_MAX_EPOCHS, math.floor((share - fixed) / per_epoch)) if share > fixed else 0
        cost = _classifier_seconds(profile, n_splits, crop_speed, crop_epochs)
        left = _fitting_epochs(room - after - cost, n_splits, _epoch_seconds(profile, n_splits, speed))
        wanted = GOOD_EPOCHS if n_splits == 5 else FLOOR_EPOCHS
        if crop_epochs >= CROP_MIN_EPOCHS and left >= wanted:
            classifier_epochs, epochs = crop_epochs, min(epochs, left)
        else:
            notes.append(f"no crop classifier: {CROP_MIN_EPOCHS} of its epochs on every fold would leave the "
                         f"detector fewer than {wanted} epochs")
    elif profile.classes < 2:
        notes.append("no crop classifier: one class, nothing to rename")
    mosaic = 0.0 if small_objects(profile, size) else 0.3
    if mosaic == 0.0:
        notes.append(f"small objects ({profile.box_p10 * size:.0f} px at the 10th percentile at {size} px): no "
                     "mosaic, which would halve them")
    seconds = {"detector": n_splits * (epochs * _epoch_seconds(profile, n_splits, speed) + RUN_OVERHEAD),
               "views and fusion": after,
               "crop classifier": _classifier_seconds(profile, n_splits, crop_speed, classifier_epochs)
               if classifier_epochs else 0.0,
               "stage": STAGE_OVERHEAD, "reserve": reserve * budget_s}
    return DetectionPlan(backbone, channels, size, n_splits, epochs, PATIENCE, mosaic, classifier_epochs, crop_size,
                         fusion, seconds, notes)


def detect_section(plan: DetectionPlan) -> dict:
    """The plan as `detect.*` keys (configs/detect-small.yaml's recipe where the plan does not decide)."""
    section = {
        "model": {"name": "fcos", "backbone": plan.backbone, "fpn_channels": plan.fpn_channels},
        "train": {"image_size": plan.image_size, "epochs": plan.epochs, "patience": plan.patience,
                  "batch_size": BATCH_SIZE, "lr": 0.01, "hflip": True},
        "augment": {"scale": 0.2, "shift": 0.1, "colour": 0.2, "mosaic": plan.mosaic},
        "folds": {"n_splits": plan.n_splits},
        "views": {"scales": [1.0], "hflip": True},
        "fusion": dict(plan.fusion),
        "classifier": {"enabled": plan.classifier_epochs > 0},
    }
    if plan.classifier_epochs:
        section["classifier"] |= {"backbone": CROP_BACKBONE,
                                  "train": {"image_size": plan.crop_size, "epochs": plan.classifier_epochs,
                                            "batch_size": CROP_BATCH}}
    return section


def table(plan: DetectionPlan) -> str:
    """The plan as printed: the choices, then the estimated seconds per part and the total."""
    rows = [f"  detector fcos on {plan.backbone} (FPN {plan.fpn_channels}) at {plan.image_size} px, "
            f"{plan.n_splits} fold(s) x up to {plan.epochs} epochs (patience {plan.patience})",
            "  crop classifier " + (f"{CROP_BACKBONE} at {plan.crop_size} px, up to {plan.classifier_epochs} epochs "
                                    "per fold" if plan.classifier_epochs else "off")]
    rows += [f"  {part:<18} {plan.seconds[part] / 60:>6.1f} min" for part in PARTS if part in plan.seconds]
    rows.append(f"  {'total':<18} {plan.total_seconds / 60:>6.1f} min")
    return "\n".join(rows)
