"""The daemon loop in-process with a controlled clock: debounce, jobs, artifacts, invalid recipes, restarts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from loraforge.cli import cli
from loraforge.daemon import Daemon, JobQueue, read_status
from loraforge.daemon.debounce import Debouncer
from loraforge.daemon.worker import JOB_ENV
from loraforge.errors import ConfigError
from loraforge.hashing import sha256_folder
from loraforge.registry import Registry

FAKE = [sys.executable, str(Path(__file__).parent / "daemon_fake_recipe.py")]


@pytest.fixture
def lf_home(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "home"
    monkeypatch.setenv("LORAFORGE_HOME", str(path))
    return path


@pytest.fixture
def recipes(tmp_path) -> Path:
    path = tmp_path / "recipes"
    path.mkdir()
    return path


def make_daemon(home: Path, watch: Path, **kw) -> Daemon:
    options = {"recipe_cmd": FAKE, "debounce": 2.0, "grace": 5.0, "use_watchdog": False}
    options.update(kw)
    return Daemon([watch], home=home, **options)


def drive(daemon: Daemon, until, now: float, timeout: float = 30.0) -> None:
    """Tick at a fixed clock value until `until()` holds; real time only bounds the wait for children."""
    deadline = time.monotonic() + timeout
    while not until():
        assert time.monotonic() < deadline, f"timed out; events: {list(daemon.events)}"
        daemon.tick(now=now)
        time.sleep(0.02)


def idle(daemon: Daemon) -> bool:
    return not any(w.busy for w in daemon.workers) and not JobQueue(daemon.home).list(status="queued")


def add_image(folder: Path, name: str, color: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (color, 0, 0)).save(folder / name)


def log_of(queue: JobQueue, job_id: int) -> str:
    jobs = [j for j in queue.list() if j.id == job_id]
    path = Path(jobs[0].log_path) if jobs else None
    return path.read_text() if path is not None and path.is_file() else ""


def jobs_ls(home: Path) -> str:
    result = CliRunner().invoke(cli, ["--home", str(home), "jobs", "ls"])
    assert result.exit_code == 0, result.output
    return result.output


def test_debouncer_fires_once_after_the_last_touch():
    d = Debouncer(2.0)
    for t in (0.0, 0.5, 1.0):
        d.touch("a.yaml", t)
    assert d.due(2.9) == []
    assert d.due(3.0) == ["a.yaml"]
    assert d.due(10.0) == []


def test_three_saves_in_the_window_make_one_job_and_one_artifact(lf_home, recipes):
    daemon = make_daemon(lf_home, recipes)
    daemon.start(now=0.0)
    recipe = recipes / "style.yaml"
    for t, seconds in ((1.0, 0.1), (1.5, 0.2), (2.0, 0.15)):
        recipe.write_text(f"name: style\nseconds: {seconds}\n")
        assert daemon.notify(recipe, now=t) == {str(recipe)}
    daemon.tick(now=3.9)  # 1.9 s after the last save: still inside the window
    queue = JobQueue(lf_home)
    assert queue.list() == []
    daemon.tick(now=4.0)
    drive(daemon, lambda: idle(daemon), now=4.0)

    jobs = queue.list()
    assert [(j.status, j.step_ids, j.attempts) for j in jobs] == [("succeeded", ["train"], 1)]
    assert [(r["name"], r["version"]) for r in Registry(lf_home).list()] == [("style", 1)]
    log = Path(jobs[0].log_path)
    assert log.parent == lf_home / "jobs" and "train: registered style:1" in log.read_text()

    # the same content again (a touch): planned, up to date, no job
    daemon.notify(recipe, now=10.0)
    daemon.tick(now=12.0)
    assert len(queue.list()) == 1
    assert "style.yaml: up to date" in daemon.events[-1]["message"]
    daemon.close()


def test_new_image_in_the_dataset_makes_a_new_version_naming_its_digest(lf_home, recipes):
    data = recipes / "data"
    add_image(data, "a.png", 10)
    (recipes / "style.yaml").write_text("name: style\ndataset: data\n")
    daemon = make_daemon(lf_home, recipes)
    daemon.start(now=0.0)  # existing recipes are planned at the first tick
    drive(daemon, lambda: idle(daemon) and JobQueue(lf_home).list(), now=0.0)
    first_digest = sha256_folder(data)
    assert daemon.recipe_watch[str(recipes / "style.yaml")] == [str(data)]

    add_image(data, "b.png", 200)
    assert daemon.notify(data / "b.png", now=5.0) == {str(recipes / "style.yaml")}
    daemon.tick(now=7.0)
    drive(daemon, lambda: idle(daemon), now=7.0)

    registry = Registry(lf_home)
    v1, v2 = registry.resolve("style:1"), registry.resolve("style:2")
    assert v1.provenance.dataset_digest == first_digest
    assert v2.provenance.dataset_digest == sha256_folder(data) != first_digest
    assert [j.status for j in JobQueue(lf_home).list()] == ["succeeded", "succeeded"]
    daemon.close()


def test_invalid_recipe_is_a_failed_job_and_the_daemon_keeps_serving(lf_home, recipes):
    (recipes / "broken.yaml").write_text("seconds: 1\n")
    (recipes / "good.yaml").write_text("name: good\n")
    daemon = make_daemon(lf_home, recipes)
    daemon.start(now=0.0)
    drive(daemon, lambda: idle(daemon) and len(JobQueue(lf_home).list()) == 2, now=0.0)

    by_recipe = {Path(j.recipe).name: j for j in JobQueue(lf_home).list()}
    assert by_recipe["broken.yaml"].status == "failed"
    assert by_recipe["broken.yaml"].error == "broken.yaml: a recipe needs a 'name'"
    assert by_recipe["good.yaml"].status == "succeeded"
    listing = jobs_ls(lf_home)
    assert "failed" in listing and "broken.yaml: a recipe needs a 'name'" in listing

    # the same broken file saved again does not pile up failed jobs; a fix runs normally
    daemon.notify(recipes / "broken.yaml", now=5.0)
    daemon.tick(now=8.0)
    assert len(JobQueue(lf_home).list()) == 2
    (recipes / "broken.yaml").write_text("name: fixed\n")
    daemon.notify(recipes / "broken.yaml", now=10.0)
    daemon.tick(now=12.0)
    drive(daemon, lambda: idle(daemon), now=12.0)
    assert [j.status for j in JobQueue(lf_home).list()] == ["failed", "succeeded", "succeeded"]
    assert Registry(lf_home).resolve("fixed").version == 1
    daemon.close()


def test_a_failing_apply_records_its_error_line(lf_home, recipes):
    (recipes / "bad.yaml").write_text("name: bad\nfail: the base model tiny-xl is unknown\n")
    daemon = make_daemon(lf_home, recipes)
    daemon.start(now=0.0)
    drive(daemon, lambda: idle(daemon) and JobQueue(lf_home).list(), now=0.0)
    (job,) = JobQueue(lf_home).list()
    assert (job.status, job.exit_code, job.error) == ("failed", 1, "the base model tiny-xl is unknown")
    assert Registry(lf_home).list() == []
    daemon.close()


def test_a_change_while_running_queues_one_job_that_newer_changes_supersede(lf_home, recipes):
    recipe = recipes / "slow.yaml"
    recipe.write_text("name: slow\nseconds: 30\n")
    daemon = make_daemon(lf_home, recipes)
    daemon.start(now=0.0)
    queue = JobQueue(lf_home)
    drive(daemon, lambda: "step 1/600" in log_of(queue, 1), now=0.0)  # it has read the recipe
    for t, seconds in ((5.0, 0.1), (10.0, 0.2)):  # two separate changes, each after its debounce
        recipe.write_text(f"name: slow\nseconds: {seconds}\n")
        daemon.notify(recipe, now=t)
        daemon.tick(now=t + 2.0)
    jobs = queue.list()
    assert [j.status for j in jobs] == ["running", "queued"], "one queued job, updated by the newer change"
    assert jobs[1].reason == "slow.yaml changed"
    queue.cancel(1)  # the long first run is not needed any more
    drive(daemon, lambda: idle(daemon), now=12.0)
    assert [j.status for j in queue.list()] == ["cancelled", "succeeded"]
    # job 2 ran the newest content (seconds=0.2: 4 steps of 0.05 s) and registered one version
    assert [r["version"] for r in Registry(lf_home).list()] == [1]
    assert "step 4/4" in Path(queue.get(2).log_path).read_text()
    daemon.close()


def test_one_worker_per_gpu_with_cuda_visible_devices(lf_home, recipes):
    for name in ("a", "b"):
        (recipes / f"{name}.yaml").write_text(f"name: {name}\nseconds: 0.5\n")
    daemon = make_daemon(lf_home, recipes, gpus=["0", "1"], publish=False)
    daemon.start(now=0.0)
    queue = JobQueue(lf_home)
    drive(daemon, lambda: len(queue.list(status="running")) == 2, now=0.0)  # both at once
    drive(daemon, lambda: idle(daemon), now=0.0)
    by_worker = {j.worker: Path(j.log_path).read_text() for j in queue.list()}
    assert sorted(by_worker) == ["gpu0", "gpu1"]
    assert "CUDA_VISIBLE_DEVICES='0' publish=False" in by_worker["gpu0"]
    assert "CUDA_VISIBLE_DEVICES='1' publish=False" in by_worker["gpu1"]
    status = json.loads((lf_home / "daemon" / "status.json").read_text())
    assert [w["name"] for w in status["workers"]] == ["gpu0", "gpu1"]
    daemon.close()


def test_a_job_training_on_two_processes_gets_two_gpus_and_waits_for_them(lf_home, recipes):
    (recipes / "a.yaml").write_text("name: a\nseconds: 0.5\n")
    (recipes / "b.yaml").write_text("name: b\nprocesses: 2\nseconds: 0.2\n")
    daemon = make_daemon(lf_home, recipes, gpus=["0", "1"], publish=False)
    daemon.start(now=0.0)
    queue = JobQueue(lf_home)
    drive(daemon, lambda: len(queue.list()) == 2 and idle(daemon), now=0.0)
    a, b = queue.list()
    assert (a.status, b.status) == ("succeeded", "succeeded")
    assert b.started_at >= a.finished_at  # it waited for the GPU job a held, not for one GPU
    assert "CUDA_VISIBLE_DEVICES='0,1' publish=False" in Path(b.log_path).read_text()
    assert "on GPUs 0,1 (gpu0 and gpu1)" in Path(b.log_path).read_text()
    daemon.close()


def test_a_job_wanting_more_gpus_than_the_daemon_has_fails_in_one_line(lf_home, recipes):
    (recipes / "b.yaml").write_text("name: b\nprocesses: 4\nseconds: 0.2\n")
    daemon = make_daemon(lf_home, recipes, gpus=["0", "1"], publish=False)
    daemon.start(now=0.0)
    queue = JobQueue(lf_home)
    drive(daemon, lambda: queue.list() and queue.list()[0].status == "failed", now=0.0)
    (job,) = queue.list()
    message = ("step 'train' trains on processes: 4, which needs 4 GPUs; this daemon has 2 (gpu0, gpu1): lower "
               "processes or run it on a machine with more GPUs (or --executor ray)")
    assert job.error == message
    assert Path(job.log_path).read_text() == f"Error: {message}\n"  # nothing ran
    assert Registry(lf_home).list(name="b") == []
    daemon.close()


def test_cancel_and_retry(lf_home, recipes):
    (recipes / "slow.yaml").write_text("name: slow\nseconds: 20\n")
    daemon = make_daemon(lf_home, recipes)
    daemon.start(now=0.0)
    queue = JobQueue(lf_home)
    drive(daemon, lambda: "step 1/400" in log_of(queue, 1), now=0.0)
    result = CliRunner().invoke(cli, ["--home", str(lf_home), "jobs", "cancel", "1"])
    assert result.exit_code == 0 and "the daemon will stop it" in result.output
    drive(daemon, lambda: idle(daemon), now=1.0, timeout=10)
    job = queue.get(1)
    assert (job.status, job.error) == ("cancelled", "cancelled by user")
    assert "interrupted: checkpoint saved" in Path(job.log_path).read_text()

    result = CliRunner().invoke(cli, ["--home", str(lf_home), "jobs", "cancel", "1"])
    assert result.exit_code == 1 and "job 1 is already cancelled" in result.output
    (recipes / "slow.yaml").write_text("name: slow\nseconds: 0.2\n")
    result = CliRunner().invoke(cli, ["--home", str(lf_home), "jobs", "retry", "1"])
    assert result.exit_code == 0 and "job 2 queued (retry of job 1)" in result.output
    drive(daemon, lambda: idle(daemon), now=2.0)
    assert (queue.get(2).status, queue.get(2).retry_of) == ("succeeded", 1)
    result = CliRunner().invoke(cli, ["--home", str(lf_home), "jobs", "logs", "2"])
    assert "train: registered slow:1" in result.output
    result = CliRunner().invoke(cli, ["--home", str(lf_home), "jobs", "show", "99"])
    assert result.exit_code == 1 and "no job with id 99" in result.output
    daemon.close()


def test_restart_requeues_a_running_job_and_stops_the_child_left_behind(lf_home, recipes):
    recipe = recipes / "r.yaml"
    recipe.write_text("name: r\nseconds: 0.3\n")
    queue = JobQueue(lf_home)
    job, _ = queue.enqueue(str(recipe), [{"id": "train"}], reason="test")
    queue.claim("cpu")
    # a child of the dead daemon, still running this job
    orphan = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                              env={**os.environ, JOB_ENV: str(job.id)})
    queue.set_pid(job.id, orphan.pid)
    # another job was running too, and the user cancelled it while the daemon was down
    other, _ = queue.enqueue(str(recipes / "other.yaml"), [{"id": "train"}], reason="test")
    queue.claim("gpu1")
    assert queue.cancel(other.id).status == "running"

    daemon = make_daemon(lf_home, recipes)
    daemon.start(now=0.0)
    assert orphan.wait(timeout=10) is not None
    assert queue.get(job.id).status == "queued"
    drive(daemon, lambda: idle(daemon), now=0.0)
    assert [(j.id, j.status, j.attempts) for j in queue.list()] == [(job.id, "succeeded", 2),
                                                                  (other.id, "cancelled", 1)]
    assert [r["version"] for r in Registry(lf_home).list()] == [1]
    daemon.close()


def test_a_plan_longer_than_the_staleness_window_leaves_the_daemon_alive(lf_home, recipes):
    """Planning runs in a polled child, so the heartbeat goes on and `daemon status` sees a live daemon."""
    recipe = recipes / "deep.yaml"
    recipe.write_text("name: deep\nplan_seconds: 2.0\n")
    daemon = make_daemon(lf_home, recipes, poll_interval=0.05)
    daemon.start(now=0.0)
    ticking = threading.Thread(target=daemon.tick, kwargs={"now": 0.0})
    started = time.monotonic()
    ticking.start()
    alive, planning = [], set()
    while ticking.is_alive():
        state = read_status(lf_home, stale_after=1.0)
        alive.append(state["running"])
        planning.add(state["planning"])
        time.sleep(0.1)
    ticking.join()
    assert time.monotonic() - started > 2.0, "the plan must outlast the staleness window"
    assert len(alive) > 10 and all(alive), alive
    assert str(recipe) in planning
    assert [j.step_ids for j in JobQueue(lf_home).list()] == [["train"]]
    daemon.close()


def test_the_loops_clock_moves_on_while_a_plan_runs(lf_home, recipes, monkeypatch):
    """A cancelled job's grace period counts real seconds during a long plan, not the tick's start time."""
    (recipes / "deep.yaml").write_text("name: deep\nplan_seconds: 1.0\n")
    daemon = make_daemon(lf_home, recipes, poll_interval=0.05)
    daemon.start(now=100.0)
    seen = []
    monkeypatch.setattr(daemon, "_reap", lambda now: seen.append(now))
    daemon.tick(now=100.0)
    assert len(seen) > 3 and max(seen) - seen[0] > 0.5 and min(seen) >= 100.0, seen
    daemon.close()


def test_status_shows_a_job_change_at_once_despite_the_heartbeat_rate_limit(lf_home, recipes):
    """The heartbeat is rate-limited, but a job that starts or finishes is in status.json right away."""
    daemon = make_daemon(lf_home, recipes)
    daemon.start(now=0.0)
    daemon.tick(now=0.0)  # a status write: the rate limit now holds back the next ones
    daemon.event("job 7: succeeded (x.yaml)")
    daemon.tick(now=0.0)
    assert "job 7: succeeded (x.yaml)" in [e["message"] for e in read_status(lf_home)["events"]]
    daemon.close()


def test_a_second_daemon_on_the_same_home_is_refused(lf_home, recipes):
    first = make_daemon(lf_home, recipes)
    first.start(now=0.0)
    second = make_daemon(lf_home, recipes)
    with pytest.raises(ConfigError, match=r"another loraforge daemon \(pid \d+\) is running on .*; stop it first"):
        second.run()
    assert read_status(lf_home)["running"], "the refused daemon must not mark the running one stopped"
    first.close()
    assert not read_status(lf_home)["running"]


def test_watchdog_turns_an_editor_save_into_one_change(lf_home, recipes):
    """temp file + rename, several events per save, a swap file: one planned change, one job."""
    daemon = make_daemon(lf_home, recipes, use_watchdog=True)
    daemon.start(now=0.0)
    recipe = recipes / "style.yaml"
    for i in range(3):
        (recipes / ".style.yaml.swp").write_text("swap")
        tmp = recipes / f"style.yaml.tmp{i}"
        tmp.write_text(f"name: style\nseconds: 0.{i + 1}\n")
        os.replace(tmp, recipe)
    (recipes / ".style.yaml.swp").unlink()
    deadline = time.monotonic() + 10
    while str(recipe) not in daemon.debouncer:  # events arrive on watchdog's thread
        assert time.monotonic() < deadline
        daemon.tick(now=0.5)
        time.sleep(0.02)
    time.sleep(0.3)
    daemon.tick(now=0.5)  # trailing events of the same burst
    assert len(daemon.debouncer) == 1
    daemon.tick(now=2.6)
    drive(daemon, lambda: idle(daemon), now=2.6)
    assert [(Path(j.recipe).name, j.status) for j in JobQueue(lf_home).list()] == [("style.yaml", "succeeded")]
    daemon.close()


def test_jobs_logs_follow_streams_until_the_job_ends_and_listings_have_json(lf_home, recipes):
    (recipes / "r.yaml").write_text("name: r\nseconds: 0.5\n")
    daemon = make_daemon(lf_home, recipes)
    daemon.start(now=0.0)
    queue = JobQueue(lf_home)
    drive(daemon, lambda: queue.list(status="running"), now=0.0)
    follower = subprocess.Popen([sys.executable, "-m", "loraforge", "--home", str(lf_home), "jobs", "logs", "1",
                                 "--follow"], stdout=subprocess.PIPE, text=True)
    drive(daemon, lambda: idle(daemon), now=0.0)
    out, _ = follower.communicate(timeout=20)
    assert follower.returncode == 0
    assert "step 10/10" in out and out.rstrip().endswith("train: registered r:1")

    rows = json.loads(CliRunner().invoke(cli, ["--home", str(lf_home), "jobs", "ls", "--json"]).output)
    assert [(r["id"], r["status"], r["recipe"], r["exit_code"]) for r in rows] == [
        (1, "succeeded", str(recipes / "r.yaml"), 0)]
    shown = CliRunner().invoke(cli, ["--home", str(lf_home), "jobs", "show", "1"]).output
    assert "status:           succeeded" in shown and "train (train: inputs changed)" in shown
    daemon.close()
    status = CliRunner().invoke(cli, ["--home", str(lf_home), "daemon", "status"]).output
    assert status.startswith("daemon: not running") and "queue: 0 queued, 0 running, 1 succeeded" in status
    assert "job 1: succeeded (r.yaml)" in status


def test_daemon_command_needs_a_folder_to_watch(tmp_path):
    result = CliRunner().invoke(cli, ["--home", str(tmp_path / "h"), "daemon"])
    assert result.exit_code == 2 and "give at least one --watch DIR" in result.output
    result = CliRunner().invoke(cli, ["--home", str(tmp_path / "h"), "daemon", "--watch", str(tmp_path / "nope")])
    assert result.exit_code == 1 and f"--watch {tmp_path / 'nope'}: no such folder" in result.output
    result = CliRunner().invoke(cli, ["--home", str(tmp_path / "h"), "daemon", "--watch", str(tmp_path),
                                      "--debounce", "soon"])
    assert result.exit_code == 2 and "'soon' is not a duration" in result.output
    result = CliRunner().invoke(cli, ["--home", str(tmp_path / "h"), "daemon", "status"])
    assert result.exit_code == 0 and "daemon: never started" in result.output
