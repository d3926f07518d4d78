"""kohya SDXL files with Stability (SGM) UNet block names, as sd-scripts writes every SDXL LoRA/LoCon.

The file is built here with the SGM names sd-scripts gives the tiny SDXL's modules (attention, ff,
proj, resnet convs and shortcut, down/upsampler, time and added embeddings, conv_in/out, both text
encoders). The oracle is diffusers: its own kohya loader (`load_lora_weights` on the ORIGINAL file,
which maps SGM names with the pipeline's UNet config) gives the output every loraforge export must
reproduce when diffusers loads it; and the export back to kohya must be the original file's tensors.
"""

from __future__ import annotations

import copy
import json
import re
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cli_helpers import refused, run_cli
from oracles import loader_messages
from loraforge.errors import FormatError
from loraforge.formats.kohya import kohya_to_lora, lora_to_kohya

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REL_TOL = 1e-4
PARTIAL_LOAD = re.compile(r"unexpected|missing|not (been )?(correctly )?(loaded|renamed)|no lora keys|incompatible"
                          r"|did not match|ignored", re.I)

# sd-scripts' name for a tiny-SDXL module (layers_per_block 1: down level 0 resnet only, level 1 resnet +
# 2-layer transformer; up level 0 with attention and an upsampler) → the diffusers module it is.
SGM_UNET = {
    "input_blocks_0_0": "conv_in",
    "time_embed_0": "time_embedding.linear_1",
    "time_embed_2": "time_embedding.linear_2",
    "label_emb_0_0": "add_embedding.linear_1",
    "label_emb_0_2": "add_embedding.linear_2",
    "input_blocks_1_0_in_layers_2": "down_blocks.0.resnets.0.conv1",
    "input_blocks_1_0_emb_layers_1": "down_blocks.0.resnets.0.time_emb_proj",
    "input_blocks_1_0_out_layers_3": "down_blocks.0.resnets.0.conv2",
    "input_blocks_2_0_op": "down_blocks.0.downsamplers.0.conv",
    "input_blocks_3_0_in_layers_2": "down_blocks.1.resnets.0.conv1",
    "input_blocks_3_0_skip_connection": "down_blocks.1.resnets.0.conv_shortcut",
    "input_blocks_3_1_proj_in": "down_blocks.1.attentions.0.proj_in",
    "input_blocks_3_1_transformer_blocks_0_attn1_to_q": "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
    "input_blocks_3_1_transformer_blocks_0_attn2_to_k": "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
    "input_blocks_3_1_transformer_blocks_1_attn1_to_out_0":
        "down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_out.0",
    "input_blocks_3_1_transformer_blocks_1_ff_net_0_proj":
        "down_blocks.1.attentions.0.transformer_blocks.1.ff.net.0.proj",
    "input_blocks_3_1_transformer_blocks_1_ff_net_2": "down_blocks.1.attentions.0.transformer_blocks.1.ff.net.2",
    "input_blocks_3_1_proj_out": "down_blocks.1.attentions.0.proj_out",
    "middle_block_0_in_layers_2": "mid_block.resnets.0.conv1",
    "middle_block_1_transformer_blocks_0_attn2_to_v": "mid_block.attentions.0.transformer_blocks.0.attn2.to_v",
    "middle_block_2_out_layers_3": "mid_block.resnets.1.conv2",
    "output_blocks_0_0_in_layers_2": "up_blocks.0.resnets.0.conv1",
    "output_blocks_0_0_skip_connection": "up_blocks.0.resnets.0.conv_shortcut",
    "output_blocks_0_1_transformer_blocks_1_attn1_to_k": "up_blocks.0.attentions.0.transformer_blocks.1.attn1.to_k",
    "output_blocks_1_1_proj_out": "up_blocks.0.attentions.1.proj_out",
    "output_blocks_1_2_conv": "up_blocks.0.upsamplers.0.conv",
    "output_blocks_2_0_emb_layers_1": "up_blocks.1.resnets.0.time_emb_proj",
    "output_blocks_3_0_out_layers_3": "up_blocks.1.resnets.1.conv2",
    "out_2": "conv_out",
}
# sd-scripts adapts every attention projection and MLP layer of both text encoders (diffusers' loader
# also needs the full set to recognise the layout: a lone q_proj is left unloaded).
TEXT_LAYER = [f"text_model.encoder.layers.{i}.{m}" for i in (0, 1)
              for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                        "mlp.fc1", "mlp.fc2")]
