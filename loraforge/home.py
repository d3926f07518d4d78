"""Where loraforge keeps its state: the home folder and its fixed sub-folders."""

from __future__ import annotations

import atexit
import os
import re
import time
from pathlib import Path

from loraforge.errors import StorageError


def loraforge_home(home: str | os.PathLike | None = None) -> Path:
    """The loraforge home: the argument, else `$LORAFORGE_HOME`, else `~/.loraforge`."""
    if home is None:
        home = os.environ.get("LORAFORGE_HOME") or Path.home() / ".loraforge"
    path = Path(home).expanduser().resolve()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageError(f"cannot create the loraforge home {path} ({exc.strerror}): set LORAFORGE_HOME "
                           "(or --home) to a folder you can write") from None
    return path


def home_is_writable(home: Path) -> bool:
    """Whether this process may create files in `home` (false on read-only mounts, even for root)."""
    return os.access(home, os.W_OK)


def models_dir(home: Path) -> Path:
    return home / "models"


def checkouts_dir(home: Path) -> Path:
    """Materialised multi-file artifacts (hard links into the blob store)."""
    return home / "checkouts"


def cache_dir(home: Path) -> Path:
    return home / "cache"


def digest_index_file(home: Path) -> Path:
    """Where file digests are kept by stat (hashing.DigestIndex): recipe inputs and local base models."""
    return cache_dir(home) / "file-digests.json"


def tmp_dir(home: Path) -> Path:
    """This process's scratch folder, `tmp/<host>.<pid>.<start time>`, created on first use.

    It is on the same filesystem as the blob store, so renames into the store are atomic. It is
    named after its owner so that `remove_stale_tmp` can tell what a killed process left behind
    from what a live one is still writing.
    """
    pid = os.getpid()
    path = home / "tmp" / _owner_tag(pid)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        if home_is_writable(home):
            raise
        raise StorageError(f"the loraforge home {home} is read-only: cannot write scratch files; set "
                           "LORAFORGE_HOME (or --home) to a writable folder") from None
    if path not in _removed_at_exit:
        # A process that exits normally takes its scratch folder with it; only a killed one leaves it for gc.
        _removed_at_exit.add(path)
        atexit.register(_remove_own_scratch, path, pid)
    return path


_removed_at_exit: set[Path] = set()


def _remove_own_scratch(path: Path, pid: int) -> None:
    if os.getpid() == pid:  # not in a forked child that inherited the handler
        import shutil

        shutil.rmtree(path, ignore_errors=True)


# Entries written straight into tmp/ (before scratch folders carried their owner) are removed once
# nothing in them changed for this long: no merge or training run goes a day without writing.
OWNERLESS_MAX_AGE_S = 24 * 3600


def remove_stale_tmp(home: Path, now: float | None = None) -> tuple[int, int]:
    """Delete the scratch folders of processes that are gone; returns (entries, bytes) removed.

    Folders of live processes and of other hosts (a home on a shared filesystem) are left alone.
    """
    root = home / "tmp"
    if not root.is_dir():
        return 0, 0
    import shutil

    now = time.time() if now is None else now
    count = freed = 0
    for entry in sorted(root.iterdir()):
        owner = _parse_owner_tag(entry.name) if entry.is_dir() and not entry.is_symlink() else None
        if owner is None:
            if now - _newest_mtime(entry) < OWNERLESS_MAX_AGE_S:
                continue
        elif owner[0] != _host() or _alive(owner[1], owner[2]):
            continue
        size = _tree_size(entry)
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        if not os.path.lexists(entry):
            count, freed = count + 1, freed + size
    return count, freed


def _host() -> str:
    # os.uname's nodename is what socket.gethostname returns on POSIX, without importing socket
    # (every command imports this module; only scratch-folder owners need the name).
    return re.sub(r"[^A-Za-z0-9-]", "-", os.uname().nodename) or "host"


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot (Linux), so a reused pid is not its owner."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "0"
    return stat.rpartition(")")[2].split()[19]  # field 22; the command name before ")" may hold spaces


def _owner_tag(pid: int) -> str:
    return f"{_host()}.{pid}.{_start_time(pid)}"


def _parse_owner_tag(name: str) -> tuple[str, int, str] | None:
    parts = name.rsplit(".", 2)
    if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
        return None
    return parts[0], int(parts[1]), parts[2]


def _alive(pid: int, start: str) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    now_start = _start_time(pid)
    return start == "0" or now_start == "0" or now_start == start


def _walk(entry: Path):
    if entry.is_dir() and not entry.is_symlink():
        for dirpath, _dirs, files in os.walk(entry):
            yield Path(dirpath)
            for name in files:
                yield Path(dirpath) / name
    else:
        yield entry


def _newest_mtime(entry: Path) -> float:
    return max((p.lstat().st_mtime for p in _walk(entry) if os.path.lexists(p)), default=0.0)


def _tree_size(entry: Path) -> int:
    return sum(p.lstat().st_size for p in _walk(entry) if os.path.lexists(p) and not p.is_dir())
