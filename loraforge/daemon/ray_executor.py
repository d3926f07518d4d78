"""The Ray executor: each daemon job is one Ray task, placed by Ray's scheduler on any node of the cluster.

The head (the daemon) keeps the queue and the registry. A job ships its inputs by digest (the recipe
file and the local paths its plan watches), the task runs `recipe apply` in a scratch home on its node
(loraforge.daemon.ray_task) and returns an artifact bundle, which the head registers once per input
digest (loraforge.daemon.bundle). Logs and stop requests travel through one small actor, the JobBoard.
`RayWorker` has the local Worker's interface, so the daemon loop is the same for both executors.
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from loraforge.daemon.bundle import register_bundle, write_head_lock
from loraforge.daemon.checkpoints import CheckpointMailbox, describe, discard_stored, load_stored, store_checkpoints
from loraforge.daemon.queue import Job
from loraforge.daemon.worker import JobSlot
from loraforge.errors import ConfigError
from loraforge.hashing import sha256_file

MAX_RETRIES = 3  # how often Ray re-runs a task whose worker process or node died
TRAIN_KINDS = {"train", "slider", "reward"}  # step kinds that want a GPU when the cluster has one


def import_ray():
    try:
        import ray
    except ImportError:
        raise ConfigError("--executor ray needs Ray: pip install 'loraforge[ray]'") from None
    return ray


class JobBoard(CheckpointMailbox):
    """Head-side mailbox per job: log text pushed by tasks, stop requests read by them, checkpoints."""

    def __init__(self):
        super().__init__()
        self.logs: dict[str, list[str]] = {}
        self.stops: dict[str, str] = {}

    def push(self, key: str, text: str) -> None:
        self.logs.setdefault(key, []).append(text)

    def pull(self, key: str) -> str:
        return "".join(self.logs.pop(key, []))

    def request_stop(self, key: str, how: str) -> None:
        self.stops[key] = how

    def stop_wanted(self, key: str) -> Optional[str]:
        return self.stops.get(key)

    def forget(self, key: str) -> None:
        self.logs.pop(key, None)
        self.stops.pop(key, None)
        self.forget_checkpoints(key)


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Refuse an address nothing listens on: ray.init would retry it for minutes without a word."""
    if address in ("auto", "local"):
        return  # Ray answers these at once
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--ray-address {address}: write auto, HOST:PORT or ray://HOST:10001")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise ConfigError(f"--ray-address {address}: no Ray cluster answers there ({exc.strerror or exc}); "
                          "start one with `ray start --head` or give its address") from None


class RayCluster:
    """The connection to a Ray cluster, the board actor and the inputs already put in the object store."""

    def __init__(self, address: str = "auto"):
        ray = import_ray()
        self.ray = ray
        if not ray.is_initialized():
            _check_reachable(address)
            try:
                ray.init(address=address, log_to_driver=False, logging_level="ERROR")
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise ConfigError(f"--ray-address {address}: cannot connect to a Ray cluster ({exc}); "
                                  "start one with `ray start --head` or give its address") from None
        self.address = address
        # num_cpus=0: the board only relays messages and must never hold a slot a job could use
        self.board = ray.remote(num_cpus=0)(JobBoard).remote()
        from loraforge.daemon.ray_task import run_job

        self.task = ray.remote(run_job)
        self._refs: dict[str, Any] = {}

    def resources(self) -> dict[str, float]:
        return self.ray.cluster_resources()

    def gpus(self) -> int:
        return int(self.resources().get("GPU", 0))

    def largest_node(self, unit: str) -> int:
        """The most of `unit` ("GPU" or "CPU") one live node of the cluster has."""
        return int(max((n.get("Resources", {}).get(unit, 0) for n in self.ray.nodes() if n.get("Alive")), default=0))

    def slots(self) -> int:
        """How many jobs may run at once: one per GPU when the cluster has GPUs, else one per CPU."""
        return max(1, self.gpus() or int(self.resources().get("CPU", 1)))

    def put_file(self, path: Path, digest: Optional[str] = None) -> tuple[str, list]:
        """(sha256, [object ref]) of a file; a digest already in the object store is not put again.

        `digest`: the file's known sha256 (a registry blob), so a large blob is not hashed again per job.
        """
        digest = digest or sha256_file(path)
        if digest not in self._refs:
            self._refs[digest] = self.ray.put(path.read_bytes())
        return digest, [self._refs[digest]]  # boxed: Ray must not fetch it before the task asks

    def shutdown(self) -> None:
        if self.ray.is_initialized():
            self.ray.shutdown()


