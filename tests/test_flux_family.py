"""The Flux family end to end on builtin:tiny-flux: the builtin itself, generation, family refusals, LoRA algebra,
fuse, extract and resize on transformer adapters, `registry show` and the Hub card.

Numbers are checked against direct computation on the pipeline's own modules (diffusers' FluxTransformer2DModel
and `FluxPipeline.load_lora_weights` are the consumers)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from loraforge.formats.lora import LoraModule, LoraState
from loraforge.formats.safetensors_io import read_safetensors
from loraforge.registry import Registry
from loraforge.registry.resolve import load_adapter
from tests.cli_helpers import refused, run_cli
from tests.oracles import flux_transformer_inputs

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FLUX = "builtin:tiny-flux"


@pytest.fixture
def flux_folder(tiny_flux_path) -> Path:
    return tiny_flux_path


@pytest.fixture
def fhome(home) -> Path:
    return home


def _targets(folder: Path) -> dict:
    from loraforge.models.targets import module_shapes

    return module_shapes(folder)


def random_flux_lora(folder: Path, seed: int, rank: int = 2, modules: tuple[str, ...] | None = None,
                     scale: float = 0.3) -> LoraState:
    """A LoRA on tiny-flux's transformer Linear layers (attention, MLPs, modulation, embedders)."""
    g = torch.Generator().manual_seed(seed)
    shapes = _targets(folder)["transformer"]
    names = modules or tuple(n for n, s in sorted(shapes.items()) if len(s) == 2)
    state = LoraState()
    for name in names:
        out, inp = shapes[name]
        state[f"transformer.{name}"] = LoraModule(down=torch.randn(rank, inp, generator=g) * scale,
                                                  up=torch.randn(out, rank, generator=g) * scale, alpha=float(rank))
    return state


def import_state(home: Path, state: LoraState, name: str, tmp: Path, base: str = FLUX) -> None:
    from loraforge.formats import write_adapter

    path = tmp / f"{name}.safetensors"
    write_adapter(state, path, "loraforge")
    run_cli(home, "registry", "import", str(path), "--name", name, "--base", base)


def transformer_output(transformer) -> torch.Tensor:
    """One forward of a Flux transformer on fixed inputs."""
    with torch.no_grad():
        return transformer(**flux_transformer_inputs(transformer))[0]


def with_deltas(folder: Path, deltas: dict[str, torch.Tensor]):
    """tiny-flux's transformer with ΔW added by hand to each named weight."""
    from diffusers import FluxTransformer2DModel

    transformer = FluxTransformer2DModel.from_pretrained(folder / "transformer")
    with torch.no_grad():
        for name, delta in deltas.items():
            transformer.get_submodule(name.removeprefix("transformer.")).weight.add_(delta)
    return transformer


# ---- the builtin -------------------------------------------------------------------------------------------

