"""Offline inference bundle: the pipeline's chosen submission, recomputed from the bundle's files alone.

This file is copied verbatim into submissions/<competition>-bundle/predict.py by `make bundle`. It imports
only torch, timm, numpy, pandas and Pillow (what a Kaggle image has) and never the pipeline: what the pipeline
does between an image file and a submission row (decoding, resizing, normalising, the TTA views kept, the
fold mean, the blend, the thresholds, the submission's columns and order) is written out here again, and
`spec.json` beside it holds every number that run chose. tests/test_bundle.py checks that the result equals
the pipeline's own submission.

    python predict.py --data /kaggle/input/<competition> --out submission.csv [--batch-size 64]
                      [--device auto|cpu|cuda] [--engine torch|onnx] [--proba-out blended.csv]
                      [--detections-out boxes.csv]

`--engine onnx` runs the members' ONNX files with onnxruntime (bundles made with `export.bundle_onnx=true`; a
detection bundle's graphs are its detectors' network parts, the decoding and fusion stay in torch).
A detection bundle (spec task "detection") runs detection.py beside this file instead of the members and blend;
it needs torchvision as well (Kaggle images have it).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

HERE = Path(__file__).resolve().parent
EPS = 1e-15  # the blends' probability floor (scoring/blend.py)


class BundleError(Exception):
    """A problem the user can fix: printed as one line, exit status 2."""


# --- images: the pipeline's data/images.py and data/cache.py, step for step ---------------------------------------

_HIGH_BIT = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


def _flatten_alpha(im: Image.Image) -> Image.Image:
    rgba = im.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _to_8bit(im: Image.Image) -> np.ndarray:
    arr = np.asarray(im, dtype=np.float64)
    top = 65535.0 if im.mode != "F" and arr.max() > 255 else max(float(arr.max()), 255.0)
    return np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)


def _normalise(im: Image.Image) -> np.ndarray:
    if im.mode in _HIGH_BIT:
        return _to_8bit(im)
    if im.mode == "P":
        im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        im = _flatten_alpha(im)
    if im.mode == "1":
        im = im.convert("L")
    if im.mode not in ("L", "RGB"):
        im = im.convert("RGB")
    return np.asarray(im, dtype=np.uint8).copy()


def load_image(path: Path, max_pixels: int) -> np.ndarray:
    """Upright uint8 (H, W) or (H, W, 3), as the pipeline decodes it (EXIF, modes, 16-bit, alpha on white)."""
    if Image.MAX_IMAGE_PIXELS is not None and max_pixels > 2 * Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as im:
                if im.size[0] * im.size[1] > max_pixels:
                    raise BundleError(f"{path}: {im.size[0] * im.size[1]:,} pixels, above max_pixels={max_pixels:,}")
                im.load()
                arr = _normalise(ImageOps.exif_transpose(im))
    except (OSError, ValueError, SyntaxError) as exc:
        raise BundleError(f"{path}: cannot decode image ({type(exc).__name__}: {exc})") from None
    return arr


def to_channels(arr: np.ndarray, channels: int) -> np.ndarray:
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.shape[2] == channels:
        return arr
    if channels == 3:
        return np.repeat(arr, 3, axis=2)
    return np.asarray(Image.fromarray(arr).convert("L"))[..., None]


def resize(arr: np.ndarray, size: int) -> np.ndarray:
    if arr.shape[0] == size and arr.shape[1] == size:
        return arr
    squeeze = arr.ndim == 3 and arr.shape[2] == 1
    out = np.asarray(Image.fromarray(arr[..., 0] if squeeze else arr).resize((size, size), Image.BILINEAR))
    return out[..., None] if squeeze else out


def decode_all(paths: list[Path], size: int, channels: int, max_pixels: int) -> np.ndarray:
    """(N, size, size, channels) uint8, each image decoded once per (size, channels), in threads (Pillow releases
    the GIL while it decodes and resizes)."""
    out = np.empty((len(paths), size, size, channels), dtype=np.uint8)
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        for i, arr in enumerate(pool.map(lambda p: resize(to_channels(load_image(p, max_pixels), channels), size),
                                         paths)):
            out[i] = arr
    return out


# --- test-time views: training/tta.py ------------------------------------------------------------------------------

FIXED = {
    "identity": lambda x: x,
    "hflip": lambda x: x.flip(-1),
    "vflip": lambda x: x.flip(-2),
    "rot90": lambda x: x.rot90(1, (2, 3)),
    "rot180": lambda x: x.rot90(2, (2, 3)),
    "rot270": lambda x: x.rot90(3, (2, 3)),
}


def random_affine(n: int, seed: int, k: int, degrees: float, scale: float, shift: float) -> torch.Tensor:
    """The k-th random view's (n, 2, 3) affine matrices, drawn as the pipeline draws them (seed, k, image index)."""
    gen = torch.Generator().manual_seed(seed * 1009 + k)
    u = torch.rand(n, 4, generator=gen) * 2 - 1
    angle, zoom = u[:, 0] * math.radians(degrees), 1 + u[:, 1] * scale
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    tx, ty = u[:, 2] * shift * 2, u[:, 3] * shift * 2
    return torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)


