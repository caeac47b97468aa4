"""Interleaved repeats for the benchmarks: one pass of A against one pass of B decides nothing on a
shared machine (three runs of the same engine-vs-bare command gave 0.84, 1.00 and 0.85).

`interleaved` runs every candidate once per round, in alternating order (A B, B A, ...), so a slow
spell of the machine falls on both sides of a ratio; `ratio` summarises the per-round ratios as their
median and spread (min-max), the figure repeated runs should agree on.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def interleaved(candidates: dict[str, Callable[[], object]], repeats: int,
                measure: Callable[[Callable[[], object]], float] | None = None) -> dict[str, list[float]]:
    """{name: [value per round]}; a value is the call's wall time in seconds, or what `measure(fn)` returns
    (e.g. a function that times only the part it wants, or a throughput the call computes itself)."""
    measure = measure or seconds
    names = list(candidates)
    values: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            values[name].append(measure(candidates[name]))
    return values


def seconds(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def ratio(numerator: list[float], denominator: list[float]) -> tuple[float, float, float]:
    """(median, min, max) of the per-round ratios numerator[r] / denominator[r]."""
    per_round = [a / b for a, b in zip(numerator, denominator, strict=True)]
    return statistics.median(per_round), min(per_round), max(per_round)


def ratio_text(numerator: list[float], denominator: list[float], digits: int = 2) -> str:
    """'1.23x (1.10-1.31 over 5 rounds)'."""
    mid, low, high = ratio(numerator, denominator)
    return f"{mid:.{digits}f}x ({low:.{digits}f}-{high:.{digits}f} over {len(numerator)} rounds)"


def median(values: list[float]) -> float:
    return statistics.median(values)
