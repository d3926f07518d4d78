"""The other real adapter layouts users bring (PEFT folders with rank/alpha patterns or DoRA, diffusers files
with adapter metadata or DoRA, the old attention-processor keys, pickled `.bin` files, ai-toolkit files, kohya
files without alphas or with fp16/int64 alphas and mixed dtypes), each produced by its owner's code where the
owner is installed (PEFT, diffusers, lycoris-lora) and checked against the owner's own forward pass or loader
(relative error < 1e-4 in fp32); and the one-line refusals of layouts loraforge does not know, of files that
are no adapter (embeddings, folders holding adapters) and of architectures it does not adapt."""

from __future__ import annotations

import copy
import json
import re
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from loraforge.formats import FORMATS
from loraforge.registry import Registry

from cli_helpers import refused, run_cli

torch.set_num_threads(1)


# -- refusals: unknown layouts and other architectures --------------------------------------

def _detecting_formats() -> str:
    return ", ".join(sorted(name for name, fmt in FORMATS.items() if fmt.detect is not None))


def _refused_import(home: Path, path: Path) -> str:
    line = refused(run_cli(home, "registry", "import", str(path), "--name", "x", ok=False))
    assert Registry(home).list() == []
    return line


def test_an_unknown_layout_names_its_first_unknown_key_and_the_known_formats(home, tmp_path):
    path = tmp_path / "odd.safetensors"
    save_file({"unet.mid_block.attn1.to_q.lora_A.weight": torch.ones(2, 4),
               "unet.mid_block.attn1.to_q.lora_B.weight": torch.ones(4, 2),
               "zz.adapter.scale": torch.ones(1)}, str(path))
    line = _refused_import(home, path)
    assert line == (f"Error: {path} is not a LoRA adapter in a known format (first unknown key: zz.adapter.scale); "
                    f"known: {_detecting_formats()}")
    assert {"diffusers", "kohya", "loraforge", "peft"} <= set(line.rsplit("known: ", 1)[1].split(", "))


def test_a_file_mixing_two_formats_names_one_key_of_each(home, tmp_path):
    path = tmp_path / "mixed.safetensors"
    save_file({"unet.mid_block.attn1.to_q.lora_A.weight": torch.ones(2, 4),
               "unet.mid_block.attn1.to_q.lora_B.weight": torch.ones(4, 2),
               "lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": torch.ones(2, 4),
               "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight": torch.ones(4, 2)}, str(path))
    line = _refused_import(home, path)
    assert "mixes the keys of several adapter formats" in line
    assert "kohya: lora_unet_mid_block_attentions_0_proj_in.lora_down.weight" in line
    assert "diffusers: unet.mid_block.attn1.to_q.lora_A.weight" in line


def _tiny_sd3():
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=4,
                                 num_attention_heads=2, joint_attention_dim=8, caption_projection_dim=8,
                                 pooled_projection_dim=8, out_channels=4, pos_embed_max_size=8)


# Flux's own transformer LoRAs import (tests/test_flux_formats.py); SD3's attention modules have Flux's paths, but its
# patch embedding does not.
@pytest.mark.parametrize("family, build, pipeline, says", [
    ("sd3", _tiny_sd3, "StableDiffusion3Pipeline",
     "a LoRA for a diffusion transformer other than Flux (SD3, PixArt, Sana, ...) (key transformer.pos_embed.proj"),
])
def test_a_transformer_lora_saved_by_diffusers_says_which_architecture_it_is(home, tmp_path, family, build,
                                                                             pipeline, says):
    import diffusers
    from peft import LoraConfig, get_peft_model_state_dict

    model = build()
    model.add_adapter(LoraConfig(r=2, target_modules=["to_q", "to_k", "pos_embed.proj"]))
    getattr(diffusers, pipeline).save_lora_weights(str(tmp_path / family),
                                                   transformer_lora_layers=get_peft_model_state_dict(model))
    path = tmp_path / family / "pytorch_lora_weights.safetensors"
    line = _refused_import(home, path)
    assert line.startswith(f"Error: {path} is {says}"), line
    assert line.endswith("an architecture loraforge does not adapt; it adapts SD1.x, SDXL "
                         "(UNet and CLIP text encoders) and Flux")


@pytest.mark.parametrize("key, family", [
    ("lora_unet_joint_blocks_0_x_block_attn_qkv", "SD3"),  # kohya sd-scripts' SD3 names
    ("lora_te3_encoder_block_0_layer_0_SelfAttention_q", "SD3 (T5 text encoder)"),  # T5 without Flux keys
])
def test_kohya_files_of_other_architectures_say_which_they_are(home, tmp_path, key, family):
    path = tmp_path / "other.safetensors"
    save_file({f"{key}.lora_down.weight": torch.ones(2, 8), f"{key}.lora_up.weight": torch.ones(8, 2),
               f"{key}.alpha": torch.tensor(2.0)}, str(path))
    line = _refused_import(home, path)
    assert line.startswith(f"Error: {path} is a LoRA for {family} (key {key}.alpha)"), line


# -- the tiny pipelines, what they compute, and a LoraState applied by hand ------------------

REL_TOL = 1e-4
PARTIAL_LOAD = re.compile(r"unexpected|missing|not (been )?(correctly )?(loaded|renamed)|no lora keys|incompatible"
                          r"|did not match|ignored", re.I)
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


@pytest.fixture(scope="module")
def pipelines(tiny_sd_path, tiny_sdxl_path):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return {"sd1": StableDiffusionPipeline.from_pretrained(str(tiny_sd_path), safety_checker=None,
                                                           requires_safety_checker=False),
            "sdxl": StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl_path))}


