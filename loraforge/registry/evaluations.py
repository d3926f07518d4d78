"""Metrics of artifacts: the scores `loraforge eval` and the recipe `eval` step record, per exact version.

Every score is one row (artifact, metric, value, evaluator version, prompts, seeds, sampler settings), so a
re-scoring with other prompts or a newer evaluator adds a row and never rewrites history; readers (`registry
show`, publish gates) take the latest row of each metric. Its table is the `evaluations` migration set's,
reached only through `CatalogTable`.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

from loraforge.errors import ConfigError
from loraforge.registry.catalog import subsystem_migrations

SCHEMA = subsystem_migrations("evaluations")
TABLE = "evaluations"


@SCHEMA()
def m001_evaluations(db) -> None:
    """One row per (artifact version, metric) score."""
    db[TABLE].create(
        {
            "id": int,
            "name": str,
            "version": int,
            "digest": str,
            "metric": str,
            "value": float,
            "evaluator_version": str,
            "prompts": str,
            "seeds": str,
            "settings": str,
            "created_at": str,
        },
        pk="id",
        not_null={"name", "version", "metric", "value"},
    )
    db[TABLE].create_index(["name", "version"])


def _catalog(holder):
    """The open Catalog of a Registry, or the Catalog itself."""
    return getattr(holder, "db", holder)


def _write_table(registry):
    """The evaluations table, its migrations applied (a Registry or a Catalog: both know their home)."""
    from loraforge.registry.tables import open_table

    return open_table(registry.home, "evaluations", TABLE, read_only=registry.read_only)


def _read_table(holder):
    """The evaluations table on the caller's own connection, read only: a catalog that was never scored has no
    table yet and reads as empty, without applying migrations (so `registry show` stays a plain-sqlite3 read)."""
    from loraforge.registry.tables import CatalogTable

    return CatalogTable(_catalog(holder), TABLE, read_only=True)


def _row(holder, ref: str):
    """The catalog row of `ref`; a Registry is read through its own catalog."""
    from loraforge.registry.rows import resolve

    return resolve(_catalog(holder), ref)


def record_metrics(registry, ref: str, metrics: dict[str, float], *, evaluators: dict[str, str],
                   prompts: list[str], seeds: list[int], settings: dict) -> None:
    """Record `metrics` (metric name → value) of the exact version `ref`, each with its evaluator's version,
    the prompts and seeds it was scored on and the sampler `settings` (sampler, steps, guidance, size)."""
    row = _row(registry, ref)
    if ref != row.ref:
        raise ConfigError(f"metrics are recorded for an exact version: give {row.ref}, not {ref}")
    missing = sorted(set(metrics) - set(evaluators))
    if missing:
        raise ConfigError(f"no evaluator version given for metric(s) {', '.join(missing)} of {ref}")
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    table = _write_table(registry)
    with table.transaction():
        for metric, value in metrics.items():
            table.insert({"name": row.name, "version": row.version, "digest": row.digest, "metric": metric,
                          "value": float(value), "evaluator_version": str(evaluators[metric]),
                          "prompts": json.dumps(list(prompts)), "seeds": json.dumps([int(s) for s in seeds]),
                          "settings": json.dumps(settings, sort_keys=True), "created_at": now})


def metrics_of(registry, ref: str) -> dict[str, dict[str, Any]]:
    """The latest record of each metric of the exact version `ref` (a Registry or a Catalog is read):
    `{metric: {"value", "evaluator_version", "prompts", "seeds", "settings", "created_at"}}`; `{}` when never
    scored."""
    row = _row(registry, ref)
    out: dict[str, dict[str, Any]] = {}
    # The digest too: a removed latest version's number is given again to the next registration.
    where = {"name": row.name, "version": row.version, "digest": row.digest}
    for r in _read_table(registry).rows(where, order_by="id"):
        out[r["metric"]] = {"value": r["value"], "evaluator_version": r["evaluator_version"],
                            "prompts": json.loads(r["prompts"] or "[]"), "seeds": json.loads(r["seeds"] or "[]"),
                            "settings": json.loads(r["settings"] or "{}"), "created_at": r["created_at"]}
    return dict(sorted(out.items()))
