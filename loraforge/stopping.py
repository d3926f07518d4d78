"""SIGTERM as a request to stop at the next safe point (the daemon sends it to let a job checkpoint).

One flag per process, shared by every layer that can stop cleanly: the training loop checks it after
each step and saves a checkpoint, the recipe engine checks it before starting a step. A second SIGTERM
stops the process at once — unless it comes within REPEAT_S of the first: when the daemon is killed,
the kernel sends a job its parent-death SIGTERM once per daemon thread, milliseconds apart, and that
burst is one request to checkpoint, not two. Only the main thread can own signal handlers; elsewhere
SIGTERM keeps its default and the flag is never set.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from typing import Iterator

REPEAT_S = 1.0  # SIGTERMs this close to the first one are the same request
_state = {"depth": 0, "requested": False, "previous": None, "first_at": 0.0}


def stop_requested() -> bool:
    """Whether a SIGTERM arrived since the outermost `sigterm_stops()` began."""
    return _state["requested"]


def _handle(signum, frame) -> None:
    now = time.monotonic()
    if not _state["requested"]:
        _state["requested"], _state["first_at"] = True, now
    elif now - _state["first_at"] > REPEAT_S:  # a second SIGTERM: stop at once
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)


@contextlib.contextmanager
def sigterm_stops() -> Iterator[None]:
    """Within this block SIGTERM sets `stop_requested()` instead of ending the process. Nests: the outermost
    block installs the handler (and clears the flag) and restores the previous handler when it ends."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if _state["depth"] == 0:
        _state["requested"] = False
        _state["previous"] = signal.signal(signal.SIGTERM, _handle)
    _state["depth"] += 1
    try:
        yield
    finally:
        _state["depth"] -= 1
        if _state["depth"] == 0:
            signal.signal(signal.SIGTERM, _state["previous"] or signal.SIG_DFL)
            _state["previous"] = None