def fresh(pipe):
    """A copy of `pipe` without its VAE (never run here) that a loader may change."""
    vae, pipe.vae = pipe.vae, None
    try:
        return copy.deepcopy(pipe)
    finally:
        pipe.vae = vae


def outputs(pipe) -> dict[str, torch.Tensor]:
    """What the UNet and each text encoder compute on fixed inputs."""
    gen = torch.Generator().manual_seed(1)
    unet = pipe.unet
    cfg = unet.config
    sample = torch.randn(1, cfg.in_channels, 16, 16, generator=gen)
    context = torch.randn(1, 7, cfg.cross_attention_dim, generator=gen)
    extra = {}
    if cfg.addition_embed_type == "text_time":
        text = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        extra["added_cond_kwargs"] = {"text_embeds": torch.randn(1, text, generator=gen),
                                      "time_ids": torch.randn(1, 6, generator=gen)}
    ids = torch.tensor([[1, 5, 9, 3, 2, 7]])
    with torch.no_grad():
        out = {"unet": unet(sample, 10, encoder_hidden_states=context, **extra).sample}
        for name in TEXT_ENCODERS:
            te = getattr(pipe, name, None)
            if te is not None:
                out[name] = te(ids).last_hidden_state
    return out


def assert_same_outputs(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], base=None):
    for name in want:
        err = ((got[name] - want[name]).norm() / want[name].norm()).item()
        assert err < REL_TOL, (name, err)
        if base is not None and name in base:
            assert not torch.allclose(want[name], base[name], atol=1e-5), f"the adapter leaves {name} unchanged"


def applied(pipe, state) -> dict[str, torch.Tensor]:
    """The outputs of `pipe` with W + ΔW of every module of `state` written into its weights."""
    pipe = fresh(pipe)
    with torch.no_grad():
        for component in state.components:
            modules = dict(getattr(pipe, component).named_modules())
            for path, m in state.component(component).items():
                module = modules.get(path) or modules[path.removeprefix("text_model.")]
                module.weight += m.delta(torch.float32, base_weight=module.weight).to(module.weight.dtype)
    return outputs(pipe)


def randomized(model, seed: int):
    """`model` (PEFT-wrapped) with random factors in every LoRA layer, so B is not zero."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def loaded_by_diffusers(pipe, path: Path):
    """A copy of `pipe` after diffusers' `load_lora_weights(path)`, refusing any partial load."""
    from diffusers.utils import logging as diffusers_logging

    pipe = fresh(pipe)
    diffusers_logging.set_verbosity_warning()
    lines: list[str] = []
    handler = _Lines(lines)
    loggers = [diffusers_logging.get_logger("diffusers"), diffusers_logging.get_logger("peft"),
               __import__("logging").getLogger("transformers")]  # its loading report names unexpected keys
    for logger in loggers:
        logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipe.load_lora_weights(str(path))
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    said = lines + [str(w.message) for w in caught]
    present = {k.split(".", 1)[0] for k in load_file_keys(path)}  # components the file has keys for
    said = [m for m in said if not re.search(r"No LoRA keys .* prefix='(\w+)'", m)
            or re.search(r"prefix='(\w+)'", m)[1] in present]
    assert not [m for m in said if PARTIAL_LOAD.search(m)], said
    return pipe


class _Lines(__import__("logging").Handler):
    def __init__(self, lines: list[str]):
        super().__init__()
        self.lines = lines

    def emit(self, record):
        self.lines.append(record.getMessage())


def imported(home: Path, path: Path, name: str, fmt: str, out: Path):
    """Import `path` through the CLI and export it as `fmt` to `out`; (stored state, exported files)."""
    from loraforge.formats import read_adapter

    run_cli(home, "registry", "import", str(path), "--name", name)
    run_cli(home, "registry", "export", f"{name}:1", "--format", fmt, "-o", str(out))
    return read_adapter(path)[0], out


# -- PEFT folders with rank_pattern / alpha_pattern -----------------------------------------

PEFT_CASES = {
    "unet": dict(r=4, lora_alpha=8, target_modules=["to_q", "to_v", "to_out.0", "proj_in", "conv1", "ff.net.2"],
                 rank_pattern={"down_blocks.0.*to_q": 2, "proj_in": 3}, alpha_pattern={"to_v": 3, "conv1": 16}),
    "text_encoder": dict(r=2, lora_alpha=6, target_modules=["q_proj", "v_proj", "fc1"],
                         rank_pattern={"layers.0.self_attn.q_proj": 4}, alpha_pattern={"fc1": 1}),
    "text_encoder_2": dict(r=3, lora_alpha=2, target_modules=["k_proj", "out_proj", "fc2"],
                           rank_pattern={"fc2": 1}, alpha_pattern={"out_proj": 5}),
}


