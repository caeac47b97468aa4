"""Training augmentation: albumentations presets and free lists, Mixup/CutMix from timm.

Presets grow as the course's competition lessons do: light (flips, small shifts/rotations),
medium (+ bigger random resized crops, brightness/contrast), heavy (+ stronger geometry, blur, dropout).
`train.transforms` appends any albumentations transform by name with its arguments.
"""

from __future__ import annotations

import difflib
import inspect

import albumentations as A
from timm.data import Mixup

from .config import TrainConfig
from .errors import PipelineError


def _preset(name: str, size: int, hflip: bool) -> list:
    flips = [A.HorizontalFlip(p=0.5)] if hflip else []
    if name == "none":
        return []
    if name == "light":
        return flips + [A.Affine(scale=(0.9, 1.1), translate_percent=(-0.08, 0.08), rotate=(-10, 10), p=0.7)]
    if name == "medium":
        return flips + [A.RandomResizedCrop(size=(size, size), scale=(0.6, 1.0), p=0.7),
                        A.Affine(rotate=(-15, 15), p=0.5), A.RandomBrightnessContrast(0.2, 0.2, p=0.5)]
    return flips + [A.RandomResizedCrop(size=(size, size), scale=(0.35, 1.0), p=0.9),
                    A.Affine(scale=(0.85, 1.15), rotate=(-25, 25), shear=(-8, 8), p=0.7),
                    A.RandomBrightnessContrast(0.3, 0.3, p=0.7), A.RandomGamma(p=0.3), A.GaussianBlur(p=0.2),
                    A.CoarseDropout(num_holes_range=(1, 4), hole_height_range=(0.05, 0.2),
                                    hole_width_range=(0.05, 0.2), p=0.4)]


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
    targets are already (batch, num_classes) rows (multi-hot tags, or numbers as one column), mixed as given."""
    if cfg.mixup_alpha <= 0 and cfg.cutmix_alpha <= 0:
        return None
    return Mixup(mixup_alpha=cfg.mixup_alpha, cutmix_alpha=cfg.cutmix_alpha, prob=cfg.mix_prob,
                 switch_prob=cfg.mix_switch_prob, label_smoothing=cfg.label_smoothing if smoothing else 0.0,
                 num_classes=num_classes, multi_label=dense)
