"""Every export loads completely in the program it is for, checked with that program's own loader.

An adapter with random factors on every Linear and Conv2d of the tiny SD1 and SDXL pipelines (attention,
feed-forward, proj_in/out, resnet convs, time and added embeddings, text-encoder q/k/v/out/fc1/fc2 and
the projection) is imported and exported through the CLI, then loaded by diffusers'
`load_lora_weights` (diffusers files and, through diffusers' kohya converter, kohya files) and by PEFT's
`PeftModel.from_pretrained`. A load passes when the loader reports no missing or unexpected key, gives
every adapted module a LoRA layer and computes what W + ΔW computes (ΔW = alpha/rank · up·down, worked
out here from the tensors the test drew), within a relative error of 1e-4 in fp32.

ComfyUI and A1111 are not installable here: their kohya files are checked by name against the modules
the base really has, and converted key by key with diffusers' own kohya conversion.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cli_helpers import refused, run_cli
from oracles import loader_messages
from loraforge.formats import LoraModule, LoraState, write_adapter

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAMILIES = {"sd1": "builtin:tiny-sd", "sdxl": "builtin:tiny-sdxl"}
KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}
# What a loader says when it drops or misses part of a file.
PARTIAL_LOAD = re.compile(r"unexpected|missing|not (been )?(correctly )?(loaded|renamed)|no lora keys|incompatible"
                          r"|did not match|ignored", re.I)
REL_TOL = 1e-4


# -- the pipelines, as diffusers loads them from the builtin folders -------------------------

@pytest.fixture(scope="module")
def pipelines(tiny_sd_path, tiny_sdxl_path):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return {"sd1": StableDiffusionPipeline.from_pretrained(str(tiny_sd_path), safety_checker=None,
                                                           requires_safety_checker=False),
            "sdxl": StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl_path))}


def components(pipe) -> dict[str, torch.nn.Module]:
    return {c: getattr(pipe, c) for c in ("unet", "text_encoder", "text_encoder_2") if getattr(pipe, c, None)}


def targetable(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Every Linear and Conv2d of `model` by its path in memory."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}


def file_path(component: str, model: torch.nn.Module, path: str) -> str:
    """The path adapter files give a module: text encoders under `text_model.`, as CLIP was built
    before transformers 5 dropped that wrapper from CLIPTextModel."""
    if component == "unet" or hasattr(model, "text_model") or not path.startswith(("encoder.", "embeddings.",
                                                                                    "final_layer_norm")):
        return path
    return f"text_model.{path}"


def draw_adapter(pipe, seed: int = 0, kohya_style: bool = False
                 ) -> tuple[LoraState, dict[tuple[str, str], torch.Tensor]]:
    """(adapter on every targetable module, {(component, in-memory path): ΔW}) with mixed ranks and alphas;
    `kohya_style`: one rank and alpha for linear layers and another for convolutions, as sd-scripts
    writes them (network_dim/alpha, conv_dim/alpha)."""
    gen = torch.Generator().manual_seed(seed)
    state, deltas = LoraState(), {}
    i = 0
    for component, model in components(pipe).items():
        for path, module in sorted(targetable(model).items()):
            i += 1
            w = module.weight
            if kohya_style:
                rank, alpha = (2, 1.0) if w.ndim == 4 else (4, 2.0)
            else:
                rank, alpha = (2, 3, 4)[i % 3], (1.0, 3.0, 0.5, 8.0)[i % 4]
            if w.ndim == 4:
                down = torch.randn(rank, w.shape[1], *w.shape[2:], generator=gen) * 0.1
                up = torch.randn(w.shape[0], rank, 1, 1, generator=gen) * 0.1
                delta = torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down)
            else:
                down = torch.randn(rank, w.shape[1], generator=gen) * 0.1
                up = torch.randn(w.shape[0], rank, generator=gen) * 0.1
                delta = up @ down
            state[f"{component}.{file_path(component, model, path)}"] = LoraModule(down, up, alpha)
            deltas[component, path] = delta * (alpha / rank)
    return state, deltas


def patched(model: torch.nn.Module, component: str, deltas) -> torch.nn.Module:
    """A copy of `model` with W + ΔW written into its weights: what every loader must compute."""
    model = copy.deepcopy(model)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for (c, path), delta in deltas.items():
            if c == component:
                modules[path].weight += delta
    return model


# -- what the models compute ---------------------------------------------------------------

def unet_out(unet) -> torch.Tensor:
    cfg = unet.config
    gen = torch.Generator().manual_seed(1)
    sample = torch.randn(1, cfg.in_channels, 16, 16, generator=gen)
    context = torch.randn(1, 7, cfg.cross_attention_dim, generator=gen)
    extra = {}
    if cfg.addition_embed_type == "text_time":
        time_ids = 6
        text = cfg.projection_class_embeddings_input_dim - time_ids * cfg.addition_time_embed_dim
        extra["added_cond_kwargs"] = {"text_embeds": torch.randn(1, text, generator=gen),
                                      "time_ids": torch.randn(1, time_ids, generator=gen) * 10}
    with torch.no_grad():
        return unet(sample, 50, encoder_hidden_states=context, **extra).sample


def text_out(text_encoder) -> torch.Tensor:
    ids = torch.tensor([[0, 17, 230, 41, 980, 5, 1, 1]])
    with torch.no_grad():
        out = text_encoder(ids, output_hidden_states=True)
    projected = getattr(out, "text_embeds", None)
    return torch.cat([out.hidden_states[-2].flatten(), out.last_hidden_state.flatten()]
                     + ([projected.flatten()] if projected is not None else []))


def output_of(component: str, model) -> torch.Tensor:
    return unet_out(model) if component == "unet" else text_out(model)


def assert_computes_w_plus_delta(component: str, loaded, base, deltas) -> None:
    """`loaded` computes what base + ΔW computes (rel err < 1e-4), and that differs from the base."""
    got, want = output_of(component, loaded), output_of(component, patched(base, component, deltas))
    before = output_of(component, base)
    err = ((got - want).norm() / want.norm()).item()
    assert err < REL_TOL, f"{component}: relative error {err:.2e}"
    assert ((want - before).norm() / want.norm()).item() > 1e-2, f"{component}: the adapter changes nothing"


def lora_modules(model: torch.nn.Module) -> set[str]:
    """In-memory paths of the modules PEFT put a LoRA layer on."""
    from peft.tuners.lora import LoraLayer

    return {n.removeprefix("base_model.model.") for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def import_and_export(home: Path, tmp_path: Path, family: str, state: LoraState, *export_args: str) -> Path:
    """Import `state` (a kohya file) against the family's base with the CLI, export it with `export_args`;
    returns the path `registry export` printed first (the file, or the folder's first file)."""
    source = tmp_path / f"{family}-source.safetensors"
    write_adapter(state, source, "kohya")
    run_cli(home, "registry", "import", str(source), "--name", family, "--base", FAMILIES[family])
    out = tmp_path / f"{family}-export"
    printed = run_cli(home, "registry", "export", family, *export_args, "-o", str(out)).output.split()
    return Path(printed[0])


def fresh_pipe(pipelines, family: str):
    """(a copy of the family's pipeline to load into, the untouched components to compare with)."""
    pipe = copy.deepcopy(pipelines[family])
    return pipe, components(pipelines[family])


# -- diffusers -----------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_for_diffusers_loads_completely_with_load_lora_weights(home, tmp_path, pipelines, family):
    state, deltas = draw_adapter(pipelines[family])
    written = import_and_export(home, tmp_path, family, state, "--for", "diffusers")
    assert written.name == "pytorch_lora_weights.safetensors"
    pipe, bases = fresh_pipe(pipelines, family)
    with loader_messages() as messages:
        pipe.load_lora_weights(str(written.parent))
    assert not [m for m in messages if PARTIAL_LOAD.search(m)], messages
    for component, base in bases.items():
        model = getattr(pipe, component)
        assert lora_modules(model) == set(targetable(base)), component
        assert_computes_w_plus_delta(component, model, base, deltas)


# An SDXL file with diffusers-named kohya keys loses its add_embedding in diffusers' kohya conversion
# (`add_embedding_linear_1` and `_2` both become `add.embedding.linear`); sd-scripts' own SDXL names
# (`label_emb_0_0`), which `--for comfyui|a1111|kohya` write for SDXL, convert. Strict: fails once fixed.
ADD_EMBEDDING_MANGLED = pytest.mark.xfail(strict=True, reason="diffusers' kohya conversion mangles the "
                                          "diffusers-named add_embedding of an SDXL kohya file")

# diffusers' kohya loader names the alpha of an attention key after the whole weight key
# (`…attn1.processor.to_q_lora.down.weight`), which matches no module: per-module alphas there are
# dropped for the most common one. Strict: this starts failing once diffusers honours them.
PER_MODULE_ALPHAS_DROPPED = pytest.mark.xfail(strict=True, reason="diffusers' kohya loader ignores per-module "
                                              "alphas on attention keys")


@pytest.mark.parametrize("family, kohya_style, names", [
    ("sd1", True, ()),
    pytest.param("sd1", False, (), marks=PER_MODULE_ALPHAS_DROPPED),
    ("sdxl", True, ()),
    pytest.param("sdxl", True, ("--kohya-names", "diffusers"), marks=ADD_EMBEDDING_MANGLED),
])
def test_for_comfyui_writes_kohya_keys_that_diffusers_kohya_loader_applies_fully(home, tmp_path, pipelines,
                                                                                  family, kohya_style, names):
    """diffusers' kohya loader is a second consumer of the kohya export. It honours one alpha for linear
    layers and one for convolutions (what sd-scripts writes) but not per-module alphas on attention keys."""
    state, deltas = draw_adapter(pipelines[family], seed=1, kohya_style=kohya_style)
    written = import_and_export(home, tmp_path, family, state, "--for", "comfyui", *names)
    assert written.suffix == ".safetensors"
    pipe, bases = fresh_pipe(pipelines, family)
    with loader_messages() as messages:
        pipe.load_lora_weights(str(written))  # diffusers detects kohya keys and converts them itself
    assert not [m for m in messages if PARTIAL_LOAD.search(m)], messages
    for component, base in bases.items():
        model = getattr(pipe, component)
        assert lora_modules(model) == set(targetable(base)), component
        assert_computes_w_plus_delta(component, model, base, deltas)


# -- kohya / A1111 / ComfyUI names ---------------------------------------------------------

def kohya_prefixes(family: str) -> dict[str, str]:
    return {**KOHYA_PREFIXES, "text_encoder": "lora_te1_"} if family == "sdxl" else KOHYA_PREFIXES


@pytest.mark.parametrize("family, names", [("sd1", ()), ("sdxl", ("--kohya-names", "diffusers"))])
@pytest.mark.parametrize("consumer", ["comfyui", "a1111", "kohya"])
def test_kohya_names_are_the_flattened_paths_of_real_modules(home, tmp_path, pipelines, family, names, consumer):
    """Name-matching loaders find a module by its kohya flattening (`lora_unet_` + path with `_`):
    every key must be one, for every module the adapter has."""
    state, _ = draw_adapter(pipelines[family], seed=2)
    written = import_and_export(home, tmp_path, family, state, "--for", consumer, *names)
    prefixes = kohya_prefixes(family)
    expected = set()
    for name in state:
        component, path = name.split(".", 1)
        flat = prefixes[component] + path.replace(".", "_")
        expected |= {flat + ".lora_down.weight", flat + ".lora_up.weight", flat + ".alpha"}
    assert set(load_file(str(written))) == expected


@pytest.mark.parametrize("consumer", ["comfyui", "a1111", "kohya"])
def test_for_kohya_consumers_an_sdxl_unet_gets_sgm_names(home, tmp_path, pipelines, consumer):
    """sd-scripts names SDXL UNet modules by their Stability (SGM) paths, and so do the SDXL files ComfyUI
    and A1111 are used with; the text encoders keep their CLIP paths."""
    state, _ = draw_adapter(pipelines["sdxl"], seed=2)
    written = import_and_export(home, tmp_path, "sdxl", state, "--for", consumer)
    keys = {k.split(".", 1)[0] for k in load_file(str(written))}
    unet = {k for k in keys if k.startswith("lora_unet_")}
    assert len(unet) == len(state.component("unet"))
    sgm = ("input_blocks_", "middle_block_", "output_blocks_", "time_embed_", "label_emb_", "out_")
    assert all(k.removeprefix("lora_unet_").startswith(sgm) for k in unet), sorted(unet)[:5]
    prefixes = kohya_prefixes("sdxl")
    assert keys - unet == {prefixes[n.split(".", 1)[0]] + n.split(".", 1)[1].replace(".", "_")
                           for n in state if not n.startswith("unet.")}


@pytest.mark.parametrize("family, names", [
    ("sd1", ()),
    ("sdxl", ()),
    pytest.param("sdxl", ("--kohya-names", "diffusers"), marks=ADD_EMBEDDING_MANGLED),
])
def test_diffusers_kohya_conversion_turns_every_unet_key_into_a_real_module(home, tmp_path, pipelines, family,
                                                                            names):
    """diffusers' own kohya conversion consumes every key and names a module the UNet has for each."""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    state, _ = draw_adapter(pipelines[family], seed=2)
    written = import_and_export(home, tmp_path, family, state, "--for", "kohya", *names)
    sd = load_file(str(written))
    if family == "sdxl" and not names:  # SGM block names: diffusers maps them with the UNet's config first
        from diffusers.loaders.lora_conversion_utils import _maybe_map_sgm_blocks_to_diffusers

        sd = _maybe_map_sgm_blocks_to_diffusers(sd, pipelines[family].unet.config)
    converted, alphas = _convert_non_diffusers_lora_to_diffusers(sd)  # raises on a leftover
    assert len(converted) == 2 * len(state) and len(alphas) == len(state)
    unet = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in converted.items()
                                            if k.startswith("unet.")})
    paths = {k.removesuffix(".lora_A.weight").removesuffix(".lora_B.weight") for k in unet}
    assert paths == set(targetable(pipelines[family].unet))


