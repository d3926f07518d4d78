"""`loraforge daemon --executor ray` on a real local Ray cluster (`ray start --head`, two CPUs: two workers).

Jobs run the stand-in recipe command (tests/daemon_fake_recipe.py): it trains in 0.05 s steps, checkpoints
each one in its home's tmp folder, stops on SIGTERM and registers one artifact per input digest. On Ray
that home is the task's scratch home on the worker node; the head registers the returned bundle.
"""

from __future__ import annotations

import json
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

import pytest

from loraforge.daemon import JobQueue
from loraforge.registry import Registry

# The test environment installs loraforge[ray] (`make test`): without Ray this module fails, never skips.
import ray  # noqa: E402,F401

RAY = Path(sys.executable).with_name("ray")
FAKE = [sys.executable, str(Path(__file__).parent / "daemon_fake_recipe.py")]


def wait_for(what: str, cond, timeout: float = 40.0, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        tail = f"\n--- {log.name}:\n{log.read_text()[-3000:]}" if log is not None and log.is_file() else ""
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the daemon exited ({proc.returncode}) while waiting for {what}{tail}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}{tail}")
        time.sleep(0.05)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    """A one-node Ray cluster with 2 CPUs (two jobs at once); stopped whatever happens."""
    temp = Path(tempfile.mkdtemp(prefix="lfray"))  # short: Ray's socket paths live under it
    port = free_port()
    env = dict(os.environ, LORAFORGE_RAY_CACHE=str(temp / "cache"), RAY_USAGE_STATS_ENABLED="0")
    start = [str(RAY), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port), "--num-cpus", "2",
             "--disable-usage-stats", "--include-dashboard=false", "--object-store-memory", "100000000",
             "--temp-dir", str(temp / "ray")]
    try:
        subprocess.run(start, env=env, check=True, capture_output=True, timeout=60)
        yield {"address": f"127.0.0.1:{port}", "cache": temp / "cache"}
    finally:
        subprocess.run([str(RAY), "stop", "--force"], capture_output=True, timeout=60)
        shutil.rmtree(temp, ignore_errors=True)


class RayDaemon:
    def __init__(self, home: Path, recipes: Path, address: str):
        self.home = home
        self.log = home.parent / "daemon.out"
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "loraforge", "--home", str(home), "daemon", "--watch", str(recipes),
                 "--executor", "ray", "--ray-address", address, "--debounce", "0.2s", "--grace", "10s",
                 "--recipe-cmd", shlex.join(FAKE)], stdout=out, stderr=subprocess.STDOUT)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=40)


@pytest.fixture
def env(tmp_path, monkeypatch):
    home, recipes = tmp_path / "home", tmp_path / "recipes"
    recipes.mkdir()
    monkeypatch.setenv("LORAFORGE_HOME", str(home))
    daemons: list[RayDaemon] = []
    yield home, recipes, daemons
    for d in daemons:
        if d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait()


def job_log(home: Path, job_id: int) -> str:
    path = home / "jobs" / f"{job_id}.log"
    return path.read_text() if path.is_file() else ""


def worker_pids(text: str) -> list[int]:
    return [int(line.split("worker pid ", 1)[1].split(",", 1)[0]) for line in text.splitlines()
            if line.startswith("--- ray task on node")]


def versions(home: Path, name: str) -> list[int]:
    return sorted(row["version"] for row in Registry(home).list(name=name))


def status_of(home: Path, job_id: int) -> str | None:
    try:
        return JobQueue(home).get(job_id).status
    except Exception:
        return None


