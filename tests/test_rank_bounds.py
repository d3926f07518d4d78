"""A rank no module can have is refused in one line before any factor is allocated, for every command that
takes `--rank` on existing adapters (resize, extract, LoRA merges); concat, which has no rank, refuses one."""

from __future__ import annotations

import pytest

from loraforge.formats import write_adapter
from loraforge.models.targets import module_shapes
from loraforge.registry import Registry
from loraforge.synthetic import random_lora

from cli_helpers import run_cli as run

TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


@pytest.fixture()
def adapters(home, tiny_sd_path, tmp_path):
    for seed, name in ((1, "a"), (2, "b")):
        state = random_lora(module_shapes(tiny_sd_path), rank=4, components=("unet",), targets=TARGETS, seed=seed)
        path = tmp_path / f"{name}.safetensors"
        write_adapter(state, path, "kohya")
        run(home, "registry", "import", str(path), "--name", name, "--base", "builtin:tiny-sd")
    widest = max(min(shape[0], shape[1]) for name, shape in module_shapes(tiny_sd_path)["unet"].items()
                 if name.rsplit(".", 1)[-1] in {"to_q", "to_k", "to_v"} or name.endswith("to_out.0"))
    return widest


def _refused(result, *words):
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("method", ["svd", "ties", "dare"])
def test_merge_loras_refuses_a_rank_above_every_module(home, adapters, method):
    before = Registry(home).list()
    result = run(home, "merge", "loras", "a=0.5", "b=0.5", "--method", method, "--rank", "100000",
                 "--name", "m", ok=False)
    _refused(result, "rank 100000", f"--rank {adapters} or less")
    assert Registry(home).list() == before
    run(home, "merge", "loras", "a=0.5", "b=0.5", "--method", method, "--rank", str(adapters), "--name", "m")


def test_concat_refuses_a_rank_it_would_ignore(home, adapters):
    result = run(home, "merge", "loras", "a=0.5", "b=0.5", "--method", "concat", "--rank", "4", "--name", "m",
                 ok=False)
    _refused(result, "--rank does not apply to concat", "--method svd")
    assert not Registry(home).exists("m")


def test_resize_refuses_a_rank_above_the_adapters(home, adapters):
    result = run(home, "lora", "resize", "a", "--rank", "100000", "--name", "r", ok=False)
    _refused(result, "rank 100000", "resize only lowers ranks", "--rank 4 or less")
    assert not Registry(home).exists("r")
    run(home, "lora", "resize", "a", "--rank", "2", "--name", "r")
    assert Registry(home).resolve("r").adapter.rank == 2


def test_extract_refuses_a_rank_above_every_layer(home, adapters):
    run(home, "lora", "fuse", "builtin:tiny-sd", "a=1", "--name", "tuned")
    result = run(home, "lora", "extract", "tuned", "--base", "builtin:tiny-sd", "--rank", "100000",
                 "--name", "x", ok=False)
    _refused(result, "rank 100000", "or less")
    assert not Registry(home).exists("x")
