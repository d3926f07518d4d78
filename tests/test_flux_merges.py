"""Flux checkpoint merges on builtin:tiny-flux variants, as diffusers folders and as Black Forest Labs single files:
numbers vs direct computation, block weights over double and single blocks, the VAE and text encoders left alone
by default, refusals; the BFL ⇄ diffusers conversion against diffusers' own converter on FLUX.1-dev widths; a BFL
file loaded as a pipeline with --config. diffusers' FluxPipeline and its converter are the consumer and oracle."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from loraforge.models.flux_single_file import bfl_to_diffusers, diffusers_to_bfl, write_bfl_file
from loraforge.synthetic import perturbed_checkpoint
from sparsify_reference import ties_reference
from tests.cli_helpers import refused, run_cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TRANSFORMER = "transformer/diffusion_pytorch_model.safetensors"
TEXT_FILES = ("text_encoder/model.safetensors", "text_encoder_2/model.safetensors")
VAE = "vae/diffusion_pytorch_model.safetensors"
WRAPPER = "model.diffusion_model."


@pytest.fixture(scope="module")
def flux(builtin_home, tmp_path_factory) -> dict[str, Path]:
    """tiny-flux (a), two perturbed copies (b: every component, c: the transformer) and BFL files of a and b
    (b's under ComfyUI's `model.diffusion_model.` wrapper)."""
    from loraforge.models.builtin import ensure_builtin

    root = tmp_path_factory.mktemp("flux-variants")
    a = ensure_builtin("tiny-flux", builtin_home)
    b = perturbed_checkpoint(a, root / "b", seed=1, scale=0.05,
                             components=("transformer", "text_encoder", "text_encoder_2", "vae"))
    c = perturbed_checkpoint(a, root / "c", seed=2, scale=0.05, components=("transformer",))
    return {"a": a, "b": b, "c": c, "a_bfl": write_bfl_file(a, root / "a.safetensors"),
            "b_bfl": write_bfl_file(b, root / "b.safetensors", wrapper=WRAPPER)}


@pytest.fixture
def fhome(home, flux) -> Path:
    target = home / "models" / "builtin" / "tiny-flux"
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        target.symlink_to(flux["a"], target_is_directory=True)
    return home


def transformer(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in load_file(Path(folder) / TRANSFORMER).items()}


def merge(home: Path, *args: str) -> None:
    run_cli(home, "merge", "checkpoints", *args, "--dtype", "fp32")


# ---- the conversion ------------------------------------------------------------------------------------------

DEV_HIDDEN, DEV_MLP, DEV_HEAD = 3072, 12288, 128
_DEV_ROWS = {  # BFL module → its rows on FLUX.1-dev; every weight gets 2 columns (thin), norms their head width
    "img_in": DEV_HIDDEN, "txt_in": DEV_HIDDEN, "time_in.in_layer": DEV_HIDDEN, "time_in.out_layer": DEV_HIDDEN,
    "vector_in.in_layer": DEV_HIDDEN, "vector_in.out_layer": DEV_HIDDEN, "guidance_in.in_layer": DEV_HIDDEN,
    "guidance_in.out_layer": DEV_HIDDEN, "final_layer.linear": 64, "final_layer.adaLN_modulation.1": 2 * DEV_HIDDEN,
    **{f"double_blocks.0.{s}_{p}": r for s in ("img", "txt") for p, r in (
        ("attn.qkv", 3 * DEV_HIDDEN), ("attn.proj", DEV_HIDDEN), ("mlp.0", DEV_MLP), ("mlp.2", DEV_HIDDEN),
        ("mod.lin", 6 * DEV_HIDDEN))},
    "single_blocks.0.linear1": 3 * DEV_HIDDEN + DEV_MLP, "single_blocks.0.linear2": DEV_HIDDEN,
    "single_blocks.0.modulation.lin": 3 * DEV_HIDDEN,
}


def dev_width_bfl(seed: int = 0) -> dict[str, torch.Tensor]:
    """A FLUX.1-dev-width BFL transformer of 1 double and 1 single block, thin: full rows, 2 columns."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, rows in _DEV_ROWS.items():
        state[f"{name}.weight"] = torch.randn(rows, 2, generator=g)
        state[f"{name}.bias"] = torch.randn(rows, generator=g)
    for block in ("double_blocks.0.img_attn", "double_blocks.0.txt_attn", "single_blocks.0"):
        for norm in ("query_norm", "key_norm"):
            state[f"{block}.norm.{norm}.scale"] = torch.randn(DEV_HEAD, generator=g)
    return state


