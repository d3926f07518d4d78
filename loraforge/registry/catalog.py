"""The SQLite catalog of the registry (sqlite-utils), its schema as registered migrations.

The registry's own tables are the `loraforge` migration set. A subsystem that keeps tables in the
catalog (the daemon's jobs, the reward cache) registers its own named set with `subsystem_migrations`
and opens them with `open_catalog(home, subsystem=...)`; it reads and writes them through
`loraforge.registry.tables.CatalogTable`, never with SQL of its own.
"""

from __future__ import annotations

import fcntl
import sqlite3
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator
from urllib.parse import quote

import sqlite_utils
from sqlite_utils import Migrations

from loraforge.errors import CatalogError
from loraforge.home import home_is_writable

migrations = Migrations("loraforge")

# Each subsystem's migration set, by name (the set's name in `_sqlite_migrations`).
SUBSYSTEM_MIGRATIONS: dict[str, Migrations] = {}


def subsystem_migrations(name: str) -> Migrations:
    """A new migration set for a subsystem's own tables; decorate its ordered steps with it.

    Steps run in the order they are declared, once per catalog, each in its own transaction.
    """
    if not name.isidentifier():
        raise ValueError(f"migration set name {name!r} must be an identifier")
    if name == migrations.name or name in SUBSYSTEM_MIGRATIONS:
        raise ValueError(f"migration set {name!r} is already registered")
    SUBSYSTEM_MIGRATIONS[name] = Migrations(name)
    return SUBSYSTEM_MIGRATIONS[name]


@migrations()
def m001_artifacts(db: sqlite_utils.Database) -> None:
    db["artifacts"].create(
        {
            "id": int,
            "name": str,
            "version": int,
            "kind": str,
            "digest": str,
            "input_digest": str,
            "size": int,
            "created_at": str,
            "manifest": str,
        },
        pk="id",
        not_null={"name", "version", "kind", "digest", "manifest"},
    )
    db["artifacts"].create_index(["name", "version"], unique=True)
    db["artifacts"].create_index(["digest"])
    db["artifacts"].create_index(["input_digest"])
    db["files"].create(
        {"artifact_id": int, "path": str, "sha256": str, "size": int},
        pk=("artifact_id", "path"),
        foreign_keys=[("artifact_id", "artifacts", "id")],
    )
    db["files"].create_index(["sha256"])
    db["aliases"].create({"name": str, "alias": str, "version": int, "updated_at": str}, pk=("name", "alias"))


def connect(path: Path) -> sqlite_utils.Database:
    conn = sqlite3.connect(str(path), timeout=60, isolation_level=None, check_same_thread=False)
    db = sqlite_utils.Database(conn)
    conn.execute("PRAGMA busy_timeout = 60000")
    mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
    if mode != "wal":
        conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("PRAGMA foreign_keys = ON")
    return db


@contextmanager
def file_lock(path: Path, shared: bool = False) -> Iterator[None]:
    """An advisory lock between processes (released when the process dies); exclusive unless `shared`."""
    with open(path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def connect_read_only(path: Path) -> sqlite_utils.Database:
    """Open a catalog that this process cannot write (a read-only home)."""
    if not path.is_file():
        raise CatalogError(f"the loraforge home {path.parent} is read-only and holds no registry.db: "
                           "set LORAFORGE_HOME (or --home) to a writable folder")
    uri = f"file:{quote(str(path))}?mode=ro"
    conn = sqlite3.connect(uri, uri=True, timeout=60, isolation_level=None, check_same_thread=False)
    try:
        conn.execute("PRAGMA schema_version").fetchone()
    except sqlite3.OperationalError:
        # A WAL database is read through its -shm file; when the last writer removed it and the
        # folder is read-only, SQLite can only read the file as immutable (as it is, with no writer).
        conn.close()
        conn = sqlite3.connect(uri.replace("mode=ro", "immutable=1"), uri=True, isolation_level=None,
                               check_same_thread=False)
    return sqlite_utils.Database(conn)


def open_catalog(home: Path, read_only: bool | None = None, subsystem: str | None = None) -> sqlite_utils.Database:
    """Open `registry.db` under `home`, applying pending migrations under a lock.

    `read_only` (by default: when this process cannot write `home`) opens it without writing anything.
    `subsystem` names a set from `subsystem_migrations` whose tables the caller needs, applied after
    the registry's own.
    """
    sets = [migrations]
    if subsystem is not None:
        if subsystem not in SUBSYSTEM_MIGRATIONS:
            raise ValueError(f"no migration set {subsystem!r} is registered")
        sets.append(SUBSYSTEM_MIGRATIONS[subsystem])
    db_path = home / "registry.db"
    if read_only is None:
        read_only = not home_is_writable(home)
    try:
        db = connect_read_only(db_path) if read_only else connect(db_path)
        pending = [m for m in sets if m.pending(db)]
    except sqlite3.DatabaseError as exc:
        if "locked" in str(exc):
            raise
        raise CatalogError(f"{db_path} is not a readable registry catalog ({exc}): restore it from a backup, "
                           "or move it aside to start an empty registry") from None
    if read_only:
        # A subsystem's set is applied only by the commands that open it, so a read-only home may
        # never have had it: its tables are read as they are (see CatalogTable), absent ones as empty.
        if migrations in pending:
            raise CatalogError(f"{db_path} needs upgrading for this loraforge version, which a read-only home "
                               "does not allow: run any command once with write access")
        return db
    if pending:
        with file_lock(home / "registry.lock"):
            for pending_set in pending:
                pending_set.apply(db)
    return db


@contextmanager
def immediate(db: sqlite_utils.Database) -> Iterator[sqlite3.Connection]:
    """A write transaction that takes the database lock up front (no upgrade deadlocks)."""
    conn = db.conn
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    else:
        conn.execute("COMMIT")
