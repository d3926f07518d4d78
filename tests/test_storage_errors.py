"""Writes that the disk refuses — full, over `ulimit -f`, read-only — and homes that cannot be made or
read: each is one `Error:` line naming the place and the fix, a non-zero exit, and an unchanged registry."""

from __future__ import annotations

import builtins
import errno
import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from loraforge.home import tmp_dir

from cli_helpers import run_cli as run
from cli_helpers import error_line as one_error_line


def commands(tiny_sd_path: Path) -> dict[str, tuple[str, ...]]:
    return {
        "import": ("registry", "import", str(tiny_sd_path), "--name", "art", "--kind", "checkpoint"),
        "merge": ("merge", "checkpoints", "builtin:tiny-sd", "builtin:tiny-sd", "--alpha", "0.3", "--name", "art"),
    }


def snapshot(home: Path) -> dict:
    """What a user could see of the registry: its versions, stored blobs and leftover scratch files."""
    rows = json.loads(run(home, "registry", "ls", "--json").output)
    blobs = sorted(p.name for p in (home / "blobs").rglob("*") if p.is_file())
    scratch = sorted(str(p) for p in (home / "tmp").rglob("*") if p.is_file())
    return {"versions": [(r["name"], r["version"], r["digest"]) for r in rows], "blobs": blobs, "scratch": scratch}



class FullDisk:
    """Files opened for writing under `root` share `free` bytes; a write past them fails with ENOSPC."""

    def __init__(self, root: Path, free: int):
        self.root, self.free = str(root), free

    def patch(self, monkeypatch) -> None:
        real_open, real_fdopen = builtins.open, os.fdopen

        def limited(opener, target_of):
            def wrapper(target, *args, **kwargs):
                f = opener(target, *args, **kwargs)
                mode = args[0] if args else kwargs.get("mode", "r")
                if any(c in mode for c in "wax+") and target_of(target, f).startswith(self.root):
                    return _LimitedFile(f, self)
                return f
            return wrapper

        monkeypatch.setattr(builtins, "open", limited(real_open, lambda t, f: os.fspath(t) if not isinstance(t, int) else ""))
        monkeypatch.setattr(os, "fdopen", limited(real_fdopen, lambda t, f: os.readlink(f"/proc/self/fd/{t}")))


class _LimitedFile:
    def __init__(self, f, disk: FullDisk):
        self._f, self._disk = f, disk

    def write(self, data):
        size = len(data.encode()) if isinstance(data, str) else memoryview(data).nbytes
        if size > self._disk.free:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._disk.free -= size
        return self._f.write(data)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self._f.close()
        return False

    def __getattr__(self, name):
        return getattr(self._f, name)


@pytest.mark.parametrize("label", ["import", "merge"])
def test_disk_full_during_the_write_is_one_error_line(home, tiny_sd_path, monkeypatch, label):
    before = snapshot(home)
    FullDisk(home, free=500_000).patch(monkeypatch)
    result = run(home, *commands(tiny_sd_path)[label], ok=False)
    monkeypatch.undo()
    assert result.exit_code == 1
    line = one_error_line(result.output)
    assert "no space left on the device" in line and str(home) in line and "free some space" in line
    assert snapshot(home) == before


@pytest.mark.parametrize("label", ["import", "merge"])
def test_file_size_limit_is_one_error_line(home, tiny_sd_path, label):
    before = snapshot(home)  # also creates the catalog, well under the limit

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (500_000, 500_000))

    done = subprocess.run([sys.executable, "-m", "loraforge", *commands(tiny_sd_path)[label]],
                          env={**os.environ, "LORAFORGE_HOME": str(home)}, capture_output=True, text=True,
                          preexec_fn=limit_file_size, timeout=300)
    assert done.returncode == 1, done.stderr[-2000:]
    line = one_error_line(done.stderr)
    assert "file size limit (ulimit -f)" in line and str(home) in line and "raise the limit" in line
    assert snapshot(home) == before
