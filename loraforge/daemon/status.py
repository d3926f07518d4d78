"""The daemon's status file: a heartbeat, its workers, the queue and its last events."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Optional

# `daemon status` calls a daemon dead when its heartbeat is older than this.
STALE_AFTER_S = 30.0


def daemon_dir(home: Path) -> Path:
    path = home / "daemon"
    path.mkdir(parents=True, exist_ok=True)
    return path


def status_path(home: Path) -> Path:
    return daemon_dir(home) / "status.json"


def write_status(home: Path, status: dict[str, Any]) -> None:
    """Written to a temp file and renamed, so a reader never sees half a file."""
    path = status_path(home)
    tmp = path.with_name(f".status.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(status, indent=2, sort_keys=True, default=str), encoding="utf-8")
    os.replace(tmp, path)


def pid_alive(pid: Optional[int]) -> bool:
    if not pid:
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_status(home: Path, stale_after: float = STALE_AFTER_S) -> Optional[dict[str, Any]]:
    """The last status written, with `running` telling whether that daemon is still alive.

    Alive means its pid exists and its heartbeat is younger than `stale_after` seconds.
    """
    path = status_path(home)
    if not path.is_file():
        return None
    try:
        status = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    age = time.time() - float(status.get("heartbeat_unix", 0))
    status["heartbeat_age_s"] = round(age, 1)
    status["running"] = bool(pid_alive(status.get("pid")) and age < stale_after and not status.get("stopped"))
    return status
