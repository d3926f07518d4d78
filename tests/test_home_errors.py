"""Homes that cannot be written, created or read: read-only homes still answer read-only commands,
and everything else is one `Error:` line naming the home (or registry.db) and the fix."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


from cli_helpers import run_cli as run
from cli_helpers import error_line as one_error_line



@pytest.fixture()
def filled_home(home, adapter_file) -> Path:
    run(home, "registry", "import", str(adapter_file), "--name", "style")
    run(home, "registry", "tag", "style", "prod")
    return home


def state(home: Path) -> dict:
    """Every file of the home but scratch, with its bytes' size and mtime."""
    return {str(p.relative_to(home)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in home.rglob("*") if p.is_file() and "tmp" not in p.relative_to(home).parts}



WRITES = [
    ("registry", "import", "{adapter}", "--name", "other"),
    ("registry", "tag", "style", "dev"),
    ("registry", "rm", "style"),
    ("registry", "gc"),
]


def test_read_only_home_reads_and_refuses_writes(filled_home, adapter_file, monkeypatch):
    """The home is read-only as `access(2)` reports it (root ignores permission bits, so we ask)."""
    real_access = os.access
    home = filled_home.resolve()
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if (mode & os.W_OK and Path(p) == home)
                        else real_access(p, mode, **kw))
    before = state(filled_home)
    rows = json.loads(run(filled_home, "registry", "ls", "--json").output)
    assert [(r["name"], r["version"], r["aliases"]) for r in rows] == [("style", 1, ["prod"])]
    assert "style:1  (lora)  aliases: prod" in run(filled_home, "registry", "show", "style").output
    assert run(filled_home, "registry", "verify").output.endswith("ok\n")
    for args in WRITES:
        result = run(filled_home, *[a.format(adapter=adapter_file) for a in args], ok=False)
        assert result.exit_code == 1, args
        line = one_error_line(result.output)
        assert f"the loraforge home {home} is read-only" in line and "LORAFORGE_HOME" in line, args
    assert state(filled_home) == before


def _ro_mount_works(tmp_path: Path) -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = tmp_path / "probe"
    probe.mkdir()
    done = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount --bind -o ro {probe} {probe} && touch {probe}/x"],
                          capture_output=True, text=True)
    return "Read-only file system" in done.stderr


def test_home_on_a_read_only_mount(filled_home, adapter_file, tmp_path):
    """A real read-only bind mount (in a private mount namespace), as on a shared model server."""
    if not _ro_mount_works(tmp_path):
        pytest.skip("no unprivileged read-only bind mounts here")
    before = state(filled_home)
    lf = f"{sys.executable} -m loraforge --home {filled_home}"
    script = "\n".join([
        f"mount --bind -o ro {filled_home} {filled_home} || exit 99",
        f"{lf} registry ls; echo rc=$?",
        f"{lf} registry show style:prod; echo rc=$?",
        f"{lf} registry verify; echo rc=$?",
        f"{lf} jobs ls; echo rc=$?",
        f"{lf} registry import {adapter_file} --name other; echo rc=$?",
    ])
    done = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=300)
    out = done.stdout
    assert done.returncode == 0, done.stderr[-2000:]
    assert out.count("rc=0") == 4 and out.count("rc=1") == 1, out + done.stderr
    assert "style  1        lora  prod" in out and "style:1  (lora)" in out and "ok\nrc=0" in out
    assert one_error_line(done.stderr).startswith(f"Error: the loraforge home {filled_home.resolve()} is read-only")
    assert state(filled_home) == before


def test_home_that_cannot_be_created(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    for home in (blocker / "home", blocker / "deeper" / "home"):
        monkeypatch.setenv("LORAFORGE_HOME", str(home))
        for args in (("registry", "ls"), ("registry", "import", str(blocker), "--name", "x")):
            result = run(home, *args, ok=False)
            assert result.exit_code == 1
            line = one_error_line(result.output)
            assert f"cannot create the loraforge home {home}" in line and "LORAFORGE_HOME" in line
    assert blocker.read_text() == "not a folder"


def test_home_under_a_folder_nobody_may_write(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    if subprocess.run(["chattr", "+i", str(locked)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here")
    try:
        result = run(locked / "home", "registry", "ls", ok=False)
        assert result.exit_code == 1
        assert f"cannot create the loraforge home {locked / 'home'}" in one_error_line(result.output)
    finally:
        subprocess.run(["chattr", "-i", str(locked)], check=True)


def test_garbage_registry_db_is_one_line_everywhere_and_verify_reports_it(filled_home, adapter_file):
    db = filled_home / "registry.db"
    for side in ("registry.db-wal", "registry.db-shm"):
        (filled_home / side).unlink(missing_ok=True)
    db.write_bytes(os.urandom(4096))
    before = state(filled_home)
    garbage = db.read_bytes()
    commands = [("registry", "ls"), ("registry", "show", "style"), ("registry", "export", "style", "-o", "x.safetensors"),
                ("registry", "import", str(adapter_file), "--name", "other"), ("registry", "gc"), ("jobs", "ls")]
    for args in commands:
        result = run(filled_home, *args, ok=False)
        assert result.exit_code == 1, args
        line = one_error_line(result.output)
        assert f"{db} is not a readable registry catalog" in line and "restore it from a backup" in line, args
    result = run(filled_home, "registry", "verify", ok=False)
    assert result.exit_code == 1
    assert f"DAMAGED {db} is not a readable registry catalog" in result.output
    report = json.loads(run(filled_home, "registry", "verify", "--json", ok=False).output)
    assert report["ok"] is False and str(db) in report["problems"][0]
    assert db.read_bytes() == garbage and state(filled_home) == before


def test_damaged_pages_inside_registry_db_are_reported(home):
    from loraforge.registry import Registry
    from loraforge.registry.manifest import Manifest, Provenance

    reg = Registry(home)
    for i in range(200):  # enough rows for a catalog of many pages
        reg.register(Manifest(name=f"set{i}", kind="dataset", digest="", files=[],
                              provenance=Provenance(method="snapshot", params={"note": "x" * 500})))
    reg.db.conn.close()
    db = home / "registry.db"
    data = bytearray(db.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 3000] = b"\x5a" * 3000
    db.write_bytes(bytes(data))

    result = run(home, "registry", "verify", ok=False)
    assert result.exit_code == 1
    assert f"DAMAGED {db} is damaged: " in result.output and "problems" in result.output.splitlines()[-1]
    listed = run(home, "registry", "ls", ok=False)
    assert listed.exit_code == 1
    line = one_error_line(listed.output)
    assert "registry catalog" in line and "is damaged" in line and "restore its registry.db from a backup" in line

