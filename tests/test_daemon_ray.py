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
from tests import process_helpers
from tests.process_helpers import children_of

# The test environment installs loraforge[ray] (`make test`): without Ray this module fails, never skips.
import ray  # noqa: E402,F401

RAY = Path(sys.executable).with_name("ray")
FAKE = [sys.executable, str(Path(__file__).parent / "daemon_fake_recipe.py")]


def wait_for(what: str, cond, timeout: float = 40.0, proc: subprocess.Popen | None = None, log: Path | None = None):
    return process_helpers.wait_for(what, cond, timeout, proc, log)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    """A one-node Ray cluster with 2 CPUs (two jobs at once), stopped whatever happens. `ray start --block` holds
    its processes: a SIGTERM to it stops this cluster alone (`ray stop --force` would stop every Ray cluster of
    the machine, a user's own included)."""
    temp = Path(tempfile.mkdtemp(prefix="lfray"))  # short: Ray's socket paths live under it
    port = free_port()
    env = dict(os.environ, LORAFORGE_RAY_CACHE=str(temp / "cache"), RAY_USAGE_STATS_ENABLED="0")
    start = [str(RAY), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port),
             "--num-cpus", "2", "--disable-usage-stats", "--include-dashboard=false",
             "--object-store-memory", "100000000", "--temp-dir", str(temp / "ray")]
    head = subprocess.Popen(start, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        wait_for("the Ray head to listen", lambda: _listening(port), timeout=60, proc=head)
        yield {"address": f"127.0.0.1:{port}", "cache": temp / "cache"}
    finally:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        shutil.rmtree(temp, ignore_errors=True)


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


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


def test_a_retry_that_lost_its_scratch_home_resumes_from_the_checkpoint_uploaded_to_the_head(cluster, env):
    home, recipes, daemons = env
    (recipes / "a.yaml").write_text("name: zeta\nseconds: 3\n")
    daemon = RayDaemon(home, recipes, cluster["address"])
    daemons.append(daemon)
    wait_for("a checkpoint at the head", lambda: "step 15/60" in job_log(home, 1)
             and "head: stored checkpoint" in job_log(home, 1), proc=daemon.proc, log=daemon.log)
    (pid,) = worker_pids(job_log(home, 1))
    trainers = children_of(pid)
    assert trainers
    # As if the node were gone: freeze the worker and its trainer, delete the job's scratch home, kill both.
    for p in (pid, *trainers):
        os.kill(p, signal.SIGSTOP)
    (scratch,) = (cluster["cache"] / "jobs").glob("job1-*")
    shutil.rmtree(scratch)
    for p in (pid, *trainers):
        os.kill(p, signal.SIGKILL)
    wait_for("the job to finish", lambda: status_of(home, 1) in ("succeeded", "failed"), proc=daemon.proc,
             log=daemon.log)
    text = job_log(home, 1)
    assert status_of(home, 1) == "succeeded", text[-2000:]
    first, retry = text.split("--- ray task on node", 2)[1:]
    stored = [int(line.split("/step-", 1)[1].split()[0]) for line in first.splitlines()
              if line.startswith("head: stored checkpoint")]
    assert stored and stored == sorted(stored)
    restored = int(retry.split("--- restored checkpoint ", 1)[1].split("/step-", 1)[1].split()[0])
    resumed = int(retry.split("resumed from step ", 1)[1].split()[0])
    assert resumed == restored >= stored[-1] >= 1  # the newest upload, not step 0
    assert versions(home, "zeta") == [1]
    assert not (home / "daemon" / "ray-checkpoints" / "job1").exists()  # deleted once the bundle is registered
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
    assert "head: the task resumes from checkpoint " in text  # the checkpoint the first head stored, offered again
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
    assert not (home / "daemon" / "ray-checkpoints" / "job1").exists()  # cancelled: its upload is deleted
    assert daemon.stop() == 0


def run_real_daemon_job(home: Path, recipes: Path, cluster) -> None:
    """Run the daemon with its default command (the real recipe engine) on the Ray cluster until job 1 ends, which
    must succeed, and stop it with SIGTERM."""
    daemon = subprocess.Popen(
        [sys.executable, "-m", "loraforge", "--home", str(home), "daemon", "--watch", str(recipes), "--executor", "ray",
         "--ray-address", cluster["address"], "--debounce", "0.2s"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        wait_for("the job to finish", lambda: status_of(home, 1) in ("succeeded", "failed"), timeout=90, proc=daemon)
        assert status_of(home, 1) == "succeeded", job_log(home, 1)[-2000:]
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=40) == 0


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
    run_real_daemon_job(home, recipes, cluster)
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


SHIPPED_RECIPE = """\
name: shipped
base: builtin:tiny-sd
steps:
  look:
    render: {prompts: [a cat], steps: 1, size: 16, seeds: [1], adapters: [{ref: style:2, weight: 0.8}]}
"""


@pytest.mark.slow  # the real recipe engine renders one 16 px image with a LoRA: about 20 s on 2 cores
def test_a_registry_artifact_only_the_head_holds_is_shipped_and_the_lock_comes_back(cluster, env, monkeypatch,
                                                                                     tiny_sd_path):
    from loraforge.formats import write_adapter
    from loraforge.models.targets import module_shapes
    from loraforge.synthetic import random_lora

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    home, recipes, daemons = env
    for seed in (3, 4):  # style:1 and style:2: the recipe names the second, which the workers never saw
        adapter = recipes.parent / f"style{seed}.safetensors"
        write_adapter(random_lora(module_shapes(tiny_sd_path), rank=2, seed=seed), adapter, "kohya")
        out = subprocess.run([sys.executable, "-m", "loraforge", "--home", str(home), "registry", "import",
                              str(adapter), "--name", "style", "--kind", "lora"], capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0, out.stderr
    style = Registry(home).resolve("style:2")
    (recipes / "shipped.yaml").write_text(SHIPPED_RECIPE)
    run_real_daemon_job(home, recipes, cluster)
    assert "1 registry artifact(s)" in job_log(home, 1)
    assert versions(home, "shipped-look") == [1] and versions(home, "style") == [1, 2]  # style not registered again
    image = Registry(home).resolve("shipped-look:1")
    parents = {(p.ref, p.digest) for p in image.provenance.parents}
    assert ("style:2", style.digest) in parents  # rendered with the head's style:2, by name, version and content
    lineage = Registry(home).lineage("shipped-look:1")
    assert any(n.ref == "style:2" and n.kind == "lora" for n in lineage.children)
    # The lock the remote apply wrote is next to the head's recipe, in the head's terms.
    lock = (recipes / "shipped.yaml.lock").read_text()
    assert "output: shipped-look:1" in lock and "pinned: style:2" in lock and str(cluster["cache"]) not in lock
    plan = subprocess.run([sys.executable, "-m", "loraforge", "--home", str(home), "recipe", "plan",
                           str(recipes / "shipped.yaml"), "--json"], capture_output=True, text=True, timeout=120)
    data = json.loads(plan.stdout)
    assert [(s["id"], s["status"]) for s in data["steps"]] == [("look", "up-to-date")]  # the head's digests match
    assert {a["ref"] for a in data["artifacts"]} == {"style:2", "shipped-look:1"}


def _report(registry: Registry, folder: Path, name: str, text: str, input_digest: str, parents=(), params=None) -> str:
    from loraforge.registry import Manifest, Provenance, RecipeInfo
    from loraforge.registry.manifest import Parent

    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}-{input_digest}.txt").write_text(text)
    recipe = RecipeInfo(name="r", path="/scratch/r.yaml", digest="d", step=name, input_digest=input_digest)
    manifest = Manifest(name=name, kind="report", digest="", files=[], provenance=Provenance(
        recipe=recipe, parents=[Parent(ref=ref, digest=digest) for ref, digest in parents], params=params or {}))
    made = registry.register(manifest, [(folder / f"{name}-{input_digest}.txt", "report.txt")], input_digest=input_digest)
    return made.ref


def test_a_bundle_registered_where_the_head_has_more_versions_points_its_lineage_and_lock_at_the_head_versions(
        tmp_path):
    from loraforge.daemon.bundle import collect_bundle, import_artifacts, register_bundle, write_head_lock

    head, scratch = Registry(tmp_path / "head"), Registry(tmp_path / "scratch")
    for i in (1, 2):  # the head already holds merged:1 and merged:2 from other inputs
        _report(head, tmp_path / "files", "merged", f"old {i}", f"old{i}")
    shared = _report(head, tmp_path / "files", "source", "shared input", "src")
    # The job imports the head's source:1 as source:1, then makes merged:1 and child:1 (child's parent: merged:1).
    def blob(digest, box):
        return head.blobs.path(digest)
    item = {"manifest": head.resolve(shared).to_json(), "input_digest": "src", "aliases": [],
            "blobs": {f.path: (f.sha256, []) for f in head.resolve(shared).files}}
    assert import_artifacts(scratch, [item], blob) == ["source:1"]
    assert import_artifacts(scratch, [item], blob) == ["source:1"]  # a retried task keeps what it imported
    merged = _report(scratch, tmp_path / "files", "merged", "new", "new", parents=[("source:1", None)])
    assert merged == "merged:1"
    child = _report(scratch, tmp_path / "files", "child", "child", "kid",
                    parents=[(merged, scratch.resolve(merged).digest)],
                    params={"adapters": [{"ref": merged, "weight": 1.0}], "prompt": "merged:1 is a prompt too"})
    bundle = collect_bundle(scratch.home, skip=frozenset({"source:1"}))
    assert [json.loads(i.manifest_json)["name"] for i in bundle] == ["merged", "child"]

    report = register_bundle(head, bundle, recipe_path=str(tmp_path / "r.yaml"))
    assert report.registered == ["merged:3", "child:1"] and report.renamed == {"merged:1": "merged:3", child: "child:1"}
    got = head.resolve("child:1")
    assert [p.ref for p in got.provenance.parents] == ["merged:3"]
    assert got.provenance.params == {"adapters": [{"ref": "merged:3", "weight": 1.0}],
                                     "prompt": "merged:1 is a prompt too"}  # only whole refs are renumbered
    tree = head.lineage("child:1")
    (node,) = tree.children
    assert (node.ref, node.kind) == ("merged:3", "report")  # found at the head, not an external leaf
    assert [(c.ref, c.kind) for c in node.children] == [("source:1", "report")]
    # A second registration of the same bundle (a retried task) adds nothing and still maps the refs.
    again = register_bundle(head, bundle)
    assert again.registered == [] and again.renamed == report.renamed

    lock = ("lock_version: 1\nreferences:\n  ./data:\n    kind: path\n    digest: x\n    path: /node/tree/data\n"
            "steps:\n  merge:\n    output: merged:1\n  kid:\n    output: child:1\n")
    written = write_head_lock(tmp_path / "r.yaml", lock, "/node/tree", tmp_path / "recipes", report.renamed)
    text = written.read_text()
    assert written == tmp_path / "r.yaml.lock"
    assert f"path: {tmp_path / 'recipes' / 'data'}" in text and "output: merged:3" in text and "/node/tree" not in text


def test_an_imported_version_the_scratch_home_already_holds_differently_is_refused(tmp_path):
    from loraforge.errors import ConfigError
    from loraforge.registry import Manifest

    registry = Registry(tmp_path / "home")
    ref = _report(registry, tmp_path / "files", "merged", "one", "a")
    manifest = registry.resolve(ref)
    other = tmp_path / "other.txt"
    other.write_text("two")
    with pytest.raises(ConfigError, match="merged:1 already exists: versions are immutable"):
        registry.register(manifest, [(other, "report.txt")], version=1)
    assert versions(tmp_path / "home", "merged") == [1]
    kept = registry.register(manifest, [(other, "report.txt")], version=5)
    assert kept.ref == "merged:5" and registry.resolve("merged").ref == "merged:5"


def test_the_head_ships_a_planned_version_with_its_aliases_and_refuses_one_removed_or_changed_since(tmp_path):
    from loraforge.daemon.ray_executor import job_artifacts
    from loraforge.errors import ConfigError

    class Store:  # stands in for the cluster's object store: records what was put, by digest
        def __init__(self):
            self.put: dict[str, Path] = {}

        def put_file(self, path: Path, digest: str | None = None):
            self.put[digest] = path
            return digest, ["ref"]

    registry = Registry(tmp_path / "home")
    ref = _report(registry, tmp_path / "files", "style", "one", "a")
    registry.tag(ref, "prod")
    manifest = registry.resolve(ref)
    store = Store()
    (shipped,) = job_artifacts(registry, store, [{"ref": ref, "digest": manifest.digest}])
    assert shipped["aliases"] == ["prod"] and shipped["input_digest"] == "a"
    assert shipped["blobs"] == {"report.txt": (manifest.files[0].sha256, ["ref"])}
    assert store.put == {manifest.files[0].sha256: registry.blob_path(manifest.files[0])}  # not hashed again
    with pytest.raises(ConfigError, match="style:1 changed since the recipe was planned"):
        job_artifacts(registry, store, [{"ref": ref, "digest": "0" * 64}])
    registry.remove(ref)
    with pytest.raises(ConfigError, match="style:1 is no longer in the registry"):
        job_artifacts(registry, store, [{"ref": ref, "digest": manifest.digest}])


class FakeCluster:
    """What RayWorker.resources reads of a cluster: its GPUs and its largest node."""

    def __init__(self, nodes: list[dict[str, float]]):
        self.nodes = nodes

    def gpus(self) -> int:
        return int(sum(n.get("GPU", 0) for n in self.nodes))

    def largest_node(self, unit: str) -> int:
        return int(max(n.get(unit, 0) for n in self.nodes))


@pytest.mark.parametrize("nodes, steps, wanted", [
    ([{"CPU": 8, "GPU": 4}], [{"id": "t", "kind": "train", "processes": 4}], {"num_gpus": 4, "num_cpus": 1}),
    ([{"CPU": 8, "GPU": 4}], [{"id": "t", "kind": "train"}], {"num_gpus": 1, "num_cpus": 1}),
    ([{"CPU": 8, "GPU": 4}], [{"id": "m", "kind": "merge"}], {"num_cpus": 1}),
    ([{"CPU": 4}], [{"id": "t", "kind": "train", "processes": 2}], {"num_cpus": 2}),
    ([{"CPU": 8, "GPU": 2}, {"CPU": 8, "GPU": 2}], [{"id": "t", "kind": "train", "processes": 4}],
     "step 't' trains on processes: 4, which needs 4 GPUs on one node; the cluster's largest node has 2"),
])
def test_a_job_asks_ray_for_a_gpu_per_training_process_on_one_node(nodes, steps, wanted):
    from loraforge.daemon.queue import Job
    from loraforge.daemon.ray_executor import RayWorker
    from loraforge.daemon.worker import WorkerSpec
    from loraforge.errors import ConfigError

    worker = RayWorker(WorkerSpec("ray0"), FakeCluster(nodes), Path("."), lambda job: [], [])
    job = Job(id=1, recipe="r.yaml", status="queued", created_at="", steps=steps)
    if isinstance(wanted, str):
        with pytest.raises(ConfigError, match=wanted):
            worker.resources(job)
    else:
        assert worker.resources(job) == wanted


def test_the_plan_names_the_processes_a_train_step_asks_for(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "r.yaml").write_text("name: r\nsteps:\n  big:\n    train: {method: lora, dataset: ./data, "
                                     "instance_prompt: a cat, processes: 2, batch_size: 2}\n"
                                     "  small:\n    train: {method: lora, dataset: ./data, instance_prompt: a dog}\n")
    out = subprocess.run([sys.executable, "-m", "loraforge", "--home", str(tmp_path / "home"), "recipe", "plan",
                          str(tmp_path / "r.yaml"), "--json"], capture_output=True, text=True, timeout=120)
    steps = {s["id"]: s for s in json.loads(out.stdout)["steps"]}
    assert steps["big"]["processes"] == 2 and "processes" not in steps["small"]
