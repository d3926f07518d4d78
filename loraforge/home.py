"""Where loraforge keeps its state: the home folder and its fixed sub-folders."""

from __future__ import annotations

import os
from pathlib import Path


def loraforge_home(home: str | os.PathLike | None = None) -> Path:
    """The loraforge home: the argument, else `$LORAFORGE_HOME`, else `~/.loraforge`."""
    if home is None:
        home = os.environ.get("LORAFORGE_HOME") or Path.home() / ".loraforge"
    path = Path(home).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def models_dir(home: Path) -> Path:
    return home / "models"


def checkouts_dir(home: Path) -> Path:
    """Materialised multi-file artifacts (hard links into the blob store)."""
    return home / "checkouts"


def cache_dir(home: Path) -> Path:
    return home / "cache"


def tmp_dir(home: Path) -> Path:
    """Scratch space on the same filesystem as the blob store, so renames are atomic."""
    path = home / "tmp"
    path.mkdir(parents=True, exist_ok=True)
    return path
