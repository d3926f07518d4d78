"""Benchmarks run by `make bench`: every `bench_*.py` module here with a `main()`."""

from __future__ import annotations

import time
from typing import Callable


def best_of(fn: Callable[[], object], repeat: int = 3) -> float:
    """The fastest of `repeat` timed calls of `fn`, in seconds (the least disturbed by a busy machine)."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best
