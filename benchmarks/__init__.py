"""Benchmarks run by `make bench`: every `bench_*.py` module here with a `main()`.

A `main()` may return a list of `Figure`s: `python -m benchmarks` prints them all in one table at the end,
each measured side by side with its baseline in the same run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional


def best_of(fn: Callable[[], object], repeat: int = 3) -> float:
    """The fastest of `repeat` timed calls of `fn`, in seconds (the least disturbed by a busy machine)."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


@dataclass
class Figure:
    """One measured figure against its baseline: `ratio` is baseline / measured (above 1: faster)."""

    name: str                 # what was measured, e.g. "registry show NAME:VER (process)"
    seconds: float            # loraforge's figure
    baseline: str             # what it is compared with, e.g. "bare sqlite3 query (process)"
    baseline_seconds: float
    goal: str = ""            # the target, in words, e.g. "<= 0.15 s"
    met: Optional[bool] = None  # whether the goal holds in this run (None: no goal)
    note: str = ""            # e.g. memory figures

    @property
    def ratio(self) -> float:
        return self.baseline_seconds / self.seconds if self.seconds else float("inf")


def summary(figures: list[Figure]) -> str:
    """The one table `make bench` ends with."""
    head = ["figure", "seconds", "baseline", "baseline s", "ratio", "goal", "met", "note"]
    rows = [[f.name, f"{f.seconds:.3f}", f.baseline, f"{f.baseline_seconds:.3f}", f"{f.ratio:.2f}x", f.goal,
             "" if f.met is None else ("yes" if f.met else "NO"), f.note] for f in figures]
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head] + rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)
