"""The daemon with the real recipe engine: a LoRA trained from a dataset folder, retrained when it grows."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from PIL import Image

from loraforge.daemon import Daemon, JobQueue
from loraforge.registry import Registry

RECIPE = """\
name: e2e
base: builtin:tiny-sd
steps:
  style:
    train:
      method: lora
      dataset: ./data
      steps: 1
      resolution: 32
      rank: 2
      validation_steps: 1
      validation_prompts: ["a red square"]
"""


def add_image(folder: Path, i: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), (40 * i, 120, 200)).save(folder / f"{i}.png")
    (folder / f"{i}.txt").write_text(f"a red square number {i}")


def run_until_idle(daemon: Daemon, now: float, timeout: float = 240.0) -> None:
    queue = JobQueue(daemon.home)
    deadline = time.monotonic() + timeout
    daemon.tick(now=now)
    while any(w.busy for w in daemon.workers) or queue.list(status="queued"):
        assert time.monotonic() < deadline, f"timed out; events: {list(daemon.events)}"
        time.sleep(0.1)
        daemon.tick(now=now)


@pytest.mark.slow
def test_recipe_training_from_a_dataset_is_rebuilt_when_an_image_is_added(home, tmp_path):
    recipes = tmp_path / "recipes"
    data = recipes / "data"
    for i in (1, 2):
        add_image(data, i)
    (recipes / "e2e.yaml").write_text(RECIPE)
    daemon = Daemon([recipes], home=home, debounce=1.0, grace=30.0, use_watchdog=False)
    daemon.start(now=0.0)
    try:
        run_until_idle(daemon, now=0.0)
        registry = Registry(home)
        jobs = JobQueue(home).list()
        assert [(j.status, j.step_ids) for j in jobs] == [("succeeded", ["style"])], jobs[0].error
        assert [(r["name"], r["version"]) for r in registry.list(kind="lora")] == [("e2e-style", 1)]
        first = registry.resolve("e2e-style:1")
        assert daemon.recipe_watch[str(recipes / "e2e.yaml")] == [str(data)]

        add_image(data, 3)
        assert daemon.notify(data / "3.png", now=5.0) == {str(recipes / "e2e.yaml")}
        run_until_idle(daemon, now=6.5)
        jobs = JobQueue(home).list()
        assert [j.status for j in jobs] == ["succeeded", "succeeded"], jobs[-1].error
        second = registry.resolve("e2e-style:2")
        assert second.provenance.dataset_digest != first.provenance.dataset_digest
        # the new version names the dataset snapshot that holds the new image
        snapshot = next(m for m in registry.iter_manifests()
                        if m.kind == "dataset" and m.digest == second.provenance.dataset_digest)
        assert "3.png" in {f.path for f in snapshot.files}
        assert second.provenance.recipe.input_digest == jobs[1].steps[0]["input_digest"]
        assert [r["version"] for r in registry.list(kind="lora")] == [1, 2]
    finally:
        daemon.close()
