"""Training augmentation: albumentations presets and free lists, Mixup/CutMix from timm.

Presets grow as d2l's competition lessons do: light (flips, small shifts/rotations),
medium (+ bigger random resized crops, brightness/contrast), heavy (+ stronger geometry, blur, dropout).
`train.transforms` appends any albumentations transform by name with its arguments.
"""

from __future__ import annotations

import difflib
import inspect

import albumentations as A
from timm.data import Mixup

from pipeline.core.config import TrainConfig
from pipeline.core.errors import PipelineError

# The presets' operations and parameters, in order, read by both builders: albumentations per image on the CPU
# (below) and the batched device version (pipeline/training/gpu_augment.py), so the two cannot drift apart.
# affine: scale range of x and y (drawn separately), translation as a fraction of the side, rotation and
# x-shear limits in degrees; crop: area scale (aspect ratio 3/4 to 4/3); brightness_contrast: x * (1 + c) + b
# with c, b uniform within the limits; gamma: exponent range; blur: Gaussian sigma range; dropout: 1-4 holes of
# 5-20% of each side.
PRESETS: dict[str, list[tuple[str, dict]]] = {
    "none": [],
    "light": [("affine", {"scale": (0.9, 1.1), "translate": 0.08, "rotate": 10, "shear": 0, "p": 0.7})],
    "medium": [("crop", {"scale": (0.6, 1.0), "p": 0.7}),
               ("affine", {"scale": (1.0, 1.0), "translate": 0, "rotate": 15, "shear": 0, "p": 0.5}),
               ("brightness_contrast", {"brightness": 0.2, "contrast": 0.2, "p": 0.5})],
    "heavy": [("crop", {"scale": (0.35, 1.0), "p": 0.9}),
              ("affine", {"scale": (0.85, 1.15), "translate": 0, "rotate": 25, "shear": 8, "p": 0.7}),
              ("brightness_contrast", {"brightness": 0.3, "contrast": 0.3, "p": 0.7}),
              ("gamma", {"gamma": (0.8, 1.2), "p": 0.3}), ("blur", {"sigma": (0.5, 3.0), "p": 0.2}),
              ("dropout", {"holes": (1, 4), "size": (0.05, 0.2), "p": 0.4})],
}
HFLIP = ("hflip", {"p": 0.5})


def preset_ops(name: str, hflip: bool) -> list[tuple[str, dict]]:
    """The preset's (operation, parameters), a horizontal flip first when on."""
    return ([HFLIP] if hflip and name != "none" else []) + PRESETS[name]


def _albumentation(op: str, a: dict, size: int) -> A.BasicTransform:
    if op == "hflip":
        return A.HorizontalFlip(p=a["p"])
    if op == "crop":
        return A.RandomResizedCrop(size=(size, size), scale=a["scale"], p=a["p"])
    if op == "affine":
        t = a["translate"]
        return A.Affine(scale=a["scale"], translate_percent=(-t, t) if t else None, rotate=(-a["rotate"], a["rotate"]),
                        shear=(-a["shear"], a["shear"]), p=a["p"])
    if op == "brightness_contrast":
        return A.RandomBrightnessContrast(a["brightness"], a["contrast"], p=a["p"])
    if op == "gamma":
        return A.RandomGamma(gamma_limit=(a["gamma"][0] * 100, a["gamma"][1] * 100), p=a["p"])
    if op == "blur":
        return A.GaussianBlur(sigma_limit=a["sigma"], p=a["p"])
    return A.CoarseDropout(num_holes_range=a["holes"], hole_height_range=a["size"], hole_width_range=a["size"],
                           p=a["p"])


def _preset(name: str, size: int, hflip: bool) -> list:
    return [_albumentation(op, a, size) for op, a in preset_ops(name, hflip)]


def _arguments(name: str, cls: type, kwargs) -> dict:
    """The transform's keyword arguments; albumentations only warns about unknown ones and drops them."""
    if kwargs is None:
        return {}
    if not isinstance(kwargs, dict):
        raise PipelineError(f"train.transforms: {name}: arguments must be a mapping, "
                            f"e.g. {{{name}: {{p: 0.5}}}}; got {kwargs!r}")
    known = list(inspect.signature(cls).parameters)
    for arg in kwargs:
        if arg not in known:
            close = difflib.get_close_matches(str(arg), known, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"it takes {', '.join(known)}"
            raise PipelineError(f"train.transforms: {name} has no argument '{arg}'; {hint}")
    return kwargs


def _custom(specs: list[dict]) -> list:
    ops = []
    for spec in specs:
        if not isinstance(spec, dict) or len(spec) != 1:
            raise PipelineError(f"train.transforms: each entry is {{Name: {{arguments}}}}, got {spec!r}")
        (name, kwargs), = spec.items()
        cls = getattr(A, str(name), None)
        if not (isinstance(cls, type) and issubclass(cls, A.BasicTransform)):
            raise PipelineError(f"train.transforms: albumentations has no transform '{name}'")
        kwargs = _arguments(name, cls, kwargs)
        try:
            ops.append(cls(**kwargs))
        except Exception as exc:  # noqa: BLE001 - albumentations validates with its own exception types
            raise PipelineError(f"train.transforms: {name}{kwargs or ''}: {str(exc).splitlines()[0]}") from None
    return ops


def train_transform(cfg: TrainConfig, seed: int) -> A.Compose:
    """The preset, then the free list; seeded (and reseeded each epoch) so a resumed run repeats it."""
    return A.Compose(_preset(cfg.augment, cfg.image_size, cfg.hflip) + _custom(cfg.transforms), seed=seed)


def mixer(cfg: TrainConfig, num_classes: int, dense: bool = False, smoothing: bool = True) -> Mixup | None:
    """timm's Mixup/CutMix (it also applies label smoothing to the mixed targets), or None when off. dense: the
    targets are already (batch, num_classes) rows (multi-hot tags, numbers as one column, or soft pseudo-labels
    already smoothed: smoothing=False), mixed as given."""
    if cfg.mixup_alpha <= 0 and cfg.cutmix_alpha <= 0:
        return None
    return Mixup(mixup_alpha=cfg.mixup_alpha, cutmix_alpha=cfg.cutmix_alpha, prob=cfg.mix_prob,
                 switch_prob=cfg.mix_switch_prob, label_smoothing=cfg.label_smoothing if smoothing else 0.0,
                 num_classes=num_classes, multi_label=dense)
