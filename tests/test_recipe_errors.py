"""Recipe failures: validate refuses what apply would, a failed apply keeps the old lock, --debug shows the step."""

from __future__ import annotations

import traceback

import pytest
from click.testing import CliRunner

from loraforge.cli import cli
from loraforge.errors import FormatError
from loraforge.registry import Registry

from cli_helpers import run_cli

BAD_IMPORT = """\
steps:
  good:
    synthetic: {kind: lora, seed: 1, rank: 2}
  imp:
    import: {path: ./bad.safetensors, kind: lora}
"""


def test_debug_shows_the_traceback_of_the_failed_step(home, tmp_path):
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(BAD_IMPORT)
    result = CliRunner().invoke(cli, ["--debug", "recipe", "apply", str(recipe)])
    assert isinstance(result.exception, FormatError), result.output  # the step's own error, not a wrapper
    frames = [f.filename.replace("\\", "/") for f in traceback.extract_tb(result.exc_info[2])]
    assert any(f.endswith("loraforge/recipes/steps/import_file.py") for f in frames), frames
    assert any("loraforge/registry/" in f for f in frames), frames  # down to where it was raised
    # Without --debug it stays one line.
    plain = run_cli(home, "recipe", "apply", str(recipe), ok=False)
    assert plain.exit_code == 1
    assert [line for line in plain.output.splitlines() if line.startswith("Error: ")] == [
        f"Error: step 'imp' failed: {result.exception}"]


def test_a_failed_apply_leaves_the_lock_as_it_was(home, tmp_path):
    recipe = tmp_path / "r.yaml"
    lock = tmp_path / "r.yaml.lock"
    recipe.write_text(BAD_IMPORT)
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    assert run_cli(home, "recipe", "apply", str(recipe), ok=False).exit_code == 1
    assert not lock.exists()
    recipe.write_text(BAD_IMPORT.split("  imp:")[0])
    run_cli(home, "recipe", "apply", str(recipe))
    before = lock.read_bytes()
    recipe.write_text(BAD_IMPORT.replace("seed: 1", "seed: 2"))
    assert run_cli(home, "recipe", "apply", str(recipe), ok=False).exit_code == 1
    assert lock.read_bytes() == before
    assert sorted(m.ref for m in Registry(home).iter_manifests()) == ["r-good:1", "r-good:2"]


REFUSED = [
    ("steps:\n  a:\n    synthetic: {kind: lora}\n    output: ../../escape\n", "r.yaml:4:", "'../../escape'"),
    ("steps:\n  " + "a" * 64 + ":\n    synthetic: {kind: lora}\nname: " + "n" * 100 + "\n", "r.yaml:2:",
     "at most 128"),
    ("steps:\n  a:\n    synthetic: {kind: lora}\npublish:\n  - {artifact: '${a}', repo: me/x, privat: true}\n",
     "r.yaml:5:", "'privat'"),
    ("steps:\n  a:\n    synthetic: {kind: lora}\npublish:\n  - {artifact: '${a}', repo: me/x--y..z}\n",
     "r.yaml:5:", "'me/x--y..z'"),
    ("steps:\n  a:\n    synthetic: {kind: lora}\npublish:\n  - {artifact: '${a}', repo: me/" + "x" * 100 + "}\n",
     "r.yaml:5:", "me/xxx"),
]


@pytest.mark.parametrize("text, where, value", REFUSED,
                         ids=["output-escape", "default-output-too-long", "publish-key", "repo-dots", "repo-long"])
def test_validate_refuses_what_apply_would_refuse(home, tmp_path, text, where, value):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    for command in ("validate", "apply"):
        result = run_cli(home, "recipe", command, str(recipe), ok=False)
        assert result.exit_code == 1, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"Error: {tmp_path.resolve()}/{where}"), result.output
        assert value in lines[0]
    assert list(Registry(home).iter_manifests()) == []
    assert not (tmp_path / "r.yaml.lock").exists()