TEXT = {"lora_te1_": ("text_encoder", TEXT_LAYER), "lora_te2_": ("text_encoder_2", TEXT_LAYER)}
RANK, ALPHA = 4, 2.0  # one rank and alpha for every module: diffusers' kohya loader keeps only one per kind


@pytest.fixture(scope="module")
def pipeline(tiny_sdxl_path):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl_path))


def _module(pipe, component: str, path: str) -> torch.nn.Module:
    model = getattr(pipe, component)
    if component != "unet" and not hasattr(model, "text_model"):
        path = path.removeprefix("text_model.")
    return model.get_submodule(path)


def sgm_kohya_file(pipe, path: Path, dtype=torch.float32) -> Path:
    """A kohya SDXL LoRA/LoCon in SGM names with random factors, written by safetensors as sd-scripts does."""
    gen = torch.Generator().manual_seed(7)
    sd = {}
    targets = [("lora_unet_" + flat, _module(pipe, "unet", diffusers)) for flat, diffusers in SGM_UNET.items()]
    for prefix, (component, paths) in TEXT.items():
        targets += [(prefix + p.replace(".", "_"), _module(pipe, component, p)) for p in paths]
    for name, module in targets:
        w = module.weight
        if w.ndim == 4:
            down = torch.randn(RANK, w.shape[1], *w.shape[2:], generator=gen) * 0.1
            up = torch.randn(w.shape[0], RANK, 1, 1, generator=gen) * 0.1
        else:
            down = torch.randn(RANK, w.shape[1], generator=gen) * 0.1
            up = torch.randn(w.shape[0], RANK, generator=gen) * 0.1
        sd[f"{name}.lora_down.weight"] = down.to(dtype)
        sd[f"{name}.lora_up.weight"] = up.to(dtype)
        sd[f"{name}.alpha"] = torch.tensor(ALPHA, dtype=dtype)
    save_file(sd, str(path), metadata={"ss_network_module": "networks.lora", "ss_base_model_version": "sdxl_base_v1-0"})
    return path


def outputs(pipe) -> dict[str, torch.Tensor]:
    """The UNet's noise prediction and both text encoders' hidden states on fixed inputs."""
    unet = pipe.unet
    cfg = unet.config
    gen = torch.Generator().manual_seed(1)
    sample = torch.randn(1, cfg.in_channels, 16, 16, generator=gen)
    context = torch.randn(1, 7, cfg.cross_attention_dim, generator=gen)
    text = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    added = {"text_embeds": torch.randn(1, text, generator=gen), "time_ids": torch.randn(1, 6, generator=gen) * 10}
    ids = torch.tensor([[0, 17, 230, 41, 980, 5, 1, 1]])
    with torch.no_grad():
        out = {"unet": unet(sample, 50, encoder_hidden_states=context, added_cond_kwargs=added).sample}
        for c in ("text_encoder", "text_encoder_2"):
            hidden = getattr(pipe, c)(ids, output_hidden_states=True).hidden_states
            out[c] = torch.cat([h.flatten() for h in hidden])
    return out


def loaded_outputs(pipeline, path: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """What the pipeline computes with `path` loaded by diffusers' `load_lora_weights`, and what it said."""
    pipe = copy.deepcopy(pipeline)
    with loader_messages() as said:
        pipe.load_lora_weights(str(path))
    return outputs(pipe), said


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], base: dict[str, torch.Tensor]):
    for c in want:
        err = ((got[c] - want[c]).norm() / want[c].norm()).item()
        assert err < REL_TOL, f"{c}: relative error {err:.2e}"
        assert ((want[c] - base[c]).norm() / want[c].norm()).item() > 1e-3, f"{c}: the adapter changes nothing"