def test_bfl_to_diffusers_equals_diffusers_converter_on_dev_widths_and_round_trips_exactly():
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    bfl = dev_width_bfl()
    assert "double_blocks.0.img_attn.qkv.weight" in bfl and "double_blocks.0.txt_mlp.0.bias" in bfl
    want = convert_flux_transformer_checkpoint_to_diffusers(copy.copy(bfl))
    for state in (bfl, {WRAPPER + k: v for k, v in bfl.items()}):
        got = bfl_to_diffusers(state)
        assert sorted(got) == sorted(want)
        for key in want:
            assert torch.equal(got[key], want[key]), key
    assert torch.equal(want["norm_out.linear.bias"][:DEV_HIDDEN], bfl["final_layer.adaLN_modulation.1.bias"][DEV_HIDDEN:])
    back = diffusers_to_bfl(want)
    assert sorted(back) == sorted(bfl) and all(torch.equal(back[k], bfl[k]) for k in bfl)
    wrapped = diffusers_to_bfl(want, wrapper=WRAPPER)
    assert all(torch.equal(wrapped[WRAPPER + k], bfl[k]) for k in bfl)


def test_a_bfl_file_of_tiny_flux_round_trips_and_an_unknown_tensor_is_refused(flux):
    from loraforge.errors import FormatError

    bfl = load_file(flux["a_bfl"])
    assert "double_blocks.1.img_attn.qkv.weight" in bfl and "single_blocks.1.linear1.weight" in bfl
    own = load_file(flux["a"] / TRANSFORMER)
    back = bfl_to_diffusers(bfl)
    assert sorted(back) == sorted(own) and all(torch.equal(back[k], own[k]) for k in own)
    with pytest.raises(FormatError, match="double_blocks.0.img_attn.extra.weight"):
        bfl_to_diffusers({**bfl, "double_blocks.0.img_attn.extra.weight": torch.zeros(2, 2)})


# ---- merges --------------------------------------------------------------------------------------------------

def test_merges_of_flux_folders_equal_direct_computation_and_leave_vae_and_text_encoders(fhome, flux, tmp_path):
    from loraforge.models.base import locate_base
    from loraforge.models.pipeline import generate, load_pipeline

    a, b, c = (transformer(flux[k]) for k in "abc")
    ws, ad = tmp_path / "ws", tmp_path / "ad"
    merge(fhome, str(flux["a"]), str(flux["b"]), "--alpha", "0.3", "-o", str(ws))
    merge(fhome, str(flux["a"]), str(flux["b"]), str(flux["c"]), "--method", "add_difference", "--alpha", "0.5",
          "-o", str(ad))
    got_ws, got_ad = transformer(ws), transformer(ad)
    assert sorted(got_ws) == sorted(a)
    for key in a:
        torch.testing.assert_close(got_ws[key], 0.7 * a[key] + 0.3 * b[key], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got_ad[key], a[key] + 0.5 * (b[key] - c[key]), rtol=1e-6, atol=1e-6)
    # b's VAE and both text encoders differ from a's, yet the merge copies a's, byte for byte
    for rel in (VAE, *TEXT_FILES):
        assert (flux["b"] / rel).read_bytes() != (flux["a"] / rel).read_bytes()
        assert (ws / rel).read_bytes() == (flux["a"] / rel).read_bytes()
    pipe = load_pipeline(locate_base(str(ws), fhome, digest=False), device="cpu")
    assert type(pipe).__name__ == "FluxPipeline"
    image = np.asarray(generate(pipe, "a red square", steps=2, seed=0), dtype=np.float32)
    assert image.shape == (64, 64, 3) and image.std() > 1.0