def apply_view(name: str, x: torch.Tensor, theta: torch.Tensor | None = None) -> torch.Tensor:
    if name in FIXED:
        return FIXED[name](x)
    if name.startswith("scale"):
        return F.interpolate(x, scale_factor=float(name[5:]), mode="bilinear", align_corners=False)
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


# --- networks -----------------------------------------------------------------------------------------------------

def build_network(backbone: str, n_out: int, in_chans: int, drop_rate: float) -> torch.nn.Module:
    """A timm model, or one of the pipeline's d2l nets from classic.py (copied into the bundle beside this file)."""
    if backbone.startswith("d2l_"):
        spec = importlib.util.spec_from_file_location("bundle_classic", HERE / "classic.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.CLASSIC[backbone](n_out, in_chans, drop_rate)
    import timm  # only when a timm backbone is used

    return timm.create_model(backbone, pretrained=False, num_classes=n_out, in_chans=in_chans, drop_rate=drop_rate)


class TorchRunner:
    """One fold model in torch: the safetensors weights on the device, in eval mode."""

    def __init__(self, member: dict, fold: dict, device: torch.device):
        from safetensors.torch import load_file  # safetensors comes with timm (and the pipeline's bundles need it)

        self.device = device
        self.model = build_network(member["backbone"], fold["head"]["n_out"], member["in_chans"], member["drop_rate"])
        self.model.load_state_dict(load_file(str(HERE / fold["weights"])))
        self.model.to(device).eval()

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.to(self.device)).float().cpu()


class OnnxRunner:
    """One fold model in onnxruntime (input `image`, output `logits`, dynamic batch): one graph for any size, or
    one per input side when the network needs its input size fixed (spec: fold["onnx"] maps "any" or a side to a
    file)."""

    def __init__(self, member: dict, fold: dict, device: torch.device):
        import onnxruntime as ort

        if not fold.get("onnx"):
            raise BundleError("--engine onnx: this bundle has no ONNX files; rebuild it with "
                              "`make bundle OVERRIDES=export.bundle_onnx=true` or use --engine torch")
        providers = (["CUDAExecutionProvider", "CPUExecutionProvider"] if device.type == "cuda"
                     else ["CPUExecutionProvider"])
        self.sessions = {side: ort.InferenceSession(str(HERE / rel), providers=providers)
                         for side, rel in fold["onnx"].items()}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        sess = self.sessions.get("any") or self.sessions.get(str(x.shape[-1]))
        if sess is None:
            raise BundleError(f"spec.json: no ONNX graph for {x.shape[-1]} px inputs; rebuild the bundle")
        return torch.from_numpy(sess.run(None, {"image": x.cpu().numpy()})[0]).float()


