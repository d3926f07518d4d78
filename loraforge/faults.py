"""Test-only fault injection: `LORAFORGE_FAULT=<point>` makes the process kill itself at that point.

The write paths of the registry call `fault_point` where an interruption would leave something
behind (a half-written blob, a blob not yet renamed, an open catalog transaction), so the fault
tests can SIGKILL a real command exactly there. Nothing else may set the variable.
"""

from __future__ import annotations

import os
import signal

POINTS = (
    "blob-partial",                 # one chunk of a multi-chunk blob written, the rest not
    "blob-before-rename",           # a blob complete in the scratch folder, not yet in the store
    "register-before-transaction",  # every blob stored, no catalog row yet
    "register-in-transaction",      # rows inserted, transaction not committed
    "register-after-transaction",   # committed, the command has not reported yet
)


def fault_point(name: str) -> None:
    """For tests only: SIGKILL this process when `$LORAFORGE_FAULT` is `name`; otherwise nothing."""
    if os.environ.get("LORAFORGE_FAULT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
