"""Debouncing: many file events in a burst (an editor's temp file + rename) become one change."""

from __future__ import annotations

from typing import Hashable


class Debouncer:
    """Holds keys until no event touched them for `delay` seconds; time is always passed in."""

    def __init__(self, delay: float):
        if delay < 0:
            raise ValueError("debounce delay must be >= 0")
        self.delay = float(delay)
        self._last: dict[Hashable, float] = {}

    def touch(self, key: Hashable, now: float) -> None:
        self._last[key] = now

    def due(self, now: float) -> list[Hashable]:
        """Keys quiet for at least `delay`, in the order they last changed; they are forgotten."""
        ready = sorted((t, k) for k, t in self._last.items() if now - t >= self.delay)
        for _, key in ready:
            del self._last[key]
        return [k for _, k in ready]

    def __len__(self) -> int:
        return len(self._last)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._last