def test_for_a1111_and_for_kohya_write_the_same_bytes_as_format_kohya(home, tmp_path, pipelines):
    state, _ = draw_adapter(pipelines["sd1"], seed=3)
    source = tmp_path / "source.safetensors"
    write_adapter(state, source, "kohya")
    run_cli(home, "registry", "import", str(source), "--name", "s", "--base", "builtin:tiny-sd")
    outs = {}
    for args in (("--format", "kohya"), ("--for", "a1111"), ("--for", "kohya"), ("--for", "comfyui"),
                 ("--for", "comfyui", "--format", "kohya")):
        out = tmp_path / ("-".join(a.strip("-") for a in args) + ".safetensors")
        run_cli(home, "registry", "export", "s", *args, "-o", str(out))
        outs[args] = out.read_bytes()
    assert len(set(outs.values())) == 1


# -- PEFT ----------------------------------------------------------------------------------

def test_for_peft_loads_in_peft_for_the_unet_and_both_sdxl_text_encoders(home, tmp_path, pipelines):
    from peft import PeftModel

    state, deltas = draw_adapter(pipelines["sdxl"], seed=4)
    written = import_and_export(home, tmp_path, "sdxl", state, "--for", "peft")
    folder = tmp_path / "sdxl-export"
    assert written.is_relative_to(folder)
    assert {p.name for p in folder.iterdir()} == {"unet", "text_encoder", "text_encoder_2"}
    for component, base in components(pipelines["sdxl"]).items():
        with loader_messages() as messages:
            model = PeftModel.from_pretrained(copy.deepcopy(base), str(folder / component))
        assert not [m for m in messages if PARTIAL_LOAD.search(m)], (component, messages)
        assert lora_modules(model) == set(targetable(base)), component
        assert_computes_w_plus_delta(component, model.base_model.model, base, deltas)


