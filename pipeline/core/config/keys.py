"""Key names: every dotted key of the tree, and the suggestion an unknown key gets (a moved key's new place, a
detect key without its section, else the closest known key)."""

from __future__ import annotations

import difflib
from typing import Any

from pydantic import BaseModel

from pipeline.core.config.detect import FLAT_KEYS


def is_section(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def known_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        if is_section(field.annotation):
            keys += known_keys(field.annotation, prefix + name + ".")
    return keys


MOVED = {f"{track}.{key}": f"runtime.{key}" for track in ("train", "detect")
         for key in ("device", "amp", "amp_dtype", "channels_last", "compile", "num_workers", "threads")}


# segment.model (one network) became segment.models (a list of members, blended); one key for one thing, so the old
# one is an error that shows the new form rather than a second spelling to keep in sync
REPLACED = {"segment.model": "segment.model became segment.models, a list of members: segment.models=[{name: "
                             "unet-r18, arch: unet, encoder: resnet18}] (docs/segmentation.md)"}


def suggestion(key: str, root: type[BaseModel]) -> str:
    """What to say after "unknown config key 'KEY'": the key it moved to, or the likely one among root's keys."""
    if key in MOVED:
        return f" (it moved to '{MOVED[key]}', shared by both tracks)"
    replaced = next((v for k, v in REPLACED.items() if key == k or key.startswith(k + ".")), None)
    if replaced:
        return f" ({replaced})"
    flat = sectioned_detect_key(key)
    if flat:
        return f" (did you mean '{flat}'?)"
    close = difflib.get_close_matches(key, known_keys(root), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def sectioned_detect_key(key: str) -> str | None:
    """detect.epochs -> detect.train.epochs: a detect key given without its section; None for any other key."""
    section, _, name = key.partition(".")
    if section != "detect" or name not in FLAT_KEYS:
        return None
    return f"detect.{FLAT_KEYS[name]}"
