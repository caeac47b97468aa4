"""`make auto`'s plan for a segmentation folder: the segment keys from the data's profile, measured speeds and a budget.

Pure functions of their arguments (no files, no clock, no device), unit-tested with made-up profiles. The rules:

- candidate sizes: the images' own side (the median longer side, rounded up to a multiple of 32: the encoders halve
  it five times) capped at MAX_SIZE, and three quarters and half of it, never below MIN_SIZE;
- image size: the largest candidate at which every fold model of a 3-fold plan still gets GOOD_EPOCHS; when none
  does, the smallest (most epochs for the time);
- folds: 5, else 4, when each fold model keeps GOOD_EPOCHS at that size, else 3;
- epochs: the most that fit (up to MAX_EPOCHS), an upper bound: segment.train.patience (PATIENCE) stops a fold
  model after that many epochs without a better validation Dice, so early stopping usually ends sooner;
- every estimate is the measured step time times training/planning.py's CALIBRATION (the loop around the steps),
  plus the fixed costs below; the estimated total is at most the budget, `reserve` of it kept for estimation error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from pipeline.training.planning import CALIBRATION

MAX_SIZE = 256  # on two CPU cores a 256 px U-Net step is already a large part of a second per image
MIN_SIZE = 64  # below it five halvings leave the encoder's deepest map 2x2
SHARES = (1.0, 0.75, 0.5)  # candidate sizes as shares of the images' own
GOOD_EPOCHS = 20  # segment.train.epochs' default: the images' own size and more folds only when they keep it
MAX_EPOCHS = 40  # an upper bound; early stopping on the validation Dice ends most fold models well before it
PATIENCE = 5  # segment.train.patience's default
FOLDS = (5, 4, 3)  # the most first; 3 is the floor (fewer leaves each fold model too little to validate on)
VIEWS = 2  # segment.views' default: the plain images and their mirror, each predicted for OOF and test
# The stage's threshold and smallest-component grid (5 x 4 points per class) and its nested choice cost about as much
# per OOF image as the validation's 3 x 4 monitor grid twice over
POST_PASSES = 2
# seconds: a fold model's building, files and tracking run; a fold epoch's checkpoint writes; the stage's reading,
# folds, gallery and submission
RUN_OVERHEAD, EPOCH_OVERHEAD, STAGE_OVERHEAD = 5.0, 0.2, 10.0
PARTS = ("training", "prediction", "stage", "reserve")  # the estimate's parts, as printed


@dataclass(frozen=True)
class SegmentationProfile:
    """What the planner knows of a segmentation folder and a machine."""

    images: int  # training images (every one is out of fold once)
    test_images: int
    classes: int
    image_side: int  # median of the images' longer sides
    empty_share: float  # training images with no mask pixel in any class
    device: str  # cpu or cuda


@dataclass(frozen=True)
class SegmentationPlan:
    image_size: int
    n_splits: int
    epochs: int
    patience: int
    seconds: dict[str, float]  # estimated seconds per part
    notes: list[str] = field(default_factory=list)

    @property
    def total_seconds(self) -> float:
        return sum(self.seconds.values())


def candidate_sizes(image_side: int) -> list[int]:
    """The sizes worth timing, largest first: the images' own (a multiple of 32, MIN_SIZE to MAX_SIZE), then
    SHARES of it rounded down to a multiple of 32, never below MIN_SIZE."""
    own = min(MAX_SIZE, max(MIN_SIZE, 32 * math.ceil(image_side / 32)))
    sizes = {max(MIN_SIZE, 32 * math.floor(own * share / 32)) for share in SHARES}
    return sorted(sizes, reverse=True)


def epoch_seconds(profile: SegmentationProfile, n_splits: int, speed: tuple[float, float]) -> float:
    """One fold model's epoch: its training images' steps and its held-out images' validation."""
    train_s, validate_s = speed
    trained, held = profile.images * (n_splits - 1) / n_splits, profile.images / n_splits
    return (trained * train_s + held * validate_s) * CALIBRATION + EPOCH_OVERHEAD


