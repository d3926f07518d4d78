"""The part of a Ray job that runs on a worker node: fetch inputs, run `recipe apply` in a scratch home, bundle.

Inputs arrive as (sha256, object ref) per file and are fetched into a node-local cache only when the
cache lacks that digest, so a dataset shared by many jobs crosses the network once per node. The scratch
home is keyed by the job, so a task Ray retries after its worker died finds the trainer's checkpoint
there and resumes; on another node it restores the newest checkpoint it uploaded to the head
(loraforge.daemon.checkpoints). The registry versions the plan read are
imported into the scratch home under their own name and version (their blobs through the same cache),
so the remote plan resolves the recipe's references, and reuses up-to-date steps, exactly as the head does.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Optional

from loraforge.daemon.bundle import collect_bundle, import_artifacts
from loraforge.daemon.checkpoints import Uploader, restore_from_head

CACHE_ENV = "LORAFORGE_RAY_CACHE"
LOG_EVERY_S = 0.2


def node_cache() -> Path:
    """This node's cache of input blobs and job scratch homes ($LORAFORGE_RAY_CACHE, else the temp dir)."""
    root = Path(os.environ.get(CACHE_ENV) or Path(tempfile.gettempdir()) / f"loraforge-ray-{os.getuid()}")
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    return root


def fetch_blob(digest: str, ref_box: list) -> Path:
    """The cached copy of blob `digest`, fetched from the object store (ref_box = [ref]) if missing."""
    import ray

    path = node_cache() / "blobs" / digest
    if not path.is_file():
        data = ray.get(ref_box[0])
        tmp = path.with_name(f".{digest}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)  # atomic: two jobs fetching the same blob on one node both succeed
    return path


def _place(blob: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        target.unlink()
    try:
        os.link(blob, target)
    except OSError:
        shutil.copyfile(blob, target)


def _die_with_parent() -> None:
    from loraforge.daemon.worker import _die_with_parent as die

    die()


def run_job(spec: dict[str, Any], inputs: dict[str, tuple[str, list]], board: Any) -> dict[str, Any]:
    """Run one job; returns {"returncode", "bundle", "node", "pid"}. `board` is the head's JobBoard actor."""
    import ray

    key = spec["key"]
    scratch = node_cache() / "jobs" / key
    tree, home = scratch / "tree", scratch / "home"
    home.mkdir(parents=True, exist_ok=True)
    for rel, (digest, ref_box) in sorted(inputs.items()):
        _place(fetch_blob(digest, ref_box), tree / rel)
    imported = frozenset()
    if spec.get("artifacts"):
        from loraforge.registry import Registry

        imported = frozenset(import_artifacts(Registry(home), spec["artifacts"], fetch_blob))
    recipe = str(tree / spec["recipe_rel"])
    cmd = [recipe if arg == spec["recipe"] else arg for arg in (spec.get("cmd") or [])]
    if spec.get("default_cmd"):
        cmd = [sys.executable, "-m", "loraforge", *cmd]
    env = dict(os.environ)
    env["LORAFORGE_HOME"] = str(home)
    env["PYTHONUNBUFFERED"] = "1"
    gpus = ray.get_gpu_ids()
    env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in gpus)
    node = ray.get_runtime_context().get_node_id()
    header = f"--- ray task on node {node[:12]}, worker pid {os.getpid()}, GPUs {gpus or 'none'}: {' '.join(cmd)}\n"
    board.push.remote(key, header)
    restored = restore_from_head(ray, board, key, home)  # a retry elsewhere resumes from the head's copy
    if restored:
        board.push.remote(key, f"--- restored checkpoint {', '.join(restored)} uploaded to the head\n")
    uploader = Uploader(ray, board, key, home)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env=env, cwd=str(tree), preexec_fn=_die_with_parent)
    lines: list[str] = []
    lock = threading.Lock()

    def read() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            with lock:
                lines.append(raw.decode("utf-8", "replace"))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    signalled: Optional[str] = None

    def flush() -> None:
        with lock:
            chunk, lines[:] = "".join(lines), []
        if chunk:
            board.push.remote(key, chunk)

    while proc.poll() is None:
        try:
            proc.wait(timeout=LOG_EVERY_S)  # returns as soon as the child exits
        except subprocess.TimeoutExpired:
            pass
        flush()
        uploader.tick()
        wanted = ray.get(board.stop_wanted.remote(key))
        if wanted and wanted != signalled:
            # SIGTERM lets the trainer checkpoint; a kill is the head giving up after its grace period
            proc.send_signal(signal.SIGTERM if wanted == "term" else signal.SIGKILL)
            signalled = wanted
    reader.join(timeout=5)
    flush()
    if proc.returncode != 0:
        uploader.tick(wait=True)  # the checkpoint a stopped trainer wrote as it exited, for the job's next run
    result: dict[str, Any] = {"returncode": proc.returncode, "bundle": [], "node": node, "pid": os.getpid()}
    if proc.returncode == 0:
        result["bundle"] = collect_bundle(home, skip=imported)
        lock = Path(recipe + ".lock")
        if lock.is_file():
            result["lock"] = {"text": lock.read_text(encoding="utf-8"), "tree": str(tree.resolve())}
        shutil.rmtree(scratch, ignore_errors=True)  # done: nothing to resume from
    return result