def tensor_bytes(path: Path) -> tuple[dict, bytes, dict]:
    """(header without metadata, data bytes, metadata) of a safetensors file."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    meta = header.pop("__metadata__", {})
    return header, raw[8 + n:], meta


@pytest.fixture(scope="module")
def oracle(pipeline, tmp_path_factory):
    """(the SGM file, diffusers' outputs with it loaded by its own kohya loader, the base outputs)."""
    source = sgm_kohya_file(pipeline, tmp_path_factory.mktemp("sgm") / "sdxl_sgm.safetensors")
    want, said = loaded_outputs(pipeline, source)
    assert not [s for s in said if PARTIAL_LOAD.search(s)], said  # diffusers itself loads all of it
    return source, want, outputs(pipeline)


def test_sgm_names_map_to_the_modules_sd_scripts_means(oracle, tiny_sdxl_path):
    from loraforge.models.targets import module_names

    source, _, _ = oracle
    state = kohya_to_lora(load_file(str(source)), module_names(tiny_sdxl_path))
    assert sorted(n.removeprefix("unet.") for n in state if n.startswith("unet.")) == sorted(SGM_UNET.values())
    assert state.hints["kohya_unet_names"] == "sgm" and state.hints["kohya_sgm_layers_per_block"] == "1"
    assert sorted(lora_to_kohya(state)) == sorted(load_file(str(source)))


def test_import_export_diffusers_loads_like_diffusers_own_kohya_loader(home, oracle, pipeline, tmp_path):
    source, want, base = oracle
    run_cli(home, "registry", "import", str(source), "--name", "sgm", "--base", "builtin:tiny-sdxl")
    out = tmp_path / "sgm-diffusers.safetensors"
    run_cli(home, "registry", "export", "sgm", "--format", "diffusers", "-o", str(out))
    got, said = loaded_outputs(pipeline, out)
    assert not [s for s in said if PARTIAL_LOAD.search(s)], said
    assert_same(got, want, base)


def test_export_kohya_gives_back_the_sgm_file(home, oracle, tmp_path):
    source, _, _ = oracle
    run_cli(home, "registry", "import", str(source), "--name", "sgm", "--base", "builtin:tiny-sdxl")
    out = tmp_path / "back.safetensors"
    run_cli(home, "registry", "export", "sgm", "--format", "kohya", "--with-manifest", "-o", str(out))
    (header, data, meta), (orig_header, orig_data, _) = tensor_bytes(out), tensor_bytes(source)
    assert header == orig_header  # same keys, dtypes, shapes and offsets
    assert data == orig_data  # same tensor bytes, in the same order
    assert json.loads(meta["loraforge_manifest"])["name"] == "sgm"


def test_export_kohya_names_diffusers_loads_the_same(home, oracle, pipeline, tmp_path):
    source, _, base = oracle
    # diffusers' kohya loader cannot place a diffusers-named add_embedding (it reads `add.embedding.linear`,
    # pinned below): the SGM file without label_emb is the one both namings must load alike
    sd = {k: v for k, v in load_file(str(source)).items() if "label_emb" not in k}
    source = tmp_path / "no-label-emb.safetensors"
    save_file(sd, str(source))
    want, _ = loaded_outputs(pipeline, source)
    run_cli(home, "registry", "import", str(source), "--name", "sgm", "--base", "builtin:tiny-sdxl")
    out = tmp_path / "diffusers-names.safetensors"
    run_cli(home, "registry", "export", "sgm", "--format", "kohya", "--kohya-names", "diffusers", "-o", str(out))
    keys = load_file(str(out))
    unet_keys = [k for k in keys if k.startswith("lora_unet_")]
    assert len(unet_keys) == len([k for k in sd if k.startswith("lora_unet_")])
    assert not [k for k in unet_keys if re.match(r"lora_unet_(input_blocks|middle_block|output_blocks|time_embed_\d|label_emb|out_\d)", k)]
    assert "lora_unet_down_blocks_1_attentions_0_proj_in.lora_down.weight" in keys
    got, said = loaded_outputs(pipeline, out)
    assert not [s for s in said if PARTIAL_LOAD.search(s)], said
    assert_same(got, want, base)
    # and back to SGM names on request, the layout taken from the base: the SGM file's tensors again
    again = tmp_path / "sgm-again.safetensors"
    run_cli(home, "registry", "import", str(out), "--name", "plain", "--base", "builtin:tiny-sdxl")
    run_cli(home, "registry", "export", "plain", "--format", "kohya", "--kohya-names", "sgm", "-o", str(again))
    assert tensor_bytes(again)[:2] == tensor_bytes(source)[:2]


def test_diffusers_kohya_loader_misplaces_a_diffusers_named_add_embedding(oracle, pipeline, tmp_path):
    """Why an SGM import stays SGM: diffusers' loader turns `lora_unet_add_embedding_linear_1` into
    `add.embedding.linear`, which no module has. Starts failing once diffusers maps it."""
    source, _, _ = oracle
    sd = {k: v for k, v in lora_to_kohya(_plain(kohya_to_lora(load_file(str(source)), _names(pipeline)))).items()
          if "add_embedding" in k or "conv_in" in k}
    path = tmp_path / "add-embedding.safetensors"
    save_file(sd, str(path))
    _, said = loaded_outputs(pipeline, path)
    assert [s for s in said if "add.embedding.linear" in s], said


def _names(pipe) -> dict[str, list[str]]:
    return {"unet": [n for n, m in pipe.unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]}


def _plain(state):
    state.hints = {k: v for k, v in state.hints.items() if not k.startswith("kohya_sgm") and k != "kohya_unet_names"}
    return state


def test_kohya_names_refusals_are_one_line(home, oracle, tmp_path, tiny_sd_path):
    source, _, _ = oracle
    run_cli(home, "registry", "import", str(source), "--name", "sgm", "--base", "builtin:tiny-sdxl")
    line = refused(run_cli(home, "registry", "export", "sgm", "--format", "diffusers", "--kohya-names", "sgm",
                           "-o", str(tmp_path / "x"), ok=False))
    assert "--kohya-names applies to adapters written as kohya files" in line
    from loraforge.formats import write_adapter
    from loraforge.formats.lora import LoraModule, LoraState

    sd1 = tmp_path / "sd1.safetensors"
    write_adapter(LoraState({"unet.down_blocks.0.attentions.0.proj_in": LoraModule(torch.zeros(2, 32),
                                                                                  torch.zeros(32, 2), 2.0)}),
                  sd1, "kohya")
    run_cli(home, "registry", "import", str(sd1), "--name", "sd1", "--base", "builtin:tiny-sd")
    line = refused(run_cli(home, "registry", "export", "sd1", "--format", "kohya", "--kohya-names", "sgm",
                           "-o", str(tmp_path / "y"), ok=False))
    assert "for SDXL adapters" in line and "--kohya-names diffusers" in line
    run_cli(home, "registry", "import", str(sd1), "--name", "nobase")
    line = refused(run_cli(home, "registry", "export", "nobase", "--format", "kohya", "--kohya-names", "sgm",
                           "-o", str(tmp_path / "z"), ok=False))
    assert "imported without a base" in line
    assert not (tmp_path / "x").exists() and not (tmp_path / "y.safetensors").exists()


def test_sgm_key_the_base_lacks_is_one_line(home, oracle, tmp_path):
    source, _, _ = oracle
    sd = load_file(str(source))
    # input_blocks_7 is a fourth down level, which the tiny SDXL does not have
    for suffix, t in [("lora_down.weight", torch.zeros(RANK, 64)), ("lora_up.weight", torch.zeros(64, RANK))]:
        sd[f"lora_unet_input_blocks_7_1_proj_in.{suffix}"] = t
    bad = tmp_path / "bad.safetensors"
    save_file(sd, str(bad))
    line = refused(run_cli(home, "registry", "import", str(bad), "--name", "bad", "--base", "builtin:tiny-sdxl",
                           ok=False))
    assert "lora_unet_input_blocks_7_1_proj_in" in line and "base's unet" in line, line
    assert json.loads(run_cli(home, "registry", "ls", "--json").output) == []  # nothing registered


def test_sgm_names_without_a_base_use_sdxl_and_refuse_what_does_not_fit(oracle):
    source, _, _ = oracle
    # the tiny SDXL has one layer per block, SDXL two: its input_blocks_3 is not a resnet of SDXL's level 0
    with pytest.raises(FormatError, match="does not fit SDXL's UNet"):
        kohya_to_lora(load_file(str(source)))


# SDXL base 1.0's UNet (stabilityai/stable-diffusion-xl-base-1.0, unet/config.json), built on the meta
# device: its module names without its weights.
SDXL_UNET_CONFIG = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)