def prediction_seconds(profile: SegmentationProfile, n_splits: int, speed: tuple[float, float]) -> float:
    """Every training image once out of fold and every test image by every fold model, each under VIEWS views,
    then the post-processing grid on the OOF maps (validation's seconds per image hold a prediction and a grid)."""
    validate_s = speed[1]
    seen = (profile.images + n_splits * profile.test_images) * VIEWS
    return (seen + POST_PASSES * profile.images) * validate_s * CALIBRATION


def fitting_epochs(room: float, profile: SegmentationProfile, n_splits: int, speed: tuple[float, float]) -> int:
    """The epochs every fold model gets in `room` seconds, after the prediction that follows training."""
    left = room - prediction_seconds(profile, n_splits, speed)
    return max(0, math.floor((left / n_splits - RUN_OVERHEAD) / epoch_seconds(profile, n_splits, speed)))


def plan(profile: SegmentationProfile, speeds: dict[int, tuple[float, float]], budget_s: float, *,
         reserve: float = 0.1) -> SegmentationPlan:
    """The segment keys for `budget_s` seconds of training, prediction and the stage's own work from now.

    `speeds` maps a candidate size to the default member's measured (training, validation) seconds per image at it;
    sizes without a speed are left out. When not even one epoch fits, the plan has 1 epoch and a total over the
    budget (the caller says so).
    """
    sizes = sorted(speeds, reverse=True)
    if not sizes:
        raise ValueError("no image size has a measured speed")
    room = budget_s * (1 - reserve) - STAGE_OVERHEAD
    notes = []
    size = next((s for s in sizes if fitting_epochs(room, profile, FOLDS[-1], speeds[s]) >= GOOD_EPOCHS), sizes[-1])
    if size != sizes[0]:
        notes.append(f"image size {size} px: at {sizes[0]} px each of {FOLDS[-1]} fold models would train "
                     f"{fitting_epochs(room, profile, FOLDS[-1], speeds[sizes[0]])} epochs, not {GOOD_EPOCHS}")
    speed = speeds[size]
    n_splits = next((k for k in FOLDS if fitting_epochs(room, profile, k, speed) >= GOOD_EPOCHS), FOLDS[-1])
    if n_splits < FOLDS[0]:
        notes.append(f"folds: {n_splits}, as {FOLDS[0]} would leave each fold model "
                     f"{fitting_epochs(room, profile, FOLDS[0], speed)} epochs, not {GOOD_EPOCHS}")
    epochs = min(MAX_EPOCHS, max(1, fitting_epochs(room, profile, n_splits, speed)))
    notes.append(f"epochs: up to {epochs}, patience {PATIENCE}: a fold model stops after {PATIENCE} epochs without a "
                 "better validation Dice, so it usually ends sooner than planned")
    seconds = {"training": n_splits * (epochs * epoch_seconds(profile, n_splits, speed) + RUN_OVERHEAD),
               "prediction": prediction_seconds(profile, n_splits, speed),
               "stage": STAGE_OVERHEAD, "reserve": reserve * budget_s}
    return SegmentationPlan(size, n_splits, epochs, PATIENCE, seconds, notes)


def segment_section(plan: SegmentationPlan) -> dict:
    """The plan as `segment.*` keys (the defaults where the plan does not decide)."""
    return {"train": {"image_size": plan.image_size, "epochs": plan.epochs, "patience": plan.patience},
            "folds": {"n_splits": plan.n_splits}}


def table(plan: SegmentationPlan) -> str:
    """The plan as printed: the choices, then the estimated minutes per part and the total."""
    rows = [f"  {plan.image_size} px, {plan.n_splits} folds x up to {plan.epochs} epochs (patience {plan.patience})"]
    rows += [f"  {part:<12} {plan.seconds[part] / 60:>6.1f} min" for part in PARTS if part in plan.seconds]
    rows.append(f"  {'total':<12} {plan.total_seconds / 60:>6.1f} min")
    return "\n".join(rows)