def job_artifacts(registry, cluster: RayCluster, wanted: Sequence[dict]) -> list[dict]:
    """What a task imports into its scratch home: per registry version the plan read, its manifest, input
    digest, the aliases pointing at it and its blobs as (sha256, [object ref]) by path.

    A version whose content is no longer what the plan saw (removed and re-made since) is refused: the
    remote job would otherwise build from other inputs than the head planned.
    """
    from loraforge.daemon.bundle import manifest_input_digest
    from loraforge.errors import ArtifactNotFound

    shipped = []
    for want in wanted:
        try:
            manifest = registry.resolve(want["ref"])
        except ArtifactNotFound:
            raise ConfigError(f"{want['ref']} is no longer in the registry; the recipe is planned again") from None
        if want.get("digest") and manifest.digest != want["digest"]:
            raise ConfigError(f"{want['ref']} changed since the recipe was planned; it is planned again")
        aliases = sorted(a for a, v in registry.aliases(manifest.name).items() if v == manifest.version)
        blobs = {e.path: cluster.put_file(registry.blob_path(e), e.sha256) for e in manifest.files}
        shipped.append({"manifest": manifest.to_json(), "input_digest": manifest_input_digest(manifest),
                        "aliases": aliases, "blobs": blobs})
    return shipped


def job_inputs(recipe: Path, watched: Sequence[str]) -> tuple[Path, dict[str, Path]]:
    """The recipe and every file under the paths it reads, relative to their common folder."""
    paths = [recipe.resolve(), *(Path(p).resolve() for p in watched)]
    root = Path(os.path.commonpath([str(recipe.resolve().parent), *(str(p) for p in paths[1:])]))
    files: dict[str, Path] = {}
    for path in paths:
        found = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else []
        for file in found:
            files[file.relative_to(root).as_posix()] = file
    return root, files


@dataclass
class _Handle:
    pid: Optional[int] = None  # the remote worker's pid, once its first log line names it


