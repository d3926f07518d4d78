"""Streaming sha256 digests of files, folders and JSON-able values."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable

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