@pytest.mark.parametrize("family, component", [("sd1", "unet"), ("sd1", "text_encoder"), ("sdxl", "text_encoder_2")])
def test_a_peft_folder_with_rank_and_alpha_patterns_imports_exactly_and_exports_them(home, tmp_path, pipelines,
                                                                                   family, component):
    from peft import LoraConfig, PeftModel, get_peft_model
    from peft.tuners.lora import LoraLayer

    pipe = pipelines[family]
    base = getattr(pipe, component)
    produced = randomized(get_peft_model(copy.deepcopy(base), LoraConfig(**PEFT_CASES[component])), seed=2)
    produced.save_pretrained(str(tmp_path / "peft"))
    layers = {n: m for n, m in produced.named_modules() if isinstance(m, LoraLayer)}
    assert {m.r["default"] for m in layers.values()} >= {PEFT_CASES[component]["r"],
                                                         *PEFT_CASES[component]["rank_pattern"].values()}

    state, out = imported(home, tmp_path / "peft", "p", "peft", tmp_path / "out")
    with_peft = fresh(pipe)
    setattr(with_peft, component, produced)
    want = outputs(with_peft)
    assert_same_outputs(applied(pipe, state), want, base={component: outputs(pipe)[component]})

    loaded = PeftModel.from_pretrained(copy.deepcopy(base), str(out))
    reloaded = {n: m for n, m in loaded.named_modules() if isinstance(m, LoraLayer)}
    assert sorted(reloaded) == sorted(layers)
    for name, layer in layers.items():  # PEFT resolves the exported patterns to the same rank and scale
        assert (reloaded[name].r["default"], reloaded[name].scaling["default"]) == \
            (layer.r["default"], layer.scaling["default"]), name
    with_ours = fresh(pipe)
    setattr(with_ours, component, loaded)
    assert_same_outputs(outputs(with_ours), want)


# -- diffusers files with lora_adapter_metadata ---------------------------------------------

DIFFUSERS_CASES = {
    "unet": dict(r=4, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_out"],
                 rank_pattern={"attn2.to_k": 2}, alpha_pattern={"to_v": 12, "proj_out": 1}),
    "text_encoder": dict(r=2, lora_alpha=6, target_modules=["q_proj", "v_proj"], alpha_pattern={"v_proj": 1}),
    "text_encoder_2": dict(r=3, lora_alpha=1, target_modules=["k_proj", "fc1"], rank_pattern={"fc1": 2}),
}


def _saved_by_diffusers(pipe, folder: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A LoRA on every component of `pipe` (alpha ≠ rank, with patterns) saved by diffusers'
    `save_lora_weights` with each component's adapter metadata; (file, the producer's outputs)."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    producer = fresh(pipe)
    layers, metadata = {}, {}
    for i, name in enumerate(c for c in ("unet", *TEXT_ENCODERS) if getattr(producer, c, None) is not None):
        model = getattr(producer, name)
        config = LoraConfig(**DIFFUSERS_CASES[name])
        inject_adapter_in_model(config, model)  # what `add_adapter` does; transformers' wants a newer PEFT
        randomized(model, seed=10 + i)
        layers[f"{name}_lora_layers"] = get_peft_model_state_dict(model)
        metadata[f"{name}_lora_adapter_metadata"] = config.to_dict()
    type(producer).save_lora_weights(str(folder), **layers, **metadata)
    return folder / "pytorch_lora_weights.safetensors", outputs(producer)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_a_diffusers_file_with_adapter_metadata_imports_with_its_alphas_and_exports_for_load_lora_weights(
        home, tmp_path, pipelines, family):
    from loraforge.formats import read_header

    pipe = pipelines[family]
    path, want = _saved_by_diffusers(pipe, tmp_path / "saved")
    assert "lora_adapter_metadata" in read_header(path)[1]
    assert_same_outputs(outputs(loaded_by_diffusers(pipe, path)), want)  # the owner's loader agrees with itself

    state, out = imported(home, path, "d", "diffusers", tmp_path / "out.safetensors")
    assert 12.0 in set(state.alphas.values()) and not all(m.alpha == m.rank for m in state.values())
    text = [n for n in state if not n.startswith("unet.")]
    assert text and all(n.split(".", 1)[1].startswith("text_model.encoder.") for n in text), text  # canonical
    assert_same_outputs(applied(pipe, state), want, base=outputs(pipe))
    assert_same_outputs(outputs(loaded_by_diffusers(pipe, out)), want)


# -- the older diffusers attention-processor keys ------------------------------------------

def _old_diffusers_file(pipe, path: Path, unet_prefix: str) -> dict[str, torch.Tensor]:
    """An SD1 LoRA in the keys diffusers wrote before PEFT (UNet `…attn1.processor.to_q_lora.down.weight`,
    text encoder `…q_proj.lora_linear_layer.down.weight`, alpha = rank), spelled by inverting diffusers' own
    old-to-new table and by its PEFT-to-diffusers converter; returns the producer's outputs."""
    from diffusers.utils.state_dict_utils import UNET_TO_DIFFUSERS, convert_state_dict_to_diffusers
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    producer = fresh(pipe)
    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"]),
                            producer.unet)
    inject_adapter_in_model(LoraConfig(r=3, lora_alpha=3, target_modules=["q_proj", "out_proj", "fc1"]),
                            producer.text_encoder)
    randomized(producer.unet, seed=20), randomized(producer.text_encoder, seed=21)
    new_to_old = {new + ".weight": old.replace(".to_", ".processor.to_") + ".weight"
                  for old, new in UNET_TO_DIFFUSERS.items() if old.startswith(".to_") and "magnitude" not in old}
    sd = {}
    for key, value in get_peft_model_state_dict(producer.unet).items():
        suffix = next(s for s in new_to_old if key.endswith(s))
        sd[unet_prefix + key[: -len(suffix)] + new_to_old[suffix]] = value
    for key, value in convert_state_dict_to_diffusers(get_peft_model_state_dict(producer.text_encoder)).items():
        sd[f"text_encoder.{key}"] = value
    save_file(sd, str(path))
    return outputs(producer)


