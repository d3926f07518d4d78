"""Flux LoRAs spelled with diffusers' module paths flattened kohya-style: `lora_transformer_…` (OneTrainer and other
trainers) against diffusers' own Flux loader (`FluxPipeline.load_lora_weights` + `fuse_lora`, whose kohya converter
reads these names at any width), and LyCORIS LoKr / LoHa networks made by lycoris-lora on tiny-flux's transformer
(`lycoris_transformer_blocks_0_attn_to_q.lokr_w1`), with lycoris' own ΔW and forward pass as the oracle."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from loraforge.formats import read_adapter
from loraforge.registry import Registry
from loraforge.registry.resolve import load_adapter
from oracles import flux_transformer_inputs, rel_err
from tests.cli_helpers import refused, run_cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FLUX = "builtin:tiny-flux"
H, MLP = 32, 128  # tiny-flux's width and single-block MLP width

# (flattened path, out, in, rank, alpha): every kind of module diffusers' converter maps for these names
FLAT_MODULES = (
    ("lora_transformer_transformer_blocks_0_attn_to_q", H, H, 4, 2.0),
    ("lora_transformer_transformer_blocks_0_attn_to_out_0", H, H, 2, 3.0),
    ("lora_transformer_transformer_blocks_1_attn_add_k_proj", H, H, 3, 1.0),
    ("lora_transformer_transformer_blocks_1_attn_to_add_out", H, H, 2, 8.0),
    ("lora_transformer_single_transformer_blocks_0_attn_to_v", H, H, 4, 1.5),
    ("lora_transformer_single_transformer_blocks_1_attn_to_q", H, H, 2, 4.0),
    ("lora_transformer_x_embedder", H, 64, 2, 1.0),
    ("lora_transformer_context_embedder", H, H, 2, 0.5),
    ("lora_transformer_norm_out_linear", 2 * H, H, 2, 2.0),
    ("lora_transformer_proj_out", 64, H, 2, 1.0),
    ("lora_transformer_time_text_embed_guidance_embedder_linear_1", H, 256, 2, 3.0),
    ("lora_transformer_time_text_embed_timestep_embedder_linear_2", H, H, 2, 1.0),
    ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", H, H, 2, 1.0),
    ("lora_te1_text_model_encoder_layers_1_mlp_fc1", 64, H, 2, 4.0),
)


def _flat_file(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, out, inp, rank, alpha in FLAT_MODULES:
        sd[f"{name}.lora_down.weight"] = torch.randn(rank, inp, generator=g) * 0.3
        sd[f"{name}.lora_up.weight"] = torch.randn(out, rank, generator=g) * 0.3
        sd[f"{name}.alpha"] = torch.tensor(alpha)
    return sd


def _weights(pipe) -> dict[str, torch.Tensor]:
    """Every Linear weight of the transformer and CLIP, by canonical module name."""
    out = {}
    for component in ("transformer", "text_encoder"):
        for path, module in getattr(pipe, component).named_modules():
            if isinstance(module, torch.nn.Linear):
                name = f"{component}.{path}"
                if component == "text_encoder" and not path.startswith("text_model."):
                    name = f"{component}.text_model.{path}"  # canonical CLIP paths keep the wrapper
                out[name] = module.weight.detach().clone()
    return out


def _fused_by_diffusers(home, file) -> dict[str, torch.Tensor]:
    """ΔW per module that diffusers applies: FluxPipeline.load_lora_weights + fuse_lora, weights after − before."""
    from loraforge.models.base import locate_base
    from loraforge.models.pipeline import load_pipeline

    pipe = load_pipeline(locate_base(FLUX, home))
    before = _weights(pipe)
    pipe.load_lora_weights(str(file))
    pipe.fuse_lora(components=["transformer", "text_encoder"])
    pipe.unload_lora_weights()
    after = _weights(pipe)
    return {n: after[n] - before[n] for n in before if not torch.equal(after[n], before[n])}


def _assert_deltas(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert sorted(ours) == sorted(theirs)
    for name in ours:
        assert rel_err(ours[name], theirs[name]) < 1e-5, name


def test_a_lora_transformer_file_gives_the_delta_diffusers_loader_applies(home, tmp_path):
    sd = _flat_file()
    source = tmp_path / "onetrainer.safetensors"
    save_file(sd, str(source))
    run_cli(home, "registry", "import", str(source), "--name", "flat", "--base", FLUX)
    state, manifest = load_adapter(Registry(home), "flat")
    assert manifest.adapter.variants == {"lora": len(FLAT_MODULES)}
    assert "transformer.norm_out.linear" in state and "text_encoder.text_model.encoder.layers.1.mlp.fc1" in state
    ours = {n: state[n].delta() for n in state}
    _assert_deltas(ours, _fused_by_diffusers(home, source))

    exported = tmp_path / "flat_diffusers.safetensors"
    run_cli(home, "registry", "export", "flat", "--for", "diffusers", "-o", str(exported))
    _assert_deltas(ours, _fused_by_diffusers(home, exported))

    # kohya export of the import: the file's own names and tensors (its alphas as it stored them)
    back = tmp_path / "back.safetensors"
    run_cli(home, "registry", "export", "flat", "--format", "kohya", "-o", str(back))
    written = load_file(str(back))
    assert sorted(written) == sorted(sd) and all(torch.equal(written[k], sd[k]) for k in sd)


def test_feed_forward_and_modulation_modules_map_one_to_one_without_a_base():
    from loraforge.formats.kohya import kohya_to_lora

    g = torch.Generator().manual_seed(2)
    names = {"lora_transformer_transformer_blocks_1_ff_context_net_0_proj": "transformer_blocks.1.ff_context.net.0.proj",
             "lora_transformer_transformer_blocks_0_norm1_context_linear": "transformer_blocks.0.norm1_context.linear",
             "lora_transformer_single_transformer_blocks_1_proj_mlp": "single_transformer_blocks.1.proj_mlp",
             "lora_transformer_single_transformer_blocks_0_norm_linear": "single_transformer_blocks.0.norm.linear",
             "lora_transformer_single_transformer_blocks_0_proj_out": "single_transformer_blocks.0.proj_out",
             "lora_transformer_proj_out": "proj_out"}
    sd = {}
    for flat in names:
        sd[f"{flat}.lora_down.weight"] = torch.randn(2, 8, generator=g)
        sd[f"{flat}.lora_up.weight"] = torch.randn(8, 2, generator=g)
    state = kohya_to_lora(sd)
    assert sorted(state) == sorted(f"transformer.{p}" for p in names.values())


# -- LyCORIS on diffusers' Flux transformer ----------------------------------------------------------------

class LycorisNetwork:
    """A lycoris network on tiny-flux's transformer (every Linear, diffusers module names), randomised, saved by
    lycoris to `path`."""

    def __init__(self, folder, tiny_flux_path, algo: str):
        from diffusers import FluxTransformer2DModel
        from lycoris import create_lycoris

        self.transformer = FluxTransformer2DModel.from_pretrained(tiny_flux_path / "transformer").eval()
        self.base = {f"transformer.{k}": v.clone() for k, v in self.transformer.state_dict().items()}
        torch.manual_seed(7)
        self.network = create_lycoris(self.transformer, 1.0, linear_dim=4, linear_alpha=2.0, algo=algo, preset="full",
                                      warn_on_unmatched=False)
        self.network.apply_to()
        with torch.no_grad():  # lycoris zero-initialises one factor; make every module move the output
            for _, p in self.network.named_parameters():
                p.normal_(0, 0.25)
        self.path = folder / f"{algo}.safetensors"
        self.network.save_weights(str(self.path), torch.float32, {})


@pytest.fixture(scope="module")
def lycoris_files(tiny_flux_path, tmp_path_factory):
    folder = tmp_path_factory.mktemp("lycoris_flux")
    cache: dict[str, LycorisNetwork] = {}

    def get(algo: str) -> LycorisNetwork:
        if algo not in cache:
            cache[algo] = LycorisNetwork(folder, tiny_flux_path, algo)
        return cache[algo]

    return get


@pytest.mark.parametrize("algo", ["lokr", "loha"])
def test_a_lycoris_network_on_the_flux_transformer_imports_with_lycoris_delta_and_output(
        lycoris_files, algo, home, tmp_path, tiny_flux_path):
    from diffusers import FluxTransformer2DModel

    made = lycoris_files(algo)
    assert all(k.startswith("lycoris_") for k in load_file(str(made.path)))
    state, fmt, _ = read_adapter(made.path)
    assert fmt == "kohya" and state.variants == {algo: len(made.network.loras)} and len(made.network.loras) == 50
    g = torch.Generator().manual_seed(1)
    for lm in made.network.loras:  # the layer output lycoris' own forward adds, under the module's diffusers path
        path = lm.lora_name.removeprefix("lycoris_")
        name = next(n for n in state if n.removeprefix("transformer.").replace(".", "_") == path)
        w, b = made.base[name + ".weight"], made.base[name + ".bias"]
        x = torch.randn(3, w.shape[1], generator=g)
        with torch.no_grad():
            applied = lm(x)
            want = applied - F.linear(x, w, b)
            mine = F.linear(x, w + state[name].delta().reshape(w.shape), b) - F.linear(x, w, b)
        # float32 cancellation in (W + ΔW)x − Wx: the error is measured against the layer output, and ΔW is no noise
        assert (mine - want).abs().max() < 1e-5 * applied.abs().max() and rel_err(mine, want) < 1e-3, name

    run_cli(home, "registry", "import", str(made.path), "--name", "lyco", "--base", FLUX)
    assert Registry(home).resolve("lyco").adapter.variants == {algo: 50}
    out = tmp_path / "fused"
    run_cli(home, "lora", "fuse", FLUX, "lyco:1=1.0", "--dtype", "fp32", "-o", str(out))
    fused = FluxTransformer2DModel.from_pretrained(out / "transformer").eval()
    plain = FluxTransformer2DModel.from_pretrained(tiny_flux_path / "transformer").eval()
    inputs = flux_transformer_inputs(plain)
    with torch.no_grad():
        want = made.transformer(**inputs)[0]  # the transformer with lycoris' network applied
        got = fused(**inputs)[0]
        before = plain(**inputs)[0]
    assert rel_err(got, want) < 1e-4
    assert rel_err(before, want) > 1e-2, "the adapter must change the output for the test to mean anything"

    back = tmp_path / "back.safetensors"  # the kohya export spells it as lycoris saved it
    run_cli(home, "registry", "export", "lyco", "--format", "kohya", "-o", str(back))
    written, original = load_file(str(back)), load_file(str(made.path))
    assert sorted(written) == sorted(original) and all(torch.equal(written[k], original[k]) for k in original)


# -- refusals ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("keys, says", [
    (["lora_transformer_pos_embed_proj"], "key lora_transformer_pos_embed_proj"),  # SD3's / PixArt's patch embedding
    (["lora_transformer_transformer_blocks_0_attn_to_q", "lora_transformer_transformer_blocks_0_attn2_to_q"],
     "key lora_transformer_transformer_blocks_0_attn2_to_q"),  # SD3.5's second attention, beside Flux-like keys
    (["lora_transformer_joint_blocks_0_x_block_attn_qkv"], "key lora_transformer_joint_blocks_0"),
    (["lycoris_transformer_blocks_0_attn_to_q", "lycoris_pos_embed_proj"], "key lycoris_pos_embed_proj"),
])
def test_other_transformers_flattened_keys_are_refused_naming_the_family(home, tmp_path, keys, says):
    sd = {}
    for key in keys:
        sd[f"{key}.lora_down.weight"] = torch.ones(2, 8)
        sd[f"{key}.lora_up.weight"] = torch.ones(8, 2)
    path = tmp_path / "sd3.safetensors"
    save_file(sd, str(path))
    before = Registry(home).list()
    line = refused(run_cli(home, "registry", "import", str(path), "--name", "sd3", ok=False))
    assert "is a LoRA for a diffusion transformer other than Flux (SD3, PixArt, Sana, ...)" in line, line
    assert says in line, line
    assert Registry(home).list() == before


def test_a_file_mixing_flux_namings_is_refused_in_one_line(home, tmp_path):
    sd = {}
    for key in ("lora_transformer_x_embedder", "lora_unet_double_blocks_0_img_attn_proj"):
        sd[f"{key}.lora_down.weight"] = torch.ones(2, 8)
        sd[f"{key}.lora_up.weight"] = torch.ones(8, 2)
    path = tmp_path / "mixed.safetensors"
    save_file(sd, str(path))
    line = refused(run_cli(home, "registry", "import", str(path), "--name", "mixed", ok=False))
    assert "lora_transformer_x_embedder" in line and "a file must use one naming" in line, line
    both = tmp_path / "both.safetensors"
    save_file({"lora_transformer_x_embedder.lora_down.weight": torch.ones(2, 8),
               "lora_transformer_x_embedder.lora_up.weight": torch.ones(8, 2),
               "lycoris_proj_out.lora_down.weight": torch.ones(2, 8),
               "lycoris_proj_out.lora_up.weight": torch.ones(8, 2)}, str(both))
    line = refused(run_cli(home, "registry", "import", str(both), "--name", "both", ok=False))
    assert "a file must use one prefix" in line, line
