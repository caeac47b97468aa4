"""Exact and near-duplicate search: per-image fingerprints, a multi-index Hamming search, groups.

Each image is decoded once and gets: a hash of its decoded pixels (exact duplicates, gray RGB
counted as gray), a flat-colour flag, and perceptual hashes (imagehash's pHash and dHash, 64 bits
each) of the whole image and of five 95% crops (centre and corners). Two images are near
duplicates when, for some crop of one, pHash distance + dHash distance to the other's whole-image
hashes is at most `threshold` (of 128 bits). The crops make the test robust to small crops, which
move whole-image perceptual hashes far; re-encoding, resizing, brightness/contrast shifts and
gray<->RGB move them little.

The search is exact without a double loop: a distance sum <= threshold <= 15 means one of the two
64-bit hashes differs in at most 7 bits, so (pigeonhole) one of its four 16-bit chunks differs in
at most 1 bit. Each chunk value indexes a bucket table; every query probes its chunk and the 16
one-bit neighbours, and the candidates are verified with vectorised popcounts. Written here
because no maintained Python package does multi-index Hamming search on numpy arrays.

Images with a side below `near_min_size` have too few pixels for perceptual hashes (at size 1, the
1,797 8x8 digits give 414 false pairs); they are compared in pixel space instead. The luma is
resized to an 8x8 grid, made zero-mean and unit-norm (so brightness and contrast shifts, gray<->RGB
and re-encoding move it little), and paired by an exact radius search (scikit-learn) when the
Euclidean distance (0..2; d^2 = 2 - 2 * correlation) is at most `threshold`. A one-pixel shift moves
these vectors far, so, like the crops above, each image also queries with its eight one-pixel
shifts (edges replicated) against the others' unshifted vectors. An 8x8 grid keeps the digits
apart best: on the 1,797 embedded digits the closest two of different labels are 0.270 apart
(16x16: 0.217), while the planted 28x28 transforms stay within 0.18.

Over a table of images (the clean stage's rows, the EDA notebook's): `compute_features` fingerprints every
path in worker processes, `find_pairs` lists the exact, near and small pairs among the rows, and
`embedding_pair_frame` keeps the embedding pairs (pipeline/training/embeddings.py) that the others missed.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ProcessPoolExecutor
from functools import partial

import imagehash
import numpy as np
import pandas as pd
from PIL import Image
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from sklearn.neighbors import NearestNeighbors
from tqdm import tqdm

from pipeline.core.errors import PipelineError
from pipeline.data.images import MAX_PIXELS, is_gray, load_image
from pipeline.data.workers import end_with_parent

CROP = 0.95
MAX_THRESHOLD = 15  # the pigeonhole argument above holds up to here
_CHUNKS = 4
_MASKS = np.array([0] + [1 << b for b in range(16)], dtype=np.uint64)
SMALL_GRID = 16
SHIFTS = [(dx, dy) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]  # (0, 0) is the image itself
_UNSHIFTED = SHIFTS.index((0, 0))


def _bits_to_int(bits: np.ndarray) -> int:
    return int.from_bytes(np.packbits(bits.flatten()).tobytes(), "big")


def crops(im: Image.Image) -> list[Image.Image]:
    """The whole image, then its centre and four corner crops at 95% of each side."""
    w, h = im.size
    cw, ch = max(1, round(w * CROP)), max(1, round(h * CROP))
    x, y = (w - cw) // 2, (h - ch) // 2
    boxes = [(x, y, x + cw, y + ch), (0, 0, cw, ch), (w - cw, 0, w, ch), (0, h - ch, cw, h), (w - cw, h - ch, w, h)]
    return [im] + [im.crop(b) for b in boxes]


def perceptual_hashes(gray: Image.Image) -> tuple[list[int], list[int]]:
    """pHash and dHash (as ints) of the whole image and of each crop."""
    views = crops(gray)
    return ([_bits_to_int(imagehash.phash(v).hash) for v in views],
            [_bits_to_int(imagehash.dhash(v).hash) for v in views])


def image_features(path: str, near_min_size: int, max_pixels: int = MAX_PIXELS) -> dict:
    """Everything the clean stage needs from one decoded image (runs in a worker process)."""
    try:
        arr = load_image(path, max_pixels)
    except PipelineError as exc:
        return {"error": str(exc)}
    gray = is_gray(arr)
    if gray and arr.ndim == 3:
        arr = arr[..., 0]
    flat = bool((arr == arr.reshape(-1, *arr.shape[2:])[0]).all())
    out = {"pixel": hashlib.sha1(str(arr.shape).encode() + arr.tobytes()).hexdigest(), "gray": gray, "flat": flat,
           "height": arr.shape[0], "width": arr.shape[1], "error": None, "phash": None, "dhash": None}
    out["small"] = None
    if not flat:
        luma = Image.fromarray(arr).convert("L")
        if min(arr.shape[:2]) >= near_min_size:
            out["phash"], out["dhash"] = perceptual_hashes(luma)
        else:
            out["small"] = small_vectors(np.asarray(luma))
    return out


def _unit(grid: np.ndarray) -> np.ndarray | None:
    flat = grid.ravel() - grid.mean()
    norm = float(np.linalg.norm(flat))
    return flat / norm if norm > 1e-6 * flat.size else None


def small_vectors(luma: np.ndarray) -> np.ndarray | None:
    """(9, 64) float32: the zero-mean unit-norm 8x8 grid of the image and of its eight one-pixel shifts
    (row SHIFTS.index((0, 0)) unshifted); None when the grid is flat (nothing to compare)."""
    h, w = luma.shape
    padded = np.pad(luma.astype(np.float32), 1, mode="edge")
    rows = []
    for dx, dy in SHIFTS:
        view = Image.fromarray(padded[1 - dy:1 - dy + h, 1 - dx:1 - dx + w])
        rows.append(_unit(np.asarray(view.resize((SMALL_GRID, SMALL_GRID), Image.BILINEAR), dtype=np.float64)))
    if rows[_UNSHIFTED] is None:
        return None
    return np.array([r if r is not None else np.full(SMALL_GRID ** 2, np.nan) for r in rows], dtype=np.float32)


def small_pairs(vectors: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Near-duplicate pairs (i < j, distance) among N small images, from their (N, 9, 64) small_vectors.

    Every shifted vector queries the unshifted ones with an exact radius search (scikit-learn's
    NearestNeighbors); a pair's distance is the smallest over the shifts of either image.
    """
    if not 0 <= threshold <= 2:
        raise PipelineError(f"clean.small_threshold={threshold}: must be between 0 and 2")
    n, s, _ = vectors.shape
    empty = np.zeros(0, np.int64)
    if n < 2:
        return empty, empty, np.zeros(0)
    queries = vectors.reshape(n * s, -1)
    usable = np.nonzero(~np.isnan(queries).any(1))[0]  # a shift of a two-pixel image can be flat
    index = NearestNeighbors(radius=threshold).fit(vectors[:, _UNSHIFTED].astype(np.float64))
    dist, found = index.radius_neighbors(queries[usable].astype(np.float64))
    counts = np.array([len(f) for f in found])
    q = np.repeat(usable // s, counts)
    b, d = np.concatenate([empty, *found]).astype(np.int64), np.concatenate([np.zeros(0), *dist])
    ok = q != b
    return _closest_per_pair(np.minimum(q[ok], b[ok]), np.maximum(q[ok], b[ok]), d[ok], n)


def _closest_per_pair(i: np.ndarray, j: np.ndarray, dist: np.ndarray, n: int):
    """One row per pair (i, j), with its smallest distance."""
    key = i * n + j
    order = np.lexsort((dist, key))
    key, dist = key[order], dist[order]
    first = np.ones(len(key), bool)
    first[1:] = key[1:] != key[:-1]
    return key[first] // n, key[first] % n, dist[first]


def popcount(x: np.ndarray) -> np.ndarray:
    return np.bitwise_count(x).astype(np.int32)


def _chunk(codes: np.ndarray, c: int) -> np.ndarray:
    return ((codes >> np.uint64(16 * c)) & np.uint64(0xFFFF)).astype(np.int64)


def _probe(query: np.ndarray, base: np.ndarray):
    """Yield (query index, base index) arrays whose codes differ in <= 1 bit in some 16-bit chunk."""
    for c in range(_CHUNKS):
        key = _chunk(base, c)
        order = np.argsort(key, kind="stable")
        start = np.searchsorted(key[order], np.arange(1 << 16))
        count = np.diff(np.append(start, len(key)))
        qkey = _chunk(query, c)
        for mask in _MASKS:
            probe = qkey ^ int(mask)
            n = count[probe]
            hit = np.nonzero(n)[0]
            if len(hit):
                reps = n[hit]
                q = np.repeat(hit, reps)
                offsets = np.arange(len(q)) - np.repeat(np.cumsum(reps) - reps, reps)
                yield q, order[np.repeat(start[probe[hit]], reps) + offsets]


def near_pairs(phash: np.ndarray, dhash: np.ndarray, threshold: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Near-duplicate pairs (i < j, distance) among N images.

    phash, dhash: (N, V) uint64, column 0 the whole image, columns 1.. its crops. Candidates are
    verified as they are found, so memory holds the matches, not every probe.
    """
    if not 0 <= threshold <= MAX_THRESHOLD:
        raise PipelineError(f"clean.near_threshold={threshold}: must be between 0 and {MAX_THRESHOLD}")
    n, v = phash.shape
    query_p, query_d = phash.reshape(-1), dhash.reshape(-1)  # row-major: image i, crop k -> i * v + k
    keys, dists = [np.zeros(0, np.int64)], [np.zeros(0, np.int32)]
    for q_codes, b_codes in ((query_p, phash[:, 0]), (query_d, dhash[:, 0])):
        for q, b in _probe(q_codes, b_codes):
            dist = popcount(query_p[q] ^ phash[b, 0]) + popcount(query_d[q] ^ dhash[b, 0])
            i = q // v
            ok = (dist <= threshold) & (i != b)
            keys.append(np.minimum(i[ok], b[ok]) * n + np.maximum(i[ok], b[ok]))
            dists.append(dist[ok])
    key, dist = np.concatenate(keys), np.concatenate(dists)
    return _closest_per_pair(key // n, key % n, dist, n)


def groups(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Connected components of the pair graph (scipy's, so a chain of near pairs is one group): a group id per item."""
    graph = coo_matrix((np.ones(len(i)), (i, j)), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def compute_features(paths: list[str], near_min_size: int, workers: int | None, desc: str,
                     max_pixels: int = MAX_PIXELS) -> list[dict]:
    """image_features for every path, in worker processes, with a progress bar."""
    job = partial(image_features, near_min_size=near_min_size, max_pixels=max_pixels)
    workers = workers or os.cpu_count() or 1
    if workers == 1 or len(paths) < 64:
        return [job(p) for p in tqdm(paths, desc=desc, unit="img", disable=None)]
    with ProcessPoolExecutor(workers, initializer=end_with_parent, initargs=(os.getpid(),)) as pool:
        return list(tqdm(pool.map(job, paths, chunksize=32), total=len(paths), desc=desc, unit="img", disable=None))


def find_pairs(frame: pd.DataFrame, threshold: int, near: bool, small_threshold: float = 0.2) -> pd.DataFrame:
    """Duplicate pairs among the rows of `frame` (positional indices a < b): exact first, then near (perceptual
    hashes, kind 'near'), then small (images below clean.near_min_size, compared in pixel space: kind 'small')."""
    first = frame.groupby("pixel").cumcount() > 0
    anchor = frame.reset_index(drop=True).groupby("pixel").ngroup()
    first_pos = pd.Series(np.arange(len(frame))).groupby(anchor.to_numpy()).transform("first").to_numpy()
    exact = pd.DataFrame({"a": first_pos[first.to_numpy()], "b": np.nonzero(first.to_numpy())[0], "distance": 0,
                          "kind": "exact"})
    if not near:
        return exact
    found = [exact]
    hashed = np.nonzero(frame["phash"].notna().to_numpy())[0]
    if len(hashed) >= 2:
        codes = frame["phash"].iloc[hashed].tolist(), frame["dhash"].iloc[hashed].tolist()
        i, j, dist = near_pairs(np.array(codes[0], dtype=np.uint64), np.array(codes[1], dtype=np.uint64),
                                threshold)
        found.append(pd.DataFrame({"a": hashed[i], "b": hashed[j], "distance": dist, "kind": "near"}))
    small = np.nonzero(frame["small"].notna().to_numpy())[0] if "small" in frame else np.zeros(0, int)
    if len(small) >= 2:
        i, j, dist = small_pairs(np.stack(frame["small"].iloc[small].tolist()), small_threshold)
        found.append(pd.DataFrame({"a": small[i], "b": small[j], "distance": np.round(dist, 4), "kind": "small"}))
    pairs = pd.concat(found, ignore_index=True)
    pixel = frame["pixel"].to_numpy()
    return pairs[(pairs["kind"] == "exact") | (pixel[pairs["a"]] != pixel[pairs["b"]])].reset_index(drop=True)


def embedding_pair_frame(i: np.ndarray, j: np.ndarray, sim: np.ndarray, pixel: np.ndarray,
                         known: pd.DataFrame) -> pd.DataFrame:
    """Embedding pairs (i, j) of similarity `sim` as rows of kind 'embedding' (distance 1 - similarity), leaving
    out the pairs already in `known` (exact, near, small) and pairs whose `pixel` hashes are equal."""
    pairs = pd.DataFrame({"a": i, "b": j, "distance": np.round(1.0 - sim, 6), "kind": "embedding",
                          "similarity": np.round(sim, 6)})
    seen = set(zip(known["a"].tolist(), known["b"].tolist(), strict=True))
    new = [(a, b) not in seen and pixel[a] != pixel[b] for a, b in zip(pairs["a"], pairs["b"], strict=True)]
    return pairs[np.array(new, dtype=bool)]
