"""Backbones by name (timm or d2l's nets), fine-tuning weights, head and frozen parameters.

Fine-tuning follows d2l: the body starts from pretrained weights (the hub with
`model.pretrained`, or a local file with `model.pretrained_path`), the classifier is new for the
competition's classes and learns `head_lr_mult` times faster, and early stages may stay frozen.
Local files are read with safetensors or `torch.load(weights_only=True)`, never by unpickling code.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn as nn
from timm.models import adapt_input_conv

from pipeline.core.errors import PipelineError
from pipeline.training.classic import CLASSIC
from pipeline.training.weights import read_state_dict, readable_file


def build_model(name: str, num_classes: int, in_chans: int, pretrained: bool = False,
                drop_rate: float = 0.0) -> nn.Module:
    """A model with a fresh `num_classes` head; timm adapts hub weights to 1-channel input itself."""
    if name in CLASSIC:
        if pretrained:
            raise PipelineError(f"model.pretrained: d2l net '{name}' has no hub weights; "
                                "use model.pretrained_path")
        return CLASSIC[name](num_classes, in_chans, drop_rate)
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, list(CLASSIC) + timm.list_models(), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else "; see timm.list_models()"
        raise PipelineError(f"model.backbones: unknown timm model '{name}'{hint}")
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans,
                                 drop_rate=drop_rate)
    except (OSError, RuntimeError, ValueError) as exc:
        if pretrained:
            raise PipelineError(
                f"model.pretrained: could not fetch weights for '{name}' from the hub ({type(exc).__name__}); "
                "go online, or set model.pretrained_path to a local file"
            ) from None
        raise


def head_parameter_names(model: nn.Module) -> set[str]:
    """Names of the classifier's parameters (timm's get_classifier, or d2l nets' last layer)."""
    head = model.get_classifier()
    ids = {id(p) for p in head.parameters()}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def pretrained_file(template: str, backbone: str) -> Path:
    """model.pretrained_path for one backbone ('{backbone}' replaced), checked to be a readable file: the
    train stage hashes it into its key before loading it, so the check must come first."""
    return readable_file(Path(template.replace("{backbone}", backbone)), "model.pretrained_path")


def load_pretrained(model: nn.Module, path: Path) -> dict:
    """Copy matching tensors from `path` into `model`, except the head; adapt a 3->1 channel stem."""
    state, own = read_state_dict(path, "model.pretrained_path"), model.state_dict()
    head = {n for n in own if n.rsplit(".", 1)[0] in {h.rsplit(".", 1)[0] for h in head_parameter_names(model)}}
    loaded, skipped = {}, []
    for name, tensor in state.items():
        if name not in own or name in head:
            skipped.append(name)
            continue
        if tensor.ndim == 4 and tensor.shape[1] != own[name].shape[1] and tensor.shape[0] == own[name].shape[0]:
            tensor = adapt_input_conv(own[name].shape[1], tensor)
        if tensor.shape != own[name].shape:
            skipped.append(name)
            continue
        loaded[name] = tensor
    if not loaded:
        raise PipelineError(f"model.pretrained_path: none of the {len(state)} tensors in {path} fit this model; "
                            "is it for another backbone?")
    model.load_state_dict(loaded, strict=False)
    return {"loaded": len(loaded), "skipped": skipped, "new": sorted(set(own) - set(loaded))}


def freeze(model: nn.Module, prefixes: list[str]) -> int:
    """Stop gradients for parameters whose names start with any prefix; returns how many were frozen."""
    frozen = 0
    for name, param in model.named_parameters():
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            param.requires_grad_(False)
            frozen += 1
    if prefixes and not frozen:
        raise PipelineError(f"model.freeze: no parameter name starts with {prefixes}; "
                            f"e.g. {next(iter(dict(model.named_parameters())))}")
    return frozen


def param_groups(model: nn.Module, lr: float, weight_decay: float, head_mult: float) -> list[dict]:
    """Body/head x decay/no-decay groups; norms and biases get no weight decay, frozen params none at all."""
    head = head_parameter_names(model)
    groups: dict[tuple[bool, bool], list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = param.ndim <= 1 or name.endswith(".bias")
        groups.setdefault((name in head, no_decay), []).append(param)
    return [{"params": ps, "lr": lr * (head_mult if is_head else 1.0),
             "weight_decay": 0.0 if no_decay else weight_decay, "is_head": is_head}
            for (is_head, no_decay), ps in sorted(groups.items())]


def make_optimizer(name: str, groups: list[dict], lr: float, momentum: float, nesterov: bool) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0)
    return (torch.optim.AdamW if name == "adamw" else torch.optim.Adam)(groups, lr=lr)


def prepare_model(backbone: str, n_classes: int, channels: int, *, pretrained: bool, pretrained_path: str | None,
                  drop_rate: float, freeze_prefixes: list[str],
                  say: Callable[[str], None] = print) -> tuple[nn.Module, bool]:
    """Model with fine-tuning weights loaded and early stages frozen; (model, fine_tuning).
    '{backbone}' in pretrained_path is replaced by the backbone's name."""
    model = build_model(backbone, n_classes, channels, pretrained, drop_rate)
    fine_tuning = pretrained
    if pretrained_path:
        path = Path(pretrained_path.replace("{backbone}", backbone))
        report = load_pretrained(model, path)
        say(f"train: {backbone}: {report['loaded']} tensors from {path}, new: {len(report['new'])} (head)")
        fine_tuning = True
    if freeze_prefixes:
        frozen = freeze(model, freeze_prefixes)
        say(f"train: {backbone}: {frozen} parameter tensors frozen ({freeze_prefixes})")
    return model, fine_tuning


IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def dataset_norm(images: np.ndarray, chunk: int = 1024) -> dict:
    """Per-channel mean and std of the training images, in chunks so a large memmap never becomes float64."""
    total, total_sq, count = 0.0, 0.0, 0
    for start in range(0, len(images), chunk):
        block = np.asarray(images[start:start + chunk], dtype=np.float64).reshape(-1, images.shape[-1]) / 255.0
        total, total_sq, count = total + block.sum(0), total_sq + (block**2).sum(0), count + len(block)
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    return {"mean": mean.round(6).tolist(), "std": np.maximum(std, 1e-3).round(6).tolist()}


def input_norm(mode: str, fine_tuning: bool, channels: int, dataset: dict) -> dict:
    """Dataset statistics, or ImageNet's (averaged for one channel) when fine-tuning pretrained weights."""
    if mode == "dataset" or (mode == "auto" and not fine_tuning):
        return dataset
    if channels == 1:
        return {"mean": [float(np.mean(IMAGENET["mean"]))], "std": [float(np.mean(IMAGENET["std"]))]}
    return IMAGENET
