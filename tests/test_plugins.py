"""Plugin loading fails loudly: broken built-in packages, entry points that collide, missing Hub code."""

from __future__ import annotations

import sys
from importlib.metadata import EntryPoint

import pytest

import loraforge.plugins as plugins
from loraforge.errors import PluginError
from loraforge.plugins import MERGE_METHODS, PluginGroup
from loraforge.registry import Registry

from cli_helpers import run_cli


def fake_merge(*args, **kwargs):
    """A third-party merge method."""


def _fake_entry_points(monkeypatch, group: str, eps: list[EntryPoint]) -> None:
    real = plugins.entry_points

    def entry_points(*, group: str = "", **kw):
        return [ep for ep in eps if ep.group == group] if group == wanted else real(group=group, **kw)

    wanted = group
    monkeypatch.setattr(plugins, "entry_points", entry_points)


def _reload(monkeypatch, group: PluginGroup) -> None:
    """Make `group` load again (its built-ins are already registered; entry points are read anew)."""
    group.names()
    monkeypatch.setattr(group, "_loaded", False)
    monkeypatch.setattr(group, "_plugins", dict(group._plugins))


def test_an_entry_point_named_like_a_builtin_is_a_one_line_error(home, monkeypatch):
    _reload(monkeypatch, MERGE_METHODS)
    _fake_entry_points(monkeypatch, "loraforge.merge_methods", [
        EntryPoint("ties", f"{__name__}:fake_merge", "loraforge.merge_methods")])
    result = run_cli(home, "methods", ok=False)
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith("Error: ")
    assert "'ties'" in lines[0] and "test_plugins:fake_merge" in lines[0] and "built-in" in lines[0]
    assert "rename" in lines[0]


def test_a_new_entry_point_is_registered_with_its_source(home, monkeypatch):
    _reload(monkeypatch, MERGE_METHODS)
    _fake_entry_points(monkeypatch, "loraforge.merge_methods", [
        EntryPoint("my_merge", f"{__name__}:fake_merge", "loraforge.merge_methods")])
    result = run_cli(home, "methods", "--json")
    assert '"my_merge"' in result.output and '"test_plugins"' in result.output


def test_an_entry_point_that_cannot_load_is_a_one_line_error(home, monkeypatch):
    _reload(monkeypatch, MERGE_METHODS)
    _fake_entry_points(monkeypatch, "loraforge.merge_methods", [
        EntryPoint("gone", "loraforge_no_such_package:merge", "loraforge.merge_methods")])
    result = run_cli(home, "methods", ok=False)
    assert result.exit_code == 1
    assert result.output.startswith("Error: cannot load merge_methods plugin 'gone'")
    assert len(result.output.strip().splitlines()) == 1


