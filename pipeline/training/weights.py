"""The one reader of weight files a user points the pipeline at (model.pretrained_path, detect's pretrained_path).

A .safetensors file, or a torch/timm checkpoint loaded with `weights_only=True` (never by unpickling code): a plain
state dict, or one under 'state_dict_ema', 'state_dict' or 'model'. DistributedDataParallel's 'module.' prefix is
dropped. Every way a file can fail (missing, a folder, unreadable, not a state dict) is one line naming the config
key, the file and the fix.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from pipeline.core.errors import PipelineError

WRAPPERS = ("state_dict_ema", "state_dict", "model")  # where timm, Lightning and torchvision scripts nest the dict


def readable_file(path: Path, key: str) -> Path:
    """`path` checked to be a readable file (stages hash it into their key before loading it, so this comes first);
    `key` is the config key that named it."""
    path = Path(path)
    if path.is_dir():
        raise PipelineError(f"{key}: {path} is a folder; point it at the weights file (.safetensors or .pth)")
    if not path.is_file():
        raise PipelineError(f"{key}: {path} not found; fix the path or leave {key} unset")
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise PipelineError(f"{key}: {path} cannot be read ({exc.strerror}); check its permissions") from None
    return path


def read_state_dict(path: Path, key: str) -> dict[str, torch.Tensor]:
    """The tensors of a weight file (see the module doc), with a one-line error naming `key` when it holds none."""
    path = readable_file(path, key)
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            for wrapper in WRAPPERS:
                if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
                    state = state[wrapper]
                    break
    except Exception as exc:  # noqa: BLE001 - any failure to parse is the same user error
        raise PipelineError(f"{key}: {path} is not a readable state dict ({type(exc).__name__}); save one with "
                            "torch.save or safetensors") from None
    tensors = {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)} \
        if isinstance(state, dict) else {}
    if not tensors:
        raise PipelineError(f"{key}: {path} holds no state dict of tensors; save one with torch.save or safetensors")
    return tensors
