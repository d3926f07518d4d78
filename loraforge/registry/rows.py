"""The catalog's artifact and alias rows, read (and aliases set) with plain sqlite3 and json.

This is the one home of the registry's read queries: resolving a reference (NAME, NAME:VER, NAME:alias,
sha256:prefix) to its row, listing rows page by page, an artifact's aliases. `Registry` validates what
it reads here into the pydantic `Manifest`; the CLI's read commands (`registry ls/show/lineage/tag`)
use the rows and manifest dicts as they are, so they import neither pydantic nor sqlite-utils. The
manifest JSON in the catalog was validated when its version was registered.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Iterator, Optional

from loraforge.errors import ArtifactNotFound, ConfigError
from loraforge.registry.catalog import Catalog, immediate
from loraforge.registry.refs import check_alias, parse_registry_ref

# Characters that make `--name` a glob; artifact names never contain them (see refs.NAME_RE).
GLOB_CHARS = frozenset("*?[")


@dataclass(frozen=True)
class ArtifactRow:
    """One version in the catalog, with its manifest as the JSON text it was stored as."""

    id: int
    name: str
    version: int
    kind: str
    digest: str
    manifest_json: str

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"

    def manifest(self) -> dict[str, Any]:
        """The stored manifest as a dict (what `Manifest.model_dump()` gave when it was registered)."""
        return json.loads(self.manifest_json)


_ROW = "SELECT id, name, version, kind, digest, manifest FROM artifacts"


def resolve(catalog: Catalog, ref: str) -> ArtifactRow:
    """The row a registry reference points at, or ArtifactNotFound (ConfigError for a malformed one)."""
    parsed = parse_registry_ref(ref)
    if parsed.digest_prefix:
        found = catalog.execute(f"{_ROW} WHERE digest LIKE ? ORDER BY id DESC", [parsed.digest_prefix + "%"])
        first = found.fetchone()
        if first is None:
            raise ArtifactNotFound(f"no artifact has a digest starting with {parsed.digest_prefix!r}")
        if any(row[4] != first[4] for row in found):
            raise ConfigError(f"digest prefix {parsed.digest_prefix!r} is ambiguous: give more digits")
        return ArtifactRow(*first)
    if parsed.alias:
        hit = catalog.execute("SELECT version FROM aliases WHERE name = ? AND alias = ?",
                              [parsed.name, parsed.alias]).fetchone()
        if hit is None:
            raise ArtifactNotFound(
                f"{parsed.name} has no alias {parsed.alias!r}; see `loraforge registry show {parsed.name}`"
            )
        version = hit[0]
    else:
        version = parsed.version
    if version is None:
        row = catalog.execute(f"{_ROW} WHERE name = ? ORDER BY version DESC LIMIT 1", [parsed.name]).fetchone()
    else:
        row = catalog.execute(f"{_ROW} WHERE name = ? AND version = ?", [parsed.name, version]).fetchone()
    if row is None:
        known = catalog.execute("SELECT MAX(version) FROM artifacts WHERE name = ?", [parsed.name]).fetchone()[0]
        if known is None:
            raise ArtifactNotFound(f"no artifact named {parsed.name!r} in the registry (see `loraforge registry ls`)")
        raise ArtifactNotFound(f"{parsed.name} has no version {version} (latest is {known})")
    return ArtifactRow(*row)


def aliases(catalog: Catalog, name: str) -> dict[str, int]:
    """alias -> version for the aliases of `name`, by alias."""
    return dict(catalog.execute("SELECT alias, version FROM aliases WHERE name = ? ORDER BY alias", [name]))


def list_rows(catalog: Catalog, kind: Optional[str] = None, name: Optional[str] = None,
              limit: Optional[int] = None, offset: int = 0) -> Iterator[dict[str, Any]]:
    """Versions ordered by name and version, one dict at a time: name, version, kind, digest, size,
    created_at and aliases (sorted). Filtered and paged in SQL: `name` is exact, or a glob when it has
    `*`, `?` or `[`; `limit`/`offset` count versions. Manifests are not read."""
    where, params = [], []
    if name:
        where.append("name GLOB ?" if GLOB_CHARS & set(name) else "name = ?")
        params.append(name)
    # Aliases are few beside versions (they move): read those of the listed names up front.
    by_version: dict[tuple[str, int], list[str]] = {}
    for n, v, a in catalog.execute("SELECT name, version, alias FROM aliases"
                                   + (f" WHERE {where[0]}" if where else "") + " ORDER BY alias", list(params)):
        by_version.setdefault((n, v), []).append(a)
    if kind:
        where.append("kind = ?")
        params.append(kind)
    sql = "SELECT name, version, kind, digest, size, created_at FROM artifacts"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY name, version"
    if limit is not None or offset:
        sql += " LIMIT ? OFFSET ?"
        params += [-1 if limit is None else limit, offset]
    for n, v, k, d, size, created in catalog.execute(sql, params):
        yield {"name": n, "version": v, "kind": k, "digest": d, "size": size, "created_at": created,
               "aliases": by_version.get((n, v), []) if by_version else []}


def tag(catalog: Catalog, ref: str, alias: str) -> ArtifactRow:
    """Point `alias` of REF's name at REF (aliases move); the row it now names."""
    catalog.check_writable("move an alias")
    check_alias(alias)
    row = resolve(catalog, ref)
    with immediate(catalog) as conn:
        conn.execute(
            "INSERT INTO aliases (name, alias, version, updated_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT(name, alias) DO UPDATE SET version = excluded.version, updated_at = excluded.updated_at",
            [row.name, alias, row.version, datetime.now(timezone.utc).isoformat(timespec="seconds")],
        )
    return row