class RayWorker(JobSlot):
    """One slot of the Ray executor: runs one job at a time as a Ray task (same interface as Worker)."""

    def __init__(self, spec, cluster: RayCluster, home: Path, watched_for: Callable[[Job], list[str]],
                 default_cmd: Sequence[str], artifacts_for: Optional[Callable[[Job], list[dict]]] = None):
        super().__init__(spec)
        self.cluster = cluster
        self.home = home
        self.watched_for = watched_for
        self.artifacts_for = artifacts_for or (lambda job: [])
        self.root: Optional[Path] = None  # the head folder the job's input tree mirrors
        self.default_cmd = list(default_cmd)
        self.proc: Optional[_Handle] = None
        self.ref = None
        self.key: Optional[str] = None
        self._returncode: Optional[int] = None
        self._kept: Optional[list] = None  # [ref] of the job's newest uploaded checkpoint, owned by the head

    def resources(self, job: Job) -> dict[str, float]:
        """What the job's task asks Ray for: a GPU per training process when the cluster has GPUs (one task,
        so N GPUs of one node), else a CPU per process. A request no node can meet is refused (Ray would
        keep it pending for ever)."""
        n = job.processes
        wants_gpu = any(s.get("kind") in TRAIN_KINDS for s in job.steps) and self.cluster.gpus() > 0
        unit = "GPU" if wants_gpu else "CPU"
        largest = self.cluster.largest_node(unit)
        if n > largest:
            step = next((s.get("id") for s in job.steps if int(s.get("processes") or 1) == n), "?")
            raise ConfigError(f"step {step!r} trains on processes: {n}, which needs {n} {unit}s on one node; the "
                              f"cluster's largest node has {largest}: lower processes or add a larger node")
        return {"num_gpus": n, "num_cpus": 1} if wants_gpu else {"num_cpus": n}

    def _log(self, text: str) -> None:
        if self.job is not None and text:
            with open(self.job.log_path, "a", encoding="utf-8") as f:
                f.write(text)

    def start(self, job: Job, cmd: Sequence[str], base_env: dict[str, str]) -> Optional[int]:
        from loraforge.errors import LoraforgeError
        from loraforge.registry import Registry

        recipe = Path(job.recipe)
        root, files = job_inputs(recipe, self.watched_for(job))
        recipe_rel = recipe.resolve().relative_to(root).as_posix()
        lock = Path(str(recipe.resolve()) + ".lock")
        if lock.is_file():  # the remote apply judges publish steps and writes its lock from the head's
            files[recipe_rel + ".lock"] = lock
        inputs = {rel: self.cluster.put_file(path) for rel, path in files.items()}
        cmd = list(cmd)
        default = cmd[:len(self.default_cmd)] == self.default_cmd
        self.key = f"job{job.id}-{(job.recipe_digest or 'none')[:16]}"
        spec = {"key": self.key, "recipe": job.recipe, "recipe_rel": recipe_rel,
                "cmd": cmd[len(self.default_cmd):] if default else cmd, "default_cmd": default}
        Path(job.log_path).parent.mkdir(parents=True, exist_ok=True)
        self.job, self.root = job, root
        try:
            resources = self.resources(job)
            spec["artifacts"] = job_artifacts(Registry(self.home), self.cluster, self.artifacts_for(job))
        except LoraforgeError as exc:  # the job fails with the reason; the next plan queues it afresh
            self._log(f"Error: {exc}\n")
            self.proc, self.cancelling, self.terminated_at, self._returncode = _Handle(), False, None, 1
            return None
        self._log(f"--- job {job.id} attempt {job.attempts} as a Ray task ({resources}), "
                  f"{len(files)} input file(s), {len(spec['artifacts'])} registry artifact(s): {' '.join(cmd)}\n")
        if (stored := load_stored(self.home, job.id)) is not None:  # a run of this job stopped on some node
            self._keep(stored)
            self._log(f"head: the task resumes from checkpoint {describe(stored)} uploaded earlier\n")
        self.ref = self.cluster.task.options(max_retries=MAX_RETRIES, retry_exceptions=False, **resources).remote(
            spec, inputs, self.cluster.board)
        self.proc = _Handle()
        self.cancelling, self.terminated_at, self._returncode = False, None, None
        return None

    def _drain(self) -> None:
        ray = self.cluster.ray
        text = ray.get(self.cluster.board.pull.remote(self.key))
        if text:
            if self.proc is not None and "worker pid " in text:
                try:
                    self.proc.pid = int(text.rsplit("worker pid ", 1)[1].split(",", 1)[0])
                except ValueError:
                    pass
            self._log(text)
        self._take_checkpoint()

    def _keep(self, payload) -> None:
        """Put the job's newest checkpoint in the object store as the head's own (it outlives the worker that
        uploaded it), for any later task of the job to restore."""
        ray = self.cluster.ray
        self._kept = [ray.put(payload)]  # referenced here until replaced: the object lives as long
        ray.get(self.cluster.board.keep_checkpoint.remote(self.key, self._kept))

    def _take_checkpoint(self) -> None:
        ray = self.cluster.ray
        box = ray.get(self.cluster.board.take_checkpoint.remote(self.key))
        if not box:
            return
        try:
            payload = ray.get(box[0], timeout=120)
        except (ray.exceptions.RayError, TimeoutError) as exc:  # its worker died before the head fetched it
            self._log(f"head: an uploaded checkpoint was lost ({type(exc).__name__}); the previous one is kept\n")
            return
        store_checkpoints(self.home, self.job.id, payload)
        self._keep(payload)
        self._log(f"head: stored checkpoint {describe(payload)}\n")

    def poll(self) -> Optional[int]:
        if self.proc is None:
            return None
        if self._returncode is not None:
            return self._returncode
        ray = self.cluster.ray
        self._drain()
        done, _ = ray.wait([self.ref], timeout=0)
        if not done:
            return None
        self._drain()
        try:
            result = ray.get(self.ref)
        except ray.exceptions.TaskCancelledError:
            self._log("Error: the Ray task was cancelled\n")
            self._returncode = -9
            return self._returncode
        except ray.exceptions.RayError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            self._log(f"Error: the Ray task failed after {MAX_RETRIES} retries: {first}\n")
            self._returncode = -9 if isinstance(exc, ray.exceptions.WorkerCrashedError) else 1
            return self._returncode
        self._returncode = result["returncode"]
        if self._returncode == 0:
            self._returncode = self._register(result["bundle"], result.get("lock"))
        return self._returncode

    def _register(self, bundle, lock: Optional[dict] = None) -> int:
        from loraforge.errors import LoraforgeError
        from loraforge.registry import Registry

        try:
            report = register_bundle(Registry(self.home), bundle, recipe_path=self.job.recipe)
        except LoraforgeError as exc:
            self._log(f"Error: registering the job's artifacts at the head failed: {exc}\n")
            return 1
        if lock is not None:
            path = write_head_lock(Path(self.job.recipe), lock["text"], lock["tree"], self.root, report.renamed)
            self._log(f"head: lock written to {path}\n")
        for ref in report.registered:
            self._log(f"head: registered {ref}\n")
        for ref in report.existing:
            self._log(f"head: {ref} already registered (same input digest)\n")
        discard_stored(self.home, self.job.id)  # registered: nothing will resume from it
        self._kept = None
        return 0

    def terminate(self, now: float) -> None:
        if self.proc is not None and self._returncode is None:
            self.cluster.board.request_stop.remote(self.key, "term")
            if self.terminated_at is None:
                self.terminated_at = now

    def kill(self) -> None:
        if self.proc is not None and self._returncode is None:
            self.cluster.board.request_stop.remote(self.key, "kill")
            self.cluster.ray.cancel(self.ref, force=True)

    def release(self) -> tuple[Optional[Job], int]:
        """Forget the finished task (waiting for it if it still runs); returns its job and exit status."""
        import time

        assert self.proc is not None
        while (returncode := self.poll()) is None:
            time.sleep(0.05)
        job = self.job
        self.cluster.board.forget.remote(self.key)
        self.job, self.proc, self.ref, self.key = None, None, None, None
        self._kept = None
        self.cancelling, self.terminated_at, self._returncode = False, None, None
        return job, returncode


def ray_workers(cluster: RayCluster, home: Path, watched_for: Callable[[Job], list[str]],
                default_cmd: Sequence[str], slots: Optional[int] = None,
                artifacts_for: Optional[Callable[[Job], list[dict]]] = None) -> list[RayWorker]:
    from loraforge.daemon.worker import WorkerSpec

    count = slots or cluster.slots()
    return [RayWorker(WorkerSpec(f"ray{i}"), cluster, home, watched_for, default_cmd, artifacts_for)
            for i in range(count)]


def default_cmd() -> list[str]:
    return [sys.executable, "-m", "loraforge"]