@pytest.mark.parametrize("unet_prefix", ["unet.", ""])
def test_old_attention_processor_keys_import_as_diffusers_loads_them(home, tmp_path, pipelines, unet_prefix):
    pipe = pipelines["sd1"]
    path = tmp_path / "pytorch_lora_weights.safetensors"
    want = _old_diffusers_file(pipe, path, unet_prefix)
    keys = sorted(load_file_keys(path))
    assert any(".processor.to_out_lora.down.weight" in k for k in keys)
    assert any(".q_proj.lora_linear_layer.up.weight" in k for k in keys)
    if unet_prefix:  # diffusers 0.42 says "no LoRA keys ... with the prefix='unet'" for the oldest files
        assert_same_outputs(outputs(loaded_by_diffusers(pipe, path)), want)

    state, out = imported(home, path, "old", "diffusers", tmp_path / "new.safetensors")
    assert any(n.endswith(".attn1.to_out.0") for n in state) and any(n.endswith("self_attn.q_proj") for n in state)
    assert_same_outputs(applied(pipe, state), want, base=outputs(pipe))
    assert_same_outputs(outputs(loaded_by_diffusers(pipe, out)), want)


def load_file_keys(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return list(f.keys())


# -- ai-toolkit files ----------------------------------------------------------------------
# ai-toolkit (ostris) trains SD1/SDXL LoRAs with its LoRASpecialNetwork, derived from sd-scripts' LoRANetwork but
# attached to diffusers' UNet: every Linear of the UNet (and its 3×3 convs when a conv rank is set) and the
# Linears of CLIP's attention and MLP blocks, named `lora_unet_` / `lora_te_` (SDXL `lora_te1_`, `lora_te2_`)
# plus the flattened diffusers / transformers path, each with `.alpha`; `save_weights` casts every tensor,
# alpha included, to the save dtype (float16 by default). Since July 2024 its SDXL files use these diffusers
# names too (the SGM keymap it used before was removed). Flux, SD3 and other transformers are saved in PEFT
# keys (`transformer.….lora_A.weight`, no alpha). The test writes files by those rules.

AI_TOOLKIT_PREFIXES = {"sd1": {"unet": "lora_unet", "text_encoder": "lora_te"},
                       "sdxl": {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}}


def _ai_toolkit_file(pipe, family: str, path: Path, dtype=torch.float16, skip=("add_embedding",)):
    """(the outputs W + ΔW gives, the file's tensors) of an ai-toolkit-style LoRA written to `path`."""
    gen = torch.Generator().manual_seed(30)
    sd, target = {}, fresh(pipe)
    for component, prefix in AI_TOOLKIT_PREFIXES[family].items():
        model = getattr(target, component)
        if component == "unet":
            modules = {n: m for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
        else:
            modules = {f"{n}.{c}": m for n, block in model.named_modules()
                       if type(block).__name__ in ("CLIPAttention", "CLIPMLP")
                       for c, m in block.named_children() if isinstance(m, torch.nn.Linear)}
        for name, module in sorted(modules.items()):
            if any(word in name for word in skip):
                continue
            conv3 = isinstance(module, torch.nn.Conv2d) and module.kernel_size != (1, 1)
            rank, alpha = (2, 1.0) if conv3 else (4, 2.0)
            w = module.weight
            down = (torch.randn(rank, *w.shape[1:], generator=gen) * 0.1).to(dtype)
            up = (torch.randn(w.shape[0], rank, *([1, 1] if w.ndim == 4 else []), generator=gen) * 0.1).to(dtype)
            # names as ai-toolkit wrote them, under the transformers it pins (CLIPTextModel with `text_model.`)
            file_name = name if component == "unet" or hasattr(model, "text_model") else f"text_model.{name}"
            key = f"{prefix}.{file_name}".replace(".", "_")
            sd.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                       f"{key}.alpha": torch.tensor(alpha).to(dtype)})
            with torch.no_grad():
                flat = up.float().flatten(1) @ down.float().flatten(1)
                w += (alpha / rank) * flat.reshape(w.shape)
    save_file(sd, str(path), metadata={"ss_base_model_version": "sdxl_1.0" if family == "sdxl" else "sd_1.5",
                                       "software": json.dumps({"name": "ai-toolkit"})})
    return outputs(target), sd


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_an_ai_toolkit_file_imports_as_diffusers_kohya_loader_applies_it_and_exports_unchanged(
        home, tmp_path, pipelines, family):
    from safetensors.torch import load_file

    pipe = pipelines[family]
    path = tmp_path / "aitk.safetensors"
    # diffusers' kohya converter mangles SDXL's add_embedding names (see test_export_consumers), so the
    # file the owner's loader checks leaves those two layers out
    want, sd = _ai_toolkit_file(pipe, family, path)
    assert {t.dtype for t in sd.values()} == {torch.float16}
    assert_same_outputs(outputs(loaded_by_diffusers(pipe, path)), want)

    state, out = imported(home, path, "aitk", "kohya", tmp_path / "back.safetensors")
    assert_same_outputs(applied(pipe, state), want, base=outputs(pipe))
    back = load_file(str(out))
    assert sorted(back) == sorted(sd)
    assert all(back[k].dtype == sd[k].dtype and torch.equal(back[k], sd[k]) for k in sd)


