"""The registry owns its database: no module outside loraforge/registry holds SQL or reaches the catalog.

Subsystems keep their tables through `loraforge.registry.tables.CatalogTable`; this reads every
other module's source (with `ast`, so comments and prose do not count) and names what it finds.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import loraforge

PACKAGE = Path(loraforge.__file__).parent
OWNER = PACKAGE / "registry"

SQL = re.compile(
    r"\b(SELECT\s.+\sFROM|INSERT\s+(OR\s+\w+\s+)?INTO|UPDATE\s+\[?\w+\]?\s+SET|DELETE\s+FROM|"
    r"CREATE\s+(TABLE|INDEX|UNIQUE\s+INDEX)|DROP\s+(TABLE|INDEX)|ALTER\s+TABLE|PRAGMA\s+\w+|BEGIN(\s+IMMEDIATE)?\s*$)",
    re.DOTALL,
)
CATALOG_CALLS = {"execute", "executemany", "executescript"}


def catalog_uses(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and SQL.search(node.value):
            found.append((node.lineno, f"SQL text {node.value[:60]!r}"))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in CATALOG_CALLS:
            found.append((node.lineno, f"a call of .{node.func.attr}()"))
        elif isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute) and node.value.attr == "db":
            found.append((node.lineno, "a table reached through .db[...]"))
        elif isinstance(node, ast.Attribute) and node.attr == "db" and isinstance(node.ctx, ast.Load):
            found.append((node.lineno, "the catalog connection .db"))
    return found


def modules_outside_the_registry() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if OWNER not in p.parents)


def test_the_check_finds_sql_and_catalog_access():
    source = ('def f(registry):\n'
              '    registry.db.execute("UPDATE artifacts SET manifest = ? WHERE id = ?", [1, 2])\n'
              '    return registry.db["jobs"].rows\n'
              'Q = f"SELECT key, value FROM reward_cache WHERE key IN ({1})"\n'
              'DOC = "Update the cache: select what changed from the plan."\n')
    kinds = [what.split(" ")[0] for _, what in catalog_uses(ast.parse(source))]
    assert kinds.count("SQL") == 2 and "a" in kinds and "the" in kinds
    assert sum(1 for _, what in catalog_uses(ast.parse(source)) if "Update the cache" in what) == 0


@pytest.mark.parametrize("path", modules_outside_the_registry(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_sql_outside_the_registry(path):
    uses = catalog_uses(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
    assert not uses, "\n".join(f"{path.relative_to(PACKAGE.parent)}:{line}: {what}: call a "
                               "loraforge.registry API instead" for line, what in uses)


def test_a_subsystem_registers_its_own_migrations_once_and_reads_its_table_through_the_registry(home):
    from loraforge.registry import Registry
    from loraforge.registry.catalog import SUBSYSTEM_MIGRATIONS, subsystem_migrations

    schema = subsystem_migrations("test_notes")
    try:
        @schema()
        def m001_notes(db) -> None:
            db["test_notes"].create({"id": int, "text": str}, pk="id")

        with pytest.raises(ValueError, match="already registered"):
            subsystem_migrations("test_notes")
        notes = Registry(home).table("test_notes", "test_notes")
        with notes.transaction():
            first = notes.insert({"text": "a"})
            notes.insert({"text": "b"})
            assert notes.update({"id": first}, {"text": "c"}) == 1
        assert [r["text"] for r in notes.rows(order_by="id")] == ["c", "b"]
        assert notes.count_by("text") == {"b": 1, "c": 1}
        with pytest.raises(ValueError, match="no column 'txt'"):
            notes.rows({"txt": "a"})
    finally:
        del SUBSYSTEM_MIGRATIONS["test_notes"]


def test_jobs_queued_before_the_queue_had_its_own_migrations_are_kept(home):
    """Older catalogs made the jobs table in the registry's own set: the queue's set adopts it."""
    from loraforge.daemon.queue import JobQueue
    from loraforge.registry.catalog import open_catalog

    db = open_catalog(home)
    db["jobs"].create({"id": int, "recipe": str, "recipe_name": str, "recipe_digest": str, "steps": str,
                       "status": str, "reason": str, "worker": str, "pid": int, "log_path": str, "error": str,
                       "exit_code": int, "attempts": int, "retry_of": int, "cancel_requested": int,
                       "created_at": str, "updated_at": str, "started_at": str, "finished_at": str}, pk="id")
    db["jobs"].insert({"recipe": "old.yaml", "status": "queued", "steps": "[]", "created_at": "2026-01-01T00:00:00"})
    db["_sqlite_migrations"].insert({"migration_set": "loraforge", "name": "m010_jobs", "applied_at": "2026-01-01"})
    queue = JobQueue(home)
    assert [(j.recipe, j.status) for j in queue.list()] == [("old.yaml", "queued")]
    job, created = queue.enqueue("new.yaml", [])
    assert created and queue.claim("w").recipe == "old.yaml" and queue.get(1).attempts == 1
