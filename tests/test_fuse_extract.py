"""Fuse, extract and resize: images match diffusers' own LoRA loading, round trips recover the adapter."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from loraforge.formats import read_adapter, write_adapter
from loraforge.models.base import base_from_path
from loraforge.models.pipeline import generate, load_pipeline
from loraforge.models.targets import module_shapes
from loraforge.registry import Registry
from loraforge.render.adapters import load_pipeline_with_adapters
from loraforge.synthetic import random_lora

from cli_helpers import run_cli as run

TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "q_proj", "v_proj")


@pytest.fixture()
def adapter(tiny_sd_path, tmp_path) -> Path:
    state = random_lora(module_shapes(tiny_sd_path), rank=4, alpha=2.0, components=("unet", "text_encoder"),
                        targets=TARGETS, seed=5, std=0.3)
    path = tmp_path / "style.safetensors"
    write_adapter(state, path, "kohya")
    return path


def test_fused_model_generates_the_image_of_the_loaded_lora(home, adapter, tmp_path):
    out = tmp_path / "fused"
    run(home, "lora", "fuse", "builtin:tiny-sd", f"{adapter}=0.8", "--dtype", "fp32", "-o", str(out))
    registry = Registry(home)
    pipe, _, _ = load_pipeline_with_adapters(registry, "builtin:tiny-sd", [f"{adapter}=0.8"], device="cpu")
    unfused = np.asarray(generate(pipe, "a photo of a cat", seed=3, steps=3), dtype=np.int16)
    fused_pipe = load_pipeline(base_from_path(out, str(out), home=home), device="cpu")
    fused = np.asarray(generate(fused_pipe, "a photo of a cat", seed=3, steps=3), dtype=np.int16)
    base_pipe = load_pipeline(base_from_path(home / "models" / "builtin" / "tiny-sd", "builtin:tiny-sd", home=home),
                              device="cpu")
    plain = np.asarray(generate(base_pipe, "a photo of a cat", seed=3, steps=3), dtype=np.int16)
    assert np.abs(fused - unfused).max() <= 2, "fused and adapter-loaded pipelines must draw the same image"
    assert np.abs(plain - unfused).mean() > 2, "the adapter must visibly change the image for the test to mean anything"


def test_cli_fuse_registers_and_refuses_a_foreign_lora(home, adapter, tiny_sdxl_path, tmp_path):
    run(home, "registry", "import", str(adapter), "--name", "style", "--base", "builtin:tiny-sd")
    run(home, "lora", "fuse", "builtin:tiny-sd", "style:1=0.6", "--name", "baked")
    reg = Registry(home)
    m = reg.resolve("baked")
    assert m.kind == "checkpoint" and m.layout == "diffusers" and m.provenance.method == "fuse"
    base, lora = m.provenance.parents
    assert base.role == "base" and base.ref == "builtin:tiny-sd" and len(base.digest) == 64
    assert (lora.ref, lora.digest, lora.weight) == ("style:1", reg.resolve("style:1").digest, 0.6)

    xl = random_lora(module_shapes(tiny_sdxl_path), rank=2, seed=1)
    write_adapter(xl, tmp_path / "xl.safetensors", "kohya")
    before = reg.list()
    result = run(home, "lora", "fuse", "builtin:tiny-sd", f"{tmp_path / 'xl.safetensors'}=1", "--name", "bad", ok=False)
    assert result.exit_code == 1 and result.output.startswith("Error: ") and len(result.output.strip().splitlines()) == 1
    assert Registry(home).list() == before


def test_extract_recovers_a_fused_lora(home, tiny_sd_path, adapter, tmp_path):
    tuned = tmp_path / "tuned"
    run(home, "lora", "fuse", "builtin:tiny-sd", f"{adapter}=1", "--dtype", "fp32", "-o", str(tuned))
    run(home, "lora", "extract", str(tuned), "--base", "builtin:tiny-sd", "--rank", "4", "--name", "recovered")
    reg = Registry(home)
    m = reg.resolve("recovered")
    assert [(p.role, p.weight) for p in m.provenance.parents] == [("model", 1.0), ("base", -1.0)]
    assert m.provenance.params["rank"] == 4 and m.base.family == "sd1"
    got, _, _ = read_adapter(reg.primary_file(m))
    want, _, _ = read_adapter(adapter)
    assert sorted(got) == sorted(want)  # exactly the adapted modules differ
    for name in want:
        d = want[name].delta()
        assert float((got[name].delta() - d).norm() / d.norm()) < 1e-4, name

    # an energy rule keeps at most the cap, and fewer where the energy is reached early
    run(home, "lora", "extract", str(tuned), "--base", "builtin:tiny-sd", "--rank", "4", "--energy", "0.5",
        "--name", "dyn")
    ranks = read_adapter(reg.primary_file(reg.resolve("dyn")))[0].ranks
    assert max(ranks.values()) <= 4 and min(ranks.values()) < 4

    result = run(home, "lora", "extract", "builtin:tiny-sd", "--base", "builtin:tiny-sd", "--name", "none", ok=False)
    assert result.exit_code == 1 and "nothing to extract" in result.output and not reg.exists("none")


def test_resize_to_rank_and_energy(home, tiny_sd_path, tmp_path):
    state = random_lora(module_shapes(tiny_sd_path), rank=8, alpha=4.0, seed=9)
    write_adapter(state, tmp_path / "big.safetensors", "kohya")
    run(home, "registry", "import", str(tmp_path / "big.safetensors"), "--name", "big", "--base", "builtin:tiny-sd")
    run(home, "lora", "resize", "big:1", "--rank", "3", "--name", "small")
    reg = Registry(home)
    m = reg.resolve("small")
    assert m.adapter.rank == 3 and m.base.family == "sd1"
    assert [(p.ref, p.digest, p.weight) for p in m.provenance.parents] == [("big:1", reg.resolve("big:1").digest, 1.0)]
    small, _, _ = read_adapter(reg.primary_file(m))
    for name in state:
        flat = state[name].delta().double().flatten(1)
        u, s, vh = torch.linalg.svd(flat, full_matrices=False)
        best = (u[:, :3] * s[:3]) @ vh[:3]
        got = small[name].delta().double().flatten(1)
        assert float((got - best).norm() / best.norm()) < 1e-5, name

    run(home, "lora", "resize", "big:1", "--energy", "0.9", "--name", "kept90")
    kept, _, _ = read_adapter(reg.primary_file(reg.resolve("kept90")))
    for name in state:
        s = torch.linalg.svdvals(state[name].delta().double().flatten(1))
        energy = torch.cumsum(s**2, 0) / (s**2).sum()
        r = kept[name].rank
        assert energy[r - 1] >= 0.9 - 1e-9 and (r == 1 or energy[r - 2] < 0.9), name

    result = run(home, "lora", "resize", "big:1", "--name", "x", ok=False)
    assert result.exit_code == 1 and result.output.startswith("Error: ") and not reg.exists("x")
