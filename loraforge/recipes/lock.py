"""`FILE.lock`: what every reference of a recipe resolved to and what every step built, as YAML.

`apply` rewrites it after each finished step; `apply --locked` resolves registry references to the
pinned versions and refuses to run when a pinned digest (an artifact, dataset or base) has changed.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Optional

import yaml

from loraforge import __version__
from loraforge.errors import RecipeError
from loraforge.yaml_aliases import AliasExpansionError, safe_load

LOCK_VERSION = 1
HEADER = "# Written by `loraforge recipe apply`; `apply --locked` uses exactly these versions and digests.\n"


def lock_path(recipe_path: Path) -> Path:
    return Path(str(recipe_path) + ".lock")


def read_lock(recipe_path: Path) -> Optional[dict]:
    """The lock next to the recipe, or None when there is none."""
    path = lock_path(recipe_path)
    if not path.is_file():
        return None
    try:
        data = safe_load(path.read_text(encoding="utf-8"), "lock file")
    except (yaml.YAMLError, AliasExpansionError) as exc:
        raise RecipeError(f"lock file {path} is damaged ({exc}); delete it and apply again") from None
    if not isinstance(data, dict):
        raise RecipeError(f"lock file {path} is damaged (not a mapping); delete it and apply again")
    return data


def require_lock(recipe_path: Path) -> dict:
    lock = read_lock(recipe_path)
    if lock is None:
        raise RecipeError(f"no lock file {lock_path(recipe_path)}: run `loraforge recipe apply` without --locked first")
    return lock


def write_lock(recipe_path: Path, data: dict, previous: Optional[dict] = None) -> Path:
    """Write the lock atomically (a crash leaves the old lock or the new one, never half of one).

    `previous` is the lock as read before the apply: when it already says exactly this, the file is
    left as it is (a no-op apply writes nothing, so it also works where the recipe's folder is read-only).
    """
    path = lock_path(recipe_path)
    body = {"lock_version": LOCK_VERSION, "loraforge_version": __version__, **data}
    if previous is not None and previous == body and path.is_file():
        return path
    text = HEADER + yaml.safe_dump(body, sort_keys=False, default_flow_style=False, allow_unicode=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
