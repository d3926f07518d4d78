"""Daemon jobs stored in the registry's SQLite catalog: queued → running → succeeded/failed/cancelled."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

from loraforge.errors import ConfigError, LoraforgeError
from loraforge.home import loraforge_home
from loraforge.registry.catalog import immediate, open_catalog

JOB_STATES: tuple[str, ...] = ("queued", "running", "succeeded", "failed", "cancelled")
FINISHED_STATES: tuple[str, ...] = ("succeeded", "failed", "cancelled")


class JobNotFound(LoraforgeError):
    """No daemon job has the given id."""


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def jobs_dir(home: Path) -> Path:
    path = home / "jobs"
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass
class Job:
    id: int
    recipe: str
    status: str
    created_at: str
    recipe_name: Optional[str] = None
    recipe_digest: Optional[str] = None
    steps: list[dict] = field(default_factory=list)
    reason: Optional[str] = None
    worker: Optional[str] = None
    pid: Optional[int] = None
    log_path: Optional[str] = None
    error: Optional[str] = None
    exit_code: Optional[int] = None
    attempts: int = 0
    retry_of: Optional[int] = None
    cancel_requested: int = 0
    updated_at: Optional[str] = None
    started_at: Optional[str] = None
    finished_at: Optional[str] = None

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "Job":
        data = dict(row)
        data["steps"] = json.loads(data.get("steps") or "[]")
        data["attempts"] = data.get("attempts") or 0
        data["cancel_requested"] = data.get("cancel_requested") or 0
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @property
    def step_ids(self) -> list[str]:
        return [str(s.get("id")) for s in self.steps]


class JobQueue:
    """The `jobs` table of a loraforge home; safe to use from several processes at once."""

    def __init__(self, home: str | os.PathLike | None = None):
        self.home = loraforge_home(home)
        self.db = open_catalog(self.home)

    # -- reading -----------------------------------------------------------------------------

    def _select(self, where: str = "", params: list | None = None, order: str = "id") -> list[Job]:
        cur = self.db.execute(f"SELECT * FROM jobs {where} ORDER BY {order}", params or [])
        names = [d[0] for d in cur.description]
        return [Job.from_row(dict(zip(names, row))) for row in cur.fetchall()]

    def get(self, job_id: int) -> Job:
        rows = self._select("WHERE id = ?", [int(job_id)])
        if not rows:
            raise JobNotFound(f"no job with id {job_id} (see `loraforge jobs ls`)")
        return rows[0]

    def list(self, status: str | None = None, recipe: str | None = None) -> list[Job]:
        where, params = [], []
        if status is not None:
            if status not in JOB_STATES:
                raise ConfigError(f"unknown job status {status!r}: choose one of {', '.join(JOB_STATES)}")
            where.append("status = ?")
            params.append(status)
        if recipe is not None:
            where.append("recipe = ?")
            params.append(str(recipe))
        return self._select(("WHERE " + " AND ".join(where)) if where else "", params)

    def counts(self) -> dict[str, int]:
        counts = {s: 0 for s in JOB_STATES}
        for status, n in self.db.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall():
            counts[status] = n
        return counts

    # -- writing -----------------------------------------------------------------------------

    def _log_path(self, job_id: int) -> str:
        return str(jobs_dir(self.home) / f"{job_id}.log")

    def enqueue(self, recipe: str | os.PathLike, steps: list[dict], recipe_digest: str | None = None,
                recipe_name: str | None = None, reason: str | None = None,
                retry_of: int | None = None) -> tuple[Job, bool]:
        """Queue a run of `recipe`; a job already queued for it is updated instead (superseded).

        Returns (job, created): `created` is False when an existing queued job absorbed the change.
        """
        recipe = str(recipe)
        now = utc_now()
        steps_json = json.dumps(steps, sort_keys=True)
        with immediate(self.db) as conn:
            hit = conn.execute(
                "SELECT id FROM jobs WHERE recipe = ? AND status = 'queued' ORDER BY id DESC LIMIT 1", [recipe]
            ).fetchone()
            if hit is not None:
                conn.execute(
                    "UPDATE jobs SET steps = ?, recipe_digest = ?, recipe_name = ?, reason = ?, updated_at = ?"
                    " WHERE id = ?",
                    [steps_json, recipe_digest, recipe_name, reason, now, hit[0]],
                )
                job_id, created = hit[0], False
            else:
                cur = conn.execute(
                    "INSERT INTO jobs (recipe, recipe_name, recipe_digest, steps, status, reason, attempts,"
                    " retry_of, cancel_requested, created_at, updated_at) VALUES (?, ?, ?, ?, 'queued', ?, 0, ?, 0, ?, ?)",
                    [recipe, recipe_name, recipe_digest, steps_json, reason, retry_of, now, now],
                )
                job_id, created = cur.lastrowid, True
                conn.execute("UPDATE jobs SET log_path = ? WHERE id = ?", [self._log_path(job_id), job_id])
        return self.get(job_id), created

    def record_failure(self, recipe: str | os.PathLike, error: str, recipe_digest: str | None = None,
                       reason: str | None = None) -> Job:
        """A job that failed before it could run (an invalid recipe): kept so `jobs ls` shows why."""
        now = utc_now()
        with immediate(self.db) as conn:
            cur = conn.execute(
                "INSERT INTO jobs (recipe, recipe_digest, steps, status, reason, error, attempts, cancel_requested,"
                " created_at, updated_at, finished_at) VALUES (?, ?, '[]', 'failed', ?, ?, 0, 0, ?, ?, ?)",
                [str(recipe), recipe_digest, reason, error, now, now, now],
            )
            job_id = cur.lastrowid
        log = Path(self._log_path(job_id))
        log.write_text(f"Error: {error}\n", encoding="utf-8")
        with immediate(self.db) as conn:
            conn.execute("UPDATE jobs SET log_path = ? WHERE id = ?", [str(log), job_id])
        return self.get(job_id)

    def claim(self, worker: str, busy_recipes: set[str] | None = None) -> Optional[Job]:
        """Take the oldest queued job (skipping recipes already running) and mark it running."""
        busy = set(busy_recipes or ())
        with immediate(self.db) as conn:
            running = {r[0] for r in conn.execute("SELECT recipe FROM jobs WHERE status = 'running'").fetchall()}
            busy |= running
            rows = conn.execute("SELECT id, recipe FROM jobs WHERE status = 'queued' ORDER BY id").fetchall()
            chosen = next((job_id for job_id, recipe in rows if recipe not in busy), None)
            if chosen is None:
                return None
            now = utc_now()
            conn.execute(
                "UPDATE jobs SET status = 'running', worker = ?, started_at = ?, updated_at = ?,"
                " attempts = attempts + 1, error = NULL, exit_code = NULL, pid = NULL WHERE id = ?",
                [worker, now, now, chosen],
            )
        return self.get(chosen)

    def set_pid(self, job_id: int, pid: int) -> None:
        with immediate(self.db) as conn:
            conn.execute("UPDATE jobs SET pid = ?, updated_at = ? WHERE id = ?", [pid, utc_now(), job_id])

    def finish(self, job_id: int, status: str, exit_code: int | None = None, error: str | None = None) -> Job:
        if status not in FINISHED_STATES:
            raise ValueError(f"{status!r} is not a finished state")
        now = utc_now()
        with immediate(self.db) as conn:
            conn.execute(
                "UPDATE jobs SET status = ?, exit_code = ?, error = ?, finished_at = ?, updated_at = ? WHERE id = ?",
                [status, exit_code, error, now, now, job_id],
            )
        return self.get(job_id)

    def requeue(self, job_id: int, note: str) -> Job:
        """Put a running job back in the queue (daemon stopped or died); it resumes from checkpoints."""
        with immediate(self.db) as conn:
            conn.execute(
                "UPDATE jobs SET status = 'queued', pid = NULL, worker = NULL, reason = ?, updated_at = ?"
                " WHERE id = ?",
                [note, utc_now(), job_id],
            )
        return self.get(job_id)

    def cancel(self, job_id: int) -> Job:
        """Cancel a queued job now; ask the daemon to stop a running one."""
        job = self.get(job_id)
        if job.status in FINISHED_STATES:
            raise ConfigError(f"job {job_id} is already {job.status}; nothing to cancel")
        with immediate(self.db) as conn:
            if job.status == "queued":
                now = utc_now()
                conn.execute(
                    "UPDATE jobs SET status = 'cancelled', error = 'cancelled by user', finished_at = ?,"
                    " updated_at = ? WHERE id = ? AND status = 'queued'",
                    [now, now, job_id],
                )
            else:
                conn.execute("UPDATE jobs SET cancel_requested = 1, updated_at = ? WHERE id = ?",
                             [utc_now(), job_id])
        return self.get(job_id)

    def cancel_requested(self, job_id: int) -> bool:
        row = self.db.execute("SELECT cancel_requested FROM jobs WHERE id = ?", [job_id]).fetchone()
        return bool(row and row[0])

    def retry(self, job_id: int) -> Job:
        """Queue a new job running the same recipe as a finished one."""
        job = self.get(job_id)
        if job.status not in ("failed", "cancelled", "succeeded"):
            raise ConfigError(f"job {job_id} is {job.status}; only a finished job can be retried")
        new, _ = self.enqueue(job.recipe, job.steps, job.recipe_digest, job.recipe_name,
                              reason=f"retry of job {job_id}", retry_of=job_id)
        return new

    def cancel_queued_for(self, recipe: str, note: str) -> list[int]:
        """Cancel every queued job of a recipe (its file was deleted)."""
        now = utc_now()
        with immediate(self.db) as conn:
            ids = [r[0] for r in conn.execute(
                "SELECT id FROM jobs WHERE recipe = ? AND status = 'queued'", [str(recipe)]).fetchall()]
            conn.execute(
                "UPDATE jobs SET status = 'cancelled', error = ?, finished_at = ?, updated_at = ?"
                " WHERE recipe = ? AND status = 'queued'",
                [note, now, now, str(recipe)],
            )
        return ids
