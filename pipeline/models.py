"""Backbones by name from timm, with one-line errors for unknown names and offline hub weights."""

from __future__ import annotations

import difflib

import timm
import torch.nn as nn

from .errors import PipelineError


def build_model(name: str, num_classes: int, in_chans: int, pretrained: bool = False, drop_rate: float = 0.0) -> nn.Module:
    """A timm model with a fresh `num_classes` head; grayscale weights are adapted by timm (in_chans)."""
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else "; see timm.list_models()"
        raise PipelineError(f"model.backbones: unknown timm model '{name}'{hint}")
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate)
    except (OSError, RuntimeError, ValueError) as exc:
        if pretrained:
            raise PipelineError(
                f"model.pretrained: could not fetch weights for '{name}' from the hub ({type(exc).__name__}); "
                "go online or set model.pretrained=false"
            ) from None
        raise
