"""The build daemon: watch recipes and data, queue jobs in SQLite, run them one per GPU, survive restarts.

The names below are imported from their modules on first use: `jobs` and `daemon status` read the
queue and the status file without importing the watcher (watchdog) or the worker.
"""

from __future__ import annotations

import importlib
from typing import Any

_MODULE_OF = {
    "Daemon": "daemon",
    "default_recipe_cmd": "daemon",
    "FINISHED_STATES": "queue",
    "JOB_STATES": "queue",
    "Job": "queue",
    "JobNotFound": "queue",
    "JobQueue": "queue",
    "read_status": "status",
}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
    globals()[name] = value
    return value
