"""The daemon loop: file changes → debounced plans → queued jobs → one child process per worker."""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import sys
import time
from collections import deque
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional, Sequence

from loraforge.daemon.debounce import Debouncer
from loraforge.daemon.planner import PlanningChild, PlanReport
from loraforge.daemon.queue import Job, JobQueue
from loraforge.daemon.status import daemon_dir, write_status
from loraforge.daemon.watcher import Watcher
from loraforge.daemon.worker import Worker, describe_exit, orphan_alive, stop_orphan, worker_specs
from loraforge.errors import ConfigError
from loraforge.home import loraforge_home, remove_stale_tmp

log = logging.getLogger("loraforge.daemon")

RECIPE_SUFFIXES = (".yaml", ".yml")
STATUS_EVERY_S = 0.5  # the heartbeat's period; far below status.STALE_AFTER_S


def default_recipe_cmd() -> list[str]:
    """How the daemon runs `loraforge ...` in child processes: the same interpreter as itself."""
    return [sys.executable, "-m", "loraforge"]


def is_recipe_name(path: Path) -> bool:
    # Editors' temp files (.x.swp, x~, x.tmp) and lock files written next to recipes are not recipes.
    name = path.name
    return (path.suffix in RECIPE_SUFFIXES and not name.startswith((".", "#"))
            and ".lock." not in name and not name.endswith((".lock.yaml", ".lock.yml")))