@pytest.fixture
def broken_builtins(tmp_path, monkeypatch):
    """A built-in plugin package whose module needs a dependency that is not installed."""
    package = tmp_path / "broken_methods"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "needs_dep.py").write_text("import loraforge_missing_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "broken_methods", raising=False)
    return "broken_methods"


def test_a_builtin_package_that_fails_to_import_is_an_error_not_an_empty_group(broken_builtins):
    group = PluginGroup("merge_methods", broken_builtins, "checkpoint merge method")
    with pytest.raises(PluginError) as info:
        group.names()
    message = str(info.value)
    assert "broken_methods.needs_dep" in message and "loraforge_missing_dependency" in message
    assert "\n" not in message


def test_a_missing_builtin_package_is_an_empty_group():
    assert PluginGroup("evaluators", "loraforge_no_such_package", "evaluator").names() == []


def test_recipe_validate_refuses_a_method_when_plugins_fail_to_import(home, tmp_path, monkeypatch,
                                                                      broken_builtins):
    monkeypatch.setattr(MERGE_METHODS, "builtin_package", broken_builtins)
    monkeypatch.setattr(MERGE_METHODS, "_loaded", False)
    monkeypatch.setattr(MERGE_METHODS, "_plugins", {})
    recipe = tmp_path / "r.yaml"
    recipe.write_text("steps:\n  m:\n    merge:\n      method: ties\n"
                      "      models: [{ref: builtin:tiny-sd}, {ref: builtin:tiny-sd}]\n")
    result = run_cli(home, "recipe", "validate", str(recipe), ok=False)
    assert result.exit_code == 1
    assert result.output.startswith("Error: ") and "loraforge_missing_dependency" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_recipe_validate_checks_method_names_of_an_empty_group(home, tmp_path, monkeypatch):
    monkeypatch.setattr(MERGE_METHODS, "builtin_package", "loraforge_no_such_package")
    monkeypatch.setattr(MERGE_METHODS, "_loaded", False)
    monkeypatch.setattr(MERGE_METHODS, "_plugins", {})
    recipe = tmp_path / "r.yaml"
    recipe.write_text("steps:\n  m:\n    merge:\n      method: tiess\n"
                      "      models: [{ref: builtin:tiny-sd}, {ref: builtin:tiny-sd}]\n")
    result = run_cli(home, "recipe", "validate", str(recipe), ok=False)
    assert result.exit_code == 1
    assert "unknown checkpoint merge method 'tiess'" in result.output and "none installed" in result.output


def test_publish_fails_loudly_when_the_hub_code_cannot_import(home, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "loraforge.hub.push", None)  # makes `import` raise ImportError
    recipe = tmp_path / "pub.yaml"
    recipe.write_text("steps:\n  style:\n    synthetic: {kind: lora, rank: 2, seed: 3}\n"
                      "publish:\n  - {artifact: ${style}, repo: me/pub-style}\n")
    result = run_cli(home, "recipe", "apply", str(recipe), ok=False)
    assert result.exit_code == 1, result.output
    error = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    # Refused when the recipe is checked, before anything is built.
    assert len(error) == 1 and "publish.0" in error[0] and "loraforge.hub.push" in error[0], result.output
    assert "does not import" in error[0] and "reinstall loraforge" in error[0]
    assert "skipped" not in result.output
    assert Registry(home).list() == []


def test_the_publish_step_fails_when_the_hub_code_cannot_import(monkeypatch):
    from types import SimpleNamespace

    from loraforge.errors import HubError
    from loraforge.recipes.steps.publish import PublishStep

    monkeypatch.setitem(sys.modules, "loraforge.hub.push", None)
    ctx = SimpleNamespace(spec=SimpleNamespace(artifact="pub-style:1", repo="me/pub-style"))
    with pytest.raises(HubError, match=r"cannot publish pub-style:1 to me/pub-style: .*does not import"):
        PublishStep().run(ctx)


# A third-party step kind, as a package would ship it: one class, installed through the
# `loraforge.step_kinds` entry-point group. It draws a solid swatch of `color` (an image artifact).
from pydantic import Field as _Field  # noqa: E402

from loraforge.plugins import STEP_KINDS  # noqa: E402
from loraforge.recipes.step_kind import Spec, SpecReference, StepKind, fill_base  # noqa: E402


class SwatchSpec(Spec):
    color: tuple[int, int, int] = _Field(description="RGB of the swatch.")
    size: int = _Field(4, ge=1)
    base: str | None = None  # only to show a plugin kind's references are resolved like a built-in's


class SwatchStep(StepKind):
    """A solid colour swatch (a test plugin)."""

    spec_class = SwatchSpec

    def output_kind(self, spec):
        return "image"

    def references(self, spec):
        return [SpecReference(("base",), "model", spec.base)]

    def with_defaults(self, spec, defaults):
        return fill_base(spec, defaults)

    def run(self, ctx):
        from PIL import Image

        from loraforge.registry.manifest import Manifest, Provenance

        path = ctx.registry.home / "swatch.png"
        Image.new("RGB", (ctx.spec.size, ctx.spec.size), tuple(ctx.spec.color)).save(path)
        manifest = ctx.stamp(Manifest(name=ctx.output, kind="image", digest="", files=[],
                                      provenance=Provenance(method="swatch", params={"color": list(ctx.spec.color)})))
        return ctx.registry.register(manifest, [(path, "swatch.png")], input_digest=ctx.input_digest)


class SwatchStepV2(SwatchStep):
    """The same plugin after an upgrade that changes its pixels: its version says so."""

    version = 2


def _install_swatch(monkeypatch, cls_name: str = "SwatchStep") -> None:
    _reload(monkeypatch, STEP_KINDS)
    _fake_entry_points(monkeypatch, "loraforge.step_kinds", [
        EntryPoint("swatch", f"{__name__}:{cls_name}", "loraforge.step_kinds")])


SWATCH = """\
name: sw
steps:
  red:
    swatch: {color: [255, 0, 0]}
  style:
    synthetic: {kind: lora, rank: 2, seed: 1}
    after: [red]
"""


def test_a_step_kind_from_an_entry_point_is_planned_and_applied_like_a_builtin(home, tmp_path, monkeypatch):
    import json

    from PIL import Image

    from loraforge.recipes.lock import read_lock

    _install_swatch(monkeypatch)
    listed = json.loads(run_cli(home, "plugins", "--group", "step_kinds", "--json").output)
    assert {"name": "swatch", "source": "test_plugins"}.items() <= next(
        p for p in listed if p["name"] == "swatch").items()
    recipe = tmp_path / "sw.yaml"
    recipe.write_text(SWATCH)
    plan = json.loads(run_cli(home, "recipe", "plan", str(recipe), "--json").output)
    assert [(s["id"], s["kind"], s["status"], s["output"]) for s in plan["steps"]] == [
        ("red", "swatch", "stale", "sw-red"), ("style", "synthetic", "stale", "sw-style")]

    result = run_cli(home, "recipe", "apply", str(recipe))
    assert "red (swatch): built sw-red:1" in result.output
    manifest = Registry(home).resolve("sw-red:1")
    assert manifest.kind == "image" and manifest.provenance.recipe.step == "red"
    # The recipe's base was filled in and resolved like a built-in kind's reference.
    assert "builtin:tiny-sd" in read_lock(recipe)["steps"]["red"]["inputs"]
    assert Image.open(Registry(home).primary_file(manifest)).getpixel((0, 0)) == (255, 0, 0)

    plan = json.loads(run_cli(home, "recipe", "plan", str(recipe), "--json").output)
    assert [s["status"] for s in plan["steps"]] == ["up-to-date", "up-to-date"]


def test_a_malformed_step_kind_or_spec_is_refused_at_its_position(home, tmp_path, monkeypatch):
    _install_swatch(monkeypatch)
    recipe = tmp_path / "sw.yaml"
    recipe.write_text("steps:\n  red:\n    swatch: {color: [255, 0], size: 0}\n")
    result = run_cli(home, "recipe", "validate", str(recipe), ok=False)
    assert result.exit_code == 1
    assert "sw.yaml:3:" in result.output and "steps.red.swatch." in result.output

    _reload(monkeypatch, STEP_KINDS)
    _fake_entry_points(monkeypatch, "loraforge.step_kinds", [
        EntryPoint("blot", f"{__name__}:fake_merge", "loraforge.step_kinds")])
    recipe.write_text("steps:\n  red:\n    blot: {color: [255, 0, 0]}\n")
    result = run_cli(home, "recipe", "validate", str(recipe), ok=False)
    assert result.output.startswith("Error: step kind 'blot' from test_plugins is not a StepKind")
    assert len(result.output.strip().splitlines()) == 1
