"""The digests of local files a recipe reads, kept by (path, size, mtime_ns, inode) in the home's cache.

Planning hashes every file and dataset folder a recipe names; with this index an unchanged folder
of thousands of images is only stat()ed. A file whose size, mtime or inode differs is hashed again.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Optional

from loraforge.hashing import digest_of_files, iter_folder_files, sha256_file

INDEX_VERSION = 1
# A file modified within this many seconds of being hashed could change again inside the same
# timestamp tick without its stat changing (coarse file-system clocks), so it is not recorded.
RACY_SECONDS = 2.0


class DigestIndex:
    """sha256 of files, reused while a file's stat is unchanged; `hashed` counts what was read."""

    def __init__(self, path: Optional[Path]):
        self.path = path  # None: nothing is kept (a read-only home)
        self.entries: dict[str, list] = self._read() if path is not None else {}
        self.changed = False
        self.hashed: dict[str, int] = {}  # reference path (file or folder) → files hashed for it

    def _read(self) -> dict[str, list]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            # A damaged cache only costs a re-hash (and `plan` says which digests were recomputed).
            return {}
        if not isinstance(data, dict) or data.get("version") != INDEX_VERSION:
            return {}
        return data.get("files") or {}

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
        if started - st.st_mtime_ns > RACY_SECONDS * 1e9:
            self.entries[key] = [*stamp, digest]
            self.changed = True
        elif key in self.entries:
            del self.entries[key]
            self.changed = True
        return digest

    def file_digest(self, path: Path) -> str:
        path = Path(path).absolute()
        return self._file(path, str(path))

    def folder_digest(self, folder: Path) -> str:
        """The same digest as hashing.sha256_folder, hashing only files whose stat changed."""
        folder = Path(folder).absolute()
        return digest_of_files((p.relative_to(folder).as_posix(), self._file(p, str(folder)))
                               for p in iter_folder_files(folder))

    def save(self) -> None:
        """Write the index atomically (entries of files that are gone are dropped)."""
        if self.path is None or not self.changed:
            return
        files = {k: v for k, v in self.entries.items() if os.path.exists(k)}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name + ".", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({"version": INDEX_VERSION, "files": files}, f)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self.changed = False