def _short(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


class Daemon:
    """Watches recipe folders and the local paths recipes read; rebuilds stale steps.

    Every method that depends on time takes `now` (seconds, monotonic by default), so tests drive the
    loop with their own clock: `start(now=0)`, `notify(path, now=1)`, `tick(now=3)`.
    """

    def __init__(self, watch: Sequence[str | os.PathLike], home: str | os.PathLike | None = None,
                 gpus: Sequence[str] | None = None, publish: bool = True, debounce: float = 2.0,
                 grace: float = 60.0, recipe_cmd: Sequence[str] | None = None, poll_interval: float = 0.2,
                 plan_timeout: float = 300.0, use_watchdog: bool = True, executor: str = "local",
                 ray_address: str = "auto", ray_slots: int | None = None):
        if not watch:
            raise ConfigError("nothing to watch: give at least one --watch DIR")
        self.watch_dirs: list[Path] = []
        for folder in watch:
            path = Path(folder).expanduser().resolve()
            if not path.is_dir():
                raise ConfigError(f"--watch {folder}: no such folder; create it or watch another")
            self.watch_dirs.append(path)
        if executor not in ("local", "ray"):
            raise ConfigError(f"unknown executor {executor!r}: choose local or ray")
        self.executor = executor
        self.cluster = None
        if executor == "ray":
            from loraforge.daemon.ray_executor import RayCluster, ray_workers

            # Connected first (an unreachable cluster leaves the home untouched), and before `run`
            # installs its signal handlers (ray.init sets its own).
            self.cluster = RayCluster(ray_address)
        self.home = loraforge_home(home)
        self.queue = JobQueue(self.home)
        self.recipe_cmd = list(recipe_cmd) if recipe_cmd else default_recipe_cmd()
        self.recipe_watch: dict[str, list[str]] = {}
        self.recipe_artifacts: dict[str, list[dict]] = {}  # the registry versions each recipe's plan read
        if self.cluster is not None:
            self.workers = ray_workers(self.cluster, self.home, lambda job: self.recipe_watch[job.recipe],
                                       default_recipe_cmd(), ray_slots,
                                       artifacts_for=lambda job: self.recipe_artifacts.get(job.recipe, []))
        else:
            self.workers = [Worker(spec) for spec in worker_specs(gpus)]
        self.publish = publish
        self.debouncer = Debouncer(debounce)
        self.grace = float(grace)
        self.poll_interval = poll_interval
        self.plan_timeout = plan_timeout
        self.watcher: Optional[Watcher] = Watcher() if use_watchdog else None
        self.events: deque[dict] = deque(maxlen=50)
        self.stopping = False
        self._signals = 0
        self._reasons: dict[str, str] = {}
        self._lock_file = None
        self._planning: Optional[PlanningChild] = None
        self._last_status = float("-inf")
        self._status_changed = False
        self.started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")

    # -- environment -------------------------------------------------------------------------

    def child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["LORAFORGE_HOME"] = str(self.home)
        return env

    def event(self, message: str) -> None:
        self.events.append({"at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "message": message})
        self._status_changed = True  # the next status write is not rate-limited: `daemon status` sees it at once
        log.info(message)

    # -- start and stop ----------------------------------------------------------------------

    def _acquire_lock(self) -> None:
        path = daemon_dir(self.home) / "daemon.lock"
        f = open(path, "a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            other = f.read().strip() or "?"
            f.close()
            raise ConfigError(
                f"another loraforge daemon (pid {other}) is running on {self.home}; stop it first"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        self._lock_file = f

    def recover(self) -> list[int]:
        """Re-queue jobs a dead daemon left `running`, after stopping any child it left behind."""
        requeued = []
        for job in self.queue.list(status="running"):
            if orphan_alive(job.pid, job.id):
                self.event(f"job {job.id}: stopping pid {job.pid} left by the previous daemon")
                stop_orphan(job.pid, job.id, self.grace)
            if job.cancel_requested:
                self.queue.finish(job.id, "cancelled", None, "cancelled by user")
                self.event(f"job {job.id}: cancelled (asked while the daemon was down)")
                continue
            self.queue.requeue(job.id, "re-queued: the daemon running it stopped")
            self.event(f"job {job.id}: re-queued ({Path(job.recipe).name} was running when the daemon stopped)")
            requeued.append(job.id)
        return requeued

    def start(self, now: float | None = None) -> None:
        """Lock the home, recover, start watching and schedule a plan of every recipe found."""
        now = time.monotonic() if now is None else now
        self._acquire_lock()
        self.recover()
        removed, size = remove_stale_tmp(self.home)  # what killed runs left (after recover stopped orphans)
        if removed:
            self.event(f"removed {removed} stale temp {'entry' if removed == 1 else 'entries'} ({size} bytes)")
        if self.watcher is not None:
            self.watcher.start()
            self._rewatch()
        for recipe in self.scan_recipes():
            self._reasons[str(recipe)] = "daemon start"
            # due at the first tick: nothing to debounce in files that are already there
            self.debouncer.touch(str(recipe), now - self.debouncer.delay)
        self.event(f"daemon started: pid {os.getpid()}, watching {', '.join(map(str, self.watch_dirs))}, "
                   f"workers {', '.join(w.spec.label for w in self.workers)}")
        self._write_status(force=True)

    def request_stop(self, now: float | None = None, immediate: bool = False) -> None:
        """Stop taking jobs and ask running children to checkpoint and exit; `immediate` kills them."""
        now = time.monotonic() if now is None else now
        if not self.stopping:
            self.stopping = True
            running = [w for w in self.workers if w.busy]
            self.event(f"stopping: waiting up to {self.grace:.0f}s for {len(running)} running job(s)"
                       if running else "stopping")
            for worker in running:
                worker.terminate(now)
        if immediate:
            self.event("stopping now: killing running jobs")
            for worker in self.workers:
                worker.kill()
        if self._planning is not None:
            self._planning.kill()

    def _on_signal(self, signum, frame) -> None:
        self._signals += 1
        self.request_stop(immediate=self._signals > 1)

    def close(self) -> None:
        """Kill what still runs (re-queuing it), stop watching, write the final status, unlock."""
        if self._lock_file is None:
            return  # never started (another daemon holds the home): its status file is not ours
        for worker in self.workers:
            worker.kill()
            if worker.busy:
                job, returncode = worker.release()
                if returncode == 0:
                    self.queue.finish(job.id, "succeeded", 0)
                else:
                    self.queue.requeue(job.id, "re-queued: interrupted by daemon shutdown")
        if self.watcher is not None:
            self.watcher.stop()
        if self.cluster is not None:
            self.cluster.shutdown()
        self.event("daemon stopped")
        self._write_status(force=True, stopped=True)
        if self._lock_file is not None:
            fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None

    def run(self) -> int:
        """The blocking loop used by `loraforge daemon`: returns once stopped by a signal."""
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.start()
            while True:
                self.tick()
                if self.stopping and not any(w.busy for w in self.workers):
                    break
                time.sleep(self.poll_interval)
        finally:
            self.close()
            for s, handler in previous.items():
                signal.signal(s, handler)
        return 0

    # -- watching ----------------------------------------------------------------------------

    def scan_recipes(self) -> list[Path]:
        found = []
        for folder in self.watch_dirs:
            found.extend(p for p in sorted(folder.iterdir()) if p.is_file() and is_recipe_name(p))
        return found

    def is_recipe(self, path: Path) -> bool:
        return path.parent in self.watch_dirs and is_recipe_name(path)

    def recipes_for(self, path: Path) -> set[str]:
        """The recipes a changed path concerns: itself if it is one, and those that read it."""
        hits = {str(path)} if self.is_recipe(path) else set()
        for recipe, paths in self.recipe_watch.items():
            for watched in paths:
                w = Path(watched)
                if path == w or w in path.parents:
                    hits.add(recipe)
        return hits

    def notify(self, path: str | os.PathLike, now: float | None = None) -> set[str]:
        """Record that `path` changed; the recipes it concerns are planned once quiet for `debounce`."""
        now = time.monotonic() if now is None else now
        path = Path(os.path.abspath(path))
        recipes = self.recipes_for(path)
        for recipe in recipes:
            self.debouncer.touch(recipe, now)
            if recipe == str(path):
                self._reasons[recipe] = f"{path.name} changed"
            else:
                self._reasons.setdefault(recipe, f"{_short(path, Path(recipe).parent)} changed")
        return recipes

    def _rewatch(self) -> None:
        if self.watcher is None:
            return
        data = {Path(p) for paths in self.recipe_watch.values() for p in paths}
        # a recipe folder is watched flat; the data a recipe reads, recursively
        self.watcher.watch(set(self.watch_dirs), data)

    # -- the loop ----------------------------------------------------------------------------

    def tick(self, now: float | None = None) -> None:
        """One pass: take file events, plan debounced changes, reap finished jobs, start queued ones."""
        now = time.monotonic() if now is None else now
        if self.watcher is not None:
            for path in self.watcher.drain():
                self.notify(path, now)
        if not self.stopping:
            for recipe in self.debouncer.due(now):
                if self.stopping:
                    break
                self.handle_change(Path(recipe), self._reasons.pop(recipe, "changed"), now)
        self._reap(now)
        if not self.stopping:
            self._dispatch()
        self._write_status()

    def plan(self, recipe: Path, now: float | None = None) -> PlanReport:
        """Plan `recipe` in a child; while it runs, the loop keeps beating, reaping and dispatching.

        A plan can take longer than `daemon status` waits for a heartbeat, so blocking on it would
        make a live daemon look dead (and leave finished jobs unreaped and free workers idle).
        """
        env = self.child_env()
        env["CUDA_VISIBLE_DEVICES"] = ""  # planning never needs a GPU
        self._planning = child = PlanningChild(self.recipe_cmd, recipe, env, self.plan_timeout)
        if self.stopping:  # a SIGTERM while the child was starting found no planner to stop
            child.kill()
        started = time.monotonic()
        try:
            while (plan := child.wait(self.poll_interval)) is None:
                # The loop's clock moves on while the plan runs (a test's injected clock as well), so a
                # cancelled job's grace period is measured in real seconds, not frozen at the tick's start.
                loop_now = (started if now is None else now) + (time.monotonic() - started)
                self._reap(loop_now)
                if not self.stopping:
                    self._dispatch()
                self._write_status()
        finally:
            self._planning = None
        return plan

    def handle_change(self, recipe: Path, reason: str = "changed", now: float | None = None) -> Optional[Job]:
        """Plan one recipe; queue its stale steps, or record why it is invalid. Returns the job, if any."""
        key = str(recipe)
        if not recipe.exists():
            cancelled = self.queue.cancel_queued_for(key, "recipe file was deleted")
            if self.recipe_watch.pop(key, None) is not None:
                self._rewatch()
            self.event(f"{recipe.name}: deleted" + (f"; cancelled job(s) {cancelled}" if cancelled else ""))
            return None
        plan = self.plan(recipe, now)
        if self.stopping:
            return None
        if not plan.valid:
            return self._record_invalid(recipe, plan, reason)
        self.recipe_artifacts[key] = plan.artifacts
        if self.recipe_watch.get(key) != plan.watch:
            self.recipe_watch[key] = plan.watch
            self._rewatch()
        stale = plan.stale_steps
        if not stale:
            self.event(f"{recipe.name}: up to date ({reason})")
            return None
        job, created = self.queue.enqueue(key, stale, plan.digest, plan.name, reason=reason)
        steps = ", ".join(job.step_ids)
        if created:
            self.event(f"job {job.id}: queued {recipe.name} [{steps}] ({reason})")
        else:
            self.event(f"job {job.id}: updated by a newer change to {recipe.name} [{steps}] ({reason})")
        return job

    def _record_invalid(self, recipe: Path, plan: PlanReport, reason: str) -> Optional[Job]:
        key = str(recipe)
        previous = self.queue.list(recipe=key)
        last = previous[-1] if previous else None
        if last and last.status == "failed" and last.recipe_digest == plan.digest and last.error == plan.error:
            return None  # the same broken file again: one failed job says it already
        job = self.queue.record_failure(key, plan.error or "invalid recipe", plan.digest, reason=reason)
        cancelled = self.queue.cancel_queued_for(key, f"superseded by job {job.id} (the recipe is invalid)")
        self.event(f"job {job.id}: {recipe.name} is invalid: {plan.error}"
                   + (f"; cancelled queued job(s) {cancelled}" if cancelled else ""))
        return job

    def _reap(self, now: float) -> None:
        for worker in self.workers:
            if not worker.busy:
                continue
            job = worker.job
            if not worker.cancelling and not self.stopping and self.queue.cancel_requested(job.id):
                worker.cancelling = True
                worker.terminate(now)
                self.event(f"job {job.id}: cancelling (SIGTERM to pid {worker.proc.pid})")
            returncode = worker.poll()
            if returncode is None:
                if worker.terminated_at is not None and now - worker.terminated_at >= self.grace:
                    self.event(f"job {job.id}: no exit {self.grace:.0f}s after SIGTERM; killing it")
                    worker.kill()
                continue
            cancelling = worker.cancelling
            job, returncode = worker.release()
            if self.cluster is not None and (returncode == 0 or cancelling or not self.stopping):
                from loraforge.daemon.checkpoints import discard_stored

                # The job is over: no later task of it resumes (a new job has a new key). Deleted before the job's
                # end is recorded, so a finished job is never seen with its upload still stored.
                discard_stored(self.home, job.id)
            if returncode == 0:
                self.queue.finish(job.id, "succeeded", 0)
                self.event(f"job {job.id}: succeeded ({Path(job.recipe).name})")
            elif cancelling:
                self.queue.finish(job.id, "cancelled", returncode, "cancelled by user")
                self.event(f"job {job.id}: cancelled")
            elif self.stopping:
                self.queue.requeue(job.id, "re-queued: interrupted by daemon shutdown")
                self.event(f"job {job.id}: interrupted by shutdown; it resumes on the next start")
            else:
                error = describe_exit(returncode, Path(job.log_path))
                self.queue.finish(job.id, "failed", returncode, error)
                self.event(f"job {job.id}: failed: {error}")

    def apply_command(self, job: Job) -> list[str]:
        cmd = [*self.recipe_cmd, "recipe", "apply", job.recipe]
        if not self.publish:
            cmd.append("--no-publish")
        return cmd

    def _refuse_too_many_gpus(self) -> None:
        """Fail, in one line of its log, a queued job training on more processes than this machine has GPUs."""
        have = sum(1 for w in self.workers if w.spec.gpu is not None)
        for job in self.queue.list(status="queued"):
            if job.processes <= have:
                continue
            step = next((s.get("id") for s in job.steps if int(s.get("processes") or 1) == job.processes), "?")
            error = (f"step {step!r} trains on processes: {job.processes}, which needs {job.processes} GPUs; this "
                     f"daemon has {have} ({', '.join(w.name for w in self.workers)}): lower processes or run it "
                     "on a machine with more GPUs (or --executor ray)")
            Path(job.log_path).parent.mkdir(parents=True, exist_ok=True)
            with open(job.log_path, "a", encoding="utf-8") as f:
                f.write(f"Error: {error}\n")
            self.queue.finish(job.id, "failed", None, error)
            self.event(f"job {job.id}: failed: {error}")

    def _free(self, worker) -> bool:
        return not worker.busy and getattr(worker, "lent_to", None) is None

    def _dispatch(self) -> None:
        gpu_workers = self.cluster is None and any(w.spec.gpu is not None for w in self.workers)
        if gpu_workers:  # a CPU worker trains any `processes` on the CPU; GPUs are counted
            self._refuse_too_many_gpus()
        for worker in self.workers:
            if not self._free(worker):
                continue
            busy = {w.job.recipe for w in self.workers if w.job is not None}
            if self._planning is not None:  # its plan may update the job it would start
                busy.add(str(self._planning.recipe))
            if self.cluster is not None:  # a remote job ships the paths its plan reads: plan it first
                busy |= {j.recipe for j in self.queue.list(status="queued") if j.recipe not in self.recipe_watch}
            others = [w for w in self.workers if w is not worker and self._free(w)]
            job = self.queue.claim(worker.name, busy, max_processes=1 + len(others) if gpu_workers else None)
            if job is None:
                return
            lent = others[:job.processes - 1] if gpu_workers else []
            try:
                pid = worker.start(job, self.apply_command(job), self.child_env(), *([lent] if lent else []))
            except OSError as exc:
                self.queue.finish(job.id, "failed", None, f"cannot start the job: {exc}")
                self.event(f"job {job.id}: cannot start: {exc}")
                continue
            self.queue.set_pid(job.id, pid)
            self.event(f"job {job.id}: running {Path(job.recipe).name} on {worker.spec.label}"
                       + (f" with {', '.join(w.spec.label for w in lent)}" if lent else "")
                       + (f", pid {pid}" if pid else ""))

    # -- status ------------------------------------------------------------------------------

    def status(self, stopped: bool = False) -> dict:
        return {
            "pid": os.getpid(),
            "home": str(self.home),
            "started_at": self.started_at,
            "heartbeat_unix": time.time(),
            "heartbeat": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "stopping": self.stopping,
            "stopped": stopped,
            "watch": [str(d) for d in self.watch_dirs],
            "watched_paths": sorted({p for paths in self.recipe_watch.values() for p in paths}),
            "publish": self.publish,
            "debounce_s": self.debouncer.delay,
            "pending_changes": len(self.debouncer),
            "planning": str(self._planning.recipe) if self._planning is not None else None,
            "workers": [
                {"name": w.name, "gpu": w.spec.gpu, "job": w.job.id if w.job else None,
                 "recipe": w.job.recipe if w.job else None, "pid": w.proc.pid if w.proc else None}
                for w in self.workers
            ],
            "queue": self.queue.counts(),
            "events": list(self.events),
        }

    def _write_status(self, force: bool = False, stopped: bool = False) -> None:
        # The heartbeat is about real time, whatever clock drives the loop (`now`): rate-limit on it. A job
        # that started or finished is written at once, so status never lags the queue it reports on.
        wall = time.monotonic()
        if not force and not self._status_changed and wall - self._last_status < STATUS_EVERY_S:
            return
        self._last_status, self._status_changed = wall, False
        try:
            write_status(self.home, self.status(stopped=stopped))
        except OSError as exc:  # a full disk must not stop the builds
            log.warning("cannot write the status file: %s", exc)
