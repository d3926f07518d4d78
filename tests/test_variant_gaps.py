"""LyCORIS variant edge cases: text-encoder files spelled without CLIP's `text_model_` wrapper (as lycoris and
other tools built on transformers 5's CLIPTextModel write them), norm modules whose layer the base lacks, and
LoHa/LoKr modules whose file stores a conv kernel flattened turned into LoRA pairs without a known base.

lycoris-lora is the producer (its own kohya network's `save_weights`) and its forward pass the oracle;
diffusers' `load_lora_weights` is the consumer of converted pairs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from loraforge.formats import read_adapter, read_safetensors
from loraforge.registry import Registry

from cli_helpers import refused, run_cli as run
from oracles import entries_and_data as _entries_and_data, rel_err as _rel

import lycoris.kohya as lycoris_kohya  # noqa: E402  (a dependency: missing, the tests fail rather than skip)
pytestmark = pytest.mark.usefixtures("one_torch_thread")

# lycoris keeps a preset's targets on its network class: every preset here names all four.
TEXT_ONLY = """
unet_target_module = []
unet_target_name = []
text_encoder_target_module = ["CLIPAttention", "CLIPMLP"]
text_encoder_target_name = []
"""
UNET_WITH_CONV = """
enable_conv = true
unet_target_module = ["Transformer2DModel", "ResnetBlock2D"]
unet_target_name = []
text_encoder_target_module = []
text_encoder_target_name = []
"""


def _randomise(network) -> None:
    with torch.no_grad():  # lycoris zero-initialises one factor; make every module move the output
        for _, p in network.named_parameters():
            p.normal_(0, 0.3)


class TextEncoderNetwork:
    """A lycoris network of `algo` over the tiny SD text encoder (transformers' CLIPTextModel), saved by lycoris."""

    def __init__(self, tiny_sd_path: Path, folder: Path, algo: str):
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel

        folder.mkdir(parents=True, exist_ok=True)
        (folder / "preset.toml").write_text(TEXT_ONLY)
        self.text_encoder = CLIPTextModel.from_pretrained(tiny_sd_path / "text_encoder").eval()
        unet = UNet2DConditionModel.from_pretrained(tiny_sd_path / "unet")
        torch.manual_seed(21)
        self.network = lycoris_kohya.create_network(1.0, 4, 2.0, None, self.text_encoder, unet, algo=algo,
                                                    preset=str(folder / "preset.toml"))
        self.network.apply_to(self.text_encoder, unet, apply_text_encoder=True, apply_unet=False)
        _randomise(self.network)
        self.path = folder / f"te_{algo}.safetensors"
        self.network.save_weights(str(self.path), torch.float32, {})


def _text_output(text_encoder) -> torch.Tensor:
    ids = torch.randint(0, text_encoder.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        return text_encoder(ids).last_hidden_state


# -- 1. kohya text-encoder keys without `text_model_` -----------------------------------------

@pytest.mark.parametrize("algo", ["lora", "loha"])
def test_lycoris_text_encoder_files_without_text_model_import_export_and_fuse_exactly(
        algo, tiny_sd_path, home, tmp_path):
    from transformers import CLIPTextModel

    made = TextEncoderNetwork(tiny_sd_path, tmp_path / "lyco", algo)
    keys = list(read_safetensors(made.path)[0])
    assert keys and all(k.startswith("lora_te_encoder_layers_") for k in keys)  # transformers 5's spelling

    state, fmt, _ = read_adapter(made.path)  # without a base: canonical paths keep `text_model.`
    assert fmt == "kohya" and all(n.startswith("text_encoder.text_model.encoder.layers.") for n in state)

    run(home, "registry", "import", str(made.path), "--name", "te", "--base", "builtin:tiny-sd")
    assert Registry(home).resolve("te").adapter.variants == {"lora" if algo == "lora" else "loha": 12}
    out = tmp_path / "back.safetensors"
    run(home, "registry", "export", "te", "--format", "kohya", "-o", str(out))
    assert _entries_and_data(out) == _entries_and_data(made.path)  # the same names, tensors and bytes

    run(home, "lora", "fuse", "builtin:tiny-sd", "te:1=1.0", "--dtype", "fp32", "-o", str(tmp_path / "fused"))
    fused = CLIPTextModel.from_pretrained(tmp_path / "fused" / "text_encoder").eval()
    want = _text_output(made.text_encoder)  # lycoris' own forward
    plain = _text_output(CLIPTextModel.from_pretrained(tiny_sd_path / "text_encoder").eval())
    assert _rel(_text_output(fused), want) < 1e-4
    assert _rel(plain, want) > 1e-2, "the adapter must change the output for the test to mean anything"


def test_an_sdxl_file_spelling_each_text_encoder_its_own_way_round_trips_and_fuses(tiny_sdxl_path, home, tmp_path):
    """On SDXL, transformers 5's CLIPTextModel (text_encoder) has no `text_model` wrapper and
    CLIPTextModelWithProjection (text_encoder_2) keeps it: lycoris writes `lora_te1_encoder_…` beside
    `lora_te2_text_model_encoder_…`, and each comes back as it was written."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    (tmp_path / "preset.toml").write_text(TEXT_ONLY)
    encoders = [CLIPTextModel.from_pretrained(tiny_sdxl_path / "text_encoder").eval(),
                CLIPTextModelWithProjection.from_pretrained(tiny_sdxl_path / "text_encoder_2").eval()]
    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl_path / "unet")
    torch.manual_seed(22)
    network = lycoris_kohya.create_network(1.0, 4, 2.0, None, encoders, unet, algo="loha",
                                           preset=str(tmp_path / "preset.toml"))
    network.apply_to(encoders, unet, apply_text_encoder=True, apply_unet=False)
    _randomise(network)
    path = tmp_path / "xl_te.safetensors"
    network.save_weights(str(path), torch.float32, {})
    keys = list(read_safetensors(path)[0])
    assert any(k.startswith("lora_te1_encoder_") for k in keys)
    assert any(k.startswith("lora_te2_text_model_encoder_") for k in keys)

    run(home, "registry", "import", str(path), "--name", "xl", "--base", "builtin:tiny-sdxl")
    out = tmp_path / "back.safetensors"
    run(home, "registry", "export", "xl", "--format", "kohya", "-o", str(out))
    assert _entries_and_data(out) == _entries_and_data(path)

    run(home, "lora", "fuse", "builtin:tiny-sdxl", "xl:1=1.0", "--dtype", "fp32", "-o", str(tmp_path / "fused"))
    for cls, component, lycoris_encoder in zip((CLIPTextModel, CLIPTextModelWithProjection),
                                               ("text_encoder", "text_encoder_2"), encoders):
        fused = cls.from_pretrained(tmp_path / "fused" / component).eval()
        plain = cls.from_pretrained(tiny_sdxl_path / component).eval()
        want = _text_output(lycoris_encoder)
        assert _rel(_text_output(fused), want) < 1e-4, component
        assert _rel(_text_output(plain), want) > 1e-2, component


def test_a_text_encoder_spelled_both_ways_in_one_file_is_refused(home, tmp_path):
    path = tmp_path / "mixed.safetensors"
    save_file({"lora_te_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(2, 32),
               "lora_te_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(32, 2),
               "lora_te_text_model_encoder_layers_1_self_attn_q_proj.lora_down.weight": torch.zeros(2, 32),
               "lora_te_text_model_encoder_layers_1_self_attn_q_proj.lora_up.weight": torch.zeros(32, 2)},
              str(path))
    line = refused(run(home, "registry", "import", str(path), "--name", "m", ok=False))
    assert "text_model_" in line and "one spelling" in line
    assert Registry(home).list() == []


# -- 2. norm modules whose layer the base lacks ------------------------------------------------

def _norm_file(path: Path, norm: str, width: int = 32) -> Path:
    """A LoRA pair on a real layer and LyCORIS norm differences (w_norm/b_norm) for layer `norm`."""
    g = torch.Generator().manual_seed(5)
    save_file({
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.randn(2, 32, generator=g),
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.randn(32, 2, generator=g),
        "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(2.0),
        f"lora_unet_{norm.replace('.', '_')}.w_norm": torch.randn(width, generator=g),
        f"lora_unet_{norm.replace('.', '_')}.b_norm": torch.randn(width, generator=g),
    }, str(path))
    return path


def test_a_norm_module_for_a_layer_the_base_lacks_is_refused_everywhere(home, tmp_path):
    missing = "down_blocks.0.resnets.0.norm3"  # ResnetBlock2D has norm1 and norm2 only
    path = _norm_file(tmp_path / "norm.safetensors", missing)
    line = refused(run(home, "registry", "import", str(path), "--name", "n", "--base", "builtin:tiny-sd", ok=False))
    assert f"unet.{missing}" in line or missing.replace(".", "_") in line
    assert Registry(home).list() == []

    run(home, "registry", "import", str(path), "--name", "n")  # without a base nothing can check it yet
    before = Registry(home).list()
    out = tmp_path / "fused"
    line = refused(run(home, "lora", "fuse", "builtin:tiny-sd", "n:1=1.0", "--dtype", "fp32", "-o", str(out),
                       ok=False))
    assert f"unet.{missing}" in line and not out.exists()
    line = refused(run(home, "generate", "--base", "builtin:tiny-sd", "--lora", "n", "--prompt", "a cat",
                       "--steps", "1", "-o", str(tmp_path / "image.png"), ok=False))
    assert f"unet.{missing}" in line and not (tmp_path / "image.png").exists()
    assert Registry(home).list() == before


def test_a_norm_module_of_the_wrong_width_is_refused_and_a_fitting_one_fuses(home, tmp_path, tiny_sd_path):
    from diffusers import UNet2DConditionModel

    wrong = _norm_file(tmp_path / "wrong.safetensors", "down_blocks.0.resnets.0.norm1", width=7)
    line = refused(run(home, "registry", "import", str(wrong), "--name", "w", "--base", "builtin:tiny-sd",
                       ok=False))
    assert "down_blocks" in line and "(7,)" in line and "(32,)" in line

    right = _norm_file(tmp_path / "right.safetensors", "down_blocks.0.resnets.0.norm1")
    run(home, "registry", "import", str(right), "--name", "r", "--base", "builtin:tiny-sd")
    run(home, "lora", "fuse", "builtin:tiny-sd", "r:1=1.0", "--dtype", "fp32", "-o", str(tmp_path / "fused"))
    fused = UNet2DConditionModel.from_pretrained(tmp_path / "fused" / "unet")
    plain = UNet2DConditionModel.from_pretrained(tiny_sd_path / "unet")
    sd = read_safetensors(right)[0]
    norm = "down_blocks.0.resnets.0.norm1"
    assert torch.equal(fused.get_submodule(norm).weight, plain.get_submodule(norm).weight + sd[
        "lora_unet_down_blocks_0_resnets_0_norm1.w_norm"])
    assert torch.equal(fused.get_submodule(norm).bias, plain.get_submodule(norm).bias + sd[
        "lora_unet_down_blocks_0_resnets_0_norm1.b_norm"])


def test_norm_modules_fuse_into_a_single_file_as_into_its_folder(home, tmp_path, tiny_sd_path):
    """A single-file base knows its norm layers too: a fitting norm module fuses as into the folder, a missing
    one is refused naming it by fuse and by generate."""
    from loraforge.models.single_file import write_single_file

    single = write_single_file(tiny_sd_path, "sd1", tmp_path / "tiny-sd.safetensors")
    right = _norm_file(tmp_path / "right.safetensors", "down_blocks.0.resnets.0.norm1")
    run(home, "registry", "import", str(right), "--name", "r")
    run(home, "lora", "fuse", str(single), "r:1=1.0", "--dtype", "fp32", "-o", str(tmp_path / "fused.safetensors"))
    run(home, "lora", "fuse", "builtin:tiny-sd", "r:1=1.0", "--dtype", "fp32", "-o", str(tmp_path / "folder"))
    fused = read_safetensors(tmp_path / "fused.safetensors")[0]
    folder = read_safetensors(tmp_path / "folder" / "unet" / "diffusion_pytorch_model.safetensors")[0]
    ldm = "model.diffusion_model.input_blocks.1.0.in_layers.0"  # the single file's name of that norm layer
    for kind in ("weight", "bias"):
        assert torch.equal(fused[f"{ldm}.{kind}"], folder[f"down_blocks.0.resnets.0.norm1.{kind}"])
        assert not torch.equal(fused[f"{ldm}.{kind}"], read_safetensors(single)[0][f"{ldm}.{kind}"])

    missing = _norm_file(tmp_path / "missing.safetensors", "down_blocks.0.resnets.0.norm3")
    run(home, "registry", "import", str(missing), "--name", "m")
    line = refused(run(home, "lora", "fuse", str(single), "m:1=1.0", "-o", str(tmp_path / "no.safetensors"), ok=False))
    assert "unet.down_blocks.0.resnets.0.norm3" in line and not (tmp_path / "no.safetensors").exists()

    line = refused(run(home, "generate", "--base", str(single), "--lora", "m", "--prompt", "a cat", "--steps", "1",
                       "-o", str(tmp_path / "image.png"), ok=False))
    assert "unet.down_blocks.0.resnets.0.norm3" in line and not (tmp_path / "image.png").exists()


def test_training_targets_naming_only_norm_layers_match_no_lora_layer(home, tmp_path):
    """The base's targets now list norm layers; a LoRA cannot adapt them, so targeting them alone is refused."""
    from test_train import RES, pattern_images

    data = pattern_images(tmp_path / "stripes", "stripes", n=2, caption="red stripes")
    line = refused(run(home, "train", "lora", "--name", "x", "--target-modules", "norm1", "--dataset", str(data),
                       "--steps", "1", "--resolution", str(RES), ok=False))
    assert "norm1" in line and "match no Linear or Conv2d module of the unet" in line
    assert Registry(home).list() == []


# -- 3. flattened conv kernels turned into LoRA pairs ------------------------------------------

@pytest.fixture(scope="module")
def conv_loha(tiny_sd_path, tmp_path_factory) -> Path:
    """A lycoris LoHa (no Tucker: conv kernels stored flattened) over the tiny SD UNet's attention and resnets."""
    from diffusers import UNet2DConditionModel

    folder = tmp_path_factory.mktemp("conv-loha")
    (folder / "preset.toml").write_text(UNET_WITH_CONV)
    unet = UNet2DConditionModel.from_pretrained(tiny_sd_path / "unet")
    torch.manual_seed(31)
    network = lycoris_kohya.create_network(1.0, 2, 2.0, None, None, unet, algo="loha", conv_dim=2, conv_alpha=2.0,
                                           preset=str(folder / "preset.toml"))
    network.apply_to(None, unet, apply_text_encoder=False, apply_unet=True)
    _randomise(network)
    path = folder / "loha.safetensors"
    network.save_weights(str(path), torch.float32, {})
    return path


def test_a_loha_without_a_base_is_not_turned_into_flat_conv_pairs(conv_loha, home):
    sd = read_safetensors(conv_loha)[0]
    assert sd["lora_unet_down_blocks_0_resnets_0_conv1.hada_w1_b"].dim() == 2  # the kernel is flattened
    run(home, "registry", "import", str(conv_loha), "--name", "hada")
    before = Registry(home).list()
    line = refused(run(home, "lora", "resize", "hada", "--rank", "3", "--name", "small", ok=False))
    assert "loha" in line and "--base" in line and "conv" in line
    line = refused(run(home, "merge", "loras", "hada:1=0.5", "--method", "concat", "--name", "m", ok=False))
    assert "loha" in line and "--base" in line
    assert Registry(home).list() == before


def test_a_loha_imported_with_its_base_resizes_to_conv_pairs_diffusers_loads(conv_loha, home, tmp_path,
                                                                             tiny_sd_path):
    from diffusers import StableDiffusionPipeline

    from loraforge.registry.resolve import load_adapter

    run(home, "registry", "import", str(conv_loha), "--name", "hada", "--base", "builtin:tiny-sd")
    run(home, "lora", "resize", "hada", "--rank", "4", "--name", "pairs")  # r₁·r₂ = 4: exact
    pairs, _ = load_adapter(Registry(home), "pairs")
    loha, _, _ = read_adapter(conv_loha)
    conv = "unet.down_blocks.0.resnets.0.conv1"
    assert pairs[conv].down.dim() == 4 and pairs[conv].weight_shape == (32, 32, 3, 3)
    out = tmp_path / "pairs.safetensors"
    run(home, "registry", "export", "pairs", "--format", "diffusers", "-o", str(out))
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path, dtype=torch.float32)
    plain = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    pipe.load_lora_weights(str(out))
    missing = [n for n in loha if n.startswith("unet.")
               and not hasattr(pipe.unet.get_submodule(n.split(".", 1)[1]), "lora_A")]
    assert missing == []
    pipe.fuse_lora()
    layer = pipe.unet.get_submodule(conv.split(".", 1)[1])
    got = layer.base_layer.weight if hasattr(layer, "base_layer") else layer.weight
    want = plain[conv.split(".", 1)[1] + ".weight"] + loha[conv].delta().reshape(32, 32, 3, 3)
    assert _rel(got.detach(), want) < 1e-4


def test_a_text_encoder_loha_without_a_base_still_converts(tiny_sd_path, home, tmp_path):
    """CLIP text encoders hold only Linear layers: their LoHa modules need no base shape to become pairs."""
    made = TextEncoderNetwork(tiny_sd_path, tmp_path / "lyco", "loha")
    run(home, "registry", "import", str(made.path), "--name", "te")
    run(home, "lora", "resize", "te", "--rank", "16", "--name", "pairs")
    from loraforge.registry.resolve import load_adapter

    pairs, _ = load_adapter(Registry(home), "pairs")
    loha, _, _ = read_adapter(made.path)
    assert pairs.variants == {"lora": 12}
    for name in loha:
        assert _rel(pairs[name].delta(), loha[name].delta()) < 1e-5, name


def test_the_modules_named_always_linear_are_linear_in_both_builtin_unets(tiny_sd_path, tiny_sdxl_path):
    """`always_linear` lets base-less LoHa/LoKr attention modules become 2-D pairs: check its names against the
    UNets diffusers builds (SD1 with conv proj_in, SDXL with linear ones)."""
    from diffusers import UNet2DConditionModel

    from loraforge.ops.variant_lowrank import always_linear

    seen = 0
    for folder in (tiny_sd_path, tiny_sdxl_path):
        unet = UNet2DConditionModel.from_pretrained(folder / "unet")
        for path, layer in unet.named_modules():
            if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)) and always_linear(f"unet.{path}"):
                assert isinstance(layer, torch.nn.Linear), path
                seen += 1
        assert not always_linear("unet.down_blocks.0.attentions.0.proj_in")  # a 1×1 conv in SD1
    assert seen > 50