def test_text_encoders_merge_on_request(fhome, flux, tmp_path):
    out = tmp_path / "with-text"
    merge(fhome, str(flux["a"]), str(flux["b"]), "--include", "transformer", "--include", "text_encoder", "-o", str(out))
    for rel in TEXT_FILES:  # CLIP and T5 both
        got, ta, tb = (load_file(p / rel) for p in (out, flux["a"], flux["b"]))
        key = next(k for k in sorted(ta) if ta[k].is_floating_point() and ta[k].dim() == 2)
        torch.testing.assert_close(got[key].float(), 0.5 * ta[key].float() + 0.5 * tb[key].float())
    assert (out / VAE).read_bytes() == (flux["a"] / VAE).read_bytes()


def test_bfl_files_merge_in_bfl_names_and_mixed_layouts_give_the_same_numbers(fhome, flux, tmp_path):
    two_files, file_folder, folder_file, folders = (tmp_path / n for n in ("ff.safetensors", "fd.safetensors",
                                                                             "df", "dd"))
    merge(fhome, str(flux["a_bfl"]), str(flux["b_bfl"]), "--alpha", "0.25", "-o", str(two_files))
    merge(fhome, str(flux["a_bfl"]), str(flux["b"]), "--alpha", "0.25", "-o", str(file_folder))
    merge(fhome, str(flux["a"]), str(flux["b_bfl"]), "--alpha", "0.25", "-o", str(folder_file))
    merge(fhome, str(flux["a"]), str(flux["b"]), "--alpha", "0.25", "-o", str(folders))
    a_bfl, b_bfl = load_file(flux["a_bfl"]), {k.removeprefix(WRAPPER): v for k, v in load_file(flux["b_bfl"]).items()}
    got = load_file(two_files)
    assert sorted(got) == sorted(a_bfl)  # the first file's names (no wrapper), not the second's
    for key in a_bfl:
        torch.testing.assert_close(got[key], 0.75 * a_bfl[key] + 0.25 * b_bfl[key], rtol=1e-6, atol=1e-6)
    mixed = load_file(file_folder)
    assert sorted(mixed) == sorted(got) and all(torch.equal(mixed[k], got[k]) for k in got)
    want = transformer(folders)
    back = transformer(folder_file)
    assert sorted(back) == sorted(want) and all(torch.equal(back[k], want[k]) for k in want)
    assert (folder_file / VAE).read_bytes() == (flux["a"] / VAE).read_bytes()


def test_slerp_and_ties_see_the_fused_bfl_tensor_whole(fhome, flux, tmp_path):
    from tests.test_merge_checkpoints import slerp_ref

    key = "double_blocks.0.img_attn.qkv.weight"
    a = load_file(flux["a_bfl"])[key].float()
    b, c = (diffusers_to_bfl(transformer(flux[k]))[key] for k in "bc")
    slerp, ties = tmp_path / "slerp.safetensors", tmp_path / "ties.safetensors"
    merge(fhome, str(flux["a_bfl"]), str(flux["b"]), "--method", "slerp", "--alpha", "0.35", "-o", str(slerp))
    torch.testing.assert_close(load_file(slerp)[key], slerp_ref(a, b, 0.35), rtol=1e-5, atol=1e-6)
    merge(fhome, str(flux["a_bfl"]), str(flux["b"]), f"{flux['c']}=0.5", "--method", "ties", "--alpha", "0.9",
          "--param", "density=0.3", "-o", str(ties))
    want = a + 0.9 * ties_reference([b - a, c - a], [1.0, 0.5], 0.3).float()
    torch.testing.assert_close(load_file(ties)[key], want, rtol=1e-5, atol=1e-6)


def test_a_bfl_file_loads_as_a_pipeline_with_config_and_is_refused_without(fhome, flux, tmp_path):
    from loraforge.errors import ConfigError
    from loraforge.models.base import locate_base
    from loraforge.models.pipeline import load_pipeline
    from tests.test_flux_family import transformer_output

    merged = tmp_path / "merged.safetensors"
    merge(fhome, str(flux["a_bfl"]), str(flux["b_bfl"]), "-o", str(merged))
    base = locate_base(str(merged), fhome, digest=False)
    assert (base.family, base.layout) == ("flux", "single_file")
    pipe = load_pipeline(base, device="cpu", config=flux["a"])
    folder = tmp_path / "merged-folder"
    merge(fhome, str(flux["a"]), str(flux["b"]), "-o", str(folder))
    from diffusers import FluxTransformer2DModel

    torch.testing.assert_close(transformer_output(pipe.transformer),
                               transformer_output(FluxTransformer2DModel.from_pretrained(folder / "transformer")))
    image = tmp_path / "bfl.png"
    out = run_cli(fhome, "generate", "--base", str(merged), "--config", str(flux["a"]), "--prompt", "a red square",
                  "--steps", "2", "-o", str(image))
    assert "64x64" in out.output and image.is_file()
    with pytest.raises(ConfigError, match="--config DIR"):
        load_pipeline(base, device="cpu", home=fhome)
    line = refused(run_cli(fhome, "generate", "--base", str(merged), "--prompt", "x", "--steps", "2",
                           "-o", str(tmp_path / "no.png"), ok=False))
    assert "Flux single file" in line and "--config" in line


