"""Daemon start and stop: seconds from launch to its first status, and from SIGTERM to exit when idle.

The tests check how a stop ends (the events it records); how long it takes is measured here.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUNS = 3


def _status(home: Path) -> dict:
    try:
        return json.loads((home / "daemon" / "status.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _one(tmp: Path, i: int) -> tuple[float, float]:
    home, watch = tmp / f"home{i}", tmp / f"recipes{i}"
    watch.mkdir()
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "loraforge", "--home", str(home), "daemon", "--watch",
                             str(watch), "--cpu"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while _status(home).get("pid") != proc.pid:
            if proc.poll() is not None:
                raise RuntimeError(f"the daemon exited with {proc.returncode} before starting")
            time.sleep(0.01)
        start_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        stop_s = time.perf_counter() - t1
    finally:
        if proc.poll() is None:
            proc.kill()
    if proc.returncode != 0:
        raise RuntimeError(f"the daemon exited with {proc.returncode} on SIGTERM")
    return start_s, stop_s


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        runs = [_one(Path(tmp), i) for i in range(RUNS)]
    print(f"\nidle daemon, best of {RUNS}")
    print(f"{'operation':<44}{'seconds':>10}")
    print(f"{'launch to first status (process start)':<44}{min(r[0] for r in runs):>10.3f}")
    print(f"{'SIGTERM to exit, no job running':<44}{min(r[1] for r in runs):>10.3f}")


if __name__ == "__main__":
    main()