def test_real_sdxl_sgm_names_round_trip_through_diffusers_own_kohya_conversion():
    """Every Linear/Conv2d of the real SDXL UNet gets an SGM name that diffusers' kohya conversion
    (`_maybe_map_sgm_blocks_to_diffusers` with the UNet config, then `_convert_unet_lora_key`) turns
    back into that module, and loraforge reads those names back, without a base, to the same paths."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.lora_conversion_utils import (
        _convert_non_diffusers_lora_to_diffusers, _maybe_map_sgm_blocks_to_diffusers,
    )
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    from loraforge.formats.kohya_names import sgm_paths

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET_CONFIG)
    paths = sorted(n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)))
    sgm = sgm_paths(paths, 2)
    assert sgm["down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k"] == \
        "input_blocks.4.1.transformer_blocks.1.attn2.to_k"  # kohya's name for it, as its SDXL files say
    # each down factor is tagged with its module's index, so the check is per module, not per set
    sd = {}
    for i, path in enumerate(paths):
        flat = "lora_unet_" + sgm[path].replace(".", "_")
        sd[flat + ".lora_down.weight"] = torch.full((1, 1), float(i))
        sd[flat + ".lora_up.weight"] = torch.zeros(1, 1)
    mapped = _maybe_map_sgm_blocks_to_diffusers(dict(sd), unet.config)
    converted, _ = _convert_non_diffusers_lora_to_diffusers(mapped)  # raises on a key it cannot place
    peft = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in converted.items()})
    theirs = {k.removesuffix(".lora_A.weight"): paths[int(v.item())] for k, v in peft.items() if ".lora_A." in k}
    assert len(theirs) == len(paths)
    wrong = {t: p for t, p in theirs.items() if t != p}
    assert not wrong, list(wrong.items())[:5]
    # import without a base: SDXL's layout is the default, and every name comes back to its module
    state = kohya_to_lora(sd)
    assert {n.removeprefix("unet."): int(m.down.item()) for n, m in state.items()} == \
        {p: i for i, p in enumerate(paths)}


def test_sgm_upsampler_after_a_resnet_alone_comes_back_as_it_was(tiny_sd_path):
    """An up level without attention (the tiny SD1's first) has its upsampler at SGM index 1, not 2."""
    from loraforge.models.targets import module_names

    sd = {}
    for flat, shape_down, shape_up in [("output_blocks_1_1_conv", (2, 64, 3, 3), (64, 2, 1, 1)),
                                       ("output_blocks_3_1_proj_in", (2, 32), (32, 2))]:
        sd[f"lora_unet_{flat}.lora_down.weight"] = torch.randn(shape_down)
        sd[f"lora_unet_{flat}.lora_up.weight"] = torch.randn(shape_up)
    state = kohya_to_lora(sd, module_names(tiny_sd_path))
    assert sorted(state) == ["unet.up_blocks.0.upsamplers.0.conv", "unet.up_blocks.1.attentions.1.proj_in"]
    assert state.hints["kohya_sgm_plain_up_levels"] == "0"
    back = lora_to_kohya(state)
    assert sorted(back) == sorted(sd) and all(torch.equal(back[k], sd[k]) for k in sd)


def test_sgm_named_lycoris_module_keeps_its_name_and_tensors(tiny_sdxl_path):
    """LyCORIS files for SDXL use the same SGM names: a LoHa module maps like a LoRA pair."""
    from loraforge.models.targets import module_names

    gen = torch.Generator().manual_seed(3)
    base = "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q"
    sd = {f"{base}.{name}": torch.randn(shape, generator=gen) for name, shape in
          [("hada_w1_a", (64, 2)), ("hada_w1_b", (2, 64)), ("hada_w2_a", (64, 2)), ("hada_w2_b", (2, 64))]}
    sd[f"{base}.alpha"] = torch.tensor(1.0)
    state = kohya_to_lora(sd, module_names(tiny_sdxl_path))
    assert list(state) == ["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"]
    back = lora_to_kohya(state)
    assert sorted(back) == sorted(sd) and all(torch.equal(back[k], sd[k]) for k in sd)


def test_a_file_mixing_sgm_and_diffusers_unet_names_is_refused():
    sd = {}
    for flat in ("input_blocks_4_1_proj_in", "down_blocks_1_attentions_0_proj_out"):
        sd[f"lora_unet_{flat}.lora_down.weight"] = torch.zeros(2, 8)
        sd[f"lora_unet_{flat}.lora_up.weight"] = torch.zeros(8, 2)
    with pytest.raises(FormatError, match="lora_unet_down_blocks_1_attentions_0_proj_out.* a file must use one naming"):
        kohya_to_lora(sd)


@pytest.mark.parametrize("hints, message", [
    ({"kohya_unet_names": "ldm"}, "expected one of diffusers, sgm"),
    ({"kohya_unet_names": "sgm", "kohya_sgm_layers_per_block": "two"}, "expected a positive whole number"),
    ({"kohya_unet_names": "sgm", "kohya_sgm_layers_per_block": "2", "kohya_sgm_plain_up_levels": "0;1"},
     "expected up-level numbers"),
])
def test_damaged_sgm_hints_in_a_loraforge_file_are_one_line(tmp_path, hints, message):
    from loraforge.formats import read_adapter

    path = tmp_path / "a.safetensors"
    save_file({"unet.conv_in.lora_down.weight": torch.zeros(2, 4, 3, 3),
               "unet.conv_in.lora_up.weight": torch.zeros(8, 2, 1, 1)}, str(path),
              metadata={"loraforge.hints": json.dumps(hints)})
    with pytest.raises(FormatError, match=message):
        read_adapter(path)


def test_sgm_hints_without_their_layout_are_refused_on_write():
    state = kohya_to_lora({"lora_unet_conv_in.lora_down.weight": torch.zeros(2, 4, 3, 3),
                           "lora_unet_conv_in.lora_up.weight": torch.zeros(8, 2, 1, 1)})
    state.hints["kohya_unet_names"] = "sgm"
    with pytest.raises(FormatError, match="lack kohya_sgm_layers_per_block"):
        lora_to_kohya(state)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_sgm_file_exports_to_the_same_tensors(home, pipeline, tmp_path, dtype):
    """sd-scripts saves in fp16 or bf16 (alpha too): the round trip keeps every dtype and byte."""
    source = sgm_kohya_file(pipeline, tmp_path / "half.safetensors", dtype=dtype)
    run_cli(home, "registry", "import", str(source), "--name", "half", "--base", "builtin:tiny-sdxl")
    out = tmp_path / "back.safetensors"
    run_cli(home, "registry", "export", "half", "--for", "comfyui", "-o", str(out))
    assert tensor_bytes(out)[:2] == tensor_bytes(source)[:2]
