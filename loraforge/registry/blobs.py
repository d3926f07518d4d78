"""Content-addressed blob store: `blobs/sha256/ab/<digest>`, written atomically, stored once.

A file written only to be stored (a converted adapter) is written at a `staging_path` in the store's
scratch folder; `put_file` then moves it into place after hashing it instead of copying it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from loraforge.errors import IntegrityError
from loraforge.faults import fault_point
from loraforge.hashing import CHUNK, sha256_file

STAGED_SUFFIX = ".staged"


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class BlobStore:
    """Files addressed by their sha256. A blob is complete once it has its final name."""

    def __init__(self, root: Path, scratch: Callable[[], Path]):
        """`scratch()` gives the folder for partly written blobs (same filesystem as `root`)."""
        self.root = Path(root)
        self.scratch = scratch  # folders are made on the first write: a read-only home stays readable

    def path(self, digest: str) -> Path:
        return self.root / digest[:2] / digest

    def exists(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def _commit(self, tmp_path: Path, digest: str, created: set[str] | None = None) -> Path:
        final = self.path(digest)
        if final.exists():
            tmp_path.unlink(missing_ok=True)
            return final
        if created is not None:
            created.add(digest)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(tmp_path, 0o444)
        fault_point("blob-before-rename")
        os.replace(tmp_path, final)
        fsync_dir(final.parent)
        return final

    def put_stream(self, stream: BinaryIO, created: set[str] | None = None) -> tuple[str, int]:
        """Copy a stream into the store; returns (sha256, size). A new blob's digest is added to `created`."""
        h = hashlib.sha256()
        size = 0
        fd, name = tempfile.mkstemp(dir=self.scratch(), prefix="blob-")
        tmp_path = Path(name)
        try:
            with os.fdopen(fd, "wb") as out:
                while chunk := stream.read(CHUNK):
                    if size == CHUNK:  # the first chunk is on disk and more follows
                        out.flush()
                        fault_point("blob-partial")
                    h.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
                out.flush()
                os.fsync(out.fileno())
            digest = h.hexdigest()
            self._commit(tmp_path, digest, created)
            return digest, size
        except BaseException:
            tmp_path.unlink(missing_ok=True)
            raise

    def staging_path(self, name: str) -> Path:
        """A new path in the scratch folder for a file written only to be stored: `put_file` moves the
        file found there into the store instead of copying it. The caller removes it if it never gets there."""
        return self.scratch() / f"blob-{uuid.uuid4().hex[:12]}-{name}{STAGED_SUFFIX}"

    def _is_staged(self, src: Path) -> bool:
        return src.name.startswith("blob-") and src.name.endswith(STAGED_SUFFIX) and src.parent == self.scratch()

    def _adopt(self, src: Path, created: set[str] | None) -> tuple[str, int]:
        """Hash a staged file, force it to disk and rename it into place: one read, no copy."""
        h = hashlib.sha256()
        size = 0
        with open(src, "rb") as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
                size += len(chunk)
            os.fsync(f.fileno())
        digest = h.hexdigest()
        self._commit(src, digest, created)
        return digest, size

    def put_file(self, src: Path, expected_sha256: str | None = None,
                 created: set[str] | None = None) -> tuple[str, int]:
        """Store a file. When its digest is known and already stored, nothing is copied; a file at a
        `staging_path` is moved into the store, not copied."""
        if expected_sha256 and self.exists(expected_sha256):
            return expected_sha256, self.path(expected_sha256).stat().st_size
        if self._is_staged(Path(src)):
            digest, size = self._adopt(Path(src), created)
        else:
            with open(src, "rb") as f:
                digest, size = self.put_stream(f, created)
        if expected_sha256 and digest != expected_sha256:
            raise IntegrityError(f"{src} changed while it was being stored (sha256 {digest}, expected {expected_sha256})")
        return digest, size

    def put_bytes(self, data: bytes) -> tuple[str, int]:
        import io

        return self.put_stream(io.BytesIO(data))

    def verify(self, digest: str) -> bool:
        p = self.path(digest)
        return p.is_file() and sha256_file(p) == digest

    def __iter__(self) -> Iterator[str]:
        if not self.root.is_dir():
            return
        for sub in sorted(self.root.iterdir()):
            if sub.is_dir():
                for p in sorted(sub.iterdir()):
                    yield p.name

    def delete(self, digest: str) -> int:
        p = self.path(digest)
        try:
            size = p.stat().st_size
        except FileNotFoundError:
            return 0
        os.chmod(p, 0o644)
        p.unlink()
        return size

    def link_or_copy(self, digest: str, dest: Path) -> None:
        """Place blob `digest` at `dest` (hard link when possible; copies are made read-only too)."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        src = self.path(digest)
        try:
            os.link(src, dest)
        except OSError:
            shutil.copyfile(src, dest)
            os.chmod(dest, 0o444)
