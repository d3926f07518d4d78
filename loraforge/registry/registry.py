"""The registry: versioned artifacts whose files live in the blob store and rows in the catalog."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Iterator, Optional

from loraforge.errors import ArtifactNotFound, ConfigError, IntegrityError, StorageError
from loraforge.faults import fault_point
from loraforge.hashing import digest_of_files
from loraforge.home import checkouts_dir, home_is_writable, loraforge_home, remove_stale_tmp, tmp_dir
from loraforge.registry.blobs import BlobStore, fsync_dir
from loraforge.registry.catalog import file_lock, immediate, open_catalog
from loraforge.registry.manifest import ARTIFACT_KINDS, FileEntry, Manifest
from loraforge.registry.refs import check_alias, check_name, parse_registry_ref


# Refs this process has committed, oldest first: an interrupted command says which of them stay.
registered_in_this_process: list[str] = []


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class LineageNode:
    ref: str
    kind: str
    role: str = "self"
    weight: Optional[float] = None
    digest: Optional[str] = None
    children: list["LineageNode"] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "ref": self.ref, "kind": self.kind, "role": self.role, "weight": self.weight,
            "digest": self.digest, "parents": [c.to_dict() for c in self.children],
        }


@dataclass
class VerifyReport:
    checked_blobs: int = 0
    checked_artifacts: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class GcReport:
    blobs: int = 0
    blob_bytes: int = 0
    temp_entries: int = 0
    temp_bytes: int = 0


class Registry:
    """A loraforge home: catalog (`registry.db`) + blobs (`blobs/sha256/`)."""

    def __init__(self, home: str | os.PathLike | None = None):
        self.home = loraforge_home(home)
        self.read_only = not home_is_writable(self.home)
        self.db = open_catalog(self.home, read_only=self.read_only)
        self.blobs = BlobStore(self.home / "blobs" / "sha256", lambda: tmp_dir(self.home))

    # -- writing -----------------------------------------------------------------------------

    def _check_writable(self, action: str) -> None:
        if self.read_only:
            raise StorageError(f"the loraforge home {self.home} is read-only: cannot {action}; set "
                               "LORAFORGE_HOME (or --home) to a writable folder")

    def store_files(self, files: Iterable[tuple[Path, str]], created: set[str] | None = None) -> list[FileEntry]:
        """Put (source path, artifact-relative path) pairs into the blob store; new digests go to `created`."""
        entries = []
        for src, rel in files:
            rel = Path(rel).as_posix()
            if rel.startswith("/") or ".." in Path(rel).parts:
                raise ConfigError(f"invalid file path {rel!r} inside an artifact")
            digest, size = self.blobs.put_file(Path(src), created=created)
            entries.append(FileEntry(path=rel, sha256=digest, size=size))
        return sorted(entries, key=lambda e: e.path)

    def register(self, manifest: Manifest, files: Iterable[tuple[Path, str]] | None = None,
                 input_digest: str | None = None) -> Manifest:
        """Store `files` (if given), then add the manifest as the next version of its name.

        Blobs are written first; the catalog rows go in one transaction, so a killed registration
        leaves at most unreferenced blobs (removed by `gc`), never half an artifact. One that fails
        (a full disk, a bad file) removes the blobs it added.
        """
        self._check_writable("register an artifact")
        check_name(manifest.name)
        # From the first blob stored until the rows commit, those blobs are referenced by nothing
        # in the catalog yet: keep `gc` out for that long (registrations share the lock).
        created: set[str] = set()
        try:
            with self._blob_lock(shared=True):
                manifest = self._register(manifest, files, input_digest, created)
        except Exception:
            self._drop_unreferenced(created)  # a failed registration leaves the store as it was
            raise
        registered_in_this_process.append(manifest.ref)
        return manifest

    def _blob_lock(self, shared: bool):
        return file_lock(self.home / "blobs.lock", shared=shared)

    def _drop_unreferenced(self, digests: set[str]) -> None:
        if not digests:
            return
        # Only under the exclusive lock: a concurrent registration may have found one of these
        # blobs already stored and be about to reference it.
        with self._blob_lock(shared=False):
            for digest in digests:
                if self.db.execute("SELECT 1 FROM files WHERE sha256 = ? LIMIT 1", [digest]).fetchone() is None:
                    self.blobs.delete(digest)

    def _register(self, manifest: Manifest, files: Iterable[tuple[Path, str]] | None,
                  input_digest: str | None, created: set[str]) -> Manifest:
        if files is not None:
            entries = self.store_files(files, created)
            manifest = manifest.model_copy(update={"files": entries})
        for entry in manifest.files:
            if not self.blobs.exists(entry.sha256):
                raise IntegrityError(f"blob {entry.sha256} of {entry.path} is not in the store")
        digest = digest_of_files((f.path, f.sha256) for f in manifest.files)
        fault_point("register-before-transaction")
        with immediate(self.db) as conn:
            row = conn.execute(
                "SELECT COALESCE(MAX(version), 0) FROM artifacts WHERE name = ?", [manifest.name]
            ).fetchone()
            existing_kind = conn.execute(
                "SELECT kind FROM artifacts WHERE name = ? LIMIT 1", [manifest.name]
            ).fetchone()
            if existing_kind and existing_kind[0] != manifest.kind:
                raise ConfigError(
                    f"name {manifest.name!r} already holds {existing_kind[0]} artifacts; "
                    f"choose another name for this {manifest.kind}"
                )
            version = row[0] + 1
            manifest = manifest.model_copy(update={"version": version, "digest": digest})
            cur = conn.execute(
                "INSERT INTO artifacts (name, version, kind, digest, input_digest, size, created_at, manifest)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [manifest.name, version, manifest.kind, digest, input_digest, manifest.total_size,
                 manifest.provenance.created_at, manifest.to_json()],
            )
            artifact_id = cur.lastrowid
            conn.executemany(
                "INSERT INTO files (artifact_id, path, sha256, size) VALUES (?, ?, ?, ?)",
                [(artifact_id, f.path, f.sha256, f.size) for f in manifest.files],
            )
            fault_point("register-in-transaction")
        fault_point("register-after-transaction")
        return manifest

    def tag(self, ref: str, alias: str) -> Manifest:
        self._check_writable("move an alias")
        check_alias(alias)
        manifest = self.resolve(ref)
        with immediate(self.db) as conn:
            conn.execute(
                "INSERT INTO aliases (name, alias, version, updated_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(name, alias) DO UPDATE SET version = excluded.version, updated_at = excluded.updated_at",
                [manifest.name, alias, manifest.version, _now()],
            )
        return manifest

    def remove(self, ref: str) -> Manifest:
        """Remove one version (its blobs stay until `gc`). Aliases pointing at it are dropped."""
        self._check_writable("remove an artifact")
        manifest = self.resolve(ref)
        with immediate(self.db) as conn:
            (artifact_id,) = conn.execute(
                "SELECT id FROM artifacts WHERE name = ? AND version = ?", [manifest.name, manifest.version]
            ).fetchone()
            conn.execute("DELETE FROM files WHERE artifact_id = ?", [artifact_id])
            conn.execute("DELETE FROM artifacts WHERE id = ?", [artifact_id])
            conn.execute("DELETE FROM aliases WHERE name = ? AND version = ?", [manifest.name, manifest.version])
        shutil.rmtree(checkouts_dir(self.home) / manifest.digest, ignore_errors=True)
        return manifest

    def gc(self) -> GcReport:
        """Delete blobs no artifact references and the temp files of dead processes.

        Waits for registrations in progress: their blobs are stored before the catalog names them.
        """
        self._check_writable("collect garbage")
        report = GcReport()
        with self._blob_lock(shared=False):
            referenced = {r[0] for r in self.db.execute("SELECT DISTINCT sha256 FROM files").fetchall()}
            for digest in list(self.blobs):
                if digest not in referenced:
                    report.blob_bytes += self.blobs.delete(digest)
                    report.blobs += 1
        report.temp_entries, report.temp_bytes = remove_stale_tmp(self.home)
        live = {r[0] for r in self.db.execute("SELECT digest FROM artifacts").fetchall()}
        root = checkouts_dir(self.home)
        if root.exists():
            for sub in root.iterdir():
                if sub.name not in live:
                    shutil.rmtree(sub, ignore_errors=True)
        return report

    # -- reading -----------------------------------------------------------------------------

    def _row_to_manifest(self, row) -> Manifest:
        return Manifest.from_json(row[0])

    def resolve(self, ref: str) -> Manifest:
        """The manifest a registry reference points at, or ArtifactNotFound."""
        parsed = parse_registry_ref(ref)
        db = self.db
        if parsed.digest_prefix:
            rows = db.execute(
                "SELECT manifest, name, version FROM artifacts WHERE digest LIKE ? ORDER BY id DESC",
                [parsed.digest_prefix + "%"],
            ).fetchall()
            if not rows:
                raise ArtifactNotFound(f"no artifact has a digest starting with {parsed.digest_prefix!r}")
            if len({r[0] and json.loads(r[0])["digest"] for r in rows}) > 1:
                raise ConfigError(f"digest prefix {parsed.digest_prefix!r} is ambiguous: give more digits")
            return self._row_to_manifest(rows[0])
        if parsed.alias:
            hit = db.execute("SELECT version FROM aliases WHERE name = ? AND alias = ?",
                             [parsed.name, parsed.alias]).fetchone()
            if hit is None:
                raise ArtifactNotFound(
                    f"{parsed.name} has no alias {parsed.alias!r}; see `loraforge registry show {parsed.name}`"
                )
            version = hit[0]
        else:
            version = parsed.version
        if version is None:
            row = db.execute(
                "SELECT manifest FROM artifacts WHERE name = ? ORDER BY version DESC LIMIT 1", [parsed.name]
            ).fetchone()
        else:
            row = db.execute("SELECT manifest FROM artifacts WHERE name = ? AND version = ?",
                             [parsed.name, version]).fetchone()
        if row is None:
            known = db.execute("SELECT MAX(version) FROM artifacts WHERE name = ?", [parsed.name]).fetchone()[0]
            if known is None:
                raise ArtifactNotFound(f"no artifact named {parsed.name!r} in the registry (see `loraforge registry ls`)")
            raise ArtifactNotFound(f"{parsed.name} has no version {version} (latest is {known})")
        return self._row_to_manifest(row)

    def exists(self, ref: str) -> bool:
        try:
            self.resolve(ref)
            return True
        except ArtifactNotFound:
            return False

    def list(self, kind: str | None = None, name: str | None = None) -> list[dict]:
        """Rows (name, version, kind, digest, size, created_at, aliases) without parsing manifests."""
        if kind is not None and kind not in ARTIFACT_KINDS:
            raise ConfigError(f"unknown kind {kind!r}: choose one of {', '.join(ARTIFACT_KINDS)}")
        where, params = [], []
        if kind:
            where.append("kind = ?")
            params.append(kind)
        if name:
            where.append("name = ?")
            params.append(name)
        sql = "SELECT name, version, kind, digest, size, created_at FROM artifacts"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY name, version"
        aliases: dict[tuple[str, int], list[str]] = {}
        for n, a, v in self.db.execute("SELECT name, alias, version FROM aliases ORDER BY alias").fetchall():
            aliases.setdefault((n, v), []).append(a)
        out = []
        for n, v, k, d, s, c in self.db.execute(sql, params).fetchall():
            out.append({"name": n, "version": v, "kind": k, "digest": d, "size": s, "created_at": c,
                        "aliases": aliases.get((n, v), [])})
        return out

    def aliases(self, name: str) -> dict[str, int]:
        return {a: v for a, v in self.db.execute(
            "SELECT alias, version FROM aliases WHERE name = ? ORDER BY alias", [name]).fetchall()}

    def find_by_input_digest(self, input_digest: str, name: str | None = None) -> Optional[Manifest]:
        sql = "SELECT manifest FROM artifacts WHERE input_digest = ?"
        params: list = [input_digest]
        if name:
            sql += " AND name = ?"
            params.append(name)
        row = self.db.execute(sql + " ORDER BY id DESC LIMIT 1", params).fetchone()
        return self._row_to_manifest(row) if row else None

    def find_by_source(self, source: str, name: str | None = None) -> Optional[Manifest]:
        """The newest artifact whose provenance source is exactly `source` (and named `name`, when given)."""
        # The catalog stores manifests as compact JSON: a LIKE prefilter avoids parsing every row.
        rows = self.db.execute("SELECT manifest FROM artifacts WHERE manifest LIKE ? ORDER BY id DESC",
                               [f'%"source":{json.dumps(source)}%']).fetchall()
        for (text,) in rows:
            manifest = Manifest.from_json(text)
            if manifest.provenance.source == source and (name is None or manifest.name == name):
                return manifest
        return None

    def referenced_blob_count(self) -> int:
        """How many distinct blobs the catalog's artifacts reference (what `verify` re-hashes)."""
        return self.db.execute("SELECT COUNT(DISTINCT sha256) FROM files").fetchone()[0]

    def iter_manifests(self) -> Iterator[Manifest]:
        for (text,) in self.db.execute("SELECT manifest FROM artifacts ORDER BY id").fetchall():
            yield Manifest.from_json(text)

    def table(self, subsystem: str, name: str):
        """A subsystem's own table in this catalog (its migrations applied), on a connection of its own."""
        from loraforge.registry.tables import open_table

        return open_table(self.home, subsystem, name, read_only=self.read_only)

    # -- files -------------------------------------------------------------------------------

    def blob_path(self, entry: FileEntry) -> Path:
        return self.blobs.path(entry.sha256)

    def checkout(self, manifest: Manifest) -> Path:
        """A folder holding the artifact's files under their names (hard links into the store)."""
        root = checkouts_dir(self.home)
        final = root / manifest.digest
        if final.exists():
            return final
        root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=tmp_dir(self.home), prefix="checkout-"))
        try:
            for entry in manifest.files:
                self.blobs.link_or_copy(entry.sha256, staging / entry.path)
            try:
                os.replace(staging, final)
            except OSError:
                if not final.exists():
                    raise
            fsync_dir(root)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return final

    def primary_file(self, manifest: Manifest) -> Path:
        """The main file of a single-file artifact (adapter or single-file checkpoint)."""
        folder = self.checkout(manifest)
        for entry in manifest.files:
            if entry.path.endswith(".safetensors"):
                return folder / entry.path
        if len(manifest.files) == 1:
            return folder / manifest.files[0].path
        raise ConfigError(f"{manifest.ref} has several files; use its folder {folder}")

    # -- lineage and integrity ----------------------------------------------------------------

    def lineage(self, ref: str, max_depth: int = 32) -> LineageNode:
        manifest = self.resolve(ref)
        return self._lineage(manifest, "self", None, max_depth, set())

    def _lineage(self, manifest: Manifest, role: str, weight, depth: int, seen: set) -> LineageNode:
        node = LineageNode(ref=manifest.ref, kind=manifest.kind, role=role, weight=weight, digest=manifest.digest)
        seen = seen | {manifest.ref}
        parents = list(manifest.provenance.parents)
        if manifest.base and not any(p.role == "base" for p in parents):
            from loraforge.registry.manifest import Parent

            parents.append(Parent(ref=manifest.base.ref, digest=manifest.base.digest, role="base"))
        for parent in parents:
            child = None
            if depth > 0 and parent.ref not in seen:
                try:
                    pm = self.resolve(parent.ref)
                    if parent.digest is None or pm.digest == parent.digest:
                        child = self._lineage(pm, parent.role, parent.weight, depth - 1, seen)
                except Exception:
                    child = None
            if child is None:
                kind = "dataset" if parent.role == "dataset" else "external"
                child = LineageNode(ref=parent.ref, kind=kind, role=parent.role, weight=parent.weight,
                                    digest=parent.digest)
            node.children.append(child)
        return node

    def verify(self, progress=None) -> VerifyReport:
        """Re-hash every referenced blob and check every catalog row against its manifest."""
        report = VerifyReport()
        try:
            pages = [row[0] for row in self.db.execute("PRAGMA quick_check").fetchall()]
        except sqlite3.DatabaseError as exc:
            pages = [str(exc)]
        if pages != ["ok"]:
            report.problems += [f"{self.home / 'registry.db'} is damaged: {line}"
                                for page in pages for line in page.splitlines() if not line.startswith("***")]
            return report  # its rows cannot be trusted to say which blobs to check
        rows = self.db.execute("SELECT id, name, version, digest, manifest FROM artifacts").fetchall()
        for artifact_id, name, version, digest, text in rows:
            report.checked_artifacts += 1
            try:
                manifest = Manifest.from_json(text)
            except Exception as exc:  # a damaged row must be reported, not crash verify
                report.problems.append(f"{name}:{version}: manifest does not parse ({exc})")
                continue
            if manifest.digest != digest or digest_of_files((f.path, f.sha256) for f in manifest.files) != digest:
                report.problems.append(f"{name}:{version}: digest does not match its file list")
            files = {(p, s) for p, s in self.db.execute(
                "SELECT path, sha256 FROM files WHERE artifact_id = ?", [artifact_id]).fetchall()}
            if files != {(f.path, f.sha256) for f in manifest.files}:
                report.problems.append(f"{name}:{version}: catalog file rows differ from the manifest")
        referenced = self.db.execute("SELECT DISTINCT sha256, size FROM files").fetchall()
        for digest, size in referenced:
            report.checked_blobs += 1
            path = self.blobs.path(digest)
            if not path.is_file():
                report.problems.append(f"blob {digest} is missing")
            elif path.stat().st_size != size:
                report.problems.append(f"blob {digest} has size {path.stat().st_size}, expected {size}")
            elif not self.blobs.verify(digest):
                report.problems.append(f"blob {digest} is damaged (its sha256 no longer matches)")
            if progress:
                progress()
        return report
