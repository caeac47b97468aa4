"""Decoded-image cache: decode and resize every image once into one uint8 array.

Training reads batches from this array (N, S, S, C) instead of decoding files every epoch, which
for small-image competitions is most of the cost. The file is keyed by the image list, the bytes
of those images, the image size and the channel count, so a change rebuilds it.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline.core.artifacts import atomic_write, content_key, fingerprint, read_json
from pipeline.data.images import MAX_PIXELS, load_image, resize, to_channels


def input_channels(mode: str, clean_json: Path) -> int:
    """1 for all-grayscale competitions under competition.channels=auto (clean.json says), else 3."""
    if mode == "auto":
        return 1 if read_json(clean_json, "run `make clean-data`")["all_gray"] else 3
    return 1 if mode == "gray" else 3


def _decode(path: str, size: int, channels: int, max_pixels: int) -> np.ndarray:
    return resize(to_channels(load_image(path, max_pixels), channels), size)


def decoded_images(cache_dir: Path, paths: list[str], size: int, channels: int, desc: str,
                   max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """(N, size, size, channels) uint8 for `paths`, from `cache_dir` (WORK/cache) when already built."""
    return cached_decode(cache_dir, content_key(paths), paths, size, channels, desc, max_pixels)


def cached_decode(folder: Path, source_key: str | None, paths: list[str], size: int, channels: int, desc: str,
                  max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """The cache file for these paths at this size, built once; `source_key` names the files' content."""
    key = fingerprint(source_key, list(paths), size, channels)
    file = Path(folder) / f"{desc}-{size}px-{channels}ch-{key}.npy"
    if file.exists():
        return np.load(file, mmap_mode="r")
    file.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(file, lambda tmp: _fill(tmp, paths, size, channels, desc, max_pixels))
    return np.load(file, mmap_mode="r")


def _fill(tmp, paths: list[str], size: int, channels: int, desc: str, max_pixels: int) -> None:
    """Decode into a preallocated .npy memmap, so memory holds one batch of decodes, not the dataset twice."""
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(paths), size, size, channels))
    workers = min(8, (os.cpu_count() or 1) * 2)
    with ThreadPoolExecutor(workers) as pool:
        job = partial(_decode, size=size, channels=channels, max_pixels=max_pixels)
        bar = tqdm(pool.map(job, paths, chunksize=16), total=len(paths), desc=f"cache: {desc}", unit="img",
                   disable=None)
        for i, arr in enumerate(bar):
            out[i] = arr
    out.flush()
    del out
