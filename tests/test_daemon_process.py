"""`loraforge daemon` as a real process: watchdog events, signals, kill -9 and restart.

Watching and scheduling are tested with a stand-in recipe command (tests/daemon_fake_recipe.py); kill -9 and
SIGTERM are tested against the real recipe engine training a tiny LoRA.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from loraforge.daemon import JobQueue
from loraforge.hashing import sha256_folder
from loraforge.registry import Registry
from tests.process_helpers import wait_for

FAKE = [sys.executable, str(Path(__file__).parent / "daemon_fake_recipe.py")]


def lf(home: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loraforge", "--home", str(home), *args],
                          capture_output=True, text=True, timeout=60)


class DaemonProcess:
    def __init__(self, home: Path, recipes: Path, debounce: str = "0.5s", grace: str = "5s", fake: bool = True):
        self.home = home
        self.log = home.parent / "daemon.out"
        # fake=False: jobs run the real `loraforge recipe apply` (the daemon's default command).
        recipe_cmd = ["--recipe-cmd", shlex.join(FAKE)] if fake else []
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "loraforge", "--home", str(home), "daemon", "--watch", str(recipes), "--cpu",
                 "--debounce", debounce, "--grace", grace, *recipe_cmd],
                stdout=out, stderr=subprocess.STDOUT,
            )
        wait_for("the daemon to start", lambda: self.status().get("pid") == self.proc.pid, proc=self.proc)

    def status(self) -> dict:
        path = self.home / "daemon" / "status.json"
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    def idle(self) -> bool:
        """No change waiting for its debounce, no job queued or running (as the daemon last wrote)."""
        s = self.status()
        return (bool(s) and s["pending_changes"] == 0 and s["queue"]["queued"] == 0
                and s["queue"]["running"] == 0 and all(w["job"] is None for w in s["workers"]))

    def stop(self, timeout: float = 30.0) -> list[str]:
        """SIGTERM, wait for the exit (the timeout only guards against a hang), return the daemon's events."""
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=timeout)
        return self.events()

    def events(self) -> list[str]:
        return [e["message"] for e in self.status().get("events", [])]


@pytest.fixture
def env(tmp_path, monkeypatch):
    home, recipes = tmp_path / "home", tmp_path / "recipes"
    recipes.mkdir()
    monkeypatch.setenv("LORAFORGE_HOME", str(home))
    return home, recipes