# ---- block weights -------------------------------------------------------------------------------------------

def test_block_weights_address_double_and_single_blocks_in_both_layouts(fhome, flux, tmp_path):
    a, b = transformer(flux["a"]), transformer(flux["b"])
    one = tmp_path / "one"
    merge(fhome, str(flux["a"]), str(flux["b"]), "--alpha", "0", "--block-weights", "double.1:1,single:0.5",
          "-o", str(one))
    got = transformer(one)
    for key in a:
        w = 1.0 if key.startswith("transformer_blocks.1.") else 0.5 if key.startswith("single_transformer_blocks.") \
            else 0.0
        torch.testing.assert_close(got[key], (1 - w) * a[key] + w * b[key], rtol=1e-6, atol=1e-6, msg=key)
    assert any(not torch.equal(got[k], a[k]) for k in got if k.startswith("transformer_blocks.1."))
    # the same weights as a list (BASE, double.0, double.1, single.0, single.1) and on BFL files, in BFL names
    listed, bfl = tmp_path / "listed", tmp_path / "bfl.safetensors"
    merge(fhome, str(flux["a"]), str(flux["b"]), "--block-weights", "0,0,1,0.5,0.5", "-o", str(listed))
    assert all(torch.equal(v, got[k]) for k, v in transformer(listed).items())
    merge(fhome, str(flux["a_bfl"]), str(flux["b_bfl"]), "--alpha", "0", "--block-weights", "double.1:1,single:0.5",
          "-o", str(bfl))
    want = diffusers_to_bfl(got)
    got_bfl = load_file(bfl)
    assert all(torch.equal(got_bfl[k], want[k]) for k in want)
    line = refused(run_cli(fhome, "merge", "checkpoints", str(flux["a"]), str(flux["b"]), "--block-weights",
                           "IN00:1", "-o", str(tmp_path / "bad"), ok=False))
    assert "IN00" in line and "double (double.0…double.1)" in line and "single (single.0…single.1)" in line


# ---- refusals ------------------------------------------------------------------------------------------------

def test_merging_sd_with_flux_is_refused_naming_both_families_and_registers_nothing(fhome, flux, tmp_path):
    from loraforge.registry import Registry

    for first, second in (("builtin:tiny-sd", str(flux["a"])), (str(flux["a_bfl"]), "builtin:tiny-sd")):
        line = refused(run_cli(fhome, "merge", "checkpoints", first, second, "--name", "mix", ok=False))
        assert "SD1.x" in line and "Flux" in line, line
    assert Registry(fhome).list() == []
    line = refused(run_cli(fhome, "merge", "checkpoints", str(flux["a"]), str(flux["b"]), "--include", "unet",
                           "-o", str(tmp_path / "x"), ok=False))
    assert "Flux checkpoints have no unet component" in line
    line = refused(run_cli(fhome, "merge", "checkpoints", str(flux["a"]), str(flux["b_bfl"]), "--include", "transformer",
                           "--include", "vae", "-o", str(tmp_path / "y"), ok=False))
    assert "holds no vae weights" in line and "transformer alone" in line
    line = refused(run_cli(fhome, "merge", "checkpoints", str(flux["a"]), str(flux["b"]), "--include", "transformer",
                           "--exclude", "text_encoder", "-o", str(tmp_path / "z"), ok=False))
    assert "include transformer" in line and "exclude text_encoder" in line and "not both" in line  # never ignored
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists() and not (tmp_path / "z").exists()
    assert json.loads((flux["a"] / "model_index.json").read_text())["_class_name"] == "FluxPipeline"
