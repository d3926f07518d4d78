"""Daemon jobs stored in the registry's SQLite catalog: queued → running → succeeded/failed/cancelled.

The `jobs` table is the `jobs` migration set's; the queue reaches it only through `CatalogTable`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

from loraforge.errors import ConfigError, LoraforgeError
from loraforge.home import loraforge_home
from loraforge.registry.catalog import subsystem_migrations
from loraforge.registry.tables import open_table

JOB_STATES: tuple[str, ...] = ("queued", "running", "succeeded", "failed", "cancelled")
FINISHED_STATES: tuple[str, ...] = ("succeeded", "failed", "cancelled")

SCHEMA = subsystem_migrations("jobs")


@SCHEMA()
def m010_jobs(db) -> None:
    """One row per queued recipe run."""
    # Catalogs from before this set existed made the table in the registry's own set: keep it.
    db["jobs"].create(
        {
            "id": int,
            "recipe": str,
            "recipe_name": str,
            "recipe_digest": str,
            "steps": str,
            "status": str,
            "reason": str,
            "worker": str,
            "pid": int,
            "log_path": str,
            "error": str,
            "exit_code": int,
            "attempts": int,
            "retry_of": int,
            "cancel_requested": int,
            "created_at": str,
            "updated_at": str,
            "started_at": str,
            "finished_at": str,
        },
        pk="id",
        not_null={"recipe", "status", "created_at"},
        defaults={"attempts": 0, "cancel_requested": 0},
        if_not_exists=True,
    )
    db["jobs"].create_index(["status"], if_not_exists=True)
    db["jobs"].create_index(["recipe", "status"], if_not_exists=True)


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

    @property
    def processes(self) -> int:
        """The most processes one of its steps trains on (`processes:` in the plan): the GPUs it needs at once."""
        return max((int(s.get("processes") or 1) for s in self.steps), default=1)


class JobQueue:
    """The `jobs` table of a loraforge home; safe to use from several processes at once."""

    def __init__(self, home: str | os.PathLike | None = None):
        self.home = loraforge_home(home)
        self.jobs = open_table(self.home, "jobs", "jobs")

    # -- reading -----------------------------------------------------------------------------

    def get(self, job_id: int) -> Job:
        row = self.jobs.first({"id": int(job_id)})
        if row is None:
            raise JobNotFound(f"no job with id {job_id} (see `loraforge jobs ls`)")
        return Job.from_row(row)

    def list(self, status: str | None = None, recipe: str | None = None) -> list[Job]:
        where: dict[str, str] = {}
        if status is not None:
            if status not in JOB_STATES:
                raise ConfigError(f"unknown job status {status!r}: choose one of {', '.join(JOB_STATES)}")
            where["status"] = status
        if recipe is not None:
            where["recipe"] = str(recipe)
        return [Job.from_row(row) for row in self.jobs.rows(where, order_by="id")]

    def counts(self) -> dict[str, int]:
        return {**{s: 0 for s in JOB_STATES}, **self.jobs.count_by("status")}

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
        with self.jobs.transaction():
            hit = self.jobs.first({"recipe": recipe, "status": "queued"}, order_by="id", descending=True)
            if hit is not None:
                self.jobs.update({"id": hit["id"]}, {"steps": steps_json, "recipe_digest": recipe_digest,
                                                     "recipe_name": recipe_name, "reason": reason, "updated_at": now})
                job_id, created = hit["id"], False
            else:
                job_id = self.jobs.insert({
                    "recipe": recipe, "recipe_name": recipe_name, "recipe_digest": recipe_digest, "steps": steps_json,
                    "status": "queued", "reason": reason, "attempts": 0, "retry_of": retry_of, "cancel_requested": 0,
                    "created_at": now, "updated_at": now})
                created = True
                self.jobs.update({"id": job_id}, {"log_path": self._log_path(job_id)})
        return self.get(job_id), created

    def record_failure(self, recipe: str | os.PathLike, error: str, recipe_digest: str | None = None,
                       reason: str | None = None) -> Job:
        """A job that failed before it could run (an invalid recipe): kept so `jobs ls` shows why."""
        now = utc_now()
        with self.jobs.transaction():
            job_id = self.jobs.insert({
                "recipe": str(recipe), "recipe_digest": recipe_digest, "steps": "[]", "status": "failed",
                "reason": reason, "error": error, "attempts": 0, "cancel_requested": 0,
                "created_at": now, "updated_at": now, "finished_at": now})
        log = Path(self._log_path(job_id))
        log.write_text(f"Error: {error}\n", encoding="utf-8")
        with self.jobs.transaction():
            self.jobs.update({"id": job_id}, {"log_path": str(log)})
        return self.get(job_id)

    def claim(self, worker: str, busy_recipes: set[str] | None = None,
              max_processes: int | None = None) -> Optional[Job]:
        """Take the oldest queued job (skipping recipes already running, and jobs training on more than
        `max_processes` processes: they wait for that many free GPUs) and mark it running."""
        busy = set(busy_recipes or ())
        with self.jobs.transaction():  # holds the lock: no other worker claims between read and write
            busy |= {r["recipe"] for r in self.jobs.rows({"status": "running"}, columns=("recipe",))}
            queued = self.jobs.rows({"status": "queued"}, columns=("id", "recipe", "attempts", "steps"), order_by="id")
            chosen = next((r for r in queued if r["recipe"] not in busy and (
                max_processes is None or Job.from_row({**r, "status": "queued", "created_at": ""}).processes
                <= max_processes)), None)
            if chosen is None:
                return None
            now = utc_now()
            self.jobs.update({"id": chosen["id"]}, {
                "status": "running", "worker": worker, "started_at": now, "updated_at": now,
                "attempts": (chosen["attempts"] or 0) + 1, "error": None, "exit_code": None, "pid": None})
        return self.get(chosen["id"])

    def set_pid(self, job_id: int, pid: int) -> None:
        with self.jobs.transaction():
            self.jobs.update({"id": job_id}, {"pid": pid, "updated_at": utc_now()})

    def finish(self, job_id: int, status: str, exit_code: int | None = None, error: str | None = None) -> Job:
        if status not in FINISHED_STATES:
            raise ValueError(f"{status!r} is not a finished state")
        now = utc_now()
        with self.jobs.transaction():
            self.jobs.update({"id": job_id}, {"status": status, "exit_code": exit_code, "error": error,
                                              "finished_at": now, "updated_at": now})
        return self.get(job_id)

    def requeue(self, job_id: int, note: str) -> Job:
        """Put a running job back in the queue (daemon stopped or died); it resumes from checkpoints."""
        with self.jobs.transaction():
            self.jobs.update({"id": job_id}, {"status": "queued", "pid": None, "worker": None, "reason": note,
                                              "updated_at": utc_now()})
        return self.get(job_id)

    def cancel(self, job_id: int) -> Job:
        """Cancel a queued job now; ask the daemon to stop a running one."""
        job = self.get(job_id)
        if job.status in FINISHED_STATES:
            raise ConfigError(f"job {job_id} is already {job.status}; nothing to cancel")
        with self.jobs.transaction():
            if job.status == "queued":
                now = utc_now()
                # Only while still queued: a worker may have claimed it since `get`.
                self.jobs.update({"id": job_id, "status": "queued"}, {
                    "status": "cancelled", "error": "cancelled by user", "finished_at": now, "updated_at": now})
            else:
                self.jobs.update({"id": job_id}, {"cancel_requested": 1, "updated_at": utc_now()})
        return self.get(job_id)

    def cancel_requested(self, job_id: int) -> bool:
        row = self.jobs.first({"id": job_id})
        return bool(row and row["cancel_requested"])

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
        queued = {"recipe": str(recipe), "status": "queued"}
        with self.jobs.transaction():
            ids = [r["id"] for r in self.jobs.rows(queued, columns=("id",))]
            self.jobs.update(queued, {"status": "cancelled", "error": note, "finished_at": now, "updated_at": now})
        return ids
