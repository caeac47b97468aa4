"""Decode any image file into a uint8 array with a consistent mode.

Competitions ship grayscale, RGB, RGBA, palette, 16-bit and EXIF-rotated files side by side; Pillow
opens all of them but hands back different modes. Everything downstream sees either an (H, W) gray
array or an (H, W, 3) RGB array, upright, 8-bit.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.core.errors import PipelineError

MAX_PIXELS = 89_478_485  # Pillow's default limit (a 9459 x 9459 image); clean.max_pixels' default
ROTATED = {5, 6, 7, 8}  # EXIF orientations that swap width and height
_HIGH_BIT = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


def _flatten_alpha(im: Image.Image) -> Image.Image:
    """Composite transparent pixels on white: the background a viewer shows."""
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


def _too_large(path: Path, pixels: int, max_pixels: int) -> PipelineError:
    return PipelineError(f"{path}: cannot decode image: {pixels:,} pixels, above clean.max_pixels={max_pixels:,} "
                         "(a decompression bomb?); raise clean.max_pixels if the image is genuine")


def load_image(path: Path, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Upright uint8 array, (H, W) for grayscale or (H, W, 3); PipelineError when undecodable.

    Images of more than max_pixels pixels are refused from their header, before any decoding: a small
    file can claim a huge canvas (a decompression bomb) and fill the memory of the process decoding it.
    """
    if Image.MAX_IMAGE_PIXELS is not None and max_pixels > 2 * Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = None  # Pillow refuses above twice its own limit before we see the size
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as im:
                if im.size[0] * im.size[1] > max_pixels:
                    raise _too_large(path, im.size[0] * im.size[1], max_pixels)
                im.load()
                im = ImageOps.exif_transpose(im)
                arr = _normalise(im)
    except Image.DecompressionBombError as exc:
        claimed = re.search(r"\((\d+) pixels\)", str(exc))
        raise _too_large(path, int(claimed.group(1)) if claimed else 2 * (Image.MAX_IMAGE_PIXELS or 0),
                         max_pixels) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise PipelineError(f"{path}: cannot decode image ({type(exc).__name__}: {exc})") from None
    if arr.size == 0:
        raise PipelineError(f"{path}: image has no pixels")
    return arr


def image_size(path: str) -> tuple[int, int]:
    """(width, height) as the pixels will be decoded (EXIF rotation applied), read from the header only."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            orientation = im.getexif().get(0x0112, 1)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise PipelineError(f"{path}: cannot decode image ({type(exc).__name__}: {exc})") from None
    return (h, w) if orientation in ROTATED else (w, h)


def is_gray(arr: np.ndarray) -> bool:
    """True for (H, W) arrays and for RGB arrays whose three channels are equal."""
    if arr.ndim == 2:
        return True
    return bool((arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all())


def to_channels(arr: np.ndarray, channels: int) -> np.ndarray:
    """(H, W, channels) uint8: gray is replicated to RGB, RGB becomes luma (ITU-R 601) for gray."""
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.shape[2] == channels:
        return arr
    if channels == 3:
        return np.repeat(arr, 3, axis=2)
    luma = np.asarray(Image.fromarray(arr).convert("L"))
    return luma[..., None]


def resize(arr: np.ndarray, size: int) -> np.ndarray:
    """Square resize with Pillow's bilinear filter (antialiased when shrinking)."""
    if arr.shape[0] == size and arr.shape[1] == size:
        return arr
    squeeze = arr.ndim == 3 and arr.shape[2] == 1
    im = Image.fromarray(arr[..., 0] if squeeze else arr)
    out = np.asarray(im.resize((size, size), Image.BILINEAR))
    return out[..., None] if squeeze else out
