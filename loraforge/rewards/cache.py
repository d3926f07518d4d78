"""A cache of reward-model answers in the registry's SQLite catalog (in memory when there is no registry).

Its table is the `rewards` migration set's; the catalog is reached only through `CatalogTable`.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Iterable

from loraforge.hashing import sha256_json
from loraforge.registry.catalog import subsystem_migrations

SCHEMA = subsystem_migrations("rewards")


@SCHEMA()
def m020_reward_cache(db) -> None:
    """Cached reward-model answers, keyed by (image digest, prompt, model, reward version)."""
    # Catalogs from before this set existed made the table in the registry's own set: keep it.
    db["reward_cache"].create(
        {
            "key": str,
            "reward": str,
            "version": str,
            "model": str,
            "image_digest": str,
            "prompt": str,
            "value": float,
            "detail": str,
            "created_at": str,
        },
        pk="key",
        not_null={"reward", "value"},
        if_not_exists=True,
    )


def cache_key(*, reward: str, version: str, image_digest: str, prompt: str, settings: dict) -> str:
    """The key of one answer: the image, the prompt and every setting that can change the answer
    (model, endpoint, question, sampling options …). Callers never pass credentials in `settings`."""
    return sha256_json([reward, version, image_digest, prompt, settings])


class RewardCache:
    """Values by key; reads and writes happen on the caller's thread (SQLite connections are not shared)."""

    def __init__(self, registry=None):
        self.table = registry.table("rewards", "reward_cache") if registry is not None else None
        self.memory: dict[str, float] = {}

    def get_many(self, keys: Iterable[str]) -> dict[str, float]:
        keys = list(dict.fromkeys(keys))
        if self.table is None:
            return {k: self.memory[k] for k in keys if k in self.memory}
        found: dict[str, float] = {}
        for i in range(0, len(keys), 500):  # SQLite bounds the number of values one query may bind
            for row in self.table.rows({"key": keys[i:i + 500]}, columns=("key", "value")):
                found[row["key"]] = float(row["value"])
        return found

    def put_many(self, rows: list[dict]) -> None:
        """rows: dicts with key, reward, version, model, image_digest, prompt, value and optional detail."""
        if self.table is None:
            self.memory.update({r["key"]: float(r["value"]) for r in rows})
            return
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        with self.table.transaction():
            self.table.replace_all([
                {"key": r["key"], "reward": r["reward"], "version": r["version"], "model": r["model"],
                 "image_digest": r["image_digest"], "prompt": r["prompt"], "value": float(r["value"]),
                 "detail": json.dumps(r.get("detail") or {}), "created_at": now} for r in rows])
