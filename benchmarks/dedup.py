"""Near-duplicate pairing: multi-index Hamming search vs a naive pairwise loop, same run.

Builds N images' worth of perceptual hashes (pHash and dHash of the whole image and 5 crops,
random 64-bit codes) with planted near pairs, then times:
  * pipeline.data.dedup.near_pairs on all N (default 100,000);
  * a naive Python double loop over pairs on a sample (default 1,500 images), and near_pairs on the
    same sample; both must find the same pairs. Prints the ratio on the sample and the naive loop's
    time extrapolated to N (it grows with N^2; the search grows about linearly).

    .venv/bin/python benchmarks/dedup.py [N] [SAMPLE] [REPEATS]

Embedding duplicates (clean.embeddings): N (default 100,000) random unit 512-d vectors with 1,000 planted
close pairs (cosine ~0.95), every pair above 0.9 searched by pipeline.training.embeddings.similar_pairs (faiss; above
EXACT_LIMIT its inverted-file index) against a naive numpy search (the whole similarity matrix, a block of
rows at a time), both timed in the same run; the faiss pairs must all be true pairs, and the planted ones
found:

    .venv/bin/python benchmarks/dedup.py embeddings [N] [D] [REPEATS]
"""

from __future__ import annotations

import sys
import time

import numpy as np
from timing import interleaved, median, ratio_text

from pipeline.core.config import CleanConfig
from pipeline.data.dedup import near_pairs
from pipeline.training import embeddings

VARIANTS = 6


def make_codes(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    P = rng.integers(0, 2**63, (n, VARIANTS), dtype=np.int64).astype(np.uint64) << np.uint64(1)
    D = rng.integers(0, 2**63, (n, VARIANTS), dtype=np.int64).astype(np.uint64) << np.uint64(1)
    for i in range(0, min(n, 2000) - 1, 2):  # 1 in 50 images has a near copy (3 + 4 bits away)
        P[i + 1, 0] = P[i, 0] ^ np.uint64(0b10101)
        D[i + 1, 0] = D[i, 0] ^ np.uint64(0b1111 << 30)
    return P, D


def naive(P: np.ndarray, D: np.ndarray, threshold: int) -> set[tuple[int, int]]:
    """What a first version would write: every pair, every crop, Python ints."""
    p, d = P.tolist(), D.tolist()
    found = set()
    for i in range(len(p)):
        for j in range(i + 1, len(p)):
            best = min(min(((p[i][k] ^ p[j][0]).bit_count() + (d[i][k] ^ d[j][0]).bit_count())
                           for k in range(VARIANTS)),
                       min(((p[j][k] ^ p[i][0]).bit_count() + (d[j][k] ^ d[i][0]).bit_count())
                           for k in range(VARIANTS)))
            if best <= threshold:
                found.add((i, j))
    return found


def main(n: int = 100_000, sample: int = 1500, repeats: int = 3) -> None:
    threshold = CleanConfig().near_threshold
    P, D = make_codes(n)
    t0 = time.perf_counter()
    i, j, _ = near_pairs(P, D, threshold)
    full = time.perf_counter() - t0
    print(f"near_pairs: {n:,} images x {VARIANTS} hashes, threshold {threshold}: {full:.2f} s, {len(i)} pairs")
    slow = naive(P[:sample], D[:sample], threshold)
    si, sj, _ = near_pairs(P[:sample], D[:sample], threshold)
    assert slow == set(zip(si.tolist(), sj.tolist(), strict=True)), "the two methods disagree"
    t = interleaved({"naive": lambda: naive(P[:sample], D[:sample], threshold),
                     "near_pairs": lambda: near_pairs(P[:sample], D[:sample], threshold)}, repeats)
    loop = median(t["naive"])
    print(f"sample of {sample:,}: naive loop {loop:.2f} s, near_pairs {median(t['near_pairs']):.3f} s (medians), "
          f"ratio {ratio_text(t['naive'], t['near_pairs'], 0)}")
    print(f"naive loop extrapolated to {n:,}: {loop * (n / sample) ** 2 / 3600:.1f} h vs {full:.2f} s measured")


def planted_vectors(n: int, d: int, pairs: int = 1000, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    x[1:2 * pairs:2] = x[0:2 * pairs:2] + 0.33 * rng.standard_normal((pairs, d)).astype(np.float32)
    return embeddings.normalise(x)


def embedding_main(n: int = 100_000, d: int = 512, repeats: int = 1, threshold: float = 0.9) -> None:
    x = planted_vectors(n, d)
    index = "IndexFlatIP (exact)" if n <= embeddings.EXACT_LIMIT else f"IndexIVFFlat (nprobe {embeddings.NPROBE})"
    found: dict = {}
    t = interleaved({"faiss": lambda: found.setdefault("faiss", embeddings.similar_pairs(x, threshold)),
                     "numpy": lambda: found.setdefault("numpy", embeddings.brute_force_pairs(x, threshold))}, repeats)
    fi, fj, fs = found["faiss"]
    ni, nj, ns = found["numpy"]
    fast, exact = set(zip(fi.tolist(), fj.tolist(), strict=True)), set(zip(ni.tolist(), nj.tolist(), strict=True))
    assert fast <= exact, "faiss returned a pair the exact search does not have"
    planted = {(k, k + 1) for k in range(0, 2000, 2)}
    print(f"embedding search: {n:,} x {d}-d unit vectors, pairs above {threshold}, {index}")
    print(f"  faiss {median(t['faiss']):.2f} s: {len(fast)} pairs, {len(fast & planted)} of {len(planted)} planted, "
          f"recall of all exact pairs {len(fast) / max(1, len(exact)):.4f}")
    print(f"  naive numpy matrix product {median(t['numpy']):.2f} s: {len(exact)} pairs")
    print(f"  ratio numpy / faiss {ratio_text(t['numpy'], t['faiss'])}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["embeddings"]:
        embedding_main(*(int(a) for a in sys.argv[2:5]))
    else:
        main(*(int(a) for a in sys.argv[1:4]))
