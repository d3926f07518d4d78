"""Trainer checkpoints that travel with a Ray job, so a retry on another node resumes instead of starting over.

The task watches its scratch home's run folders (`runs/<run key>/step-NNNNNNNN/`, written by
train.checkpoint) and offers each new newest checkpoint to the head through the job's board. The head
keeps the newest one per job under its home (`daemon/ray-checkpoints/job<id>/runs/`, replaced by the next) and
in the object store under its own ownership, so it outlives the worker that made it. A task that starts
(a Ray retry, or the job re-queued after the daemon restarted) restores it into its scratch home when
that home holds nothing as new: the recipe's train step then resumes from it. Once the job's bundle is
registered the head deletes it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Optional

from loraforge.daemon.status import daemon_dir

# {run key: {"step": "step-NNNNNNNN", "files": {path inside the step folder: bytes}}}
Payload = dict[str, dict[str, Any]]


class CheckpointMailbox:
    """The board's part for checkpoints: a task offers its newest (a ref it owns), the head takes it,
    stores it, and puts back a ref of its own that any later task of the job restores."""

    def __init__(self):
        self.offered: dict[str, list] = {}
        self.kept: dict[str, list] = {}

    def offer_checkpoint(self, key: str, box: list) -> None:
        self.offered[key] = box  # an older offer the head has not taken yet is replaced

    def take_checkpoint(self, key: str) -> Optional[list]:
        return self.offered.pop(key, None)

    def keep_checkpoint(self, key: str, box: list) -> None:
        self.kept[key] = box

    def checkpoint(self, key: str) -> Optional[list]:
        return self.kept.get(key)

    def forget_checkpoints(self, key: str) -> None:
        self.offered.pop(key, None)
        self.kept.pop(key, None)


# -- the task's side ---------------------------------------------------------------------------

def newest_checkpoints(home: Path) -> dict[str, str]:
    """{run key: its newest complete step folder's name} of the home's run folders."""
    found = {}
    runs = Path(home) / "runs"
    if runs.is_dir():
        for run in sorted(p for p in runs.iterdir() if p.is_dir()):
            done = [p.name for p in sorted(run.glob("step-*")) if (p / "state.json").is_file()]
            if done:
                found[run.name] = done[-1]
    return found


def pack_checkpoints(home: Path, newest: dict[str, str]) -> Optional[Payload]:
    """The bytes of those step folders; None if one vanished while read (the trainer rotated it out)."""
    payload: Payload = {}
    try:
        for run, step in newest.items():
            folder = Path(home) / "runs" / run / step
            files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
            payload[run] = {"step": step, "files": files}
    except OSError:
        return None
    return payload


def restore_checkpoints(home: Path, payload: Payload) -> list[str]:
    """Write each run's uploaded checkpoint into `home` unless the home has one as new; returns what was restored
    as `run/step` names."""
    have = newest_checkpoints(home)
    restored = []
    for run, item in sorted(payload.items()):
        step = item["step"]
        if have.get(run, "") >= step:  # the same node's own checkpoint: as new or newer
            continue
        target = Path(home) / "runs" / run / step
        staging = target.with_name(f".staging-restore-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        for rel, data in item["files"].items():
            path = staging / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
        restored.append(f"{run}/{step}")
    return restored


class Uploader:
    """Offers the scratch home's newest checkpoints to the head each time they change."""

    def __init__(self, ray, board, key: str, home: Path):
        self.ray, self.board, self.key, self.home = ray, board, key, home
        self.sent: dict[str, str] = newest_checkpoints(home)  # what the task restored or found: the head has it
        self.ref = None  # the newest offer: this task owns it, so it must stay referenced until replaced

    def tick(self, wait: bool = False) -> None:
        """Offer the newest checkpoints if they changed; `wait`: until the board has them (the task's last
        offer must be there before the head reads the task's result)."""
        newest = newest_checkpoints(self.home)
        if not newest or newest == self.sent:
            return
        payload = pack_checkpoints(self.home, newest)
        if payload is None:
            return  # read again at the next tick
        self.ref = self.ray.put(payload)
        sent = self.board.offer_checkpoint.remote(self.key, [self.ref])
        if wait:
            self.ray.get(sent)
        self.sent = newest


def restore_from_head(ray, board, key: str, home: Path) -> list[str]:
    """Restore the checkpoint the head kept for this job into the scratch home (see restore_checkpoints)."""
    box = ray.get(board.checkpoint.remote(key))
    if not box:
        return []
    return restore_checkpoints(home, ray.get(box[0]))


# -- the head's side ---------------------------------------------------------------------------

def uploads_dir(home: Path, job_id: int) -> Path:
    return daemon_dir(Path(home)) / "ray-checkpoints" / f"job{job_id}"


def store_checkpoints(home: Path, job_id: int, payload: Payload) -> Path:
    """Keep `payload` as the job's uploaded checkpoint, replacing the previous one (staged, then renamed)."""
    final = uploads_dir(home, job_id)
    staging = final.with_name(f".{final.name}.staging-{os.getpid()}")
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    for run, item in payload.items():
        for rel, data in item["files"].items():
            path = staging / "runs" / run / item["step"] / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
    if final.exists():
        os.replace(final, old)
    os.replace(staging, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def load_stored(home: Path, job_id: int) -> Optional[Payload]:
    """The job's uploaded checkpoint as the head keeps it, or None."""
    folder = uploads_dir(home, job_id)
    newest = newest_checkpoints(folder)
    return pack_checkpoints(folder, newest) if newest else None


def discard_stored(home: Path, job_id: int) -> None:
    shutil.rmtree(uploads_dir(home, job_id), ignore_errors=True)


def describe(payload: Payload) -> str:
    size = sum(len(d) for item in payload.values() for d in item["files"].values())
    names = ", ".join(f"{run}/{item['step']}" for run, item in sorted(payload.items()))
    return f"{names} ({size / 1e6:.2f} MB)"
