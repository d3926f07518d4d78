"""The SQLite catalog of the registry: its connection (`Catalog`) and its schema as registered migrations.

The registry's own tables are the `loraforge` migration set. A subsystem that keeps tables in the
catalog (the daemon's jobs, the reward cache) registers its own named set with `subsystem_migrations`
and opens them with `open_catalog(home, subsystem=...)`; it reads and writes them through
`loraforge.registry.tables.CatalogTable`, never with SQL of its own.

Opening a catalog costs plain `sqlite3`: whether a set has pending steps is one query on
`_sqlite_migrations`, and sqlite-utils (which applies the steps) is imported only when one is pending
or a caller asks for its table API (`catalog[name]`), so read-only commands start fast.
"""

from __future__ import annotations

import fcntl
import sqlite3
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence
from urllib.parse import quote

from loraforge.errors import CatalogError, StorageError
from loraforge.home import home_is_writable

if TYPE_CHECKING:
    import sqlite_utils

# Where sqlite-utils' Migrations record what they applied: (migration_set, name, applied_at) rows.
MIGRATIONS_TABLE = "_sqlite_migrations"


@dataclass(frozen=True)
class _Step:
    name: str
    fn: Callable[["sqlite_utils.Database"], None]
    transactional: bool


class MigrationSet:
    """The ordered schema steps of one named set, declared with `@set()` as with `sqlite_utils.Migrations`.

    Declaring steps imports nothing; `apply` hands them to sqlite-utils, which runs each pending one
    in its own transaction and records it in `_sqlite_migrations`.
    """

    def __init__(self, name: str):
        self.name = name
        self.steps: list[_Step] = []

    def __call__(self, *, name: str | None = None, transactional: bool = True):
        def register(fn):
            step_name = name or fn.__name__
            if any(s.name == step_name for s in self.steps):
                raise ValueError(f"migration {step_name!r} is already registered in set {self.name!r}")
            self.steps.append(_Step(step_name, fn, transactional))
            return fn

        return register

    def pending(self, catalog: "Catalog") -> list[str]:
        """The names of the steps not yet applied to `catalog`, in order (reads only)."""
        if not catalog.table_exists(MIGRATIONS_TABLE):
            return [s.name for s in self.steps]
        applied = {row[0] for row in catalog.execute(
            f"SELECT name FROM [{MIGRATIONS_TABLE}] WHERE migration_set = ?", [self.name])}
        return [s.name for s in self.steps if s.name not in applied]

    def apply(self, catalog: "Catalog") -> None:
        from sqlite_utils import Migrations

        migrations = Migrations(self.name)
        for step in self.steps:
            migrations(name=step.name, transactional=step.transactional)(step.fn)
        migrations.apply(catalog.tables)

    def __repr__(self) -> str:
        return f"<MigrationSet {self.name!r}: {', '.join(s.name for s in self.steps)}>"


migrations = MigrationSet("loraforge")

# Each subsystem's migration set, by name (the set's name in `_sqlite_migrations`).
SUBSYSTEM_MIGRATIONS: dict[str, MigrationSet] = {}


def subsystem_migrations(name: str) -> MigrationSet:
    """A new migration set for a subsystem's own tables; decorate its ordered steps with it.

    Steps run in the order they are declared, once per catalog, each in its own transaction.
    """
    if not name.isidentifier():
        raise ValueError(f"migration set name {name!r} must be an identifier")
    if name == migrations.name or name in SUBSYSTEM_MIGRATIONS:
        raise ValueError(f"migration set {name!r} is already registered")
    SUBSYSTEM_MIGRATIONS[name] = MigrationSet(name)
    return SUBSYSTEM_MIGRATIONS[name]


@migrations()
def m001_artifacts(db: "sqlite_utils.Database") -> None:
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


class Catalog:
    """An open `registry.db`: plain sqlite3 statements, and sqlite-utils' table API on demand."""

    def __init__(self, conn: sqlite3.Connection, home: Path, read_only: bool):
        self.conn = conn
        self.home = home
        self.read_only = read_only
        self._tables: "sqlite_utils.Database | None" = None

    def execute(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Cursor:
        return self.conn.execute(sql, params)

    @property
    def tables(self) -> "sqlite_utils.Database":
        """sqlite-utils over this connection (for migration steps and table-level work)."""
        if self._tables is None:
            import sqlite_utils

            self._tables = sqlite_utils.Database(self.conn)
        return self._tables

    def __getitem__(self, name: str):
        return self.tables[name]

    def table_exists(self, name: str) -> bool:
        return self.conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
                                 [name]).fetchone() is not None

    def columns(self, table: str) -> list[str]:
        """The column names of `table`, in order (none when it does not exist)."""
        return [row[1] for row in self.conn.execute(f"PRAGMA table_info([{table}])")]

    def check_writable(self, action: str) -> None:
        """Refuse `action` (a StorageError naming the home and the fix) when this catalog was opened read-only."""
        if self.read_only:
            raise read_only_home(self.home, action)


def read_only_home(home: Path, action: str) -> StorageError:
    """The one refusal of a write to a read-only home: what was refused and how to fix it."""
    return StorageError(f"the loraforge home {home} is read-only: cannot {action}; set "
                        "LORAFORGE_HOME (or --home) to a writable folder")


def connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(str(path), timeout=60, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout = 60000")
    mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
    if mode != "wal":
        conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("PRAGMA foreign_keys = ON")
    return conn


@contextmanager
def file_lock(path: Path, shared: bool = False) -> Iterator[None]:
    """An advisory lock between processes (released when the process dies); exclusive unless `shared`."""
    with open(path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def connect_read_only(path: Path) -> sqlite3.Connection:
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
    return conn


def open_catalog(home: Path, read_only: bool | None = None, subsystem: str | None = None) -> Catalog:
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
        catalog = Catalog(connect_read_only(db_path) if read_only else connect(db_path), home.resolve(), read_only)
        pending = [m for m in sets if m.pending(catalog)]
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
        return catalog
    if pending:
        with file_lock(home / "registry.lock"):
            for pending_set in pending:
                pending_set.apply(catalog)
    return catalog


@contextmanager
def immediate(catalog: Catalog) -> Iterator[sqlite3.Connection]:
    """A write transaction that takes the database lock up front (no upgrade deadlocks)."""
    conn = catalog.conn
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    else:
        conn.execute("COMMIT")
