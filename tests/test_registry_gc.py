"""`registry gc` next to other writers: it never deletes a blob a registration is about to reference,
and it removes the temp leftovers of dead processes but not those of live ones."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from loraforge.home import tmp_dir
from loraforge.registry import Registry, registry as registry_module

from cli_helpers import run_cli as run



def test_gc_during_a_registration_waits_and_keeps_its_blob(home, adapter_file, tmp_path, monkeypatch):
    """Force the interleaving blob stored → gc → catalog commit; the artifact must survive whole."""
    real_immediate = registry_module.immediate
    gc_result: dict = {}

    def gc_in_another_thread():
        gc_result["freed"] = Registry(home).gc()

    def immediate_after_gc(db):
        # The registration has stored its blob and is about to commit: run gc now, from another
        # connection, and give it ample time to delete what it thinks is garbage.
        monkeypatch.setattr(registry_module, "immediate", real_immediate)
        gc_thread = threading.Thread(target=gc_in_another_thread)
        gc_thread.start()
        gc_thread.join(timeout=1.5)
        gc_result["blocked"] = gc_thread.is_alive()
        gc_result["thread"] = gc_thread
        return real_immediate(db)

    monkeypatch.setattr(registry_module, "immediate", immediate_after_gc)
    result = run(home, "registry", "import", str(adapter_file), "--name", "style")
    assert "registered style:1" in result.output
    gc_result["thread"].join(timeout=30)
    assert run(home, "registry", "verify").output.endswith("ok\n")
    assert gc_result["blocked"], "gc ran while a registration held blobs it had not yet referenced"
    assert (gc_result["freed"].blobs, gc_result["freed"].temp_entries) == (0, 0)
    out = tmp_path / "back.safetensors"
    run(home, "registry", "export", "style", "--format", "kohya", "-o", str(out))
    assert out.read_bytes() and out.stat().st_size > 1000


LEAVE_SCRATCH_AND_DIE = """
import os, signal, sys
from pathlib import Path
from loraforge.home import tmp_dir
scratch = tmp_dir(Path(sys.argv[1])) / "merge-killed"
scratch.mkdir()
(scratch / "merged.safetensors").write_bytes(b"x" * 100_000)
os.kill(os.getpid(), signal.SIGKILL)
"""


def leave_scratch_of_a_killed_process(home: Path) -> None:
    """What a `kill -9` during a merge leaves: a scratch folder nobody will remove."""
    done = subprocess.run([sys.executable, "-c", LEAVE_SCRATCH_AND_DIE, str(home)])
    assert done.returncode == -signal.SIGKILL


def temp_entries(home: Path, pattern: str = "merge-*") -> list[Path]:
    return sorted((home / "tmp").rglob(pattern))


def test_gc_removes_a_dead_processes_temp_files_but_not_a_live_ones(home):
    leave_scratch_of_a_killed_process(home)
    live = tmp_dir(home) / "merge-live"  # this test process is alive: its scratch must stay
    live.mkdir()
    (live / "merged.safetensors").write_bytes(b"y" * 10)
    assert len(temp_entries(home)) == 2

    result = run(home, "registry", "gc")
    assert temp_entries(home) == [live]
    assert (live / "merged.safetensors").read_bytes() == b"y" * 10
    assert "removed 1 stale temp entry (97.7 KB)" in result.output


def test_gc_tells_a_reused_pid_from_its_owner(home):
    """A folder named after our pid but another start time belonged to an earlier process."""
    current = tmp_dir(home)
    host, pid, start = current.name.rsplit(".", 2)
    earlier = current.parent / f"{host}.{pid}.{int(start) + 1}"
    (earlier / "merge-old").mkdir(parents=True)
    run(home, "registry", "gc")
    assert not earlier.exists() and current.is_dir()


def test_gc_removes_ownerless_temp_entries_only_when_old(home):
    """Entries from before owners were recorded are removed once untouched for a day."""
    root = home / "tmp"
    root.mkdir(exist_ok=True)
    old, recent = root / "merge-old", root / "merge-recent"
    for folder in (old, recent):
        folder.mkdir()
        (folder / "merged.safetensors").write_bytes(b"z")
    two_days_ago = time.time() - 2 * 86400
    for path in (old / "merged.safetensors", old):
        os.utime(path, (two_days_ago, two_days_ago))
    run(home, "registry", "gc")
    assert not old.exists() and recent.is_dir()


def test_the_daemon_removes_stale_temp_files_when_it_starts(home, tmp_path):
    from loraforge.daemon import Daemon

    leave_scratch_of_a_killed_process(home)
    watch = tmp_path / "recipes"
    watch.mkdir()
    daemon = Daemon([watch], home=home, use_watchdog=False)
    try:
        daemon.start(now=0)
        assert temp_entries(home) == []
        assert any("removed 1 stale temp entry" in e["message"] for e in daemon.events)
    finally:
        daemon.close()


def test_a_command_that_exits_normally_leaves_no_scratch_folder(home, adapter_file):
    result = subprocess.run([sys.executable, "-m", "loraforge", "--home", str(home), "registry", "import",
                             str(adapter_file), "--name", "style"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert Registry(home).exists("style")
    assert list((home / "tmp").iterdir()) == [], "only a killed process may leave scratch files for gc"