def test_for_peft_of_a_one_component_adapter_is_one_folder(home, tmp_path, pipelines):
    from peft import PeftModel

    state, deltas = draw_adapter(pipelines["sd1"], seed=5)
    unet_only = LoraState({n: m for n, m in state.items() if n.startswith("unet.")})
    written = import_and_export(home, tmp_path, "sd1", unet_only, "--for", "peft")
    base = pipelines["sd1"].unet
    with loader_messages() as messages:
        model = PeftModel.from_pretrained(copy.deepcopy(base), str(written.parent))
    assert not [m for m in messages if PARTIAL_LOAD.search(m)], messages
    assert lora_modules(model) == set(targetable(base))
    assert_computes_w_plus_delta("unet", model.base_model.model, base, deltas)


# -- refusals ------------------------------------------------------------------------------

@pytest.mark.parametrize("consumer, fmt", [("comfyui", "diffusers"), ("diffusers", "kohya"), ("peft", "kohya"),
                                           ("a1111", "peft"), ("kohya", "loraforge")])
def test_contradictory_for_and_format_are_refused_in_one_line(home, tmp_path, adapter_file, consumer, fmt):
    run_cli(home, "registry", "import", str(adapter_file), "--name", "style")
    out = tmp_path / "out.safetensors"
    line = refused(run_cli(home, "registry", "export", "style", "--for", consumer, "--format", fmt,
                           "-o", str(out), ok=False))
    assert f"--for {consumer} needs --format" in line and f"not --format {fmt}" in line
    assert not out.exists() and not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_for_peft_on_a_checkpoint_is_refused_naming_the_loaders_of_checkpoints(home, tmp_path, tiny_sd_path):
    run_cli(home, "registry", "import", str(tiny_sd_path), "--name", "base", "--kind", "checkpoint")
    line = refused(run_cli(home, "registry", "export", "base", "--for", "peft", "-o", str(tmp_path / "o"),
                           ok=False))
    assert "loads adapters, not checkpoints" in line and "comfyui" in line and "diffusers" in line
    assert not (tmp_path / "o").exists()