def test_tiny_flux_is_a_deterministic_flux_pipeline(flux_folder, tmp_path):
    from diffusers import FluxPipeline

    from loraforge.hashing import sha256_folder
    from loraforge.models.base import family_of_folder
    from loraforge.models.builtin import save_tiny_pipeline

    index = json.loads((flux_folder / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline"
    assert index["transformer"] == ["diffusers", "FluxTransformer2DModel"]
    assert index["tokenizer_2"][1].startswith("T5Tokenizer") and index["scheduler"][1] == "FlowMatchEulerDiscreteScheduler"
    assert family_of_folder(flux_folder) == "flux"
    config = json.loads((flux_folder / "transformer" / "config.json").read_text())
    assert (config["num_layers"], config["num_single_layers"], config["guidance_embeds"]) == (2, 2, True)
    assert json.loads((flux_folder / "vae" / "config.json").read_text())["latent_channels"] == 16
    again = save_tiny_pipeline("tiny-flux", tmp_path / "again")
    assert sha256_folder(again) == sha256_folder(flux_folder)  # built from seeds: the same bytes every time
    pipe = FluxPipeline.from_pretrained(flux_folder)  # diffusers' own loader reads every part
    assert pipe.tokenizer_2("a red cat").input_ids[-1] == pipe.tokenizer_2.eos_token_id


def test_generate_on_tiny_flux_is_deterministic_and_follows_the_prompt(fhome, tmp_path):
    outs = []
    for name, prompt in (("a", "a red cat"), ("b", "a red cat"), ("c", "a blue house by the sea")):
        out = tmp_path / f"{name}.png"
        run_cli(fhome, "generate", "--base", FLUX, "--prompt", prompt, "--steps", "4", "--guidance", "3.5",
                "-o", str(out))
        outs.append(np.asarray(Image.open(out), dtype=np.float64))
    assert outs[0].shape == (64, 64, 3)
    assert np.array_equal(outs[0], outs[1])
    assert np.abs(outs[0] - outs[2]).mean() > 0.1


def test_a_negative_prompt_on_flux_is_refused(fhome, tmp_path):
    line = refused(run_cli(fhome, "generate", "--base", FLUX, "--prompt", "a cat", "--negative-prompt", "blurry",
                           "-o", str(tmp_path / "x.png"), ok=False))
    assert "Flux" in line and "negative prompt" in line


# ---- family refusals ----------------------------------------------------------------------------------------

def test_an_sd_lora_on_flux_and_a_flux_lora_on_sd_are_refused_naming_both(fhome, flux_folder, tmp_path,
                                                                          adapter_file):
    from loraforge.formats import write_adapter

    run_cli(fhome, "registry", "import", str(adapter_file), "--name", "sdlora")
    out = tmp_path / "x.png"
    line = refused(run_cli(fhome, "generate", "--base", FLUX, "--lora", "sdlora", "--prompt", "a cat", "-o", str(out),
                           ok=False))
    assert "SD1.x" in line and "Flux" in line, line
    assert not out.exists()
    flux_file = tmp_path / "flux.safetensors"
    write_adapter(random_flux_lora(flux_folder, 1), flux_file, "loraforge")
    before = Registry(fhome).list()
    line = refused(run_cli(fhome, "registry", "import", str(flux_file), "--name", "fl", "--base", "builtin:tiny-sdxl",
                           ok=False))
    assert "Flux" in line and "SDXL" in line, line
    assert Registry(fhome).list() == before  # nothing registered


# ---- algebra, fuse, extract, resize ---------------------------------------------------------------------

def test_lora_algebra_on_flux_adapters_matches_direct_computation(fhome, flux_folder, tmp_path):
    names = ("transformer_blocks.0.attn.to_q", "single_transformer_blocks.1.proj_mlp", "x_embedder")
    a, b = random_flux_lora(flux_folder, 1, modules=names), random_flux_lora(flux_folder, 2, modules=names)
    import_state(fhome, a, "fa", tmp_path)
    import_state(fhome, b, "fb", tmp_path)
    registry = Registry(fhome)
    for method, extra in (("concat", ()), ("svd", ("--rank", "4"))):
        run_cli(fhome, "merge", "loras", "fa=0.7", "fb=-0.4", "--method", method, *extra, "--name", f"m{method}")
        merged, manifest = load_adapter(registry, f"m{method}")
        assert manifest.base.family == "flux"
        for name in names:
            want = 0.7 * a[f"transformer.{name}"].delta() - 0.4 * b[f"transformer.{name}"].delta()
            got = merged[f"transformer.{name}"].delta()
            assert torch.allclose(got, want, atol=1e-5 * float(want.abs().max())), (method, name)
    run_cli(fhome, "merge", "loras", "fa=1", "fb=1", "--method", "ties", "--rank", "4", "--param", "density=0.5",
            "--name", "mties")
    ties, _ = load_adapter(registry, "mties")
    assert set(ties) == {f"transformer.{n}" for n in names}
    run_cli(fhome, "lora", "resize", "fa", "--rank", "1", "--name", "fa1")
    small, _ = load_adapter(registry, "fa1")
    for name in names:  # the optimal rank-1 truncation: the top singular pair of ΔW
        delta = a[f"transformer.{name}"].delta()
        u, s, vh = torch.linalg.svd(delta)
        assert small[f"transformer.{name}"].rank == 1
        assert torch.allclose(small[f"transformer.{name}"].delta(), s[0] * torch.outer(u[:, 0], vh[0]), atol=1e-5)


def test_fuse_into_tiny_flux_equals_the_transformer_with_delta_w_and_loads_in_flux_pipeline(fhome, flux_folder,
                                                                                              tmp_path):
    from diffusers import FluxPipeline, FluxTransformer2DModel

    state = random_flux_lora(flux_folder, 3, scale=0.2)
    import_state(fhome, state, "fl", tmp_path)
    out = tmp_path / "fused"
    run_cli(fhome, "lora", "fuse", FLUX, "fl=0.5", "--dtype", "fp32", "-o", str(out))
    fused = FluxTransformer2DModel.from_pretrained(out / "transformer")
    by_hand = with_deltas(flux_folder, {n: 0.5 * m.delta() for n, m in state.items()})
    want = transformer_output(by_hand)
    assert torch.allclose(transformer_output(fused), want, atol=1e-5 * float(want.abs().max()))
    pipe = FluxPipeline.from_pretrained(out)  # the whole pipeline folder, loadable by diffusers
    pipe.set_progress_bar_config(disable=True)
    assert pipe("a cat", num_inference_steps=2, height=64, width=64, max_sequence_length=32).images[0].size == (64, 64)


def test_generate_with_a_flux_lora_draws_what_the_fused_model_draws(fhome, flux_folder, tmp_path):
    state = random_flux_lora(flux_folder, 6, scale=0.3)
    import_state(fhome, state, "fl", tmp_path)
    run_cli(fhome, "lora", "fuse", FLUX, "fl=0.8", "--dtype", "fp32", "-o", str(tmp_path / "fused"))
    images = {}
    for name, args in (("base", ("--base", FLUX)), ("lora", ("--base", FLUX, "--lora", "fl=0.8")),
                       ("fused", ("--base", str(tmp_path / "fused")))):
        out = tmp_path / f"{name}.png"
        run_cli(fhome, "generate", *args, "--prompt", "a red cat", "--steps", "3", "--seed", "2", "-o", str(out))
        images[name] = np.asarray(Image.open(out), dtype=np.float64)
    assert np.abs(images["lora"] - images["base"]).mean() > 1.0  # the adapter changes the picture
    assert np.abs(images["lora"] - images["fused"]).max() <= 2.0  # through diffusers' Flux LoRA loader, as fused


def test_extract_from_a_tuned_flux_recovers_delta_w(fhome, flux_folder, tmp_path):
    import shutil

    from loraforge.formats.safetensors_io import write_safetensors

    tuned = tmp_path / "tuned"
    shutil.copytree(flux_folder, tuned)
    weights = tuned / "transformer" / "diffusion_pytorch_model.safetensors"
    sd, meta = read_safetensors(weights)
    g = torch.Generator().manual_seed(5)
    deltas = {}
    for name in ("transformer_blocks.1.attn.to_k", "single_transformer_blocks.0.proj_out", "proj_out"):
        w = sd[f"{name}.weight"]
        deltas[name] = torch.randn(w.shape[0], 2, generator=g) @ torch.randn(2, w.shape[1], generator=g) * 0.05
        sd[f"{name}.weight"] = w + deltas[name]
    write_safetensors(sd, weights, meta)
    run_cli(fhome, "lora", "extract", str(tuned), "--base", FLUX, "--rank", "2", "--name", "ex")
    state, manifest = load_adapter(Registry(fhome), "ex")
    assert manifest.base.family == "flux"
    assert set(state) == {f"transformer.{n}" for n in deltas}
    for name, delta in deltas.items():
        assert torch.allclose(state[f"transformer.{name}"].delta(), delta, atol=1e-5)


# ---- registry show and the Hub card ------------------------------------------------------------------------

def test_registry_show_names_the_family_and_the_card_is_a_flux_card(fhome, flux_folder, tmp_path):
    from loraforge.hub.card import render_card

    import_state(fhome, random_flux_lora(flux_folder, 4), "fl", tmp_path)
    text = run_cli(fhome, "registry", "show", "fl").output
    assert "base:     builtin:tiny-flux (Flux, " in text, text
    data = json.loads(run_cli(fhome, "registry", "show", "fl", "--json").output)
    assert data["base"]["family"] == "flux"
    manifest = Registry(fhome).resolve("fl")
    card = render_card(manifest, weight_name="fl.safetensors", repo="me/fl", files=["fl.safetensors"])
    front = card.split("---")[1]
    assert "library_name: diffusers" in front and "- flux" in front and "stable-diffusion" not in front
    assert "base_model: tiny-flux" in front, front


# ---- recipes ---------------------------------------------------------------------------------------------

def test_the_flux_example_recipe_trains_stacks_fuses_and_renders(fhome, tmp_path):
    """recipes/flux-tiny.yaml, shortened: a flow-matching LoRA and a slider on tiny-flux, their exact stack,
    the stack fused into the transformer, a grid; a second apply builds nothing."""
    import shutil

    from diffusers import FluxTransformer2DModel

    root = Path(__file__).resolve().parent.parent / "recipes"
    recipe = tmp_path / "flux-tiny.yaml"
    shutil.copy(root / "flux-tiny.yaml", recipe)
    (tmp_path / "data").symlink_to(root / "data", target_is_directory=True)
    out = run_cli(fhome, "recipe", "apply", str(recipe), "--set", "steps=4").output
    assert "5 step(s) run" in out, out
    registry = Registry(fhome)
    style, _ = load_adapter(registry, "flux-tiny-style")
    size, _ = load_adapter(registry, "flux-tiny-size")
    look, manifest = load_adapter(registry, "flux-tiny-look")
    assert manifest.base.family == "flux" and {n.split(".")[0] for n in look} == {"transformer"}
    for name in look:
        want = sum(w * s[name].delta() for s, w in ((style, 1.0), (size, 1.5)) if name in s)
        assert torch.allclose(look[name].delta(), want, atol=1e-6), name
    fused = registry.checkout(registry.resolve("flux-tiny-look-fused"))
    by_hand = with_deltas(fhome / "models" / "builtin" / "tiny-flux", {n: m.delta() for n, m in look.items()})
    want = transformer_output(by_hand)
    got = transformer_output(FluxTransformer2DModel.from_pretrained(fused / "transformer"))
    assert torch.allclose(got, want, atol=1e-5 * float(want.abs().max()))
    grid = Image.open(registry.checkout(registry.resolve("flux-tiny-grid")) / "grid.png")
    assert grid.width > 3 * 64 and grid.height > 2 * 64
    again = run_cli(fhome, "recipe", "apply", str(recipe), "--set", "steps=4").output
    assert "0 step(s) run" in again, again


def test_export_format_bfl_writes_comfyui_native_names_that_read_back_exactly(fhome, flux_folder, tmp_path):
    from loraforge.formats import read_adapter

    state = random_flux_lora(flux_folder, 7, modules=("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k",
                                                      "transformer_blocks.0.attn.to_v", "single_transformer_blocks.1.proj_out"))
    import_state(fhome, state, "fl", tmp_path)
    out = tmp_path / "fl-bfl.safetensors"
    run_cli(fhome, "registry", "export", "fl", "--format", "bfl", "-o", str(out))
    keys = set(read_safetensors(out)[0])
    assert "diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight" in keys, sorted(keys)[:4]
    assert "diffusion_model.single_blocks.1.linear2.lora_B.weight" in keys
    back, fmt, _ = read_adapter(out)
    assert fmt == "bfl" and set(back) == set(state)
    for name in state:
        assert torch.allclose(back[name].delta(), state[name].delta(), atol=1e-6), name


def test_merging_a_flux_lora_with_an_sd_lora_is_refused_naming_both(fhome, flux_folder, tmp_path, adapter_file):
    run_cli(fhome, "registry", "import", str(adapter_file), "--name", "sdlora", "--base", "builtin:tiny-sd")
    import_state(fhome, random_flux_lora(flux_folder, 8), "fl", tmp_path)
    before = Registry(fhome).list()
    line = refused(run_cli(fhome, "merge", "loras", "fl=1", "sdlora=1", "--method", "concat", "--name", "mix",
                           ok=False))
    assert "SD1.x" in line and "Flux" in line and "cannot be merged" in line, line
    assert Registry(fhome).list() == before


def test_a_flux_hub_pipeline_is_fetched_as_its_folders_without_the_root_single_files():
    """FLUX.1-dev's repository as huggingface_hub's own pattern filter sees it: the diffusers folders (T5's
    SentencePiece model and the sharded transformer included), not the 24 GB single files beside them."""
    from huggingface_hub.utils import filter_repo_objects

    from loraforge.models.base import HUB_ALLOW_PATTERNS, HUB_IGNORE_PATTERNS

    repo = ["model_index.json", "flux1-dev.safetensors", "ae.safetensors", "README.md",
            "scheduler/scheduler_config.json", "text_encoder/config.json", "text_encoder/model.safetensors",
            "text_encoder_2/config.json", "text_encoder_2/model-00001-of-00002.safetensors",
            "text_encoder_2/model-00002-of-00002.safetensors", "text_encoder_2/model.safetensors.index.json",
            "tokenizer/merges.txt", "tokenizer/vocab.json", "tokenizer/tokenizer_config.json",
            "tokenizer/special_tokens_map.json", "tokenizer_2/spiece.model", "tokenizer_2/tokenizer.json",
            "tokenizer_2/tokenizer_config.json", "tokenizer_2/special_tokens_map.json",
            "transformer/config.json", "transformer/diffusion_pytorch_model-00001-of-00003.safetensors",
            "transformer/diffusion_pytorch_model.safetensors.index.json", "vae/config.json",
            "vae/diffusion_pytorch_model.safetensors"]
    fetched = set(filter_repo_objects(repo, allow_patterns=HUB_ALLOW_PATTERNS, ignore_patterns=HUB_IGNORE_PATTERNS))
    assert fetched == set(repo) - {"flux1-dev.safetensors", "ae.safetensors", "README.md"}
