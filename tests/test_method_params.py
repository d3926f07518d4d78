"""Typed method parameters: `--param` and recipe `params:` values are checked by each method's Params model."""

from __future__ import annotations

import pytest

from loraforge.formats import write_adapter
from loraforge.models.targets import module_shapes
from loraforge.plugins import LORA_METHODS, MERGE_METHODS
from loraforge.registry import Registry
from loraforge.synthetic import random_lora

from cli_helpers import run_cli
from cli_helpers import refused as _one_error_line

BAD_CHECKPOINT_PARAMS = [
    ("ties", "density=abc", "density='abc'"),
    ("ties", "density=1.5", "density=1.5"),
    ("ties", "density=true", "density=True"),
    ("dare", "drop_rate=oops", "drop_rate='oops'"),
    ("dare", "drop_rate=1", "drop_rate=1"),
    ("dare", "seed=1.5", "seed=1.5"),
    ("slerp", "epsilon=-1", "epsilon=-1"),
]



@pytest.mark.parametrize("method, param, shown", BAD_CHECKPOINT_PARAMS)
def test_merge_checkpoints_refuses_a_mistyped_param(home, tmp_path, method, param, shown):
    result = run_cli(home, "merge", "checkpoints", "builtin:tiny-sd", "builtin:tiny-sd", "--method", method,
                     "--param", param, "--name", "x", ok=False)
    line = _one_error_line(result)
    assert f"parameter {shown}" in line and f"merge method {method}" in line
    key = param.split("=")[0]
    default = MERGE_METHODS.get(method).Params.model_fields[key].default
    assert f"use e.g. {key}={default}" in line  # the fix
    assert Registry(home).list() == []


@pytest.fixture
def adapter(tmp_path, tiny_sd_path):
    path = tmp_path / "a.safetensors"
    write_adapter(random_lora(module_shapes(tiny_sd_path), rank=2, seed=1), path, "kohya")
    return path


@pytest.mark.parametrize("method, param, shown", [
    ("ties", "density=abc", "density='abc'"),
    ("dare", "drop_rate=oops", "drop_rate='oops'"),
    ("dare", "drop_rate=-0.1", "drop_rate=-0.1"),
    ("ties", "seed=x", "seed='x'"),
    ("ties", "dens=0.2", "dens=0.2"),
])
def test_merge_loras_refuses_a_mistyped_param(home, adapter, method, param, shown):
    result = run_cli(home, "merge", "loras", f"{adapter}=0.5", f"{adapter}=0.5", "--method", method,
                     "--param", param, "--name", "x", ok=False)
    line = _one_error_line(result)
    assert f"LoRA merge method {method}" in line and shown.split("=")[0] in line
    if param.startswith("dens="):
        assert "has no parameter 'dens'" in line and "density" in line
    else:
        assert f"parameter {shown}" in line
    assert Registry(home).list() == []


def test_recipe_validate_refuses_mistyped_params_at_their_line(home, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("steps:\n  a:\n    synthetic: {kind: lora, rank: 2}\n"
                      "  m:\n    lora_merge:\n      method: dare\n      adapters: [{ref: '${a}'}]\n"
                      "      params: {drop_rate: oops}\n")
    line = _one_error_line(run_cli(home, "recipe", "validate", str(recipe), ok=False))
    assert line.startswith(f"Error: {recipe.resolve()}:8:") and "drop_rate='oops'" in line
    recipe.write_text("steps:\n  m:\n    merge:\n      method: ties\n"
                      "      models: [{ref: builtin:tiny-sd}, {ref: builtin:tiny-sd}]\n      params: {density: abc}\n")
    line = _one_error_line(run_cli(home, "recipe", "validate", str(recipe), ok=False))
    assert line.startswith(f"Error: {recipe.resolve()}:6:") and "density='abc'" in line


def test_good_params_are_filled_with_the_models_defaults():
    from loraforge.ops.method_params import method_params

    ties = MERGE_METHODS.get("ties")
    assert method_params("merge method", "ties", ties, {"density": 1}) == {"density": 1.0}
    dare = LORA_METHODS.get("dare")
    assert method_params("LoRA merge method", "dare", dare, {"seed": 3}) == {"drop_rate": 0.9, "seed": 3}