def test_for_diffusers_exports_a_diffusers_folder_checkpoint_as_stored(home, tmp_path, tiny_sd_path):
    run_cli(home, "registry", "import", str(tiny_sd_path), "--name", "base", "--kind", "checkpoint")
    out = tmp_path / "base"
    run_cli(home, "registry", "export", "base", "--for", "diffusers", "-o", str(out))
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(out / "unet"))
    original = UNet2DConditionModel.from_pretrained(str(tiny_sd_path / "unet"))
    assert all(torch.equal(a, b) for a, b in zip(unet.state_dict().values(), original.state_dict().values()))


def test_help_says_which_program_needs_which_format(home):
    text = run_cli(home, "registry", "export", "--help").output
    for consumer, fmt in (("comfyui", "kohya"), ("a1111", "kohya"), ("diffusers", "diffusers"), ("peft", "peft")):
        assert f"{consumer}: {fmt}" in text


def test_for_comfyui_exports_a_single_file_checkpoint_byte_for_byte(home, tmp_path):
    from loraforge.formats.safetensors_io import safetensors_bytes

    source = tmp_path / "model.safetensors"
    source.write_bytes(safetensors_bytes({"model.diffusion_model.input_blocks.0.0.weight": torch.randn(8, 4, 3, 3),
                                          "first_stage_model.decoder.conv_in.weight": torch.randn(8, 4, 3, 3),
                                          "cond_stage_model.transformer.text_model.final_layer_norm.weight":
                                              torch.randn(8)}))
    run_cli(home, "registry", "import", str(source), "--name", "sf", "--kind", "checkpoint")
    for consumer in ("comfyui", "a1111"):
        out = tmp_path / f"{consumer}.safetensors"
        run_cli(home, "registry", "export", "sf", "--for", consumer, "-o", str(out))
        assert out.read_bytes() == source.read_bytes()


def test_for_on_a_dataset_is_refused(home, tmp_path):
    from PIL import Image

    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (8, 8), (10, 0, 0)).save(photos / "a.png")
    run_cli(home, "registry", "import", str(photos), "--name", "photos", "--kind", "dataset")
    line = refused(run_cli(home, "registry", "export", "photos", "--for", "diffusers", "-o", str(tmp_path / "o"),
                           ok=False))
    assert "dataset is exported as stored" in line and "drop --for diffusers" in line
    run_cli(home, "registry", "export", "photos", "-o", str(tmp_path / "as-stored"))
    assert (tmp_path / "as-stored" / "a.png").read_bytes() == (photos / "a.png").read_bytes()