def test_an_ai_toolkit_sdxl_file_with_add_embedding_imports_exactly(home, tmp_path, pipelines):
    pipe = pipelines["sdxl"]
    path = tmp_path / "aitk.safetensors"
    want, sd = _ai_toolkit_file(pipe, "sdxl", path, dtype=torch.bfloat16, skip=())
    assert any(k.startswith("lora_unet_add_embedding_linear_1") for k in sd)
    state, _ = imported(home, path, "aitk", "diffusers", tmp_path / "out.safetensors")
    assert_same_outputs(applied(pipe, state), want, base=outputs(pipe))
    assert_same_outputs(outputs(loaded_by_diffusers(pipe, tmp_path / "out.safetensors")), want)


# -- kohya files with .alpha missing, alpha in fp16 or int64, and mixed factor dtypes ----------

def _kohya_by_diffusers(pipe) -> dict[str, torch.Tensor]:
    """An SD1 kohya state dict made by diffusers' own `convert_state_dict_to_kohya` from PEFT layers
    (int64 alphas equal to the rank, `lora_te1_` for the text encoder)."""
    from diffusers.utils import convert_state_dict_to_kohya
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    producer = fresh(pipe)
    sd = {}
    for name, targets, seed in (("unet", ["to_q", "to_v", "proj_in", "ff.net.2"], 40),
                                # every attention and MLP projection, as sd-scripts targets them: with q_proj but
                                # no out_proj, diffusers' kohya loader takes the file for the newer spelling and
                                # drops q_proj
                                ("text_encoder", ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"], 41)):
        model = getattr(producer, name)
        inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=targets), model)
        randomized(model, seed)
        sd.update({f"{name}.{k}": v for k, v in get_peft_model_state_dict(model).items()})
    # Under transformers 5 the converter spells CLIP paths without `text_model_` (`lora_te1_encoder_layers_…`),
    # which diffusers' own kohya loader then drops; sd-scripts writes `lora_te_text_model_encoder_…` for SD1.
    return {k.replace("lora_te1_encoder_", "lora_te_text_model_encoder_"): v
            for k, v in convert_state_dict_to_kohya(sd).items()}


def _no_alpha(sd):
    return {k: v for k, v in sd.items() if not k.endswith(".alpha")}


def _fp16_alpha(sd):
    return {k: (torch.tensor(2.0, dtype=torch.float16) if k.endswith(".alpha") else v) for k, v in sd.items()}


def _mixed_dtypes(sd):
    """Downs in bf16, ups in fp16, alphas as fp32 scalars, one module left in fp32."""
    out = {}
    for i, (k, v) in enumerate(sorted(sd.items())):
        if k.endswith(".alpha"):
            out[k] = torch.tensor(3.0)
        elif "proj_in" in k:
            out[k] = v.float()
        else:
            out[k] = v.to(torch.bfloat16 if ".lora_down." in k else torch.float16)
    return out


@pytest.mark.parametrize("variant", [lambda sd: sd, _no_alpha, _fp16_alpha, _mixed_dtypes],
                         ids=["int64-alpha", "no-alpha", "fp16-alpha", "bf16-fp16-fp32-mixture"])
def test_kohya_files_without_alpha_or_with_odd_dtypes_import_as_diffusers_kohya_loader_applies_them(
        home, tmp_path, pipelines, variant):
    from safetensors.torch import load_file

    pipe = pipelines["sd1"]
    made = _kohya_by_diffusers(pipe)
    assert {made[k].dtype for k in made if k.endswith(".alpha")} == {torch.int64}
    assert any(k.startswith("lora_te_text_model_encoder_") for k in made)
    sd = variant(made)
    path = tmp_path / "kohya.safetensors"
    save_file(sd, str(path))
    want = outputs(loaded_by_diffusers(pipe, path))

    state, out = imported(home, path, "k", "kohya", tmp_path / "back.safetensors")
    assert_same_outputs(applied(pipe, state), want, base=outputs(pipe))
    back = load_file(str(out))
    assert sorted(back) == sorted(sd)
    for k, v in sd.items():  # factors are written back as they were read, alphas with their value
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    assert_same_outputs(outputs(loaded_by_diffusers(pipe, out)), want)


# diffusers' `convert_state_dict_to_kohya` under transformers 5 spells CLIPTextModel paths without
# `text_model_` (`lora_te1_encoder_layers_0_self_attn_q_proj`); they match their base's canonical paths
# (tests/test_variant_gaps.py checks such files of lycoris' against its forward pass).
def test_kohya_text_encoder_keys_without_the_text_model_wrapper_import_against_their_base(home, tmp_path, pipelines):
    made = _kohya_by_diffusers(pipelines["sd1"])
    sd = {k.replace("lora_te_text_model_encoder_", "lora_te1_encoder_"): v for k, v in made.items()}
    path = tmp_path / "kohya.safetensors"
    save_file(sd, str(path))
    run_cli(home, "registry", "import", str(path), "--name", "k", "--base", "builtin:tiny-sd")


def test_a_peft_config_without_lora_alpha_gets_peft_s_default_alpha(home, tmp_path, pipelines):
    """PEFT builds the config it loads with its own defaults, so a hand-written adapter_config.json without
    `lora_alpha` is scaled by LoraConfig's default alpha (8), not by alpha = rank."""
    from peft import LoraConfig, PeftModel, get_peft_model

    unet = pipelines["sd1"].unet
    produced = randomized(get_peft_model(copy.deepcopy(unet), LoraConfig(r=2, target_modules=["to_q", "to_v"])), 3)
    produced.save_pretrained(str(tmp_path / "peft"))
    config_path = tmp_path / "peft" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    del config["lora_alpha"]
    config_path.write_text(json.dumps(config))
    loaded = PeftModel.from_pretrained(copy.deepcopy(unet), str(tmp_path / "peft"))
    with_peft = fresh(pipelines["sd1"])
    with_peft.unet = loaded
    state, _ = imported(home, tmp_path / "peft", "p", "peft", tmp_path / "out")
    assert set(state.alphas.values()) == {float(LoraConfig().lora_alpha)}
    assert_same_outputs(applied(pipelines["sd1"], state), outputs(with_peft))


