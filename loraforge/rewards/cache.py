"""A cache of reward-model answers in the registry's SQLite catalog (in memory when there is no registry)."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Iterable

from loraforge.hashing import sha256_json


def cache_key(*, reward: str, version: str, image_digest: str, prompt: str, settings: dict) -> str:
    """The key of one answer: the image, the prompt and every setting that can change the answer
    (model, endpoint, question, sampling options …). Callers never pass credentials in `settings`."""
    return sha256_json([reward, version, image_digest, prompt, settings])


class RewardCache:
    """Values by key; reads and writes happen on the caller's thread (SQLite connections are not shared)."""

    def __init__(self, registry=None):
        self.db = registry.db if registry is not None else None
        self.memory: dict[str, float] = {}

    def get_many(self, keys: Iterable[str]) -> dict[str, float]:
        keys = list(dict.fromkeys(keys))
        if self.db is None:
            return {k: self.memory[k] for k in keys if k in self.memory}
        found: dict[str, float] = {}
        for i in range(0, len(keys), 500):
            chunk = keys[i:i + 500]
            marks = ",".join("?" * len(chunk))
            for key, value in self.db.execute(f"SELECT key, value FROM reward_cache WHERE key IN ({marks})", chunk):
                found[key] = float(value)
        return found

    def put_many(self, rows: list[dict]) -> None:
        """rows: dicts with key, reward, version, model, image_digest, prompt, value and optional detail."""
        if self.db is None:
            self.memory.update({r["key"]: float(r["value"]) for r in rows})
            return
        from loraforge.registry.catalog import immediate

        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        with immediate(self.db) as conn:
            conn.executemany(
                "INSERT OR REPLACE INTO reward_cache (key, reward, version, model, image_digest, prompt, value, detail, "
                "created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(r["key"], r["reward"], r["version"], r["model"], r["image_digest"], r["prompt"], float(r["value"]),
                  json.dumps(r.get("detail") or {}), now) for r in rows])
