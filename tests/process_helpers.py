"""Watching subprocesses from tests: polling for a condition, a process's children, SIGTERM at a log line."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest


def wait_for(what: str, cond, timeout: float = 30.0, proc: subprocess.Popen | None = None, log: Path | None = None):
    """`cond()`'s first truthy value, polled every 50 ms; the test fails naming `what` (with the tail of `log`)
    when `proc` exits first or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        tail = f"\n--- {log.name}:\n{log.read_text()[-3000:]}" if log is not None and log.is_file() else ""
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the daemon exited ({proc.returncode}) while waiting for {what}{tail}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}{tail}")
        time.sleep(0.05)


def children_of(pid: int) -> list[int]:
    """The pids whose parent is `pid` (read from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def sigterm_at(proc: subprocess.Popen, marker: str, timeout: float = 60) -> str:
    """Send SIGTERM to `proc` when its stderr (a text pipe) prints a line containing `marker`; its remaining
    stderr once it has exited (killed after `timeout` seconds)."""
    try:
        for line in proc.stderr:
            if marker in line:
                proc.send_signal(signal.SIGTERM)
                break
        _out, err = proc.communicate(timeout=timeout)
    finally:
        proc.kill()
    return err