@torch.no_grad()
def view_logits(run, images: np.ndarray, views: list[str], norm: dict, tta: dict, batch_size: int) -> torch.Tensor:
    """(n_views, N, n_out) logits: the same-size views of a batch in one forward pass, each scale view in its own
    (training/tta.py's tta_logits)."""
    thetas = {v: random_affine(len(images), tta["seed"], int(v[6:]), tta["degrees"], tta["scale"], tta["shift"])
              for v in views if v.startswith("random")}
    mean = torch.tensor(norm["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(norm["std"]).view(1, -1, 1, 1)
    stacked = [v for v in views if not v.startswith("scale")]
    out = [[] for _ in views]
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(np.array(images[start:start + batch_size])).permute(0, 3, 1, 2).float().div_(255.0)
        x = (x - mean) / std
        end = start + len(x)
        if stacked:
            batch = torch.cat([apply_view(v, x, thetas[v][start:end] if v in thetas else None) for v in stacked])
            logits = run(batch).view(len(stacked), len(x), -1)
            for v, part in zip(stacked, logits, strict=True):
                out[views.index(v)].append(part)
        for v in views:
            if v.startswith("scale"):
                out[views.index(v)].append(run(apply_view(v, x)))
    return torch.stack([torch.cat(parts) for parts in out])


# --- predictions of one member: heads.py's activate/pooled and tta.py's merge ---------------------------------------

def activate(head: dict, logits: torch.Tensor) -> torch.Tensor:
    logits = logits.float()
    if head["task"] == "single_label":
        return logits.softmax(-1)
    if head["task"] == "multi_label":
        return logits.sigmoid()
    z = logits.sigmoid() if head["loss"] == "bce_scaled" else logits
    return head["center"] + head["scale"] * z


def merge_views(logits: torch.Tensor, how: str, task: str) -> np.ndarray:
    """(n_views, N, C) logits (numbers: values) -> (N, C) predictions, merged as the predict stage merges them."""
    t = logits.float()
    if task == "single_label":
        return (t.softmax(-1).mean(0) if how == "mean" else t.log_softmax(-1).mean(0).softmax(-1)).numpy()
    if task == "multi_label":
        return (t.mean(0).sigmoid() if how == "geometric" else t.sigmoid().mean(0)).numpy()
    return t.mean(0).numpy()  # numbers: the mean of the views' values


def member_predictions(member: dict, images: np.ndarray, runner, device, batch_size: int, task: str) -> np.ndarray:
    """The member's test predictions: each fold model's kept views merged, then the mean over fold models."""
    per_fold = []
    for fold in member["folds"]:
        run = runner(member, fold, device)
        logits = view_logits(run, images, member["tta"]["views"], fold["norm"], member["tta"], batch_size)
        if task in ("regression", "ordinal"):  # a number head's scaling is per fold: values before merging
            logits = torch.stack([activate(fold["head"], v) for v in logits])
        per_fold.append(merge_views(logits, member["tta"]["merge"], task))
    return np.mean(per_fold, axis=0)


# --- the blend: scoring/blend.py's arithmetic with the fitted parameters ---------------------------------------------

def _ranks(P: np.ndarray) -> np.ndarray:
    """Each (model, column)'s ranks over the rows, ties averaged (scipy's rankdata, done by pandas)."""
    return np.stack([pd.DataFrame(m).rank(axis=0, method="average").to_numpy() for m in P])


def blend(P: np.ndarray, spec: dict) -> np.ndarray:
    """(n_models, N, C) member predictions -> (N, C) blended predictions."""
    how = spec["how"]
    if how == "stack":
        features = np.log(np.clip(P, spec["floor"], 1.0)).transpose(1, 0, 2).reshape(P.shape[1], -1)
        decision = features @ np.asarray(spec["coef"]).T + np.asarray(spec["intercept"])
        if decision.shape[1] == 1:  # scikit-learn's binary logistic regression: one logit for the second class
            p1 = 1.0 / (1.0 + np.exp(-decision[:, 0]))
            proba = np.stack([1.0 - p1, p1], 1)
        else:
            e = np.exp(decision - decision.max(1, keepdims=True))
            proba = e / e.sum(1, keepdims=True)
        out = np.zeros(P.shape[1:])
        out[:, spec["classes"]] = proba
        return out
    w = np.asarray(spec["weights"], dtype=np.float64)
    if how == "single":
        return P[int(np.argmax(w))]
    if how == "linear":
        return np.tensordot(w, P, axes=1)
    if how == "geometric":
        logp = np.tensordot(w, np.log(np.clip(P, EPS, 1)), axes=1)
        out = np.exp(logp - logp.max(1, keepdims=True))
        return out / out.sum(1, keepdims=True)
    if how == "rank":
        out = np.tensordot(w, _ranks(P) / P.shape[1], axes=1)
        return out / out.sum(1, keepdims=True)
    if how == "rank_values":
        order, values = np.tensordot(w, _ranks(P), axes=1), np.tensordot(w, P, axes=1)
        out = np.empty_like(values, dtype=np.float64)
        for j in range(values.shape[1]):
            out[np.argsort(order[:, j], kind="stable"), j] = np.sort(values[:, j])
        return out
    raise BundleError(f"spec.json: blend how={how!r} is unknown to this predict.py; rebuild the bundle")


# --- the submission: scoring/submission.py's build ---------------------------------------------------------------

def submission_frame(spec: dict, ids: list[str], pred: np.ndarray, order: list[str]) -> pd.DataFrame:
    """The submission in `order` (sample_submission's ids, else test.csv's) with the spec's columns."""
    sub, task = spec["submission"], spec["task"]
    names = spec["classes"] if task in ("single_label", "multi_label") else ["pred"]
    rows = pd.DataFrame(pred, index=pd.Index(ids), columns=names).loc[order]
    id_col, value_cols = sub["id_column"], sub["value_columns"]
    cuts = spec["thresholds"]
    if sub["kind"] == "probabilities":
        return pd.concat([pd.DataFrame({id_col: order}), rows[value_cols].reset_index(drop=True)], axis=1)
    values = rows.to_numpy()
    if task == "regression":
        out = values[:, 0]
    elif task == "ordinal":
        edges = np.arange(len(spec["classes"]) - 1) + 0.5 if cuts is None else np.asarray(cuts)
        out = np.asarray(spec["classes"], dtype=object)[np.searchsorted(edges, values[:, 0], side="right")]
    elif task == "multi_label":
        tags = spec["classes"]
        cut = np.full(len(tags), 0.5) if cuts is None else np.broadcast_to(np.asarray(cuts, float), len(tags))
        on = values >= cut
        on[np.arange(len(values)), values.argmax(1)] |= ~on.any(1)  # every row holds at least its likeliest tag
        out = [spec["separator"].join(t for t, o in zip(tags, row, strict=True) if o) for row in on]
    else:
        out = np.asarray(spec["classes"], dtype=object)[values.argmax(1)]
    return pd.DataFrame({id_col: order, value_cols[0]: out})


def read_ids(path: Path, id_col: str) -> list[str]:
    if not path.is_file():
        raise BundleError(f"{path}: not found; pass --data the folder holding the competition's CSVs")
    frame = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True, encoding="utf-8-sig")
    if id_col not in frame.columns:
        raise BundleError(f"{path}: column '{id_col}' missing (columns {list(frame.columns)}); "
                          "the bundle was made for another competition")
    return frame[id_col].tolist()


def image_paths(data: Path, ids: list[str], spec: dict) -> list[Path]:
    inp = spec["input"]
    out = []
    for ident in ids:
        rel = (str(Path(inp["image_dir"]) / (ident + inp["image_suffix"])) if inp["image_dir"] or inp["image_suffix"]
               else ident)
        path = data / rel
        if not path.is_file():
            raise BundleError(f"{path}: image of test id '{ident}' not found under --data {data}")
        out.append(path)
    return out


def warn_versions(made_with: dict[str, str]) -> None:
    """One line per package whose version differs from the bundle's (the weights may still load; if a timm model
    fails to, install the version named here)."""
    from importlib.metadata import PackageNotFoundError, version

    for name, wanted in made_with.items():
        try:
            here = version(name)
        except PackageNotFoundError:
            continue
        if here != wanted:
            print(f"note: {name} {here} here, the bundle was made with {wanted}", file=sys.stderr)


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise BundleError("--device cuda: no CUDA device is visible; use --device auto or cpu")
    return torch.device("cuda" if name in ("auto", "cuda") and torch.cuda.is_available() else "cpu")


def predict(spec: dict, data: Path, batch_size: int, device: torch.device, engine: str
            ) -> tuple[list[str], np.ndarray, int]:
    """(test ids, blended predictions, number of images)."""
    ids = read_ids(data / spec["input"]["test_csv"], spec["input"]["id_column"])
    paths = image_paths(data, ids, spec)
    runner = OnnxRunner if engine == "onnx" else TorchRunner
    decoded: dict[tuple[int, int], np.ndarray] = {}
    preds = []
    for member in spec["members"]:
        key = (member["image_size"], member["in_chans"])
        if key not in decoded:
            decoded[key] = decode_all(paths, *key, spec["input"]["max_pixels"])
        preds.append(member_predictions(member, decoded[key], runner, device, batch_size, spec["task"]))
    P = np.stack(preds).astype(np.float64)
    return ids, blend(P, spec["blend"]), len(paths)


# --- detection: detection.py beside this file runs the spec's detection steps ----------------------------------------

def _module(name: str, file: str):
    sys.dont_write_bytecode = True  # the bundle folder may be read-only (a Kaggle dataset); no __pycache__ there
    spec = importlib.util.spec_from_file_location(name, HERE / file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def decode_detection(paths: list[Path], sides: list[int], max_pixels: int) -> tuple[dict, torch.Tensor]:
    """({side: (N, 3, side, side) uint8}, (N, 2) width, height of each image as decoded): each file decoded once,
    as the detection track's cache decodes it (3 channels, resized to the square side)."""
    out = {s: np.empty((len(paths), s, s, 3), dtype=np.uint8) for s in sides}
    sizes = np.empty((len(paths), 2), dtype=np.float32)

    def one(path: Path):
        arr = to_channels(load_image(path, max_pixels), 3)
        return arr.shape[1], arr.shape[0], [resize(arr, s) for s in sides]

    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        for i, (w, h, arrays) in enumerate(pool.map(one, paths)):
            sizes[i] = (w, h)
            for s, arr in zip(sides, arrays, strict=True):
                out[s][i] = arr
    return {s: torch.from_numpy(a).permute(0, 3, 1, 2) for s, a in out.items()}, torch.from_numpy(sizes)


def predict_detection(spec: dict, data: Path, batch_size: int, device: torch.device,
                      engine: str = "torch") -> tuple[list[str], list[dict]]:
    """(test ids, the submitted detections of each test image: boxes in pixels, scores, 0-based labels); engine
    "onnx": the detectors' network parts in onnxruntime."""
    try:
        detection = _module("bundle_detection", "detection.py")
    except ImportError as exc:
        raise BundleError(f"detection bundles need torchvision beside torch ({exc}); pip install torchvision") from None
    ids = read_ids(data / spec["input"]["test_csv"], spec["input"]["id_column"])
    paths = image_paths(data, ids, spec)
    sides = sorted({m["image_size"] for step in spec["detection"]["steps"] for m in step.get("models", [])})
    images, sizes = decode_detection(paths, sides, spec["input"]["max_pixels"])
    try:
        found = detection.run_steps(spec, images, sizes, device, batch_size, engine)
    except ValueError as exc:
        raise BundleError(str(exc)) from None
    except ImportError as exc:
        if exc.name != "onnxruntime":
            raise
        raise BundleError("--engine onnx needs onnxruntime; pip install onnxruntime, or use --engine torch") from None
    return ids, found


def detection_frames(spec: dict, ids: list[str], found: list[dict]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(the submission: image, PredictionString; every box at full precision: image, label, score, box)."""
    detection = _module("bundle_detection", "detection.py")
    sub = spec["submission"]
    frame = pd.DataFrame({sub["id_column"]: ids,
                          sub["value_columns"][0]: detection.prediction_strings(found, spec["classes"])})
    rows = [(ident, spec["classes"][int(c)], float(s), *map(float, b))
            for ident, d in zip(ids, found, strict=True)
            for c, s, b in zip(d["labels"].tolist(), d["scores"].tolist(), d["boxes"].tolist(), strict=True)]
    boxes = pd.DataFrame(rows, columns=["image", "label", "score", "xmin", "ymin", "xmax", "ymax"])
    return frame, boxes


def write_csv(frame: pd.DataFrame, path: Path, **kwargs) -> None:
    """Written beside, then renamed: a killed run leaves no half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    frame.to_csv(tmp, index=False, **kwargs)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="folder with test.csv and the test images")
    parser.add_argument("--out", type=Path, default=Path("submission.csv"), help="submission CSV to write")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass (each with its views)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--engine", choices=["torch", "onnx"], default="torch")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--proba-out", type=Path, default=None,
                        help="also write the blended predictions before thresholds (id + one column each)")
    parser.add_argument("--detections-out", type=Path, default=None,
                        help="detection: also write every submitted box at full precision (one row per box)")
    args = parser.parse_args(argv)
    try:
        if args.batch_size < 1:
            raise BundleError("--batch-size must be at least 1")
        if args.threads:
            torch.set_num_threads(args.threads)
        spec = json.loads((HERE / "spec.json").read_text())
        warn_versions(spec.get("versions", {}))
        device = pick_device(args.device)
        start = time.perf_counter()
        if spec["task"] == "detection":
            ids, found = predict_detection(spec, args.data, args.batch_size, device, args.engine)
            frame, boxes = detection_frames(spec, ids, found)
            write_csv(frame, args.out)
            if args.detections_out:
                write_csv(boxes, args.detections_out, float_format="%.9g")
            took = time.perf_counter() - start
            n_models = sum(len(m["folds"]) for step in spec["detection"]["steps"] for m in step.get("models", []))
            print(f"bundle: {len(ids)} images, {n_models} detector(s) on {device} ({args.engine}): {took:.2f} s, "
                  f"{len(ids) / took:.1f} images/s; {len(boxes)} boxes; submission written to {args.out}")
            return 0
        ids, pred, n = predict(spec, args.data, args.batch_size, device, args.engine)
        sample = args.data / spec["input"]["sample_submission_csv"]
        order = read_ids(sample, spec["submission"]["id_column"]) if sample.is_file() else ids
        missing = sorted(set(order) - set(ids))
        if missing:
            raise BundleError(f"{sample}: id '{missing[0]}' is not in test.csv; the two files must list the same ids")
        frame = submission_frame(spec, ids, pred, order)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_name(args.out.name + ".tmp")
        frame.to_csv(tmp, index=False)
        tmp.replace(args.out)  # a killed run leaves no half-written submission
        if args.proba_out:
            cols = spec["classes"] if spec["task"] in ("single_label", "multi_label") else ["pred"]
            proba = pd.DataFrame(pred, columns=cols)
            proba.insert(0, "id", ids)
            proba.to_csv(args.proba_out, index=False, float_format="%.9g")
        took = time.perf_counter() - start
        print(f"bundle: {n} images, {len(spec['members'])} members on {device} ({args.engine}): "
              f"{took:.2f} s, {n / took:.1f} images/s; submission written to {args.out}")
    except BundleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
