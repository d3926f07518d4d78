"""Flux LoRA formats: kohya sd-scripts' Flux names, XLabs, BFL / ComfyUI-native and diffusers, against diffusers'
own converters (on FLUX.1-dev widths, which they hard-code) and `FluxPipeline.load_lora_weights` on tiny-flux.

The oracle for ΔW is always B·A with each tool's own scaling: diffusers bakes alpha into its factors, kohya
and BFL keep alpha/rank; fused BFL weights are cut into diffusers' modules by rows written out here by hand.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraforge.formats import read_adapter, write_adapter
from loraforge.formats.kohya import kohya_to_lora, lora_to_kohya
from loraforge.formats.lora import LoraModule, LoraState, with_text_model
from tests.cli_helpers import refused, run_cli
from tests.oracles import flux_transformer_inputs

pytestmark = pytest.mark.usefixtures("one_torch_thread")

H, MLP = 3072, 12288  # FLUX.1-dev's width and single-block MLP width
TH, TMLP = 32, 128  # tiny-flux's


@pytest.fixture(scope="module")
def flux_folder(builtin_home) -> Path:
    from loraforge.models.builtin import ensure_builtin

    return ensure_builtin("tiny-flux", builtin_home)


@pytest.fixture
def fhome(home, flux_folder) -> Path:
    target = home / "models" / "builtin" / "tiny-flux"
    if not target.exists():
        target.symlink_to(flux_folder, target_is_directory=True)
    return home


def _pair(sd: dict, name: str, out: int, inp: int, rank: int, alpha: float | None, g, up_suffix="lora_up.weight",
          down_suffix="lora_down.weight", sep=".") -> None:
    sd[f"{name}{sep}{down_suffix}"] = torch.randn(rank, inp, generator=g) * 0.1
    sd[f"{name}{sep}{up_suffix}"] = torch.randn(out, rank, generator=g) * 0.1
    if alpha is not None:
        sd[f"{name}{sep}alpha"] = torch.tensor(alpha)


def _block_diagonal_qkv(sd: dict, name: str, h: int, rank: int, alpha: float, g) -> None:
    """A kohya split_qkv pair: three downs stacked (3r × h), up block-diagonal (3h × 3r)."""
    sd[f"{name}.lora_down.weight"] = torch.randn(3 * rank, h, generator=g) * 0.1
    up = torch.zeros(3 * h, 3 * rank)
    for i in range(3):
        up[i * h:(i + 1) * h, i * rank:(i + 1) * rank] = torch.randn(h, rank, generator=g) * 0.1
    sd[f"{name}.lora_up.weight"] = up
    sd[f"{name}.alpha"] = torch.tensor(alpha)


def _kohya_file(h: int, mlp: int, seed: int = 0, t5: bool = False, final_alpha: float | None = None
                ) -> dict[str, torch.Tensor]:
    """A kohya sd-scripts Flux LoRA as networks/lora_flux.py names it: fused qkv (shared and block-diagonal), linear1,
    the embedders, the final layer (its adaLN modulation's halves swap), and a CLIP (lora_te1_) module."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    _pair(sd, "lora_unet_double_blocks_0_img_attn_qkv", 3 * h, h, 4, 2.0, g)
    _block_diagonal_qkv(sd, "lora_unet_double_blocks_0_txt_attn_qkv", h, 2, 3.0, g)
    _pair(sd, "lora_unet_double_blocks_0_img_attn_proj", h, h, 4, 8.0, g)
    _pair(sd, "lora_unet_double_blocks_0_img_mlp_0", mlp, h, 2, 1.0, g)
    _pair(sd, "lora_unet_double_blocks_0_txt_mlp_2", h, mlp, 2, 1.0, g)
    _pair(sd, "lora_unet_double_blocks_0_img_mod_lin", 6 * h, h, 2, 2.0, g)
    _pair(sd, "lora_unet_single_blocks_0_linear1", 3 * h + mlp, h, 3, 1.5, g)
    _pair(sd, "lora_unet_single_blocks_0_linear2", h, h + mlp, 2, 2.0, g)
    _pair(sd, "lora_unet_single_blocks_0_modulation_lin", 3 * h, h, 2, 2.0, g)
    _pair(sd, "lora_unet_img_in", h, 64, 2, 1.0, g)
    _pair(sd, "lora_unet_time_in_in_layer", h, 256, 2, 1.0, g)
    _pair(sd, "lora_unet_guidance_in_in_layer", h, 256, 2, 1.0, g)
    # diffusers' converter drops the final layer's alphas (it applies scale 1): its oracle files have none
    _pair(sd, "lora_unet_final_layer_linear", 64, h, 2, final_alpha, g)
    _pair(sd, "lora_unet_final_layer_adaLN_modulation_1", 2 * h, h, 2, final_alpha, g)
    clip = 768 if h == H else TH
    _pair(sd, "lora_te1_text_model_encoder_layers_0_self_attn_q_proj", clip, clip, 2, 1.0, g)
    if t5:
        _pair(sd, "lora_te3_encoder_block_0_layer_1_DenseReluDense_wi_0", 2 * TH, TH, 2, 1.0, g)
    return sd


def _split_rows(name: str, h: int, rows: int) -> list[tuple[str, int, int]]:
    """(diffusers module, first row, end row) of each part of kohya Flux module `name`, written out by hand."""
    d = "transformer.transformer_blocks.0."
    s = "transformer.single_transformer_blocks.0."
    by_hand = {
        "lora_unet_double_blocks_0_img_attn_qkv": [d + "attn.to_q", d + "attn.to_k", d + "attn.to_v"],
        "lora_unet_double_blocks_0_txt_attn_qkv": [d + "attn.add_q_proj", d + "attn.add_k_proj", d + "attn.add_v_proj"],
        "lora_unet_double_blocks_1_txt_attn_qkv": [d.replace(".0.", ".1.") + p
                                                   for p in ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")],
    }
    if name in by_hand:
        return [(p, i * h, (i + 1) * h) for i, p in enumerate(by_hand[name])]
    if name.startswith("lora_unet_single_blocks_") and name.endswith("_linear1"):
        s = f"transformer.single_transformer_blocks.{name.split('_')[4]}."
        return [(s + "attn.to_q", 0, h), (s + "attn.to_k", h, 2 * h), (s + "attn.to_v", 2 * h, 3 * h),
                (s + "proj_mlp", 3 * h, rows)]
    single = {
        "lora_unet_double_blocks_0_img_attn_proj": d + "attn.to_out.0",
        "lora_unet_double_blocks_0_img_mlp_0": d + "ff.net.0.proj",
        "lora_unet_double_blocks_0_txt_mlp_2": d + "ff_context.net.2",
        "lora_unet_double_blocks_0_img_mod_lin": d + "norm1.linear",
        "lora_unet_single_blocks_0_linear2": s + "proj_out",
        "lora_unet_single_blocks_1_linear2": s.replace(".0.", ".1.") + "proj_out",
        "lora_unet_single_blocks_0_modulation_lin": s + "norm.linear",
        "lora_unet_img_in": "transformer.x_embedder",
        "lora_unet_time_in_in_layer": "transformer.time_text_embed.timestep_embedder.linear_1",
        "lora_unet_guidance_in_in_layer": "transformer.time_text_embed.guidance_embedder.linear_1",
        "lora_unet_final_layer_linear": "transformer.proj_out",
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": "text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
        "lora_te3_encoder_block_0_layer_1_DenseReluDense_wi_0": "text_encoder_2.encoder.block.0.layer.1.DenseReluDense.wi_0",
    }
    return [(single[name], 0, rows)]


def _cols(width: int) -> torch.Tensor:
    """The input columns of ΔW compared: all of a tiny model's, 9 spread over a FLUX.1-dev-wide input (a full
    FLUX.1-dev ΔW is hundreds of MB; rows are kept whole, so every row cut is checked)."""
    return torch.arange(width) if width <= 512 else torch.linspace(0, width - 1, 9).long()


def _kohya_deltas(sd: dict, h: int) -> dict[str, torch.Tensor]:
    """ΔW per diffusers module of a kohya Flux file, by hand: (alpha/rank)·up·down cut by rows."""
    out = {}
    for key in sd:
        if not key.endswith(".lora_down.weight"):
            continue
        name = key.removesuffix(".lora_down.weight")
        down, up = sd[key], sd[f"{name}.lora_up.weight"]
        alpha = float(sd[f"{name}.alpha"]) if f"{name}.alpha" in sd else down.shape[0]
        full = (alpha / down.shape[0]) * (up @ down[:, _cols(down.shape[1])])
        if name == "lora_unet_final_layer_adaLN_modulation_1":  # BFL (shift, scale) → diffusers (scale, shift)
            out["transformer.norm_out.linear"] = torch.cat([full[h:], full[:h]])
            continue
        for module, start, stop in _split_rows(name, h, full.shape[0]):
            out[module] = full[start:stop]
    return out


def _diffusers_deltas(sd: dict) -> dict[str, torch.Tensor]:
    """ΔW = B·A per module of a diffusers state dict (alpha baked in), names made canonical."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in sd.items():
        for suffix, kind in ((".lora_A.weight", "A"), (".lora_B.weight", "B"), (".lora_linear_layer.down.weight", "A"),
                             (".lora_linear_layer.up.weight", "B"), (".down.weight", "A"), (".up.weight", "B")):
            if key.endswith(suffix):
                name = key.removesuffix(suffix)
                name = name.replace(".to_q_lora", ".q_proj").replace(".to_k_lora", ".k_proj")
                if not name.startswith(("transformer.", "text_encoder")):
                    name = "transformer." + name  # diffusers' kohya converter leaves the embedders unprefixed
                if name.startswith("text_encoder."):
                    name = "text_encoder." + with_text_model(name.removeprefix("text_encoder."))
                pairs.setdefault(name, {})[kind] = t
                break
    return {name: p["B"].float() @ p["A"].float()[:, _cols(p["A"].shape[1])] for name, p in pairs.items()}


def _state_deltas(state: LoraState) -> dict[str, torch.Tensor]:
    out = {}
    for name, m in state.items():
        b, a = m.factors()
        out[name] = b @ a[:, _cols(a.shape[1])]
    return out


def _assert_same_deltas(ours: dict, theirs: dict, zero_ok: tuple[str, ...] = ()) -> None:
    for name in set(theirs) - set(ours):
        assert name in zero_ok and not theirs[name].any(), name
    assert set(ours) <= set(theirs), sorted(set(ours) - set(theirs))
    for name in ours:
        scale = float(theirs[name].abs().max()) or 1.0
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-6 * scale, msg=name)


# -- against diffusers' converters, on FLUX.1-dev widths ------------------------------------------------

def test_kohya_flux_reads_as_diffusers_converts_it(tmp_path):
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    sd = _kohya_file(H, MLP)
    path = tmp_path / "kohya_flux.safetensors"
    save_file(sd, str(path))
    state, fmt, _ = read_adapter(path)
    assert fmt == "kohya"
    theirs = _diffusers_deltas(_convert_kohya_flux_lora_to_diffusers({k: v.clone() for k, v in sd.items()}))
    assert set(_state_deltas(state)) == set(theirs)
    _assert_same_deltas(_state_deltas(state), theirs)
    _assert_same_deltas(_state_deltas(state), _kohya_deltas(sd, H))
    # a fused qkv pair shares its down; the split keeps alpha and rank, so every part keeps its scale
    q, v = state["transformer.transformer_blocks.0.attn.to_q"], state["transformer.transformer_blocks.0.attn.to_v"]
    assert torch.equal(q.down, v.down) and q.alpha == v.alpha == 2.0 and q.weight_shape == (H, H)
    assert state["transformer.single_transformer_blocks.0.proj_mlp"].weight_shape == (MLP, H)


def test_comfyui_native_flux_lora_reads_as_diffusers_converts_it(tmp_path):
    """ComfyUI's own spelling (`diffusion_model.<BFL module>.lora_down.weight`), read by loraforge's bfl format and
    by diffusers' Flux loader (its ComfyUI branch of _convert_kohya_flux_lora_to_diffusers): the same ΔW."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    sd = {}
    for key, t in _kohya_file(H, MLP).items():
        if key.startswith("lora_unet_"):
            flat, suffix = key.removeprefix("lora_unet_").split(".", 1)
            sd[f"diffusion_model.{_bfl_name(flat)}.{suffix}"] = t
    path = tmp_path / "comfy_native.safetensors"
    save_file(sd, str(path))
    state, fmt, _ = read_adapter(path)
    assert fmt == "bfl"
    theirs = _diffusers_deltas(_convert_kohya_flux_lora_to_diffusers({k: v.clone() for k, v in sd.items()}))
    assert set(_state_deltas(state)) == set(theirs)
    _assert_same_deltas(_state_deltas(state), theirs)


def test_xlabs_reads_as_diffusers_converts_it(tmp_path):
    from diffusers.loaders.lora_conversion_utils import _convert_xlabs_flux_lora_to_diffusers

    g = torch.Generator().manual_seed(1)
    sd: dict[str, torch.Tensor] = {}
    for layer, (out, inp) in {"qkv_lora1": (3 * H, H), "proj_lora1": (H, H), "qkv_lora2": (3 * H, H),
                              "proj_lora2": (H, H)}.items():
        _pair(sd, f"double_blocks.0.processor.{layer}", out, inp, 4, None, g, "up.weight", "down.weight")
    _pair(sd, "single_blocks.0.processor.qkv_lora", 3 * H, H, 4, None, g, "up.weight", "down.weight")
    _pair(sd, "single_blocks.0.processor.proj_lora", H, H + MLP, 4, None, g, "up.weight", "down.weight")
    path = tmp_path / "xlabs.safetensors"
    save_file(sd, str(path))
    state, fmt, _ = read_adapter(path)
    assert fmt == "xlabs"
    theirs = _diffusers_deltas(_convert_xlabs_flux_lora_to_diffusers({k: v.clone() for k, v in sd.items()}))
    assert set(_state_deltas(state)) == set(theirs)
    _assert_same_deltas(_state_deltas(state), theirs)
    # XLabs' single-block qkv covers linear1's q, k, v rows only: no proj_mlp module
    assert "transformer.single_transformer_blocks.0.proj_mlp" not in state


def test_independent_qkv_fuse_block_diagonally_and_diffusers_reads_them_back():
    """Separate q/k/v downs (a diffusers-trained LoRA) → one kohya pair of rank Σr with a block-diagonal up and
    alpha keeping every part's scale; parts with different scales get them baked into up. Both read back (through
    diffusers' converter and ours) as the same ΔW; a part the adapter leaves out (proj_mlp) is zero rows."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    g = torch.Generator().manual_seed(2)
    state = LoraState()
    d, s = "transformer.transformer_blocks.0.attn.", "transformer.single_transformer_blocks.0.attn."
    for part in ("to_q", "to_k", "to_v"):  # one scale (alpha 1, rank 2)
        state[d + part] = LoraModule(torch.randn(2, H, generator=g), torch.randn(H, 2, generator=g), 1.0)
    for part, (rank, alpha) in {"to_q": (2, 2.0), "to_k": (3, 1.0), "to_v": (1, 4.0)}.items():  # three scales
        state[s + part] = LoraModule(torch.randn(rank, H, generator=g), torch.randn(H, rank, generator=g), alpha)
    sd = lora_to_kohya(state)
    assert sorted(sd) == sorted(f"{k}.{suffix}" for k in ("lora_unet_double_blocks_0_img_attn_qkv",
                                                          "lora_unet_single_blocks_0_linear1")
                                for suffix in ("alpha", "lora_down.weight", "lora_up.weight"))
    assert sd["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape == (6, H)
    assert float(sd["lora_unet_double_blocks_0_img_attn_qkv.alpha"]) == pytest.approx(3.0)  # scale 1/2 kept
    assert sd["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape == (3 * H + 4 * H, 6)
    ours = _state_deltas(state)
    theirs = _diffusers_deltas(_convert_kohya_flux_lora_to_diffusers({k: v.clone() for k, v in sd.items()}))
    _assert_same_deltas(ours, theirs, zero_ok=("transformer.single_transformer_blocks.0.proj_mlp",))
    again = kohya_to_lora(sd)
    _assert_same_deltas(ours, _state_deltas(again), zero_ok=("transformer.single_transformer_blocks.0.proj_mlp",))


def test_kohya_flux_round_trip_is_exact():
    sd = _kohya_file(TH, TMLP, t5=True, final_alpha=1.0)
    state = kohya_to_lora(sd)
    back = lora_to_kohya(state)
    assert sorted(back) == sorted(sd)
    for key in sd:
        assert torch.equal(back[key], sd[key]), key
    assert state["text_encoder_2.encoder.block.0.layer.1.DenseReluDense.wi_0"].weight_shape == (2 * TH, TH)


def test_bfl_and_comfyui_native_files_read_as_the_kohya_file_of_the_same_factors(tmp_path):
    sd = {k: v for k, v in _kohya_file(TH, TMLP, final_alpha=2.0).items() if k.startswith("lora_unet_")}
    kohya = kohya_to_lora(sd)
    native = {}
    for key, t in sd.items():
        flat, suffix = key.removeprefix("lora_unet_").split(".", 1)
        suffix = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"}.get(suffix, suffix)
        native[f"diffusion_model.{_bfl_name(flat)}.{suffix}"] = t
    path = tmp_path / "comfy.safetensors"
    save_file(native, str(path))
    state, fmt, _ = read_adapter(path)
    assert fmt == "bfl"
    assert sorted(state) == sorted(kohya)
    _assert_same_deltas(_state_deltas(state), _state_deltas(kohya))
    written = tmp_path / "again.safetensors"
    write_adapter(state, written, "bfl")
    again = load_file(str(written))
    assert sorted(again) == sorted(native)
    for key in native:
        torch.testing.assert_close(again[key], native[key].to(again[key].dtype), rtol=0, atol=0, msg=key)
    # BFL's control LoRAs carry new norm scales: not a difference, refused naming the key
    control = {k.removeprefix("diffusion_model."): v for k, v in native.items()}
    control["double_blocks.0.img_attn.norm.query_norm.scale"] = torch.ones(16)
    save_file(control, str(tmp_path / "control.safetensors"))
    with pytest.raises(Exception, match=r"key double_blocks\.0\.img_attn\.norm\.query_norm\.scale is a norm scale"):
        read_adapter(tmp_path / "control.safetensors")


def _bfl_name(flat: str) -> str:
    from loraforge.formats.flux_names import flux_modules, kohya_flat

    return {kohya_flat(m.bfl): m.bfl for m in flux_modules(2, 2)}[flat]


def test_a_diffusers_flux_lora_and_a_peft_folder_import(tmp_path, fhome, flux_folder):
    from diffusers import FluxTransformer2DModel
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    model = FluxTransformer2DModel.from_pretrained(flux_folder / "transformer")
    model.add_adapter(LoraConfig(r=2, lora_alpha=4, target_modules=["to_q", "proj_mlp", "x_embedder"]))
    from diffusers import FluxPipeline

    FluxPipeline.save_lora_weights(str(tmp_path / "d"), transformer_lora_layers=get_peft_model_state_dict(model))
    out = run_cli(fhome, "registry", "import", str(tmp_path / "d" / "pytorch_lora_weights.safetensors"),
                  "--name", "d", "--base", "builtin:tiny-flux", "--json").output
    manifest = json.loads(out)
    assert manifest["base"]["family"] == "flux" and manifest["adapter"]["format"] == "diffusers"
    peft_model = get_peft_model(FluxTransformer2DModel.from_pretrained(flux_folder / "transformer"),
                                LoraConfig(r=2, target_modules=["to_k"]))
    peft_model.save_pretrained(str(tmp_path / "transformer"))
    state, fmt, _ = read_adapter(tmp_path / "transformer")
    assert fmt == "peft" and state.components == ["transformer"]
    assert "transformer.single_transformer_blocks.1.attn.to_k" in state


# -- on tiny-flux: import, export, load in FluxPipeline -----------------------------------------------

def _tiny_kohya(seed: int = 5) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    _pair(sd, "lora_unet_double_blocks_0_img_attn_qkv", 3 * TH, TH, 4, 2.0, g)
    _block_diagonal_qkv(sd, "lora_unet_double_blocks_1_txt_attn_qkv", TH, 2, 3.0, g)
    _pair(sd, "lora_unet_double_blocks_0_img_mlp_0", TMLP, TH, 2, 1.0, g)
    _pair(sd, "lora_unet_single_blocks_0_linear1", 3 * TH + TMLP, TH, 3, 1.5, g)
    _pair(sd, "lora_unet_single_blocks_1_linear2", TH, TH + TMLP, 2, 2.0, g)
    _pair(sd, "lora_unet_final_layer_adaLN_modulation_1", 2 * TH, TH, 2, 4.0, g)
    _pair(sd, "lora_unet_final_layer_linear", 64, TH, 2, 1.0, g)
    _pair(sd, "lora_unet_img_in", TH, 64, 2, 1.0, g)
    _pair(sd, "lora_unet_guidance_in_in_layer", TH, 256, 2, 1.0, g)
    _pair(sd, "lora_te1_text_model_encoder_layers_0_self_attn_q_proj", TH, TH, 2, 1.0, g)
    return {k: v * 4 for k, v in sd.items()}  # large enough to move the outputs well past float noise


def _with_deltas(model, deltas: dict[str, torch.Tensor], component: str):
    model = copy.deepcopy(model)
    modules = dict(model.named_modules())
    for name, delta in deltas.items():
        if name.startswith(component + "."):
            path = name.removeprefix(component + ".")
            module = modules.get(path) or modules[path.removeprefix("text_model.")]
            module.weight.data += delta
    return model


def test_kohya_flux_exports_to_diffusers_and_loads_in_flux_pipeline(tmp_path, fhome):
    from loraforge.models.base import locate_base
    from loraforge.models.pipeline import load_pipeline

    sd = _tiny_kohya()
    source = tmp_path / "style.safetensors"
    save_file(sd, str(source))
    run_cli(fhome, "registry", "import", str(source), "--name", "style", "--base", "builtin:tiny-flux")
    out = tmp_path / "style_diffusers.safetensors"
    run_cli(fhome, "registry", "export", "style", "--for", "diffusers", "-o", str(out))

    pipe = load_pipeline(locate_base("builtin:tiny-flux", fhome))
    deltas = _kohya_deltas(sd, TH)
    inputs = flux_transformer_inputs(pipe.transformer)
    with torch.no_grad():
        base = pipe.transformer(**inputs)[0]
        by_hand = _with_deltas(pipe.transformer, deltas, "transformer")(**inputs)[0]
        ids = torch.arange(6)[None]
        text_by_hand = _with_deltas(pipe.text_encoder, deltas, "text_encoder")(ids).last_hidden_state
        pipe.load_lora_weights(str(out))
        loaded = pipe.transformer(**inputs)[0]
        text_loaded = pipe.text_encoder(ids).last_hidden_state
    assert (by_hand - base).abs().max() > 1e-2  # the adapter changes the output
    torch.testing.assert_close(loaded, by_hand, rtol=1e-5, atol=1e-5 * float(by_hand.abs().max()))
    torch.testing.assert_close(text_loaded, text_by_hand, rtol=1e-5, atol=1e-5 * float(text_by_hand.abs().max()))


def test_export_for_comfyui_writes_kohya_flux_names(tmp_path, fhome):
    """A diffusers-spelled Flux adapter exported for ComfyUI: kohya's BFL names with the fused modules fused."""
    sd = _tiny_kohya(seed=6)
    state = kohya_to_lora(sd)
    source = tmp_path / "d.safetensors"
    write_adapter(state, source, "diffusers")
    run_cli(fhome, "registry", "import", str(source), "--name", "d", "--base", "builtin:tiny-flux")
    out = tmp_path / "comfy.safetensors"
    run_cli(fhome, "registry", "export", "d", "--for", "comfyui", "-o", str(out))
    written = load_file(str(out))
    assert sorted(written) == sorted(sd)
    _assert_same_deltas(_kohya_deltas(written, TH), _kohya_deltas(sd, TH))


# -- refusals --------------------------------------------------------------------------------------------

def test_cross_family_imports_are_refused_naming_both_families(tmp_path, fhome, adapter_file):
    before = run_cli(fhome, "registry", "ls", "--json").output
    line = refused(run_cli(fhome, "registry", "import", str(adapter_file), "--name", "sd", "--base", "builtin:tiny-flux",
                           ok=False))
    assert "SD1.x adapter" in line and "Flux base" in line, line
    source = tmp_path / "flux.safetensors"
    save_file(_tiny_kohya(), str(source))
    line = refused(run_cli(fhome, "registry", "import", str(source), "--name", "f", "--base", "builtin:tiny-sd", ok=False))
    assert "Flux adapter" in line and "SD1.x base" in line, line
    assert run_cli(fhome, "registry", "ls", "--json").output == before


def test_a_flux_lora_that_does_not_fit_the_base_and_other_transformers_are_refused(tmp_path, fhome):
    sd = _kohya_file(H, MLP)  # FLUX.1-dev widths on tiny-flux
    source = tmp_path / "dev.safetensors"
    save_file({k: v for k, v in sd.items() if "img_attn_proj" in k}, str(source))
    line = refused(run_cli(fhome, "registry", "import", str(source), "--name", "dev", "--base", "builtin:tiny-flux",
                           ok=False))
    assert "transformer.transformer_blocks.0.attn.to_out.0 has shape (3072, 3072) but the base has (32, 32)" in line
    sd3 = tmp_path / "sd3.safetensors"
    save_file({"transformer.pos_embed.proj.lora_A.weight": torch.ones(2, 4),
               "transformer.pos_embed.proj.lora_B.weight": torch.ones(8, 2)}, str(sd3))
    line = refused(run_cli(fhome, "registry", "import", str(sd3), "--name", "sd3", ok=False))
    assert "is a LoRA for a diffusion transformer other than Flux" in line, line
    odd = tmp_path / "odd.safetensors"
    save_file({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.ones(2, 8),
               "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.ones(8, 2)}, str(odd))
    line = refused(run_cli(fhome, "registry", "import", str(odd), "--name", "odd", ok=False))
    assert "up has 8 rows, which do not split into" in line, line


def test_kohya_names_option_is_refused_for_a_flux_adapter(tmp_path, fhome):
    source = tmp_path / "style.safetensors"
    save_file(_tiny_kohya(), str(source))
    run_cli(fhome, "registry", "import", str(source), "--name", "style", "--base", "builtin:tiny-flux")
    line = refused(run_cli(fhome, "registry", "export", "style", "--for", "comfyui", "--kohya-names", "sgm",
                           "-o", str(tmp_path / "o.safetensors"), ok=False))
    assert "kohya names a Flux transformer's modules by Black Forest Labs'" in line, line
    assert not (tmp_path / "o.safetensors").exists()


def test_a_t5_module_is_refused_by_the_diffusers_format_which_flux_pipelines_would_drop(tmp_path):
    from loraforge.errors import FormatError

    state = kohya_to_lora(_kohya_file(TH, TMLP, t5=True, final_alpha=1.0))
    with pytest.raises(FormatError, match=r"changes Flux's T5 encoder \(text_encoder_2\).*export it as kohya"):
        write_adapter(state, tmp_path / "d.safetensors", "diffusers")
    assert not (tmp_path / "d.safetensors").exists()
    write_adapter(state, tmp_path / "k.safetensors", "kohya")
    assert "lora_te3_encoder_block_0_layer_1_DenseReluDense_wi_0.lora_down.weight" in load_file(str(tmp_path / "k.safetensors"))


def test_what_flux_layouts_cannot_hold_is_refused_naming_it(tmp_path):
    from loraforge.errors import FormatError

    lokr = {"lora_unet_double_blocks_0_img_attn_qkv.lokr_w1": torch.ones(2, 2),
            "lora_unet_double_blocks_0_img_attn_qkv.lokr_w2": torch.ones(48, 16)}
    with pytest.raises(FormatError, match=r"lora_unet_double_blocks_0_img_attn_qkv holds lokr_w1, lokr_w2, not a LoRA "
                                          r"pair, on BFL's double_blocks\.0\.img_attn\.qkv"):
        kohya_to_lora(lokr)
    bias = {"double_blocks.0.img_attn.proj.lora_A.weight": torch.ones(2, 32),
            "double_blocks.0.img_attn.proj.lora_B.weight": torch.ones(32, 2),
            "double_blocks.0.img_attn.proj.lora_B.bias": torch.ones(32)}
    save_file(bias, str(tmp_path / "bias.safetensors"))
    with pytest.raises(FormatError, match=r"key double_blocks\.0\.img_attn\.proj\.lora_B\.bias is a LoRA bias"):
        read_adapter(tmp_path / "bias.safetensors")
    state = kohya_to_lora({k: v for k, v in _tiny_kohya().items() if k.startswith("lora_unet_")})
    with pytest.raises(FormatError, match="does not write them; export as kohya"):
        write_adapter(state, tmp_path / "x.safetensors", "xlabs")
    with_clip = kohya_to_lora(_tiny_kohya())
    with pytest.raises(FormatError, match="the bfl format holds a Flux transformer only.*text_encoder"):
        write_adapter(with_clip, tmp_path / "b.safetensors", "bfl")
