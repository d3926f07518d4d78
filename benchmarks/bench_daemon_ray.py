"""The Ray executor's costs: jobs per minute of short recipes through `--executor ray` against the local
executor (scheduling overhead: shipping inputs, a task, the board, the bundle), and how many artifact bundles
per second the head registers (the rate every worker's results funnel through).

Jobs run the stand-in recipe command of the tests (tests/daemon_fake_recipe.py, `seconds: 0`), so a job's time
is the daemon's and the executor's, plus one short process. Needs `loraforge[ray]`; skipped without it.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import Figure

JOBS = 8
ROOT = Path(__file__).resolve().parent.parent
FAKE = [sys.executable, str(ROOT / "tests" / "daemon_fake_recipe.py")]
BUNDLES = 40
BUNDLE_BYTES = (64 * 1024, 4 * 1024 * 1024)  # a small adapter's file, a rank-32 SDXL LoRA is ~10x the larger


def _seconds_for_jobs(tmp: Path, label: str, executor_args: list[str]) -> float:
    """Seconds from the first job running to all JOBS succeeded, for one daemon run."""
    from loraforge.daemon import JobQueue

    home, recipes = tmp / f"home-{label}", tmp / f"recipes-{label}"
    recipes.mkdir()
    for i in range(JOBS):
        (recipes / f"r{i}.yaml").write_text(f"name: {label}{i}\nseconds: 0\n")
    proc = subprocess.Popen([sys.executable, "-m", "loraforge", "--home", str(home), "daemon", "--watch", str(recipes),
                             "--debounce", "0.05s", "--recipe-cmd", shlex.join(FAKE), *executor_args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = None
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the {label} daemon exited with {proc.returncode}")
            try:
                jobs = JobQueue(home).list()
            except Exception:
                jobs = []
            if first is None and any(j.status != "queued" for j in jobs):
                first = time.perf_counter()
            if len(jobs) == JOBS and all(j.status == "succeeded" for j in jobs):
                return time.perf_counter() - first
            if any(j.status == "failed" for j in jobs):
                raise RuntimeError(f"a {label} job failed: {[j.error for j in jobs if j.error]}")
            time.sleep(0.02)
        raise RuntimeError(f"the {label} jobs did not finish in 300 s")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def _registration(tmp: Path, size: int) -> tuple[float, float]:
    """(seconds per new bundle registered, seconds per duplicate bundle skipped) of `size`-byte artifacts."""
    from loraforge.daemon.bundle import BundleItem, register_bundle
    from loraforge.registry import Manifest, Provenance, RecipeInfo, Registry

    registry = Registry(tmp / f"home-register-{size}")
    items = []
    for i in range(BUNDLES):
        digest = f"{i:064x}"
        manifest = Manifest(name=f"job{i}", kind="dataset", digest="", files=[], provenance=Provenance(
            method="bench", recipe=RecipeInfo(name=f"job{i}", digest=digest, step="train", input_digest=digest)))
        items.append([BundleItem(manifest.to_json(), digest, {"result.bin": os.urandom(size)})])
    t0 = time.perf_counter()
    for bundle in items:
        assert register_bundle(registry, bundle).registered
    new_s = (time.perf_counter() - t0) / BUNDLES
    t0 = time.perf_counter()
    for bundle in items:
        assert register_bundle(registry, bundle).existing  # a retried task's bundle
    return new_s, (time.perf_counter() - t0) / BUNDLES


def main() -> list[Figure]:
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        registration = {size: _registration(tmp, size) for size in BUNDLE_BYTES}
        print(f"\nhead registration of {BUNDLES} bundles (one artifact, one file each)")
        print(f"{'file size':<14}{'new bundles/s':>16}{'MB/s':>10}{'duplicates/s':>16}")
        for size, (new_s, dup_s) in registration.items():
            print(f"{size // 1024:>8} KiB   {1 / new_s:>16.1f}{size / new_s / 1e6:>10.1f}{1 / dup_s:>16.1f}")
        figures = [Figure(f"register a {size // 1024} KiB bundle at the head", new_s,
                          "skip it as a duplicate", dup_s) for size, (new_s, dup_s) in registration.items()]
        try:
            import ray  # noqa: F401
        except ImportError:
            print("\nray is not installed (pip install 'loraforge[ray]'): executor figures skipped")
            return figures
        local_s = _seconds_for_jobs(tmp, "local", ["--cpu"])
        ray_dir = Path(tempfile.mkdtemp(prefix="lfbench"))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        ray_bin = str(Path(sys.executable).with_name("ray"))
        env = dict(os.environ, LORAFORGE_RAY_CACHE=str(ray_dir / "cache"))
        try:
            subprocess.run([ray_bin, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
                            "--num-cpus", "2", "--disable-usage-stats", "--include-dashboard=false",
                            "--object-store-memory", "100000000", "--temp-dir", str(ray_dir / "ray")],
                           env=env, check=True, capture_output=True, timeout=120)
            address = ["--executor", "ray", "--ray-address", f"127.0.0.1:{port}"]
            ray1_s = _seconds_for_jobs(tmp, "ray1", [*address, "--ray-slots", "1"])
            ray2_s = _seconds_for_jobs(tmp, "ray2", [*address, "--ray-slots", "2"])
        finally:
            subprocess.run([ray_bin, "stop", "--force"], capture_output=True, timeout=120)
            shutil.rmtree(ray_dir, ignore_errors=True)
    print(f"\n{JOBS} short jobs (`seconds: 0`), from the first running to the last succeeded")
    print(f"{'executor':<40}{'seconds':>10}{'jobs/min':>10}{'s/job':>8}")
    for name, seconds in (("local, one CPU worker", local_s), ("ray, 1 slot", ray1_s), ("ray, 2 slots", ray2_s)):
        print(f"{name:<40}{seconds:>10.2f}{JOBS * 60 / seconds:>10.1f}{seconds / JOBS:>8.2f}")
    return figures + [
        Figure(f"{JOBS} short jobs, ray executor, 1 slot", ray1_s, "local executor, 1 worker", local_s,
               note=f"{JOBS * 60 / ray1_s:.0f} vs {JOBS * 60 / local_s:.0f} jobs/min"),
        Figure(f"{JOBS} short jobs, ray executor, 2 slots", ray2_s, "local executor, 1 worker", local_s,
               note=f"{JOBS * 60 / ray2_s:.0f} jobs/min"),
    ]


if __name__ == "__main__":
    main()