# -- DoRA in PEFT folders and diffusers files ------------------------------------------------

def test_a_peft_dora_folder_imports_as_peft_computes_it(home, tmp_path, pipelines):
    from peft import LoraConfig, get_peft_model

    pipe = pipelines["sd1"]
    config = LoraConfig(r=3, lora_alpha=5, use_dora=True, target_modules=["to_q", "to_v", "conv1", "proj_in"],
                        alpha_pattern={"to_v": 2})
    produced = randomized(get_peft_model(copy.deepcopy(pipe.unet), config), seed=50)
    produced.save_pretrained(str(tmp_path / "peft"))
    with_peft = fresh(pipe)
    with_peft.unet = produced
    run_cli(home, "registry", "import", str(tmp_path / "peft"), "--name", "dora")
    from loraforge.formats import read_adapter

    state = read_adapter(tmp_path / "peft")[0]
    assert state.variants == {"dora": len(state)}
    want = outputs(with_peft)
    assert_same_outputs(applied(pipe, state), want, base={"unet": outputs(pipe)["unet"]})

    run_cli(home, "registry", "export", "dora:1", "--format", "peft", "-o", str(tmp_path / "out"))
    from peft import PeftModel

    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["use_dora"] is True
    with_ours = fresh(pipe)
    with_ours.unet = PeftModel.from_pretrained(copy.deepcopy(pipe.unet), str(tmp_path / "out"))
    assert_same_outputs(outputs(with_ours), want)
    run_cli(home, "registry", "export", "dora:1", "--format", "diffusers", "-o", str(tmp_path / "d.safetensors"))
    assert_same_outputs(outputs(loaded_by_diffusers(pipe, tmp_path / "d.safetensors")), want)


def test_a_diffusers_dora_file_imports_as_load_lora_weights_applies_it(home, tmp_path, pipelines):
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    pipe = pipelines["sd1"]
    producer = fresh(pipe)
    config = LoraConfig(r=2, lora_alpha=4, use_dora=True, target_modules=["to_k", "to_out.0", "conv2"])
    inject_adapter_in_model(config, producer.unet)
    randomized(producer.unet, seed=51)
    type(producer).save_lora_weights(str(tmp_path / "saved"), unet_lora_layers=get_peft_model_state_dict(producer.unet),
                                     unet_lora_adapter_metadata=config.to_dict())
    path = tmp_path / "saved" / "pytorch_lora_weights.safetensors"
    assert any(k.endswith(".lora_magnitude_vector") for k in load_file_keys(path))
    want = outputs(producer)
    assert_same_outputs(outputs(loaded_by_diffusers(pipe, path)), want)
    run_cli(home, "registry", "import", str(path), "--name", "dora")
    from loraforge.formats import read_adapter

    state = read_adapter(path)[0]
    assert state.variants == {"dora": len(state)}
    assert_same_outputs(applied(pipe, state), want, base={"unet": outputs(pipe)["unet"]})
    run_cli(home, "registry", "export", "dora:1", "--format", "diffusers", "-o", str(tmp_path / "d.safetensors"))
    assert_same_outputs(outputs(loaded_by_diffusers(pipe, tmp_path / "d.safetensors")), want)


def test_a_component_mixing_dora_and_plain_modules_is_refused_for_peft_and_diffusers(home, tmp_path):
    """PEFT's use_dora covers a whole model: a kohya file with `dora_scale` on one layer only cannot be spelled."""
    g = torch.Generator().manual_seed(0)
    sd = {}
    for layer in ("to_q", "to_k"):
        key = f"lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_{layer}"
        sd.update({f"{key}.lora_down.weight": torch.randn(2, 32, generator=g),
                   f"{key}.lora_up.weight": torch.randn(32, 2, generator=g), f"{key}.alpha": torch.tensor(2.0)})
    sd["lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q.dora_scale"] = torch.rand(32, 1) + 0.5
    path = tmp_path / "mixed_dora.safetensors"
    save_file(sd, str(path))
    run_cli(home, "registry", "import", str(path), "--name", "m")
    for fmt, out in (("peft", tmp_path / "p"), ("diffusers", tmp_path / "d.safetensors")):
        line = refused(run_cli(home, "registry", "export", "m:1", "--format", fmt, "-o", str(out), ok=False))
        assert ("unet mixes DoRA modules (unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q) with plain "
                "ones (unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_k), but PEFT's use_dora covers a "
                "whole model; export it as kohya or loraforge") in line, line
        assert not out.exists()


def test_dora_magnitudes_the_config_does_not_enable_are_refused_in_one_line(home, tmp_path, pipelines):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(copy.deepcopy(pipelines["sd1"].unet),
                           LoraConfig(r=2, lora_alpha=2, use_dora=True, target_modules=["to_q"]))
    model.save_pretrained(str(tmp_path / "peft"))
    config_path = tmp_path / "peft" / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "use_dora": False}))
    line = _refused_import(home, tmp_path / "peft")
    assert re.fullmatch(r"Error: .*adapter_model\.safetensors: base_model\.model\.\S+\.to_q\.lora_magnitude_vector "
                        r"is a DoRA magnitude but the adapter config does not set use_dora, so PEFT would not load it",
                        line), line


