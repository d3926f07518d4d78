"""The build daemon: watch recipes and data, queue jobs in SQLite, run them one per GPU, survive restarts.

The names below are imported from their modules on first use: `jobs` and `daemon status` read the
queue and the status file without importing the watcher (watchdog) or the worker.
"""

from __future__ import annotations

from loraforge.lazy import lazy_exports

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

__getattr__ = lazy_exports(__name__, _MODULE_OF)
