"""A worker owns one GPU (or the CPU) and runs one job at a time as a child process."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Optional, Sequence

from loraforge.daemon.queue import Job

JOB_ENV = "LORAFORGE_JOB_ID"
_PR_SET_PDEATHSIG = 1

try:  # resolved now: the child of a fork must not load libraries before exec
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # pragma: no cover - not Linux
    _prctl = None


def _die_with_parent() -> None:
    # If the daemon is killed (-9, OOM killer) its jobs get SIGTERM, so they checkpoint and stop
    # instead of training on unsupervised and racing the job the restarted daemon re-queues.
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class WorkerSpec:
    name: str
    gpu: Optional[str] = None  # the CUDA device index; None = CPU

    @property
    def label(self) -> str:
        return f"{self.name} (GPU {self.gpu})" if self.gpu is not None else f"{self.name} (CPU)"


def detect_gpus() -> list[str]:
    """The GPUs this process may use, as values for CUDA_VISIBLE_DEVICES (one worker each)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g.strip() for g in visible.split(",") if g.strip() and g.strip() != "-1"]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:  # no usable CUDA: the CPU worker
        return []


def worker_specs(gpus: Sequence[str] | None) -> list[WorkerSpec]:
    """One worker per listed GPU, or a single CPU worker when `gpus` is empty/None."""
    if not gpus:
        return [WorkerSpec("cpu")]
    return [WorkerSpec(f"gpu{g}", str(g)) for g in gpus]


def describe_exit(returncode: int, log_path: Path) -> str:
    """A one-line reason for a failed job: the child's `Error:` line, else how it died."""
    tail = ""
    try:
        with open(log_path, "rb") as f:
            f.seek(max(0, os.path.getsize(log_path) - 16384))
            tail = f.read().decode("utf-8", "replace")
    except OSError:
        pass
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("Error: "):
            return line[len("Error: "):]
    if returncode < 0:
        name = signal.Signals(-returncode).name
        hint = " (out of memory?)" if -returncode == signal.SIGKILL else ""
        return f"killed by {name}{hint}"
    last = f": {lines[-1][:300]}" if lines else ""
    return f"exit code {returncode}{last}"


class JobSlot:
    """What every executor's worker holds: its spec, the job it runs, the handle of that run (None when idle),
    and whether a cancel is under way (`terminated_at`: when it was asked to stop)."""

    def __init__(self, spec):
        self.spec = spec
        self.job: Optional[Job] = None
        self.proc = None
        self.cancelling = False
        self.terminated_at: Optional[float] = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def busy(self) -> bool:
        return self.proc is not None


class Worker(JobSlot):
    """Runs `apply` for one job at a time with CUDA_VISIBLE_DEVICES pinned to its GPU."""

    def __init__(self, spec: WorkerSpec):
        super().__init__(spec)
        self.proc: Optional[subprocess.Popen] = None
        self._log: Optional[IO[bytes]] = None
        self.lent_to: Optional[str] = None  # the worker whose multi-GPU job uses this worker's GPU
        self.gpus: list[str] = []  # the GPUs of the running job: its own, then those lent to it
        self.lent: list["Worker"] = []  # the workers lent to the running job

    def env(self, base: dict[str, str], job: Job) -> dict[str, str]:
        env = dict(base)
        # An empty value hides every GPU, so a CPU worker never grabs one by accident.
        env["CUDA_VISIBLE_DEVICES"] = ",".join(self.gpus) if self.gpus else self.spec.gpu if self.spec.gpu is not None else ""
        env[JOB_ENV] = str(job.id)
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def start(self, job: Job, cmd: Sequence[str], base_env: dict[str, str], lent: Sequence["Worker"] = ()) -> int:
        """Start the job's child; `lent`: free workers whose GPUs a job training on several processes uses too."""
        log_path = Path(job.log_path)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "ab")
        self.gpus = [g for g in (self.spec.gpu, *(w.spec.gpu for w in lent)) if g is not None] if lent else []
        where = f"GPUs {','.join(self.gpus)} ({self.name} and {', '.join(w.name for w in lent)})" if lent else self.spec.label
        self._log.write(f"--- job {job.id} attempt {job.attempts} on {where}: {' '.join(cmd)}\n".encode())
        self._log.flush()
        self.job = job
        self.cancelling = False
        self.terminated_at = None
        # A new session: a Ctrl-C on the daemon's terminal reaches the daemon only, which then
        # forwards SIGTERM itself and gives the job time to checkpoint.
        env = self.env(base_env, job)
        self.proc = subprocess.Popen(
            list(cmd), stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=env, start_new_session=True, preexec_fn=_die_with_parent,
        )
        self.lent = list(lent)
        for worker in self.lent:
            worker.lent_to = self.name
        return self.proc.pid

    def poll(self) -> Optional[int]:
        return None if self.proc is None else self.proc.poll()

    def terminate(self, now: float) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            if self.terminated_at is None:
                self.terminated_at = now

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()

    def release(self) -> tuple[Optional[Job], int]:
        """Forget the finished child; returns its job and exit status."""
        assert self.proc is not None
        returncode = self.proc.wait()
        job = self.job
        if self._log is not None:
            self._log.close()
        for worker in self.lent:
            worker.lent_to = None
        self.job, self.proc, self._log, self.gpus, self.lent = None, None, None, [], []
        self.cancelling, self.terminated_at = False, None
        return job, returncode


def orphan_alive(pid: Optional[int], job_id: int) -> bool:
    """Whether `pid` is still the child that ran `job_id` (checked by its environment, not just the pid)."""
    if not pid:
        return False
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False
    return f"{JOB_ENV}={job_id}".encode() in environ.split(b"\0")


def stop_orphan(pid: int, job_id: int, grace: float) -> bool:
    """SIGTERM a child left by a dead daemon, wait up to `grace` seconds, then SIGKILL. True if one ran."""
    import time

    if not orphan_alive(pid, job_id):
        return False
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return True
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and orphan_alive(pid, job_id):
        time.sleep(0.05)
    if orphan_alive(pid, job_id):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        while orphan_alive(pid, job_id):
            time.sleep(0.05)
    return True