@pytest.mark.parametrize("tensors, says", [
    ({"emb_params": torch.ones(2, 768)}, "a textual-inversion embedding (A1111 key emb_params)"),
    ({"clip_l": torch.ones(2, 768), "clip_g": torch.ones(2, 1280)},
     "an SDXL textual-inversion embedding (keys clip_g, clip_l)"),
    ({"<cat-toy>": torch.ones(768)}, "a textual-inversion embedding (one vector per token: <cat-toy>)"),
])
def test_a_textual_inversion_embedding_imports_as_one_and_is_no_lora(home, tmp_path, tensors, says):
    path = tmp_path / "embedding.safetensors"
    save_file(tensors, str(path))
    line = refused(run_cli(home, "registry", "import", str(path), "--name", "x", "--kind", "lora", ok=False))
    assert Registry(home).list() == []
    assert line == (f"Error: {path} is {says}, not a LoRA adapter: import it with --kind embedding (adapter "
                    f"formats: {_detecting_formats()})")
    assert "(embedding, " in run_cli(home, "registry", "import", str(path), "--name", "x").output
    assert Registry(home).resolve("x").kind == "embedding"


@pytest.fixture()
def lycoris_dora(pipelines, tmp_path):
    """A LyCORIS DoRA (`dora_wd`, over LoRA pairs or LoHa, norm per output row or input column) on the tiny SD1
    UNet's attention layers, saved by lycoris' own kohya network; (file, UNet outputs lycoris computes)."""
    import lycoris.kohya as lycoris_kohya

    def make(algo: str = "lora", **kwargs) -> tuple[Path, dict[str, torch.Tensor]]:
        producer = fresh(pipelines["sd1"])
        preset = tmp_path / "preset.toml"
        preset.write_text('unet_target_module = ["Transformer2DModel"]\nunet_target_name = []\n'
                          'text_encoder_target_module = []\ntext_encoder_target_name = []\n')
        torch.manual_seed(60)
        network = lycoris_kohya.create_network(1.0, 4, 2.0, None, None, producer.unet, algo=algo,
                                               preset=str(preset), dora_wd=True, **kwargs)
        network.apply_to(None, producer.unet, apply_text_encoder=False, apply_unet=True)
        base = dict(pipelines["sd1"].unet.named_modules())
        with torch.no_grad():
            for _, p in network.named_parameters():
                p.normal_(0, 0.3)
            for lm in network.unet_loras:  # magnitudes near the base norms, as after training
                w = base[".".join(_kohya_path(lm.lora_name))].weight
                norms = (w.flatten(1).norm(dim=1) if lm.dora_scale.shape[0] == w.shape[0]
                         else w.transpose(0, 1).flatten(1).norm(dim=1))
                lm.dora_scale.copy_(norms.reshape(lm.dora_scale.shape) * 1.2)
        path = tmp_path / f"dora_{algo}.safetensors"
        network.save_weights(str(path), torch.float32, {})
        return path, {"unet": outputs(producer)["unet"]}

    return make


def _kohya_path(flat: str) -> list[str]:
    from loraforge.formats.kohya_names import split_words

    return split_words(flat.removeprefix("lora_unet_"))


def test_a_lycoris_dora_exports_for_diffusers_and_peft_with_lycoris_outputs(home, tmp_path, pipelines, lycoris_dora):
    from peft import PeftModel

    pipe = pipelines["sd1"]
    path, want = lycoris_dora()
    run_cli(home, "registry", "import", str(path), "--name", "wd", "--base", "builtin:tiny-sd")
    run_cli(home, "registry", "export", "wd:1", "--for", "diffusers", "-o", str(tmp_path / "d.safetensors"))
    assert_same_outputs(outputs(loaded_by_diffusers(pipe, tmp_path / "d.safetensors")), want)
    run_cli(home, "registry", "export", "wd:1", "--for", "peft", "-o", str(tmp_path / "p"))
    with_peft = fresh(pipe)
    with_peft.unet = PeftModel.from_pretrained(copy.deepcopy(pipe.unet), str(tmp_path / "p"))
    assert_same_outputs(outputs(with_peft), want)


@pytest.mark.parametrize("algo, kwargs, says", [
    ("loha", {}, "normalises a loha module"),
    ("lora", {"wd_on_output": False}, "normalises input columns"),
])
def test_a_dora_peft_cannot_spell_is_refused_in_one_line(home, tmp_path, lycoris_dora, algo, kwargs, says):
    path, _ = lycoris_dora(algo, **kwargs)
    run_cli(home, "registry", "import", str(path), "--name", "wd")
    for fmt in ("diffusers", "peft"):
        out = tmp_path / fmt
        line = refused(run_cli(home, "registry", "export", "wd:1", "--format", fmt, "-o", str(out), ok=False))
        assert re.fullmatch(rf"Error: DoRA module unet\.\S+ {says}, which PEFT's DoRA cannot spell \(a LoRA pair "
                            r"normalised per output row\); export it as kohya or loraforge", line), line
        assert not out.exists()


# -- pickled adapters: diffusers' pytorch_lora_weights.bin and PEFT's adapter_model.bin ------

