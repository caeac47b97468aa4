"""Embedding duplicates: image embeddings from a timm backbone, cosine-similarity search with faiss.

Perceptual hashes and the small-image grids find re-encodes, resizes, 5% crops and recolours; what top
solutions also dedup with embeddings are bigger crops, stronger recolours and the same object photographed
twice. Each image goes through a backbone whose weights come from a local file (model.pretrained_path, or
the competition's own trained fold model); the input of its classifier (the pooled pre-logits features) is
the embedding, L2-normalised so that inner product is cosine similarity. A randomly initialised backbone
is useless here (its pooled ReLU features of any two images are > 0.99 similar), so weights are required
and must cover the whole body.

Search: every pair above a similarity threshold, with faiss's range search. Up to EXACT_LIMIT images the
index is exact (IndexFlatIP: every pair compared, n^2 d multiply-adds); beyond, an inverted-file index
(IndexIVFFlat, NPROBE of ~sqrt(n * NPROBE) lists probed per query) compares each image with the ~1% of
images in the lists nearest to it: near duplicates are each other's nearest neighbours and land in the
same or neighbouring lists, so they are still found, in a fraction of the time (benchmarks/dedup.py:
100,000 x 512-d). An exact search of 100,000 images is ~5e12 multiply-adds, over a minute on 2 cores.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import faiss
import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from pipeline.core.errors import PipelineError
from pipeline.data.images import MAX_PIXELS, load_image, resize, to_channels

EXACT_LIMIT = 20_000  # above this many images, the approximate index (module docstring)
NPROBE = 8
BATCH = 64


@dataclass(frozen=True)
class Source:
    """The weights that embed, resolved by the clean stage: a model.pretrained_path file or a fold run's."""

    backbone: str
    weights: Path
    digest: str  # of the weights file: part of the clean stage's key
    image_size: int
    channels: int
    norm: dict  # {"mean": [...], "std": [...]} per channel
    kind: str  # "pretrained" or "fold"

    def key(self) -> dict:
        return {"backbone": self.backbone, "digest": self.digest, "image_size": self.image_size,
                "channels": self.channels, "norm": self.norm, "kind": self.kind}


def load_model(source: Source) -> nn.Module:
    """The backbone with every body tensor from `source.weights` (head left out: only its input is used).

    A file lacking some body tensors would leave them random, and random features pair unrelated images,
    so that is an error naming the file.
    """
    # imported here: timm pulls in huggingface_hub and its tqdm.autonotebook (a warning in notebooks), which the
    # clean stage needs only when clean.embeddings is on
    from pipeline.training.models import build_model, head_parameter_names, load_pretrained

    model = build_model(source.backbone, 1, source.channels)
    report = load_pretrained(model, source.weights)
    head = head_parameter_names(model)
    head_modules = {h.rsplit(".", 1)[0] for h in head}
    missing = [n for n in report["new"] if n.rsplit(".", 1)[0] not in head_modules
               and not n.endswith("num_batches_tracked")]  # a counter, not a weight
    if missing:
        key = "model.pretrained_path" if source.kind == "pretrained" else "the fold run"
        raise PipelineError(f"clean.embeddings: {source.weights} ({key}) lacks {len(missing)} tensors of "
                            f"{source.backbone} (e.g. {missing[0]}); point it at this backbone's weights or set "
                            "clean.embedding_backbone to the backbone it holds")
    return model.eval()


def _decode(path: str, size: int, channels: int, max_pixels: int) -> np.ndarray:
    return resize(to_channels(load_image(path, max_pixels), channels), size)


