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
resized to a 16x16 grid, made zero-mean and unit-norm (so brightness and contrast shifts, gray<->RGB
and re-encoding move it little), and paired by an exact radius search (scikit-learn) when the
Euclidean distance (0..2; d^2 = 2 - 2 * correlation) is at most `threshold`. A one-pixel shift moves
these vectors far, so, like the crops above, each image also queries with its eight one-pixel
shifts (edges replicated) against the others' unshifted vectors. An 8x8 grid is too coarse for
28x28 digits (at 0.2 it paired 7,208 distinct MNIST digits); at 16x16 the planted 28x28 transforms
stay within 0.074 and distinct MNIST digits lie at least 0.103 apart (docs/data-quality.md).

Perceptual hashes need structure. Over a background of one value every dHash bit is 0 (it compares
neighbouring cells) and pHash splits near-zero DCT terms at their median, so distinct mostly-black images
hash within a few bits of each other: 7,000 generated 56x56 counting collages (0-4 digits on black) gave
26,819 false near pairs, and the conflict policy then dropped 1,058 rows. So images whose luma is mostly one
value (`SPARSE_SHARE` of the pixels within `MODE_TOLERANCE` levels of the most common value: "sparse") take
the pixel-space search above instead (kind 'sparse'; there the same images gave no false pair), and every
hash pair is confirmed in pixel space before it counts: the zero-mean unit-norm 16x16 luma grids of one
image and of the other's five crops must lie within `confirm_threshold` (the planted transforms of
tests/test_dedup.py stay within 0.14). Images between PIXEL_SHARE and SPARSE_SHARE are both hashed and
searched in pixel space, so that a copy on the other side of the line still meets its original; for a pair
that both searches see, the pixel-space search decides. Single-colour ("flat") images are not compared at all: two empty
canvases are the same canvas, not a copy of one photo, and grouping them would put every empty image of a
competition into one fold.

Over a table of images (the clean stage's rows, the EDA notebook's): `compute_features` fingerprints every
path in worker processes, `find_pairs` lists the exact, near, small and sparse pairs among the rows,
`plausible_pairs` sets aside a flood of pairs no duplicate structure explains, and `embedding_pair_frame`
keeps the embedding pairs (pipeline/training/embeddings.py) that the others missed.
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
SPARSE_SHARE = 0.5  # at least half the pixels one value: too little structure for perceptual hashes
# From this share on, images also join the pixel-space search: a copy whose share lies on the other side of
# SPARSE_SHARE (JPEG noise on a black background moves it by 0.1 and more) still meets its original there.
PIXEL_SHARE = 0.3
MODE_TOLERANCE = 1  # luma levels either side of the most common value that count as that value (JPEG noise)


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
    """Everything the clean stage needs from one decoded image (runs in a worker process): its pixel hash, whether
    it is gray, flat (one colour), small (a side below near_min_size) or sparse (mostly one value), and either its
    perceptual hashes with the crop grids that confirm them, or (small or sparse) its shifted pixel-space grids."""
    try:
        arr = load_image(path, max_pixels)
    except PipelineError as exc:
        return {"error": str(exc)}
    gray = is_gray(arr)
    if gray and arr.ndim == 3:
        arr = arr[..., 0]
    flat = bool((arr == arr.reshape(-1, *arr.shape[2:])[0]).all())
    out = {"pixel": hashlib.sha1(str(arr.shape).encode() + arr.tobytes()).hexdigest(), "gray": gray, "flat": flat,
           "height": arr.shape[0], "width": arr.shape[1], "error": None, "small": min(arr.shape[:2]) < near_min_size,
           "sparse": False, "phash": None, "dhash": None, "crop_grids": None, "shift_grids": None}
    if flat:
        return out
    luma = Image.fromarray(arr).convert("L")
    values = np.asarray(luma)
    share = mode_share(values)
    out["sparse"] = share >= SPARSE_SHARE
    if out["small"] or share >= PIXEL_SHARE:
        out["shift_grids"] = small_vectors(values)
    if not (out["small"] or out["sparse"]):
        out["phash"], out["dhash"] = perceptual_hashes(luma)
        out["crop_grids"] = crop_grids(luma)
    return out


def mode_share(luma: np.ndarray) -> float:
    """The share of pixels within MODE_TOLERANCE levels of the most common luma value."""
    counts = np.bincount(luma.ravel(), minlength=256)
    mode = int(counts.argmax())
    return float(counts[max(0, mode - MODE_TOLERANCE):mode + MODE_TOLERANCE + 1].sum() / luma.size)


def crop_grids(luma: Image.Image) -> np.ndarray:
    """(6, 16, 16) uint8: the luma of the whole image and of its five crops (`crops`), each resized to a 16x16
    grid; what confirms a hash pair in pixel space (`crop_distances`)."""
    return np.stack([np.asarray(v.resize((SMALL_GRID, SMALL_GRID), Image.BILINEAR), dtype=np.uint8)
                     for v in crops(luma)])