def test_a_pickled_diffusers_lora_bin_imports_as_diffusers_loads_it(home, tmp_path, pipelines):
    """diffusers saved `pytorch_lora_weights.bin` (attention-processor keys, a torch pickle) before it
    defaulted to safetensors; many Hub LoRAs are still such files. Read with weights_only like every pickle."""
    from safetensors.torch import load_file

    pipe = pipelines["sd1"]
    folder = tmp_path / "hub"
    folder.mkdir()
    want = _old_diffusers_file(pipe, folder / "old.safetensors", "unet.")
    path = folder / "pytorch_lora_weights.bin"
    torch.save(load_file(str(folder / "old.safetensors")), path)
    (folder / "old.safetensors").unlink()
    loaded = fresh(pipe)
    loaded.load_lora_weights(str(folder), weight_name=path.name)
    assert_same_outputs(outputs(loaded), want)
    state, out = imported(home, path, "bin", "diffusers", tmp_path / "new.safetensors")
    assert_same_outputs(applied(pipe, state), want, base=outputs(pipe))
    assert_same_outputs(outputs(loaded_by_diffusers(pipe, out)), want)


def test_a_peft_folder_saved_as_a_pickle_imports_as_peft_loads_it(home, tmp_path, pipelines):
    from peft import LoraConfig, PeftModel, get_peft_model

    unet = pipelines["sd1"].unet
    produced = randomized(get_peft_model(copy.deepcopy(unet), LoraConfig(r=2, lora_alpha=3, target_modules=["to_k"])),
                          seed=70)
    produced.save_pretrained(str(tmp_path / "peft"), safe_serialization=False)
    assert (tmp_path / "peft" / "adapter_model.bin").is_file()
    assert not (tmp_path / "peft" / "adapter_model.safetensors").exists()
    with_peft = fresh(pipelines["sd1"])
    with_peft.unet = PeftModel.from_pretrained(copy.deepcopy(unet), str(tmp_path / "peft"))
    state, out = imported(home, tmp_path / "peft", "p", "peft", tmp_path / "out")
    assert_same_outputs(applied(pipelines["sd1"], state), outputs(with_peft), base={"unet": outputs(pipelines["sd1"])["unet"]})
    assert (out / "adapter_model.safetensors").is_file()


def test_a_folder_that_holds_adapters_points_at_them(home, tmp_path, pipelines):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(copy.deepcopy(pipelines["sd1"].unet), LoraConfig(r=2, target_modules=["to_q"]),
                           adapter_name="style")
    model.save_pretrained(str(tmp_path / "saved"))  # PEFT puts a non-default adapter in a subfolder
    assert (tmp_path / "saved" / "style" / "adapter_config.json").is_file()
    line = _refused_import(home, tmp_path / "saved")
    assert line == (f"Error: {tmp_path / 'saved'} holds PEFT adapter folders (style), not one adapter; "
                    f"pass one of them, e.g. {tmp_path / 'saved' / 'style'}")

    repo = tmp_path / "repo"  # a Hub repo as downloaded: the adapter file and a model card
    _old_diffusers_file(pipelines["sd1"], tmp_path / "w.safetensors", "unet.")
    repo.mkdir()
    (tmp_path / "w.safetensors").rename(repo / "pytorch_lora_weights.safetensors")
    (repo / "README.md").write_text("---\nlibrary_name: diffusers\n---\n")
    line = _refused_import(home, repo)
    assert line == (f"Error: {repo} is a folder, not an adapter file or PEFT folder; pass the file in it, "
                    f"e.g. {repo / 'pytorch_lora_weights.safetensors'}")


# ComfyUI and A1111 read a DoRA magnitude in a kohya file as LyCORIS writes it, `.dora_scale` shaped out×1
# (per output row), not PEFT's `.lora_magnitude_vector` (shape (out,)). (diffusers' kohya loader drops
# `dora_scale` from SD files, so it cannot be the oracle; tests/test_variant_exports loads the file in lycoris.)
def test_the_kohya_export_of_a_peft_dora_spells_its_magnitudes_as_lycoris_does(home, tmp_path, pipelines):
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file

    config = LoraConfig(r=2, lora_alpha=2, use_dora=True, target_modules=["to_q", "to_v"])
    produced = randomized(get_peft_model(copy.deepcopy(pipelines["sd1"].unet), config), seed=80)
    produced.save_pretrained(str(tmp_path / "peft"))
    _, out = imported(home, tmp_path / "peft", "dora", "kohya", tmp_path / "k.safetensors")
    sd = load_file(str(out))
    scales = {k: v for k, v in sd.items() if k.endswith(".dora_scale")}
    assert scales and not any(k.endswith(".lora_magnitude_vector") for k in sd)
    for key, scale in scales.items():
        up = sd[key.replace(".dora_scale", ".lora_up.weight")]
        assert tuple(scale.shape) == (up.shape[0], 1), key


@pytest.mark.parametrize("extra, says", [
    (dict(lora_bias=True), r"key base_model\.model\.\S+\.to_q\.lora_B\.bias is a lora_B bias \(PEFT lora_bias=True\), "
                           r"which loraforge does not import; train the adapter without lora_bias"),
    (dict(modules_to_save=["conv_out"]), r"key base_model\.model\.conv_out\.(bias|weight) is a whole weight PEFT saved "
                                         r"for modules_to_save \(conv_out\), which loraforge does not import; only "
                                         r"LoRA factors are"),
])
def test_peft_folders_with_more_than_lora_factors_are_refused_in_one_line(home, tmp_path, pipelines, extra, says):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(copy.deepcopy(pipelines["sd1"].unet), LoraConfig(r=2, target_modules=["to_q"], **extra))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns that a 1-D lora_B.bias looks like an unsharded tensor
        model.save_pretrained(str(tmp_path / "peft"))
    line = _refused_import(home, tmp_path / "peft")
    assert re.fullmatch(rf"Error: \S+adapter_model\.safetensors: {says}", line), line
