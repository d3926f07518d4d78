"""`loraforge daemon` as a real process: watchdog events, signals, kill -9 and restart."""

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

FAKE = [sys.executable, str(Path(__file__).parent / "daemon_fake_recipe.py")]


def wait_for(what: str, cond, timeout: float = 30.0, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the daemon exited ({proc.returncode}) while waiting for {what}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def lf(home: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loraforge", "--home", str(home), *args],
                          capture_output=True, text=True, timeout=60)


class DaemonProcess:
    def __init__(self, home: Path, recipes: Path, debounce: str = "0.5s", grace: str = "5s"):
        self.home = home
        self.log = home.parent / "daemon.out"
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "loraforge", "--home", str(home), "daemon", "--watch", str(recipes), "--cpu",
                 "--debounce", debounce, "--grace", grace, "--recipe-cmd", shlex.join(FAKE)],
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


def test_kill_9_then_restart_finishes_the_job_once_and_sigterm_lets_it_checkpoint(env):
    home, recipes = env
    (recipes / "long.yaml").write_text("name: long\nseconds: 2\n")  # 40 checkpointed steps
    daemon = DaemonProcess(home, recipes)
    log = home / "jobs" / "1.log"
    wait_for("training to start", lambda: log.is_file() and "step 5/40" in log.read_text(), proc=daemon.proc)
    daemon.proc.kill()
    daemon.proc.wait(timeout=10)
    # the orphaned child is told (SIGTERM) that its parent died: it checkpoints and stops
    wait_for("the orphan to checkpoint", lambda: "interrupted: checkpoint saved" in log.read_text())
    assert jobs(home)[0].status == "running", "the dead daemon could not record anything"

    daemon = DaemonProcess(home, recipes)
    wait_for("job 1 to finish", lambda: finished(home, 1), proc=daemon.proc)
    (job,) = jobs(home)
    assert (job.status, job.attempts) == ("succeeded", 2)
    text = log.read_text()
    assert "resumed from step" in text and text.count("train: registered long:1") == 1
    assert [r["version"] for r in Registry(home).list()] == [1], "no duplicate version"

    # SIGTERM during a job: the job checkpoints, the daemon exits cleanly and re-queues it
    (recipes / "second.yaml").write_text("name: second\nseconds: 5\n")
    log2 = home / "jobs" / "2.log"
    wait_for("job 2 to train", lambda: log2.is_file() and "step 3/100" in log2.read_text(), proc=daemon.proc)
    events = daemon.stop()
    assert daemon.proc.returncode == 0
    # the job exited by itself after checkpointing: the daemon did not wait out its grace and kill it
    assert "stopping: waiting up to 5s for 1 running job(s)" in events
    assert not any("after SIGTERM; killing it" in e for e in events), events
    assert "interrupted: checkpoint saved" in log2.read_text()
    assert JobQueue(home).get(2).status == "queued"

    # a job that ignores SIGTERM: the second signal stops everything at once
    (recipes / "second.yaml").write_text("name: second\nseconds: 30\nignore_sigterm: true\n")
    daemon = DaemonProcess(home, recipes, grace="60s")
    wait_for("job 2 to run again", lambda: "step 1/600" in log2.read_text(), proc=daemon.proc)
    daemon.proc.send_signal(signal.SIGTERM)
    wait_for("the daemon to start stopping", lambda: daemon.status().get("stopping"), proc=daemon.proc)
    daemon.proc.send_signal(signal.SIGTERM)
    daemon.proc.wait(timeout=30)  # a hang guard, well under the 60 s grace
    assert daemon.proc.returncode == 0
    # the second signal killed the job at once instead of waiting out the 60 s grace
    events = daemon.events()
    assert "stopping now: killing running jobs" in events
    assert not any("after SIGTERM; killing it" in e for e in events), events
    job2 = JobQueue(home).get(2)
    assert job2.status == "queued" and job2.reason == "re-queued: interrupted by daemon shutdown"
    assert [r["name"] for r in Registry(home).list()] == ["long"]
