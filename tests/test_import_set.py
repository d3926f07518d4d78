"""Commands that compute nothing import none of torch, diffusers, transformers.

Each command runs in a fresh interpreter (the CLI's `main()` with its arguments in sys.argv), which then
reports the heavy modules found in `sys.modules`. Importing torch alone takes ~2 s; `--help`, registry
reads, recipe validate/plan, a no-op apply, `jobs ls` and `daemon status` must not pay it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from loraforge.home import models_dir

FORBIDDEN = ("torch", "diffusers", "transformers")
# Reported for the failure message: a module of these names imported is a sign of what pulled torch in.
WATCHED = FORBIDDEN + ("peft", "safetensors", "PIL", "watchdog", "loraforge.models.pipeline", "loraforge.ops.lowrank")
REPORT = "IMPORTED-MODULES:"
RUN_CLI = f"""
import json, sys
try:
    from loraforge.cli import main
    main()
finally:
    print({REPORT!r} + json.dumps(sorted(m for m in {WATCHED!r} if m in sys.modules)), file=sys.stderr)
"""
ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "recipes" / "quickstart.yaml"
# A synthetic adapter and a stack of it (a LoRA method plugin): seconds to build on tiny-sd.
TINY_RECIPE = """\
name: tiny
base: builtin:tiny-sd
steps:
  style:
    synthetic: {kind: lora, rank: 2, seed: 3}
  look:
    stack:
      adapters: [{ref: "${style}", weight: 0.5}]