def test_two_recipes_run_at_once_on_two_workers_and_the_head_registers_their_bundles(cluster, env):
    home, recipes, daemons = env
    data = recipes / "data"
    data.mkdir()
    (data / "a.txt").write_text("one")
    (recipes / "a.yaml").write_text("name: alpha\ndataset: data\nseconds: 2.5\n")
    (recipes / "b.yaml").write_text("name: beta\nseconds: 2.5\n")
    daemon = RayDaemon(home, recipes, cluster["address"])
    daemons.append(daemon)
    both = wait_for("both jobs running", lambda: [status_of(home, 1), status_of(home, 2)] == ["running"] * 2
                    and all(worker_pids(job_log(home, i)) for i in (1, 2)), proc=daemon.proc, log=daemon.log)
    assert both
    wait_for("both jobs done", lambda: [status_of(home, 1), status_of(home, 2)] == ["succeeded"] * 2,
             proc=daemon.proc, log=daemon.log)
    logs = [job_log(home, 1), job_log(home, 2)]
    (pid_a,), (pid_b,) = worker_pids(logs[0]), worker_pids(logs[1])
    assert pid_a != pid_b  # two worker processes, at the same time
    assert "head: registered alpha:1" in logs[0] and "head: registered beta:1" in logs[1]
    assert versions(home, "alpha") == [1] and versions(home, "beta") == [1]
    alpha = Registry(home).resolve("alpha:1")
    assert alpha.provenance.recipe.path == str(recipes / "a.yaml")  # the head's recipe, not the scratch copy
    assert Registry(home).checkout(alpha).joinpath("result.txt").read_text() == alpha.provenance.recipe.input_digest
    # The dataset went to the node's cache once, by digest.
    assert (cluster["cache"] / "blobs").is_dir() and any((cluster["cache"] / "blobs").iterdir())
    assert daemon.stop() == 0
    assert [j.status for j in JobQueue(home).list()] == ["succeeded", "succeeded"]


def test_killing_the_worker_mid_training_retries_the_task_which_resumes_and_registers_once(cluster, env):
    home, recipes, daemons = env
    (recipes / "a.yaml").write_text("name: gamma\nseconds: 3\n")
    daemon = RayDaemon(home, recipes, cluster["address"])
    daemons.append(daemon)
    wait_for("training under way", lambda: "step 15/60" in job_log(home, 1), proc=daemon.proc, log=daemon.log)
    (pid,) = worker_pids(job_log(home, 1))
    os.kill(pid, signal.SIGKILL)
    wait_for("the job to finish", lambda: status_of(home, 1) in ("succeeded", "failed"), proc=daemon.proc,
             log=daemon.log)
    text = job_log(home, 1)
    assert status_of(home, 1) == "succeeded", text[-2000:]
    pids = worker_pids(text)
    assert len(pids) == 2 and pids[1] != pid  # Ray ran the task again, in another worker process
    resumed = int(text.split("resumed from step ", 1)[1].split()[0])
    assert resumed >= 15  # from the trainer's checkpoint, not from step 0
    assert versions(home, "gamma") == [1]
    assert daemon.stop() == 0


def test_killing_and_restarting_the_daemon_loses_nothing_and_makes_one_version(cluster, env):
    home, recipes, daemons = env
    (recipes / "a.yaml").write_text("name: delta\nseconds: 3\n")
    first = RayDaemon(home, recipes, cluster["address"])
    daemons.append(first)
    wait_for("training under way", lambda: "step 10/60" in job_log(home, 1), proc=first.proc, log=first.log)
    first.proc.kill()
    first.proc.wait()
    assert status_of(home, 1) == "running"  # as the dead daemon left it
    second = RayDaemon(home, recipes, cluster["address"])
    daemons.append(second)
    wait_for("the re-queued job to finish", lambda: status_of(home, 1) == "succeeded", proc=second.proc,
             log=second.log)
    text = job_log(home, 1)
    assert "resumed from step" in text
    assert [j.id for j in JobQueue(home).list()] == [1]  # re-queued, not a second job
    assert versions(home, "delta") == [1]
    assert second.stop() == 0