def save_like_an_editor(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def jobs(home: Path) -> list:
    return JobQueue(home).list()


def finished(home: Path, n: int):
    js = jobs(home)
    return len(js) == n and all(j.status in ("succeeded", "failed", "cancelled") for j in js) and js


def test_watch_build_invalid_dataset_change_and_sigterm(env):
    home, recipes = env
    data = recipes / "data"
    data.mkdir()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(data / "a.png")
    daemon = DaemonProcess(home, recipes, debounce="1s")
    try:
        # writing a recipe: exactly one job and one artifact
        save_like_an_editor(recipes / "style.yaml", "name: style\ndataset: data\n")
        wait_for("job 1", lambda: finished(home, 1), proc=daemon.proc)
        assert [j.status for j in jobs(home)] == ["succeeded"]
        assert [r["version"] for r in Registry(home).list()] == [1]

        # three saves inside the 1 s debounce window: one job
        for seconds in ("0.05", "0.1", "0.15"):
            save_like_an_editor(recipes / "style.yaml", f"name: style\ndataset: data\nseconds: {seconds}\n")
            time.sleep(0.05)
        wait_for("job 2", lambda: finished(home, 2), proc=daemon.proc)
        wait_for("the daemon to be idle", daemon.idle, proc=daemon.proc)
        assert len(jobs(home)) == 2 and [r["version"] for r in Registry(home).list()] == [1, 2]
        assert "step 3/3" in Path(jobs(home)[1].log_path).read_text(), "job 2 ran the last save"

        # an invalid recipe: a failed job that `jobs ls` explains, and the daemon keeps serving
        save_like_an_editor(recipes / "broken.yaml", "name: [unclosed\n")
        wait_for("the failed job", lambda: finished(home, 3), proc=daemon.proc)
        listing = lf(home, "jobs", "ls")
        assert listing.returncode == 0
        assert "failed" in listing.stdout and "broken.yaml: not valid YAML" in listing.stdout

        # a new image in the dataset: a new version whose provenance names the new dataset digest
        Image.new("RGB", (8, 8), (200, 100, 0)).save(data / "b.png")
        wait_for("job 4", lambda: finished(home, 4), proc=daemon.proc)
        newest = Registry(home).resolve("style")
        assert newest.version == 3 and newest.provenance.dataset_digest == sha256_folder(data)
        assert [j.status for j in jobs(home)] == ["succeeded", "succeeded", "failed", "succeeded"]

        shown = lf(home, "daemon", "status")
        assert shown.returncode == 0
        assert f"daemon: running (pid {daemon.proc.pid}" in shown.stdout
        assert "job 4: succeeded (style.yaml)" in shown.stdout and "3 succeeded, 1 failed" in shown.stdout
    finally:
        events = daemon.stop()
    assert daemon.proc.returncode == 0
    assert events[-2:] == ["stopping", "daemon stopped"]  # idle: nothing to wait for or kill
    after = json.loads(lf(home, "daemon", "status", "--json").stdout)
    assert after["running"] is False


# The real recipe engine (the daemon's default command) training a tiny LoRA: 200 steps of ~0.1 s.
REAL_RECIPE = """\
name: long
base: builtin:tiny-sd
steps:
  train:
    train: {method: lora, dataset: ./data, instance_prompt: a cat, steps: 200, resolution: 16, rank: 2,
            validation_steps: 1}
"""


@pytest.mark.slow
def test_kill_9_and_sigterm_of_the_daemon_checkpoint_a_real_training_job_that_resumes_once(home, tmp_path,
                                                                                           monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # children on a shared 2-core box
    recipes = tmp_path / "recipes"
    (recipes / "data").mkdir(parents=True)
    for i in range(2):
        Image.new("RGB", (16, 16), (60 * i, 90, 140)).save(recipes / "data" / f"{i}.png")
    (recipes / "long.yaml").write_text(REAL_RECIPE)
    daemon = DaemonProcess(home, recipes, grace="60s", fake=False)
    log = home / "jobs" / "1.log"
    wait_for("training to start", lambda: log.is_file() and "step 20/200" in log.read_text(), timeout=180,
             proc=daemon.proc, log=log)
    daemon.proc.kill()
    daemon.proc.wait(timeout=10)
    # The orphaned `recipe apply` is told (SIGTERM) that its parent died: the trainer checkpoints, the apply stops.
    wait_for("the orphan to checkpoint", lambda: "Error: stopped by SIGTERM in step 'train'" in log.read_text(),
             timeout=60, log=log)
    first_stop = _stopped_at(log.read_text())
    assert 20 <= first_stop < 200 and "(checkpoint saved" in log.read_text()
    assert jobs(home)[0].status == "running", "the dead daemon could not record anything"
    assert _adapters(home) == []

    # Restarted, the daemon re-queues the job; it resumes from that checkpoint. A SIGTERM to the daemon is forwarded:
    # the job checkpoints again, the daemon exits cleanly and leaves the job queued.
    daemon = DaemonProcess(home, recipes, grace="60s", fake=False)
    resumed = f"resumed from step {first_stop} of 200"
    wait_for("the job to resume", lambda: resumed in log.read_text(), timeout=180, proc=daemon.proc, log=log)
    events = daemon.stop(timeout=90)  # a hang guard, above the 60 s grace
    assert daemon.proc.returncode == 0
    # the job exited by itself after checkpointing: the daemon did not wait out its grace and kill it
    assert "stopping: waiting up to 60s for 1 running job(s)" in events
    assert not any("after SIGTERM; killing it" in e for e in events), events
    second_stop = _stopped_at(log.read_text().split(resumed, 1)[1])
    assert first_stop < second_stop < 200
    job = JobQueue(home).get(1)
    assert (job.status, job.reason) == ("queued", "re-queued: interrupted by daemon shutdown")
    assert _adapters(home) == []

    # Third start: the job resumes from the second checkpoint and registers exactly one version.
    daemon = DaemonProcess(home, recipes, grace="60s", fake=False)
    try:
        wait_for("job 1 to finish", lambda: finished(home, 1), timeout=240, proc=daemon.proc, log=log)
    finally:
        daemon.stop(timeout=90)
    (job,) = jobs(home)
    assert (job.status, job.attempts) == ("succeeded", 3)
    assert f"resumed from step {second_stop} of 200" in log.read_text()
    assert _adapters(home) == [("long-train", 1)], "no duplicate version"
    assert Registry(home).resolve("long-train").metrics["resumed_from_step"] == second_stop


def _stopped_at(text: str) -> int:
    return int(text.split("stopped by SIGTERM after step ", 1)[1].split()[0])


def _adapters(home: Path) -> list[tuple[str, int]]:
    return sorted((r["name"], r["version"]) for r in Registry(home).list() if r["kind"] != "dataset")


def test_a_job_that_ignores_sigterm_is_killed_on_the_second_signal(env):
    # The real engine always honours SIGTERM; only a stand-in can play a job that does not.
    home, recipes = env
    (recipes / "second.yaml").write_text("name: second\nseconds: 30\nignore_sigterm: true\n")
    daemon = DaemonProcess(home, recipes, grace="60s")
    log = home / "jobs" / "1.log"
    wait_for("job 1 to run", lambda: log.is_file() and "step 1/600" in log.read_text(), proc=daemon.proc)
    daemon.proc.send_signal(signal.SIGTERM)
    wait_for("the daemon to start stopping", lambda: daemon.status().get("stopping"), proc=daemon.proc)
    daemon.proc.send_signal(signal.SIGTERM)
    daemon.proc.wait(timeout=30)  # a hang guard, well under the 60 s grace
    assert daemon.proc.returncode == 0
    # the second signal killed the job at once instead of waiting out the 60 s grace
    events = daemon.events()
    assert "stopping now: killing running jobs" in events
    assert not any("after SIGTERM; killing it" in e for e in events), events
    job = JobQueue(home).get(1)
    assert job.status == "queued" and job.reason == "re-queued: interrupted by daemon shutdown"
    assert Registry(home).list() == []
