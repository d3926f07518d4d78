"""kill -9 at every write point of a registration and of a checkpoint merge.

Each case runs the real command in a child process with `LORAFORGE_FAULT=<point>` (see
loraforge.faults), so the child SIGKILLs itself exactly there. Afterwards the registry must verify
clean, hold no version or one whole version, `gc` must remove the blobs and scratch files the
child left, and running the command again must give exactly one version, equal to a clean run's.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from loraforge.faults import POINTS
from loraforge.home import models_dir, tmp_dir
from loraforge.registry import Registry

from cli_helpers import run_cli as run

COMMITTED = {"register-after-transaction"}  # the kill comes after the version is in the catalog


def commands(tiny_sd_path: Path) -> dict[str, tuple[str, ...]]:
    return {
        "import": ("registry", "import", str(tiny_sd_path), "--name", "art", "--kind", "checkpoint"),
        "merge": ("merge", "checkpoints", "builtin:tiny-sd", "builtin:tiny-sd", "--alpha", "0.3",
                  "--name", "art"),
    }


@pytest.fixture(scope="module")
def reference_digests(tmp_path_factory, tiny_sd_path) -> dict[str, str]:
    """What each command registers when nothing goes wrong."""
    digests = {}
    for label, args in commands(tiny_sd_path).items():
        home = tmp_path_factory.mktemp(f"reference-{label}")
        (models_dir(home) / "builtin").mkdir(parents=True)
        (models_dir(home) / "builtin" / "tiny-sd").symlink_to(tiny_sd_path, target_is_directory=True)
        run(home, *args)
        digests[label] = Registry(home).resolve("art").digest
    return digests


def versions(home: Path) -> list[tuple[int, str]]:
    rows = json.loads(run(home, "registry", "ls", "--json").output)
    return [(r["version"], r["digest"]) for r in rows if r["name"] == "art"]


def stored_blobs(home: Path) -> set[str]:
    return {p.name for p in (home / "blobs" / "sha256").rglob("*") if p.is_file()}


def referenced_blobs(home: Path) -> set[str]:
    return {row[0] for row in Registry(home).db.execute("SELECT sha256 FROM files").fetchall()}


def scratch_left(home: Path) -> list[Path]:
    """Everything under the home's temp folder that this (live) test process does not own."""
    ours = tmp_dir(home)
    return [p for p in (home / "tmp").rglob("*") if p != ours and ours not in p.parents]


# A merge's files are written in the scratch folder and moved into the store whole: no blob is half copied.
NOT_PASSED = {("merge", "blob-partial")}
CASES = [(label, point) for label in ("import", "merge") for point in POINTS if (label, point) not in NOT_PASSED]


@pytest.mark.parametrize("label,point", CASES)
def test_kill_at_write_point_then_verify_gc_and_rerun(home, tiny_sd_path, reference_digests, label, point):
    args = commands(tiny_sd_path)[label]
    env = {**os.environ, "LORAFORGE_HOME": str(home), "LORAFORGE_FAULT": point}
    killed = subprocess.run([sys.executable, "-m", "loraforge", *args], env=env, capture_output=True,
                            text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]

    expected = [(1, reference_digests[label])] if point in COMMITTED else []
    assert versions(home) == expected
    assert run(home, "registry", "verify").output.endswith("ok\n")
    left = scratch_left(home)
    if point.startswith("blob-"):
        assert any(p.name.startswith("blob-") for p in left), "the half-stored blob should be in scratch"
    if label == "merge":
        assert any(p.name.startswith("merge-") for p in left), "the merge's staging folder should be left"

    gc = run(home, "registry", "gc").output
    assert scratch_left(home) == []
    if left:
        assert "removed 1 stale temp entry" in gc
    assert stored_blobs(home) == referenced_blobs(home)
    assert run(home, "registry", "verify").output.endswith("ok\n")

    if point not in COMMITTED:
        run(home, *args)
    assert versions(home) == [(1, reference_digests[label])]
    assert run(home, "registry", "verify").output.endswith("ok\n")


def test_kill_after_a_recipe_import_commits_keeps_its_input_digest_and_the_next_apply_reuses_it(home, tmp_path,
                                                                                                 tiny_sd_path):
    """A recipe's facts go in with the version, so a kill right after the commit loses none of them."""
    from loraforge.formats import write_adapter
    from loraforge.models.targets import module_shapes
    from loraforge.synthetic import random_lora

    write_adapter(random_lora(module_shapes(tiny_sd_path), rank=2, seed=1), tmp_path / "x.safetensors", "kohya")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("steps:\n  x:\n    import: {path: ./x.safetensors, kind: lora}\n")
    env = {**os.environ, "LORAFORGE_HOME": str(home), "LORAFORGE_FAULT": "register-after-transaction"}
    killed = subprocess.run([sys.executable, "-m", "loraforge", "recipe", "apply", str(recipe)], env=env,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]

    registered = Registry(home).resolve("r-x")
    assert registered.version == 1
    assert registered.provenance.recipe is not None and registered.provenance.source == "recipe:r#x"
    applied = json.loads(run(home, "recipe", "apply", str(recipe), "--json").stdout)
    assert [(s["id"], s["action"]) for s in applied["steps"]] == [("x", "reused")]
    assert [r["version"] for r in Registry(home).list(name="r-x")] == [1]


@pytest.mark.parametrize("extra", [(), ("--name", "art")], ids=["output", "output-and-name"])
def test_kill_while_a_merge_writes_its_output_leaves_no_output_only_a_partial_beside_it(home, tmp_path, extra):
    """`-o OUT` is staged beside OUT and renamed on when complete: a kill mid-write leaves OUT absent (never
    half a checkpoint) and one `.partial` entry that names OUT, registers nothing, and a rerun writes OUT."""
    out = tmp_path / "out" / "merged"
    args = ("merge", "checkpoints", "builtin:tiny-sd", "builtin:tiny-sd", "--alpha", "0.3", "-o", str(out), *extra)
    env = {**os.environ, "LORAFORGE_HOME": str(home), "LORAFORGE_FAULT": "merge-output-partial"}
    killed = subprocess.run([sys.executable, "-m", "loraforge", *args], env=env, capture_output=True, text=True,
                            timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    left = sorted(p.name for p in out.parent.iterdir())
    assert len(left) == 1 and left[0].startswith("merged.") and left[0].endswith(".partial"), left
    assert versions(home) == []

    run(home, *args)
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert sorted(p.name for p in out.parent.iterdir()) == ["merged", left[0]]