def features(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """The classifier's input (pooled pre-logits features), whatever the architecture: timm models and the
    course nets all expose their classifier through get_classifier()."""
    seen: list[torch.Tensor] = []
    hook = model.get_classifier().register_forward_pre_hook(lambda _m, inputs: seen.append(inputs[0]))
    try:
        model(batch)
    finally:
        hook.remove()
    return seen[0].flatten(1)


@torch.no_grad()
def embed(model: nn.Module, paths: list[str], image_size: int, channels: int, norm: dict,
          device: torch.device | str = "cpu", batch_size: int = BATCH,
          max_pixels: int = MAX_PIXELS, desc: str = "clean: embed") -> np.ndarray:
    """(N, D) float32 L2-normalised embeddings of the images, decoded a batch at a time (never all in memory)."""
    model = model.to(device).eval()
    mean = torch.tensor(norm["mean"], device=device).view(1, -1, 1, 1)
    std = torch.tensor(norm["std"], device=device).view(1, -1, 1, 1)
    job = partial(_decode, size=image_size, channels=channels, max_pixels=max_pixels)
    out = []
    with ThreadPoolExecutor(4) as pool, tqdm(total=len(paths), desc=desc, unit="img", disable=None) as bar:
        for start in range(0, len(paths), batch_size):
            arrays = list(pool.map(job, paths[start:start + batch_size]))
            x = torch.from_numpy(np.stack(arrays)).to(device).permute(0, 3, 1, 2).float() / 255.0
            out.append(features(model, (x - mean) / std).float().cpu().numpy())
            bar.update(len(arrays))
    vectors = np.concatenate(out) if out else np.zeros((0, 1), np.float32)
    return normalise(vectors)


def normalise(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (an all-zero row stays zero: it pairs with nothing)."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def make_index(vectors: np.ndarray, exact_limit: int = EXACT_LIMIT, seed: int = 0) -> faiss.Index:
    """An inner-product index over the (unit) vectors: exact up to exact_limit rows, IVF beyond."""
    n, d = vectors.shape
    if n <= exact_limit:
        index = faiss.IndexFlatIP(d)
    else:
        nlist = max(1, int(math.sqrt(n * NPROBE)))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        sample = np.random.default_rng(seed).choice(n, min(n, 40 * nlist), replace=False)
        index.train(vectors[np.sort(sample)])  # k-means on 40 rows per list: enough for the lists, 6x faster
        index.nprobe = NPROBE
    index.add(vectors)
    return index


def similar_pairs(vectors: np.ndarray, threshold: float, exact_limit: int = EXACT_LIMIT,
                  progress: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs (i < j, cosine similarity) of the unit `vectors` whose similarity is above `threshold`.

    faiss's range search, a block of queries at a time (the results of a block are all that memory holds
    beyond the index); a pair found from both sides is listed once.
    """
    if not -1 <= threshold < 1:
        raise PipelineError(f"clean.embedding_threshold={threshold}: must be in [-1, 1)")
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n = len(vectors)
    empty = np.zeros(0, np.int64)
    if n < 2:
        return empty, empty, np.zeros(0, np.float32)
    index = make_index(vectors, exact_limit)
    qs, bs, ss = [empty], [empty], [np.zeros(0, np.float32)]
    block = 8192
    for start in range(0, n, block):
        lims, sims, found = index.range_search(vectors[start:start + block], float(threshold))
        q = start + np.repeat(np.arange(len(lims) - 1), np.diff(lims).astype(np.int64))
        keep = q != found
        qs.append(q[keep])
        bs.append(found[keep].astype(np.int64))
        ss.append(sims[keep])
        if progress:
            progress(min(block, n - start))
    q, b, s = np.concatenate(qs), np.concatenate(bs), np.concatenate(ss)
    return _best_per_pair(np.minimum(q, b), np.maximum(q, b), s, n)


def _best_per_pair(i: np.ndarray, j: np.ndarray, sim: np.ndarray, n: int):
    key = i * n + j
    order = np.lexsort((-sim, key))
    key, sim = key[order], sim[order]
    first = np.ones(len(key), bool)
    first[1:] = key[1:] != key[:-1]
    return key[first] // n, key[first] % n, sim[first]


def brute_force_pairs(vectors: np.ndarray, threshold: float,
                      block: int = 4096) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The same pairs by numpy matrix products, block by block: the reference the tests and benchmark compare
    faiss against (written out because it is the definition, not for use)."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n = len(vectors)
    out_i, out_j, out_s = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], [np.zeros(0, np.float32)]
    for start in range(0, n, block):
        sims = vectors[start:start + block] @ vectors.T
        r, c = np.nonzero(sims > threshold)
        r = r + start
        keep = r < c
        out_i.append(r[keep])
        out_j.append(c[keep])
        out_s.append(sims[r[keep] - start, c[keep]])
    return np.concatenate(out_i), np.concatenate(out_j), np.concatenate(out_s)
