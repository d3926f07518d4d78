"""The registry: versioned artifacts whose files live in the blob store and rows in the catalog."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Optional

from loraforge.errors import ArtifactNotFound, ConfigError, IntegrityError
from loraforge.faults import fault_point
from loraforge.hashing import digest_of_files
from loraforge.home import checkouts_dir, home_is_writable, loraforge_home, remove_stale_tmp, tmp_dir
from loraforge.registry import rows
from loraforge.registry.blobs import BlobStore, fsync_dir
from loraforge.registry.catalog import file_lock, immediate, open_catalog
from loraforge.registry.lineage import LineageNode, lineage
from loraforge.registry.manifest import ARTIFACT_KINDS, FileEntry, Manifest
from loraforge.registry.refs import check_name


# Refs this process has committed, oldest first: an interrupted command says which of them stay.
registered_in_this_process: list[str] = []


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
        self.db.check_writable(action)

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
                 input_digest: str | None = None, version: int | None = None) -> Manifest:
        """Store `files` (if given), then add the manifest as the next version of its name.

        `version` keeps a given version number instead (a copy of another home's artifact, which must keep
        the name:version recipes and manifests call it by); a version the name already holds is refused.

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
                manifest = self._register(manifest, files, input_digest, created, version)
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
                  input_digest: str | None, created: set[str], version: int | None = None) -> Manifest:
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
            if version is None:
                version = row[0] + 1
            elif conn.execute("SELECT 1 FROM artifacts WHERE name = ? AND version = ?",
                              [manifest.name, version]).fetchone() is not None:
                raise ConfigError(f"{manifest.name}:{version} already exists: versions are immutable")
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
        """Point `alias` of REF's name at REF (aliases move)."""
        return Manifest.from_json(rows.tag(self.db, ref, alias).manifest_json)

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

    def resolve(self, ref: str) -> Manifest:
        """The manifest a registry reference points at, or ArtifactNotFound."""
        return Manifest.from_json(rows.resolve(self.db, ref).manifest_json)

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
        return list(rows.list_rows(self.db, kind=kind, name=name))

    def aliases(self, name: str) -> dict[str, int]:
        return rows.aliases(self.db, name)

    def find_by_input_digest(self, input_digest: str, name: str | None = None) -> Optional[Manifest]:
        sql = "SELECT manifest FROM artifacts WHERE input_digest = ?"
        params: list = [input_digest]
        if name:
            sql += " AND name = ?"
            params.append(name)
        row = self.db.execute(sql + " ORDER BY id DESC LIMIT 1", params).fetchone()
        return Manifest.from_json(row[0]) if row else None

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
        """The tree of REF's parents (see `loraforge.registry.lineage`)."""
        return lineage(self.db, ref, max_depth)

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
