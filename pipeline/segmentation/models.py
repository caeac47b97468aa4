"""Segmentation networks from segmentation_models_pytorch: an architecture (U-Net, FPN, DeepLabV3+, ...) on an
encoder (smp's own, or any timm model as `tu-<name>`), one output channel per class (sigmoid: classes may
overlap, as in Severstal and Understanding Clouds).

No weights come from the hub unless encoder_weights asks for them; `load_pretrained` takes a local file of the
whole model or of its encoder instead.
"""

from __future__ import annotations

from pathlib import Path

import segmentation_models_pytorch as smp
import torch

from pipeline.core.errors import PipelineError
from pipeline.training.weights import read_state_dict

# ImageNet statistics: what smp's and timm's pretrained encoders were trained on, kept for random init too so a
# pretrained_path file and a random start see the same inputs
NORM = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}


def create(arch: str, encoder: str, n_classes: int, encoder_weights: str | None = None) -> torch.nn.Module:
    """smp.create_model with a one-line error for an encoder smp does not know."""
    try:
        return smp.create_model(arch, encoder_name=encoder, encoder_weights=encoder_weights, in_channels=3,
                                classes=n_classes)
    except (KeyError, ValueError, RuntimeError) as exc:
        raise PipelineError(f"segment.models: {arch} on encoder '{encoder}' cannot be built ({str(exc)[:160]}); "
                            "use an smp encoder (resnet18, efficientnet-b0) or a timm model as tu-<name>") from None


def load_pretrained(model: torch.nn.Module, path: Path) -> str:
    """Load a state dict of the whole model (the segmentation head may be shaped for another class count and then
    keeps its random init) or of its encoder; returns what was loaded, in words."""
    state = read_state_dict(path, "segment.models pretrained_path")
    for part, root in (("whole model", model), ("encoder", model.encoder)):
        own = root.state_dict()
        for prefix in ("", "model.", "encoder."):
            found = {k: state[prefix + k] for k in own if prefix + k in state}
            fits = {k: v for k, v in found.items() if v.shape == own[k].shape}
            if len(fits) >= 0.9 * len(own):
                root.load_state_dict(fits, strict=False)
                return f"{part} from {path} ({len(fits)} of {len(own)} tensors)"
    raise PipelineError(f"segment.models pretrained_path {path}: fits neither the model nor its encoder (too few "
                        "tensors of matching name and shape); give a state dict of either")