def crop_distances(grids_a: np.ndarray, grids_b: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """(P,) for P pairs of crop_grids (P, 6, 16, 16): the smallest distance (0..2) between the zero-mean unit-norm
    grid of one image and those of the other's whole image and crops, either way round (inf when every grid of a
    pair is flat)."""
    out = np.full(len(grids_a), np.inf)
    for start in range(0, len(grids_a), chunk):
        a = _units(grids_a[start:start + chunk])
        b = _units(grids_b[start:start + chunk])
        d = np.concatenate([np.linalg.norm(a[:, :1] - b, axis=2), np.linalg.norm(b[:, :1] - a, axis=2)], axis=1)
        out[start:start + chunk] = np.where(np.isnan(d), np.inf, d).min(axis=1)
    return out


def _units(grids: np.ndarray) -> np.ndarray:
    """(P, V, 16, 16) uint8 grids as (P, V, 256) zero-mean unit-norm float32 vectors; NaN where a grid is flat."""
    flat = grids.reshape(*grids.shape[:2], -1).astype(np.float32)
    flat -= flat.mean(axis=2, keepdims=True)
    norm = np.linalg.norm(flat, axis=2, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(norm > 1e-6 * flat.shape[2], flat / norm, np.nan)


def _unit(grid: np.ndarray) -> np.ndarray | None:
    flat = grid.ravel() - grid.mean()
    norm = float(np.linalg.norm(flat))
    return flat / norm if norm > 1e-6 * flat.size else None


def small_vectors(luma: np.ndarray) -> np.ndarray | None:
    """(9, 256) float32: the zero-mean unit-norm 16x16 grid of the image and of its eight one-pixel shifts
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
    """Near-duplicate pairs (i < j, distance) among N small images, from their (N, 9, 256) small_vectors.

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


def find_pairs(frame: pd.DataFrame, threshold: int, near: bool, small_threshold: float = 0.09,
               confirm_threshold: float = 0.2) -> pd.DataFrame:
    """Duplicate pairs among the rows of `frame` (positional indices a < b): exact first, then near (perceptual
    hashes confirmed in pixel space, kind 'near'), then the pixel-space search of the small and sparse images
    (kind 'small' when both images are below clean.near_min_size, else 'sparse'). Flat images pair with nothing."""
    solid = np.nonzero(~frame["flat"].fillna(False).astype(bool).to_numpy())[0]
    pixel = frame["pixel"].to_numpy()[solid]
    first = pd.Series(pixel).duplicated().to_numpy()
    anchor = pd.Series(solid).groupby(pixel).transform("first").to_numpy()
    exact = pd.DataFrame({"a": anchor[first], "b": solid[first], "distance": 0, "kind": "exact"})
    if not near:
        return exact
    found = [exact]
    hashed = np.nonzero(frame["phash"].notna().to_numpy())[0]
    if len(hashed) >= 2:
        codes = frame["phash"].iloc[hashed].tolist(), frame["dhash"].iloc[hashed].tolist()
        i, j, dist = near_pairs(np.array(codes[0], dtype=np.uint64), np.array(codes[1], dtype=np.uint64),
                                threshold)
        grids, shifted = frame["crop_grids"].to_numpy(), frame["shift_grids"].notna().to_numpy()
        a, b = hashed[i], hashed[j]
        confirmed = crop_distances(np.stack(list(grids[a])), np.stack(list(grids[b]))) <= confirm_threshold \
            if len(a) else np.zeros(0, bool)
        confirmed &= ~(shifted[a] & shifted[b])  # both in the pixel-space search below: it decides
        found.append(pd.DataFrame({"a": a[confirmed], "b": b[confirmed], "distance": dist[confirmed],
                                   "kind": "near"}))
    shifted = np.nonzero(frame["shift_grids"].notna().to_numpy())[0]
    if len(shifted) >= 2:
        i, j, dist = small_pairs(np.stack(frame["shift_grids"].iloc[shifted].tolist()), small_threshold)
        small = frame["small"].fillna(False).astype(bool).to_numpy()
        a, b = shifted[i], shifted[j]
        found.append(pd.DataFrame({"a": a, "b": b, "distance": np.round(dist, 4),
                                   "kind": np.where(small[a] & small[b], "small", "sparse")}))
    pairs = pd.concat(found, ignore_index=True)
    pixel = frame["pixel"].to_numpy()
    return pairs[(pairs["kind"] == "exact") | (pixel[pairs["a"]] != pixel[pairs["b"]])].reset_index(drop=True)


def plausible_pairs(pairs: pd.DataFrame, n_images: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(pairs to act on, pairs set aside). More near, small, sparse or embedding pairs than images is more than
    duplicates explain (a duplicate adds one pair; a flood means the images look alike to the search, as
    mostly-dark images do to hashes): then only the exact pairs are acted on, and the rest are set aside for the
    stage to report."""
    similar = pairs["kind"] != "exact"
    if similar.sum() <= n_images:
        return pairs, pairs.iloc[:0]
    return pairs[~similar].reset_index(drop=True), pairs[similar].reset_index(drop=True)


def embedding_pair_frame(i: np.ndarray, j: np.ndarray, sim: np.ndarray, pixel: np.ndarray,
                         known: pd.DataFrame) -> pd.DataFrame:
    """Embedding pairs (i, j) of similarity `sim` as rows of kind 'embedding' (distance 1 - similarity), leaving
    out the pairs already in `known` (exact, near, small) and pairs whose `pixel` hashes are equal."""
    pairs = pd.DataFrame({"a": i, "b": j, "distance": np.round(1.0 - sim, 6), "kind": "embedding",
                          "similarity": np.round(sim, 6)})
    seen = set(zip(known["a"].tolist(), known["b"].tolist(), strict=True))
    new = [(a, b) not in seen and pixel[a] != pixel[b] for a, b in zip(pairs["a"], pairs["b"], strict=True)]
    return pairs[np.array(new, dtype=bool)]