def test_jobs_cancel_stops_the_remote_trainer_which_checkpoints(cluster, env):
    home, recipes, daemons = env
    (recipes / "a.yaml").write_text("name: epsilon\nseconds: 30\n")
    daemon = RayDaemon(home, recipes, cluster["address"])
    daemons.append(daemon)
    wait_for("training under way", lambda: "step 5/600" in job_log(home, 1), proc=daemon.proc, log=daemon.log)
    out = subprocess.run([sys.executable, "-m", "loraforge", "--home", str(home), "jobs", "cancel", "1"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "the daemon will stop it" in out.stdout
    asked = time.monotonic()
    wait_for("the job to be cancelled", lambda: status_of(home, 1) == "cancelled", proc=daemon.proc,
             log=daemon.log)
    assert time.monotonic() - asked < 10  # the trainer stopped itself well before it would have finished
    text = job_log(home, 1)
    stopped = int(text.split("interrupted: checkpoint saved at step ", 1)[1].split()[0])
    assert 5 <= stopped < 600
    assert versions(home, "epsilon") == []
    assert daemon.stop() == 0


REAL_RECIPE = """\
name: real
base: builtin:tiny-sd
steps:
  train:
    train: {method: lora, dataset: ./data, instance_prompt: a cat, steps: 2, resolution: 16, rank: 2,
            validation_steps: 1}
"""


@pytest.mark.slow  # the real recipe engine and a tiny LoRA: about 25 s on 2 cores
def test_a_real_lora_recipe_trains_remotely_and_is_up_to_date_at_the_head(cluster, env, monkeypatch):
    from PIL import Image

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    home, recipes, daemons = env
    (recipes / "data").mkdir()
    for i in range(2):
        Image.new("RGB", (16, 16), (60 * i, 90, 140)).save(recipes / "data" / f"{i}.png")
    (recipes / "real.yaml").write_text(REAL_RECIPE)
    daemon = subprocess.Popen(  # the daemon's default command: the real recipe engine
        [sys.executable, "-m", "loraforge", "--home", str(home), "daemon", "--watch", str(recipes), "--executor", "ray",
         "--ray-address", cluster["address"], "--debounce", "0.2s"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        wait_for("the job to finish", lambda: status_of(home, 1) in ("succeeded", "failed"), timeout=90, proc=daemon)
        assert status_of(home, 1) == "succeeded", job_log(home, 1)[-2000:]
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=40) == 0
    assert versions(home, "real-train") == [1]
    adapter = Registry(home).resolve("real-train:1")
    assert adapter.kind == "lora" and Registry(home).primary_file(adapter).stat().st_size > 0
    plan = subprocess.run([sys.executable, "-m", "loraforge", "--home", str(home), "recipe", "plan",
                           str(recipes / "real.yaml"), "--json"], capture_output=True, text=True, timeout=120)
    steps = json.loads(plan.stdout)["steps"]
    assert [(s["id"], s["status"]) for s in steps] == [("train", "up-to-date")]  # the head's digests match


@pytest.mark.parametrize("args, code, message", [
    (["--executor", "ray", "--ray-address", "127.0.0.1:{port}"], 1,
     "Error: --ray-address 127.0.0.1:{port}: no Ray cluster answers there"),
    (["--executor", "ray", "--ray-address", "nowhere"], 1, "Error: --ray-address nowhere: write auto, HOST:PORT"),
    (["--ray-slots", "2"], 2, "--ray-address and --ray-slots need --executor ray"),
    (["--executor", "ray", "--cpu"], 2, "with --executor ray the cluster's resources decide"),
])
def test_a_ray_daemon_that_cannot_run_says_why_in_one_line_and_leaves_the_home_alone(tmp_path, args, code, message):
    port = free_port()  # nothing listens there once the probe socket is closed
    args = [a.format(port=port) for a in args]
    home, recipes = tmp_path / "home", tmp_path / "recipes"
    recipes.mkdir()
    out = subprocess.run([sys.executable, "-m", "loraforge", "--home", str(home), "daemon", "--watch", str(recipes),
                          *args], capture_output=True, text=True, timeout=60)
    assert out.returncode == code
    assert message.format(port=port) in out.stderr
    assert "Traceback" not in out.stderr
    assert not (home / "registry.db").exists()  # no catalog, no job queued
