"""`lora fuse` and `lora extract` on Black Forest Labs Flux single files (tiny-flux's transformer written as a BFL
file, plain and under ComfyUI's `model.diffusion_model.` wrapper): fusing into the file equals fusing into the
diffusers folder, converted; the fused file loads with --config and gives the transformer with ΔW added by hand;
extract reads ΔW of to_k, proj_mlp and proj_out out of fused qkv / linear1 and the swapped-free final layer, the
same from a BFL base as from the folder; refusals. diffusers' FluxTransformer2DModel is the consumer."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from loraforge.formats.lora import LoraModule, LoraState
from loraforge.models.flux_single_file import diffusers_to_bfl, write_bfl_file
from loraforge.registry import Registry
from loraforge.registry.resolve import load_adapter
from tests.cli_helpers import refused, run_cli
from tests.test_flux_family import import_state, random_flux_lora, transformer_output, with_deltas

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FLUX = "builtin:tiny-flux"
TRANSFORMER = "transformer/diffusion_pytorch_model.safetensors"
WRAPPER = "model.diffusion_model."
# A fused qkv, a fused linear1, the final layer's swapped adaLN halves, a text projection, a plain rename.
FUSED_MODULES = ("transformer_blocks.0.attn.to_k", "transformer_blocks.1.attn.add_v_proj",
                 "single_transformer_blocks.0.proj_mlp", "single_transformer_blocks.1.attn.to_q", "norm_out.linear",
                 "proj_out", "transformer_blocks.0.norm1.linear", "time_text_embed.timestep_embedder.linear_1")


@pytest.fixture(scope="module")
def bfl(tiny_flux_path, tmp_path_factory) -> dict[str, Path]:
    """tiny-flux's transformer as a plain BFL file and as one under `model.diffusion_model.`."""
    root = tmp_path_factory.mktemp("flux-bfl")
    return {"plain": write_bfl_file(tiny_flux_path, root / "flux.safetensors"),
            "wrapped": write_bfl_file(tiny_flux_path, root / "wrapped.safetensors", wrapper=WRAPPER)}


def header(path: Path) -> list[tuple[str, str]]:
    """(key, dtype) of a safetensors file, in the file's order."""
    with safe_open(path, "pt") as f:
        return [(k, str(f.get_slice(k).get_dtype())) for k in f.keys()]


# ---- fuse ----------------------------------------------------------------------------------------------------

def test_fuse_into_a_bfl_file_equals_fuse_into_the_folder_converted_and_loads_with_config(home, tiny_flux_path, bfl,
                                                                                          tmp_path):
    from loraforge.models.base import locate_base
    from loraforge.models.pipeline import load_pipeline

    state = random_flux_lora(tiny_flux_path, 11, modules=FUSED_MODULES, scale=0.2)
    import_state(home, state, "fl", tmp_path)
    folder = tmp_path / "fused-folder"
    run_cli(home, "lora", "fuse", FLUX, "fl=0.5", "--dtype", "fp32", "-o", str(folder))
    want = diffusers_to_bfl(load_file(folder / TRANSFORMER), wrapper=WRAPPER)
    out = tmp_path / "fused.safetensors"
    result = run_cli(home, "lora", "fuse", str(bfl["wrapped"]), "fl=0.5", "--dtype", "fp32", "-o", str(out))
    assert f"wrote {out}" in result.output
    assert [k for k, _ in header(out)] == [k for k, _ in header(bfl["wrapped"])]  # the base file's names and order
    got = load_file(out)
    for key, tensor in want.items():
        torch.testing.assert_close(got[key], tensor, rtol=1e-6, atol=1e-7, msg=key)
    base = load_file(bfl["wrapped"])
    assert not torch.equal(got[WRAPPER + "double_blocks.0.img_attn.qkv.weight"],
                           base[WRAPPER + "double_blocks.0.img_attn.qkv.weight"])
    assert torch.equal(got[WRAPPER + "img_in.weight"], base[WRAPPER + "img_in.weight"])  # untouched

    loaded = locate_base(str(out), home, digest=False)
    pipe = load_pipeline(loaded, device="cpu", config=tiny_flux_path)
    by_hand = with_deltas(tiny_flux_path, {n: 0.5 * m.delta() for n, m in state.items()})
    expected = transformer_output(by_hand)
    assert not torch.allclose(transformer_output(with_deltas(tiny_flux_path, {})), expected, atol=1e-4)
    torch.testing.assert_close(transformer_output(pipe.transformer), expected, rtol=1e-5,
                               atol=1e-5 * float(expected.abs().max()))


