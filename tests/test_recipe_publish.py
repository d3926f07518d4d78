"""A recipe's `publish:` block pushes the built artifact to the Hub after its step succeeds."""

from __future__ import annotations

from click.testing import CliRunner

from loraforge.cli import cli
from loraforge.registry import Registry

from test_hub import TOKEN, files_contain, hub  # noqa: F401  (the local Hub fixture)

RECIPE = """
name: pub
base: builtin:tiny-sd
steps:
  style:
    synthetic: {kind: lora, rank: 2, seed: 3}
  broken:
    train: {method: lora, dataset: ./bad-data, steps: 1, resolution: 32}
publish:
  - {artifact: ${style}, repo: me/pub-style}
  - {artifact: ${broken}, repo: me/pub-broken}
"""


def test_publish_runs_after_its_step_and_only_then(home, hub, tmp_path):  # noqa: F811
    recipe = tmp_path / "pub.yaml"
    recipe.write_text(RECIPE)
    (tmp_path / "bad-data").mkdir()
    (tmp_path / "bad-data" / "broken.png").write_bytes(b"not a png")
    result = CliRunner().invoke(cli, ["recipe", "apply", str(recipe)])
    assert result.exit_code == 1, result.output  # the broken step fails the apply …
    assert "broken.png" in result.output
    manifest = Registry(home).resolve("pub-style")
    repo = hub.state.repos["me/pub-style"]  # … but the finished step was published
    assert f"v{manifest.version}" in repo.tags
    files = repo.commits[repo.tags[f"v{manifest.version}"]].files
    assert {"pytorch_lora_weights.safetensors", "loraforge.json", "README.md"} <= set(files)
    assert "me/pub-broken" not in hub.state.repos
    assert not files_contain(home, TOKEN.encode())
    assert TOKEN not in result.output


def test_no_publish_flag_pushes_nothing(home, hub, tmp_path):  # noqa: F811
    recipe = tmp_path / "pub.yaml"
    recipe.write_text(RECIPE.replace("  - {artifact: ${broken}, repo: me/pub-broken}\n", "")
                      .split("  broken:")[0] + "publish:\n  - {artifact: ${style}, repo: me/pub-style}\n")
    result = CliRunner().invoke(cli, ["recipe", "apply", str(recipe), "--no-publish"])
    assert result.exit_code == 0, result.output
    assert "me/pub-style" not in hub.state.repos
