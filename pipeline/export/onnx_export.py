"""ONNX export of one fold model, checked against torch with onnxruntime.

The graph takes the normalised input `image` (N, C, H, W) float32 and returns `logits`, with the batch dynamic (a
deployment picks its own) and the spatial size too where the network allows it (the bundle's scale<f> TTA views feed
other sizes).
Normalisation and the head's activation stay outside the graph, as they do in torch, so the same predict.py code
runs on either engine and the check below compares like with like (logits).

torch.onnx.export runs with dynamo=False (the TorchScript exporter): the torch.export-based default needs the
onnxscript package as well, and these convolutional nets have no data-dependent control flow that would need it.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np
import torch

from pipeline.core.artifacts import atomic_write
from pipeline.core.errors import PipelineError

EXPORT_FIX = "export another experiment (export.experiment=...; a timm backbone exports at any size)"


def export_onnx(model: torch.nn.Module, path: Path, in_chans: int, image_size: int, opset: int,
                fix: str = EXPORT_FIX) -> bool:
    """Write `model` (eval mode, on the CPU) to `path` atomically, with a dynamic batch and, when the network allows
    it, a dynamic height and width; returns whether the size is dynamic. Adaptive pooling to a fixed grid (the d2l
    nets' AdaptiveAvgPool2d(5)) needs the input size when the graph is built, so such a net gets a graph for
    `image_size` only (the bundle then writes one per TTA scale). `fix` ends the one-line error."""
    model = model.cpu().eval()
    example = torch.zeros(2, in_chans, image_size, image_size)

    def write(dynamic_size: bool):
        axes = {"image": {0: "batch", 2: "height", 3: "width"} if dynamic_size else {0: "batch"},
                "logits": {0: "batch"}}

        def save(tmp: Path) -> None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice: see the module doc
                torch.onnx.export(model, (example,), str(tmp), dynamo=False, opset_version=opset,
                                  input_names=["image"], output_names=["logits"], dynamic_axes=axes)
        return save

    try:
        try:
            atomic_write(path, write(True))
            return True
        except torch.onnx.errors.SymbolicValueError:
            atomic_write(path, write(False))
            return False
    except (RuntimeError, torch.onnx.errors.OnnxExporterError) as exc:
        why = str(exc).splitlines()[0].split(". Please")[0]  # torch's first sentence, without its bug-report plea
        raise PipelineError(f"{path}: ONNX export failed ({why}); {fix} or try another export.opset") from None


def view_sizes(image_size: int, views: list[str]) -> list[int]:
    """The input sides a member's TTA views feed the network: the image size and each scale<f> view's (what
    F.interpolate with scale_factor makes: the floor of size x f)."""
    return sorted({image_size} | {int(image_size * float(v[5:])) for v in views if v.startswith("scale")})


def session(path: Path):
    """An onnxruntime CPU session of `path` (one thread per op pool: this measures, and matches, torch on CPU)."""
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def to_input(images: np.ndarray, norm: dict) -> np.ndarray:
    """uint8 NHWC -> normalised float32 NCHW, as runtime.to_input does on the CPU."""
    x = torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).float().div_(255.0)  # a copy: memmaps are read-only
    mean = torch.tensor(norm["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(norm["std"]).view(1, -1, 1, 1)
    return ((x - mean) / std).contiguous().numpy()


@torch.no_grad()
def compare(model: torch.nn.Module, path: Path, images: np.ndarray, norm: dict, batch_size: int = 64) -> dict:
    """Max abs difference of logits between torch and onnxruntime on `images`, batch by batch (batches of
    different sizes also exercise the dynamic batch axis), with both engines' seconds."""
    model = model.cpu().eval()
    sess = session(path)
    worst, t_torch, t_onnx = 0.0, 0.0, 0.0
    for start in range(0, len(images), batch_size):
        x = to_input(images[start:start + batch_size], norm)
        t0 = time.perf_counter()
        ref = model(torch.from_numpy(x)).float().numpy()
        t1 = time.perf_counter()
        got = sess.run(None, {"image": x})[0]
        t2 = time.perf_counter()
        worst = max(worst, float(np.max(np.abs(ref - got))))
        t_torch, t_onnx = t_torch + t1 - t0, t_onnx + t2 - t1
    return {"max_abs_diff": worst, "images": len(images), "torch_s": t_torch, "onnx_s": t_onnx}