"""


def run(home: Path, *args: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """(the finished process, the watched modules it imported) of `loraforge --home HOME ARGS…`."""
    env = {**os.environ, "LORAFORGE_HOME": str(home), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", RUN_CLI, "--home", str(home), *args], cwd=home.parent,
                          env=env, capture_output=True, text=True, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.startswith(REPORT)]
    assert lines, proc.stdout + proc.stderr
    proc.stderr = "\n".join(line for line in proc.stderr.splitlines() if not line.startswith(REPORT))
    return proc, json.loads(lines[-1][len(REPORT):])


def run_light(home: Path, *args: str, forbidden: tuple[str, ...] = FORBIDDEN) -> subprocess.CompletedProcess:
    """Run a command that must succeed without importing any of `forbidden`."""
    proc, imported = run(home, *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    heavy = [m for m in imported if m in forbidden]
    assert not heavy, f"`loraforge {' '.join(args)}` imported {heavy} (watched modules imported: {imported})"
    return proc


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_sd_path) -> tuple[Path, Path]:
    """(home, recipe): the tiny recipe applied once (this first apply builds, with torch)."""
    root = tmp_path_factory.mktemp("import-set")
    home = root / "home"
    builtin = models_dir(home) / "builtin"
    builtin.mkdir(parents=True)
    (builtin / "tiny-sd").symlink_to(tiny_sd_path, target_is_directory=True)
    recipe = root / "tiny.yaml"
    recipe.write_text(TINY_RECIPE, encoding="utf-8")
    proc, _ = run(home, "recipe", "apply", str(recipe))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 step(s) run" in proc.stdout
    return home, recipe


def test_help(built):
    home, _ = built
    assert "recipe" in run_light(home, "--help").stdout


def test_registry_reads_and_tag(built):
    home, _ = built
    assert "tiny-style" in run_light(home, "registry", "ls").stdout
    assert "tiny-look" in run_light(home, "registry", "ls", "--json").stdout
    assert "tiny-style:1" in run_light(home, "registry", "show", "tiny-style:1").stdout
    assert "tiny-style:1" in run_light(home, "registry", "lineage", "tiny-look:1").stdout
    assert "tiny-style:best -> tiny-style:1" in run_light(home, "registry", "tag", "tiny-style:1", "best").stdout
    assert "tiny-style:1" in run_light(home, "registry", "show", "tiny-style:best").stdout


def test_recipe_validate_plan_and_noop_apply(built):
    home, recipe = built
    assert "valid recipe 'tiny' with 2 steps" in run_light(home, "recipe", "validate", str(recipe)).stdout
    plan = json.loads(run_light(home, "recipe", "plan", str(recipe), "--json").stdout)
    assert [s["status"] for s in plan["steps"]] == ["up-to-date", "up-to-date"]
    assert "0 of 2 steps to run" in run_light(home, "recipe", "plan", str(recipe)).stdout
    lock = recipe.with_name(recipe.name + ".lock")
    before, written = lock.read_text(encoding="utf-8"), lock.stat()
    out = run_light(home, "recipe", "apply", str(recipe)).stdout
    assert "0 step(s) run, 2 up to date" in out
    # The lock already says what this apply would write: it is left as it was, not rewritten (and fsynced).
    assert lock.read_text(encoding="utf-8") == before
    assert (lock.stat().st_ino, lock.stat().st_mtime_ns) == (written.st_ino, written.st_mtime_ns)
    result = json.loads(run_light(home, "recipe", "apply", str(recipe), "--json").stdout)
    assert result["ok"] and [s["action"] for s in result["steps"]] == ["reused", "reused"]


def test_an_illusion_recipe_validates_without_torch(built):
    # Its views are checked by name; the views themselves (tensor transforms) are built when it renders.
    home, _ = built
    recipe = ROOT / "recipes" / "illusion.yaml"
    assert "valid recipe 'illusion'" in run_light(home, "recipe", "validate", str(recipe)).stdout


def test_quickstart_validates_and_plans_without_torch(built):
    # Trainings and renders validate their methods, params and sizes; nothing is built here.
    home, _ = built
    out = run_light(home, "recipe", "validate", str(QUICKSTART)).stdout
    assert "valid recipe 'quickstart' with 2 steps" in out
    plan = json.loads(run_light(home, "recipe", "plan", str(QUICKSTART), "--json").stdout)
    assert [s["kind"] for s in plan["steps"]] == ["train", "render"]
    assert {s["status"] for s in plan["steps"]} == {"stale"}


def test_jobs_and_daemon_status(built):
    # They read the queue and the status file: the file watcher (watchdog) is the running daemon's.
    home, _ = built
    light = FORBIDDEN + ("watchdog",)
    assert "status" in run_light(home, "jobs", "ls", forbidden=light).stdout
    assert "queue: 0 queued" in run_light(home, "daemon", "status", forbidden=light).stdout
    proc, imported = run(home, "jobs", "show", "7")
    assert proc.returncode == 1 and "no job with id 7" in proc.stderr
    assert not [m for m in imported if m in light], imported


def test_an_invalid_recipe_is_refused_without_torch(built):
    home, _ = built
    bad = home.parent / "bad.yaml"
    models = "[{ref: builtin:tiny-sd}, {ref: builtin:tiny-sd}]"
    bad.write_text(f"name: bad\nsteps:\n  m:\n    merge: {{method: nope, models: {models}}}\n", encoding="utf-8")
    proc, imported = run(home, "recipe", "validate", str(bad))
    assert proc.returncode == 1
    assert "unknown checkpoint merge method 'nope'" in proc.stderr
    assert not [m for m in imported if m in FORBIDDEN], imported


@pytest.mark.parametrize("name", ["merge-then-lora", "slider-sweep"])
def test_recipes_with_train_steps_validate_and_plan_without_torch(built, name):
    # The trainer plugins load for their config classes only; what trains (sessions, data, loops) loads when a step runs.
    home, _ = built
    recipe = ROOT / "recipes" / f"{name}.yaml"
    assert f"valid recipe '{name}'" in run_light(home, "recipe", "validate", str(recipe)).stdout
    plan = json.loads(run_light(home, "recipe", "plan", str(recipe), "--json").stdout)
    assert plan["steps"]