def test_fuse_into_a_bfl_file_keeps_untouched_dtypes_and_registers_a_single_file(home, tiny_flux_path, bfl, tmp_path):
    state = random_flux_lora(tiny_flux_path, 12, modules=("single_transformer_blocks.1.proj_mlp",), scale=0.2)
    import_state(home, state, "one", tmp_path)
    run_cli(home, "lora", "fuse", str(bfl["plain"]), "one=1", "--dtype", "fp16", "--name", "fused")
    manifest = Registry(home).resolve("fused")
    assert manifest.kind == "checkpoint" and manifest.layout == "single_file" and manifest.base.family == "flux"
    out = Registry(home).primary_file(manifest)
    dtypes = dict(header(out))
    assert dtypes == {k: ("F16" if k.startswith("single_blocks.1.linear1.") else d) for k, d in header(bfl["plain"])}
    delta = state["transformer.single_transformer_blocks.1.proj_mlp"].delta()
    rows = load_file(out)["single_blocks.1.linear1.weight"].float()
    base = load_file(bfl["plain"])["single_blocks.1.linear1.weight"]
    hidden = load_file(bfl["plain"])["img_in.weight"].shape[0]
    torch.testing.assert_close(rows[:3 * hidden], base[:3 * hidden].half().float())  # q, k, v rows: only rounded
    torch.testing.assert_close(rows[3 * hidden:], (base[3 * hidden:] + delta).half().float())


def test_fusing_a_text_encoder_module_or_an_sd_adapter_into_a_bfl_file_is_refused(home, tiny_flux_path, bfl,
                                                                                  tmp_path, adapter_file):
    state = random_flux_lora(tiny_flux_path, 13, modules=("transformer_blocks.0.attn.to_q",))
    g = torch.Generator().manual_seed(0)
    state["text_encoder.text_model.encoder.layers.0.self_attn.q_proj"] = LoraModule(
        torch.randn(2, 32, generator=g), torch.randn(32, 2, generator=g), 2.0)
    import_state(home, state, "withte", tmp_path)
    before = Registry(home).list()
    out = tmp_path / "no.safetensors"
    line = refused(run_cli(home, "lora", "fuse", str(bfl["plain"]), "withte=1", "-o", str(out), "--name", "x",
                           ok=False))
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj" in line and "diffusers Flux folder" in line
    line = refused(run_cli(home, "lora", "fuse", str(bfl["plain"]), f"{adapter_file}=1", "-o", str(out), ok=False))
    assert "Flux" in line and "SD" in line
    line = refused(run_cli(home, "lora", "fuse", str(bfl["plain"]), "withte=1", "-o", str(out), "--config",
                           str(tiny_flux_path), ok=False))
    assert "leave --config out" in line
    assert not out.exists() and Registry(home).list() == before


# ---- extract -------------------------------------------------------------------------------------------------

PLANTED = ("transformer_blocks.1.attn.to_k", "proj_out", "single_transformer_blocks.0.proj_mlp", "norm_out.linear")


def test_extract_between_bfl_files_recovers_planted_delta_w_and_a_folder_base_gives_the_same(home, tiny_flux_path,
                                                                                              bfl, tmp_path):
    tuned = tmp_path / "tuned"
    shutil.copytree(tiny_flux_path, tuned)
    weights = tuned / TRANSFORMER
    sd = load_file(weights)
    g = torch.Generator().manual_seed(5)
    deltas = {}
    for name in PLANTED:
        w = sd[f"{name}.weight"]
        deltas[name] = torch.randn(w.shape[0], 2, generator=g) @ torch.randn(2, w.shape[1], generator=g) * 0.05
        sd[f"{name}.weight"] = w + deltas[name]
    from safetensors.torch import save_file

    save_file(sd, weights, {"format": "pt"})
    tuned_bfl = write_bfl_file(tuned, tmp_path / "tuned.safetensors", wrapper=WRAPPER)

    registry = Registry(home)
    adapters = {}
    for label, base in (("bfl", bfl["plain"]), ("folder", FLUX)):
        run_cli(home, "lora", "extract", str(tuned_bfl), "--base", str(base), "--rank", "2", "--name", f"ex-{label}")
        adapters[label], manifest = load_adapter(registry, f"ex-{label}")
        assert manifest.base.family == "flux"
        assert set(adapters[label]) == {f"transformer.{n}" for n in PLANTED}
        for name, delta in deltas.items():
            torch.testing.assert_close(adapters[label][f"transformer.{name}"].delta(), delta, rtol=0, atol=1e-5)
    run_cli(home, "lora", "extract", str(tuned), "--base", str(bfl["wrapped"]), "--rank", "2", "--name", "ex-mixed")
    mixed, _ = load_adapter(registry, "ex-mixed")
    for name in deltas:
        for other in (adapters["bfl"], mixed):
            torch.testing.assert_close(other[f"transformer.{name}"].delta(),
                                       adapters["folder"][f"transformer.{name}"].delta(), rtol=0, atol=1e-6)


def test_extract_refuses_a_bfl_file_against_an_sd_checkpoint_and_a_needless_config(home, tiny_flux_path, bfl):
    line = refused(run_cli(home, "lora", "extract", str(bfl["plain"]), "--base", "builtin:tiny-sd", "--rank", "2",
                           "--name", "bad", ok=False))
    assert "Flux" in line and "SD" in line
    line = refused(run_cli(home, "lora", "extract", str(bfl["plain"]), "--base", str(bfl["wrapped"]), "--rank", "2",
                           "--config", str(tiny_flux_path), "--name", "bad", ok=False))
    assert "leave --config out" in line
    assert "bad" not in [row["name"] for row in Registry(home).list()]
