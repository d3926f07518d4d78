"""Streaming sha256 digests of files, folders and JSON-able values, and an index that reuses them.

The DigestIndex keeps file digests by (path, size, mtime_ns, inode), so a recipe's dataset folder or
a local base model that did not change is only stat()ed, not read again.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Optional

CHUNK = 1 << 20


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace: equal values give equal text."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def sha256_json(value: Any) -> str:
    return sha256_bytes(canonical_json(value).encode())


def digest_of_files(entries: Iterable[tuple[str, str]]) -> str:
    """Digest of a set of (relative path, file sha256) pairs, independent of order."""
    return sha256_json(sorted([p, d] for p, d in entries))


def iter_folder_files(folder: str | Path) -> list[Path]:
    """Every regular file below `folder`, sorted, skipping hidden names."""
    folder = Path(folder)
    return sorted(
        p for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def sha256_folder(folder: str | Path) -> str:
    folder = Path(folder)
    return digest_of_files((p.relative_to(folder).as_posix(), sha256_file(p)) for p in iter_folder_files(folder))


DIGEST_INDEX_VERSION = 1
# A file modified within one timestamp tick of being hashed could change again without its stat
# changing, so it is not recorded (Linux file times advance once per kernel tick, at most 10 ms;
# a file system with coarser times, such as FAT's 2 s, can still miss such an edit).
RACY_NS = 10_000_000


class DigestIndex:
    """sha256 of files, reused while a file's stat is unchanged; `hashed` counts what was read."""

    def __init__(self, path: Optional[Path]):
        self.path = path  # the JSON file it lives in; None: nothing is kept (a read-only home)
        self.entries: dict[str, list] = self._read() if path is not None else {}
        self.changed = False
        self.hashed: dict[str, int] = {}  # file or folder asked for → how many of its files were read
        self._dropped: set[str] = set()

    def _read(self) -> dict[str, list]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            # A damaged index only costs re-reading the files (and `hashed` says which were read).
            return {}
        if not isinstance(data, dict) or data.get("version") != DIGEST_INDEX_VERSION:
            return {}
        files = data.get("files")
        if not isinstance(files, dict):
            return {}
        return {k: v for k, v in files.items() if isinstance(v, list) and len(v) == 4 and isinstance(v[3], str)}

    def _file(self, path: Path, owner: str) -> str:
        st = path.stat()
        key = str(path)
        stamp = [st.st_size, st.st_mtime_ns, st.st_ino]
        entry = self.entries.get(key)
        if entry is not None and entry[:3] == stamp:
            return entry[3]
        started = time.time_ns()
        digest = sha256_file(path)
        self.hashed[owner] = self.hashed.get(owner, 0) + 1
        if started - st.st_mtime_ns > RACY_NS:
            self.entries[key] = [*stamp, digest]
            self.changed = True
        elif key in self.entries:
            del self.entries[key]
            self._dropped.add(key)
            self.changed = True
        return digest

    def file_digest(self, path: Path) -> str:
        path = Path(path).absolute()
        return self._file(path, str(path))

    def digest(self, path: Path) -> str:
        """folder_digest of a folder, file_digest of a file."""
        return self.folder_digest(path) if Path(path).is_dir() else self.file_digest(path)

    def folder_digest(self, folder: Path) -> str:
        """The same digest as hashing.sha256_folder, hashing only files whose stat changed."""
        folder = Path(folder).absolute()
        return digest_of_files((p.relative_to(folder).as_posix(), self._file(p, str(folder)))
                               for p in iter_folder_files(folder))

    def save(self) -> None:
        """Write the index atomically, merged with what other indexes saved since this one was read
        (entries of files that are gone are dropped)."""
        if self.path is None or not self.changed:
            return
        merged = {k: v for k, v in self._read().items() if k not in self._dropped}
        merged.update(self.entries)
        files = {k: v for k, v in merged.items() if os.path.exists(k)}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name + ".", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({"version": DIGEST_INDEX_VERSION, "files": files}, f)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self.changed = False
