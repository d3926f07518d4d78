"""Keep third-party library chatter (optional backends, adapter bookkeeping) out of user output."""

from __future__ import annotations

import os


def quiet_library_logs() -> None:
    """Call before diffusers/transformers are imported; explicit user settings win."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
