"""`make auto`'s planner: a portfolio of experiments from the data's profile, the measured speed and a time budget.

Pure functions of their arguments (no files, no clock, no device), so each rule is unit-tested with made-up profiles.
General rules rather than a table of known datasets:

- image size from the images' own sizes: small images (a side of at most SMALL_SIDE) at their native size, with a
  network whose stem keeps the resolution (d2l_resnet_small) beside timm's nets at the smallest size their stems
  allow; larger images at the largest size of SIZES the budget affords for the first member at its wanted epochs;
- epochs from the data: enough optimizer steps (TARGET_STEPS) whatever the row count, within [MIN_EPOCHS,
  MAX_EPOCHS], then cut to what the budget affords (never below FLOOR_EPOCHS);
- members from a ladder across families, diversity (architecture, then seed) before more of the same; as many as
  fit at 60% or more of the wanted epochs each;
- folds: 5, or 3 when the first member cannot have its wanted epochs on 5 (each of 3 folds costs 2/3 of the rows,
  and there are 3 of them: half the work);
- the label-keeping symmetries (no flips, mirror flips, the eight flips and rotations) are not assumed: the auto
  driver trains member one's fold 0 under each and keeps the best validation score (`symmetry_*` below turn the
  decision into train and predict keys).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

SMALL_SIDE = 64  # a side up to this is a small image: trained at its native size
SIZES = (224, 192, 160, 128, 112, 96, 80, 64)  # larger images: the largest of these the budget affords
TIMM_MIN_SIZE = 32  # timm's stems divide by 4, their last stage by 32: 32 px keeps a 1x1 map at the end
TARGET_STEPS = 1500  # optimizer steps a member trains for when the budget allows (scaled to epochs by the rows)
MIN_EPOCHS, MAX_EPOCHS, FLOOR_EPOCHS = 6, 40, 3  # below FLOOR_EPOCHS only when nothing more fits (said so)
SHARE_OF_WANTED = 0.6  # a further member joins only when every member still has this share of its wanted epochs
SMALL_LADDER = ("resnet10t", "d2l_resnet_small", "resnet18", "resnet26t")
LARGE_LADDER = ("resnet18", "efficientnet_b0", "resnet10t", "convnext_atto", "resnet34", "mobilenetv3_large_100")
SYMMETRIES = ("hflip", "none", "d4")  # the order the probe tries them in: mirror flips are the usual default
CALIBRATION = 1.3  # measured step time -> epoch time before the probe measures it (loading, augmentation, validation)
ENSEMBLE_SECONDS, ENSEMBLE_PER_MEMBER = 15.0, 5.0  # blending: nested CV over every blend
PREDICT_OVERHEAD = 3.0  # seconds per member and fold beyond the images' forward passes (loading weights, files)
RUN_OVERHEAD = 3.0  # seconds per fold run beyond its epochs (building the model, the fold's arrays, its files)


@dataclass(frozen=True)
class Profile:
    """What the planner knows of a competition and a machine."""

    rows: int  # training rows after the clean stage
    test_rows: int
    task: str
    n_classes: int
    image_side: int  # median of the images' shorter sides
    channels: int
    device: str  # cpu or cuda
    batch_size: int  # the training batch the speeds were measured at
    weights: frozenset[str] = frozenset()  # backbones whose ImageNet weights are at hand (fine-tuned, not from scratch)


@dataclass(frozen=True)
class Member:
    """One planned experiment."""

    name: str
    backbone: str
    image_size: int
    epochs: int
    seed: int
    minutes: float  # estimated training minutes, all folds


@dataclass
class Plan:
    n_splits: int
    members: list[Member]
    symmetry: str
    lr: float
    batch_size: int
    weights: frozenset[str]
    reserve_minutes: float  # prediction, blending and estimation error
    notes: list[str] = field(default_factory=list)

    @property
    def minutes(self) -> float:
        return sum(m.minutes for m in self.members) + self.reserve_minutes


def is_small(side: int) -> bool:
    return side <= SMALL_SIDE


def member_size(backbone: str, side: int, large_size: int) -> int:
    """The side a backbone trains at: small images at their own size (timm's nets at no less than TIMM_MIN_SIZE),
    larger ones at the planned size."""
    if not is_small(side):
        return large_size
    native = max(16, 4 * math.ceil(side / 4))  # a multiple of 4, never fewer pixels than the images have
    return native if backbone.startswith("d2l_") else max(TIMM_MIN_SIZE, native)


def ladder(profile: Profile, candidates: list[str] | None = None) -> list[str]:
    """The backbones the plan draws from, first = the one most worth training."""
    if candidates:
        return list(candidates)
    return list(SMALL_LADDER if is_small(profile.image_side) else LARGE_LADDER)


def wanted_epochs(rows: int, n_splits: int, batch_size: int) -> int:
    """Epochs that give about TARGET_STEPS optimizer steps on one fold's training rows, within the bounds."""
    steps = max(1, math.ceil(rows * (n_splits - 1) / n_splits / batch_size))
    return int(min(MAX_EPOCHS, max(MIN_EPOCHS, math.ceil(TARGET_STEPS / steps))))


def epoch_seconds(rows: int, n_splits: int, train_s: float, predict_s: float, calibration: float) -> float:
    """One epoch of one fold: the training rows' steps and the validation rows' forward passes."""
    return (rows * (n_splits - 1) / n_splits * train_s + rows / n_splits * predict_s) * calibration


def choose_size(profile: Profile, train_s_at: dict[int, float], budget_s: float, n_splits: int = 5) -> int:
    """Large images: the largest of SIZES (up to the images' own side) at which the first member trains its wanted
    epochs on every fold within half of `budget_s`; `train_s_at` maps a size to its measured seconds per training
    image (sizes not measured are scaled from the nearest measured one by the pixel count). Small images: native."""
    if is_small(profile.image_side):
        return member_size("d2l_", profile.image_side, 0)
    sizes = [s for s in SIZES if s <= max(profile.image_side, SIZES[-1])]
    epochs = wanted_epochs(profile.rows, n_splits, profile.batch_size)
    for size in sizes:
        per_image = scaled(train_s_at, size)
        cost = n_splits * epochs * epoch_seconds(profile.rows, n_splits, per_image, per_image / 3, CALIBRATION)
        if cost <= budget_s / 2:
            return size
    return sizes[-1]


def scaled(seconds_at: dict[int, float], size: int) -> float:
    """Seconds per image at `size` from the measurement at the nearest size, scaled by the pixel count."""
    nearest = min(seconds_at, key=lambda s: abs(s - size))
    return seconds_at[nearest] * (size / nearest) ** 2


def plan(profile: Profile, speeds: dict[str, tuple[float, float]], budget_s: float, *, image_size: int,
         symmetry: str = "hflip", max_members: int = 4, reserve: float = 0.1, candidates: list[str] | None = None,
         calibration: float = CALIBRATION, pinned: list[Member] | None = None, folds: int | None = None) -> Plan:
    """The portfolio for `budget_s` seconds of training, prediction and blending from now.

    `speeds` maps a backbone to its measured (train, predict) seconds per image at its member size; backbones
    without a speed are left out. `pinned` members (kept from the probe or an earlier run) stay first, at the
    minutes of training they still need; `folds` fixes the number of folds (already made).
    """
    pinned = list(pinned or [])
    budget_s -= sum(m.minutes for m in pinned) * 60
    names = [b for b in ladder(profile, candidates) if b in speeds]
    if not names:
        raise ValueError("no candidate backbone has a measured speed")
    reserve_s = reserve * budget_s  # estimation error grows with the budget
    notes = []
    for n_splits in ((folds,) if folds else (5, 3)):  # noqa: B020 (the loop's last value is the one kept)
        wanted = wanted_epochs(profile.rows, n_splits, profile.batch_size)
        first = _fold_epoch(profile, speeds[names[0]], n_splits, calibration)
        room = budget_s - reserve_s - _blend_seconds(1) - _predict_seconds(profile, speeds[names[0]], n_splits,
                                                                          symmetry, calibration)
        if n_splits * wanted * first <= room or n_splits <= 3:
            break
        notes.append(f"folds: 3, not 5: {names[0]} at {wanted} epochs on 5 folds needs "
                     f"{n_splits * wanted * first / 60:.0f} min of the {room / 60:.0f} left for training")
    # the most members that each keep SHARE_OF_WANTED of the wanted epochs (diversity before more epochs)
    order = _member_order(names, max_members, pinned)
    chosen: list[tuple[str, int]] = []
    epochs = wanted
    for count in range(len(order), 0, -1):
        trial = order[:count]
        per_epoch = sum(n_splits * _fold_epoch(profile, speeds[b], n_splits, calibration) for b, _ in trial)
        fixed = _blend_seconds(len(pinned) + count) + sum(
            _predict_seconds(profile, speeds[b], n_splits, symmetry, calibration)
            for b in [b for b, _ in trial] + [m.backbone for m in pinned] if b in speeds)
        fixed += RUN_OVERHEAD * n_splits * count
        epochs = math.floor((budget_s - reserve_s - fixed) / per_epoch) if per_epoch > 0 else wanted
        if epochs >= max(FLOOR_EPOCHS, math.ceil(SHARE_OF_WANTED * wanted)) or (count == 1 and not pinned):
            chosen, epochs = trial, min(wanted, max(1, epochs))
            break
    if chosen and epochs < wanted:
        notes.append(f"epochs: {epochs}, not the {wanted} the rows call for: the budget affords no more")
    lr = 0.003
    members = pinned + [
        Member(name=member_name(b, member_size(b, profile.image_side, image_size), seed, symmetry),
               backbone=b, image_size=member_size(b, profile.image_side, image_size), epochs=epochs, seed=seed,
               minutes=n_splits * (epochs * _fold_epoch(profile, speeds[b], n_splits, calibration) + RUN_OVERHEAD) / 60)
        for b, seed in chosen]
    if len(chosen) < len(order):
        notes.append(f"members: {len(pinned) + len(chosen)}; a further one would leave each fewer than "
                     f"{math.ceil(SHARE_OF_WANTED * wanted)} epochs")
    fixed_minutes = (reserve_s + _blend_seconds(len(members)) + sum(
        _predict_seconds(profile, speeds[m.backbone], n_splits, symmetry, calibration)
        for m in members if m.backbone in speeds)) / 60
    return Plan(n_splits, members, symmetry, lr, profile.batch_size, profile.weights, fixed_minutes, notes)


def _member_order(names: list[str], max_members: int, pinned: list[Member]) -> list[tuple[str, int]]:
    """(backbone, seed) in order of expected value: each architecture once, then the ladder again at new seeds."""
    taken = {(m.backbone, m.seed) for m in pinned}
    out = []
    for round_ in range(max_members):
        for b in names:
            seed = 42 + round_
            if (b, seed) not in taken:
                out.append((b, seed))
    return out[:max(0, max_members - len(pinned))]


def _fold_epoch(profile: Profile, speed: tuple[float, float], n_splits: int, calibration: float) -> float:
    return epoch_seconds(profile.rows, n_splits, speed[0], speed[1], calibration)


def _predict_seconds(profile: Profile, speed: tuple[float, float], n_splits: int, symmetry: str,
                     calibration: float) -> float:
    """OOF rows once and the test rows once per fold model, each with every TTA view."""
    views = len(symmetry_views(symmetry))
    images = (profile.rows + n_splits * profile.test_rows) * views
    return images * speed[1] * calibration + PREDICT_OVERHEAD * n_splits


def _blend_seconds(members: int) -> float:
    return ENSEMBLE_SECONDS + ENSEMBLE_PER_MEMBER * members


NUMBER_MARGIN = 0.9  # the regression's RMSE must be below this share of the classifier's
LEARNT = 0.5  # ... and below this share of a constant prediction's (the truth's spread): runs that learnt little
#               differ by noise, and noise must not turn classes into a number


def label_as_number(as_classes: dict[str, float], as_number: dict[str, float], constant_rmse: float) -> bool:
    """Integer labels: a number (regression) only when it beats the classifier clearly on the RMSE, at least ties it
    on the accuracy, and learnt something: a digit read as a number is a costly mistake, a count read as classes a
    small one."""
    return (as_number["rmse"] < NUMBER_MARGIN * as_classes["rmse"] and as_number["rmse"] < LEARNT * constant_rmse
            and as_number["accuracy"] >= as_classes["accuracy"])


def member_name(backbone: str, size: int, seed: int, symmetry: str) -> str:
    return f"{backbone}-{size}px-{symmetry}" + ("" if seed == 42 else f"-s{seed}")


def symmetry_train(symmetry: str) -> dict:
    """Train keys of a symmetry: mirror flips in the preset, plus vertical flips and quarter turns for d4."""
    if symmetry == "none":
        return {"hflip": False}
    if symmetry == "hflip":
        return {"hflip": True}
    return {"hflip": True, "transforms": [{"VerticalFlip": {"p": 0.5}}, {"RandomRotate90": {"p": 0.5}}]}


def symmetry_views(symmetry: str) -> list[str]:
    """The TTA views a symmetry allows (the predict stage keeps those that improve the OOF score)."""
    return {"none": ["identity"], "hflip": ["identity", "hflip"],
            "d4": ["identity", "hflip", "vflip", "rot90"]}[symmetry]


FINE_TUNE_LR = 0.001  # members that start from ImageNet weights (the head learns faster: model.head_lr_mult)


def member_entry(member: Member, symmetry: str, weights: frozenset[str] = frozenset()) -> dict:
    """A model.backbones entry of a member; one whose ImageNet weights are at hand fine-tunes them."""
    tuned = member.backbone in weights
    return {"name": member.name, "backbone": member.backbone,
            "train": {"image_size": member.image_size, "epochs": member.epochs, "seed": member.seed,
                      **({"lr": FINE_TUNE_LR} if tuned else {}), **symmetry_train(symmetry)},
            **({"model": {"pretrained": True}} if tuned else {}),
            "predict": {"tta": symmetry_views(symmetry)}}


def plan_config(plan: Plan, base: dict) -> dict:
    """The plan as a config: `base` (the user's own keys) with the plan's folds, members and shared train keys."""
    cfg = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    cfg["folds"] = {**cfg.get("folds", {}), "n_splits": plan.n_splits}
    cfg["model"] = {**cfg.get("model", {}),
                    "backbones": [member_entry(m, plan.symmetry, plan.weights) for m in plan.members]}
    cfg["model"].pop("only", None)
    cfg["train"] = {**cfg.get("train", {}), "lr": plan.lr, "batch_size": plan.batch_size, "augment": "light"}
    cfg["predict"] = {**cfg.get("predict", {}), "tta_policy": "auto"}
    return cfg


def table(plan: Plan) -> str:
    """The plan as printed: one line per member, then the reserve and the total."""
    rows = [f"{'member':<34} {'backbone':<18} {'size':>4} {'epochs':>6} {'est. min':>8}"]
    rows += [f"{m.name:<34} {m.backbone:<18} {m.image_size:>4} {m.epochs:>6} {m.minutes:>8.1f}" for m in plan.members]
    rows.append(f"{'prediction, blending, reserve':<34} {'':<18} {'':>4} {'':>6} {plan.reserve_minutes:>8.1f}")
    rows.append(f"{'total':<34} {'':<18} {'':>4} {'':>6} {plan.minutes:>8.1f}")
    return "\n".join(rows)
