"""Daemon start and stop: seconds from launch to its first status, and from SIGTERM to exit when idle;
`daemon status` and `jobs ls` as processes, side by side with `loraforge --help`.

The tests check how a stop ends (the events it records); how long it takes is measured here.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import Figure, best_of

RUNS = 3
GOAL_S = 0.3  # reading the queue and the status file, as a process


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


def _reads(home: Path) -> tuple[float, float, float]:
    """(daemon status, jobs ls, --help) as processes on `home`, best of 3 each after a warm-up run."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}  # as installed: bytecode cached

    def process_s(*args: str) -> float:
        command = [sys.executable, "-m", "loraforge", "--home", str(home), *args]
        subprocess.run(command, env=env, check=True, capture_output=True)
        return best_of(lambda: subprocess.run(command, env=env, check=True, capture_output=True), 3)

    return process_s("daemon", "status"), process_s("jobs", "ls"), process_s("--help")


def main() -> list[Figure]:
    with tempfile.TemporaryDirectory() as tmp:
        runs = [_one(Path(tmp), i) for i in range(RUNS)]
        status_s, jobs_s, help_s = _reads(Path(tmp) / "home0")
    print(f"\nidle daemon, best of {RUNS}")
    print(f"{'operation':<44}{'seconds':>10}")
    print(f"{'launch to first status (process start)':<44}{min(r[0] for r in runs):>10.3f}")
    print(f"{'SIGTERM to exit, no job running':<44}{min(r[1] for r in runs):>10.3f}")
    print(f"{'loraforge daemon status (process)':<44}{status_s:>10.3f}")
    print(f"{'loraforge jobs ls (process)':<44}{jobs_s:>10.3f}")
    print(f"{'loraforge --help (process)':<44}{help_s:>10.3f}")
    baseline, goal = "loraforge --help (process)", f"<= {GOAL_S} s"
    return [Figure("daemon status (process)", status_s, baseline, help_s, goal, status_s <= GOAL_S),
            Figure("jobs ls (process)", jobs_s, baseline, help_s, goal, jobs_s <= GOAL_S)]


if __name__ == "__main__":
    main()
