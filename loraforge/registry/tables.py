"""A subsystem's own table in the catalog, read and written by column values.

Subsystems (the daemon's jobs, the reward cache) keep tables in `registry.db` under their own
migration sets (see `catalog.subsystem_migrations`); this is their whole access to them, so the SQL
of the catalog stays in `loraforge.registry`.
"""

from __future__ import annotations

import os
import sqlite3
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

from loraforge.home import home_is_writable
from loraforge.registry.catalog import Catalog, immediate, open_catalog, read_only_home

# A `where` maps column names to a value (column = value) or a list/tuple/set of them (column IN …).
Where = Mapping[str, Any]


class CatalogTable:
    """One table; a call inside `with table.transaction():` joins that transaction."""

    def __init__(self, db: Catalog, name: str, read_only: bool = False):
        self.db = db
        self.name = name
        self.read_only = read_only
        # A read-only catalog may predate the subsystem's migrations: a table it lacks reads as empty.
        self.absent = not db.table_exists(name)
        if self.absent and not read_only:
            raise ValueError(f"the catalog has no table {name!r}: open it with its subsystem's migrations")
        self.columns = frozenset(db.columns(name))

    def _check_writable(self) -> None:
        if self.read_only:
            raise read_only_home(self.db.home, f"write the {self.name} table")

    def transaction(self) -> AbstractContextManager[sqlite3.Connection]:
        """A write transaction holding the database lock from its start (read-modify-write is safe)."""
        self._check_writable()
        return immediate(self.db)

    def rows(self, where: Where | None = None, *, columns: Iterable[str] | None = None, order_by: str = "rowid",
             descending: bool = False, limit: Optional[int] = None) -> list[dict[str, Any]]:
        """The matching rows as dicts (all columns, or `columns`), ordered by one column."""
        if self.absent:
            return []
        picked = [self._column(c) for c in columns] if columns is not None else ["*"]
        clause, params = self._where(where)
        order = "rowid" if order_by == "rowid" else self._column(order_by)
        sql = f"SELECT {', '.join(picked)} FROM [{self.name}]{clause} ORDER BY {order}"
        sql += " DESC" if descending else ""
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        cur = self.db.execute(sql, params)
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row)) for row in cur.fetchall()]

    def first(self, where: Where | None = None, **order) -> Optional[dict[str, Any]]:
        rows = self.rows(where, limit=1, **order)
        return rows[0] if rows else None

    def count_by(self, column: str) -> dict[Any, int]:
        """How many rows hold each value of `column`."""
        if self.absent:
            return {}
        col = self._column(column)
        return dict(self.db.execute(f"SELECT {col}, COUNT(*) FROM [{self.name}] GROUP BY {col}").fetchall())

    def insert(self, row: Mapping[str, Any]) -> int:
        """Add one row; returns its rowid."""
        self._check_writable()
        cols = [self._column(c) for c in row]
        cur = self.db.execute(f"INSERT INTO [{self.name}] ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                              list(row.values()))
        return cur.lastrowid

    def replace_all(self, rows: list[Mapping[str, Any]]) -> None:
        """Insert rows, each replacing any row with the same primary key (rows share one set of columns)."""
        self._check_writable()
        if not rows:
            return
        cols = [self._column(c) for c in rows[0]]
        self.db.conn.executemany(
            f"INSERT OR REPLACE INTO [{self.name}] ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
            [[r[c] for c in rows[0]] for r in rows])

    def update(self, where: Where, values: Mapping[str, Any]) -> int:
        """Set `values` on the matching rows; returns how many matched. An empty `where` is refused."""
        self._check_writable()
        if not where:
            raise ValueError(f"refusing to update every row of {self.name}: give a where")
        sets = ", ".join(f"{self._column(c)} = ?" for c in values)
        clause, params = self._where(where)
        return self.db.execute(f"UPDATE [{self.name}] SET {sets}{clause}", [*values.values(), *params]).rowcount

    def _column(self, name: str) -> str:
        # Column names cannot be bound parameters: only the table's own names reach the SQL text.
        if name not in self.columns:
            raise ValueError(f"{self.name} has no column {name!r}")
        return f"[{name}]"

    def _where(self, where: Where | None) -> tuple[str, list]:
        parts, params = [], []
        for column, value in (where or {}).items():
            if isinstance(value, (list, tuple, set, frozenset)):
                value = list(value)
                parts.append(f"{self._column(column)} IN ({', '.join('?' * len(value))})" if value else "0")
                params += value
            elif value is None:
                parts.append(f"{self._column(column)} IS NULL")
            else:
                parts.append(f"{self._column(column)} = ?")
                params.append(value)
        return (" WHERE " + " AND ".join(parts)) if parts else "", params


def open_table(home: str | os.PathLike, subsystem: str, name: str, read_only: bool | None = None) -> CatalogTable:
    """Table `name` of the catalog under `home`, with `subsystem`'s migrations applied."""
    home = Path(home)
    read_only = not home_is_writable(home) if read_only is None else read_only
    return CatalogTable(open_catalog(home, read_only=read_only, subsystem=subsystem), name, read_only=read_only)
