"""LyCORIS variants (LoHa, LoKr, Tucker LoCon, DoRA, full and norm differences) with lycoris-lora as producer
and oracle: files written by lycoris' own kohya network (`lycoris.kohya.create_network(...).save_weights`) on
the tiny SD UNet import, give the ΔW lycoris' own forward pass applies, export back to kohya tensor for tensor,
fuse to the UNet output of the network applied by lycoris, and turn into LoRA pairs exactly at their rank
bound, with the truncation error torch's SVD gives below it recorded in the manifest."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from loraforge.formats import read_adapter, read_safetensors, write_adapter
from loraforge.registry import Registry
from loraforge.registry.resolve import load_adapter

from cli_helpers import refused, run_cli as run
from oracles import entries_and_data as _entries_and_data, rel_err as _rel

import lycoris.kohya as lycoris_kohya  # noqa: E402  (a dependency: missing, the tests fail rather than skip)
pytestmark = pytest.mark.usefixtures("one_torch_thread")

PRESET = """
enable_conv = true
unet_target_module = ["Transformer2DModel", "ResnetBlock2D"]
unet_target_name = []
text_encoder_target_module = []
text_encoder_target_name = []
"""

# name → (lycoris algo, extra network arguments, the variant counts loraforge must report)
CASES = {
    "loha": ("loha", {}, {"loha": 77}),
    "loha_tucker": ("loha", {"use_tucker": True}, {"loha": 77}),
    "lokr": ("lokr", {}, {"lokr": 77}),
    "lokr_tucker": ("lokr", {"use_tucker": True, "decompose_both": True, "factor": 4}, {"lokr": 77}),
    "locon_tucker": ("locon", {"use_tucker": True}, {"locon_tucker": 16, "lora": 61}),
    "dora": ("lora", {"dora_wd": True}, {"dora": 77}),
    "dora_loha": ("loha", {"dora_wd": True}, {"dora": 77}),
    "dora_on_input": ("lora", {"dora_wd": True, "wd_on_output": False}, {"dora": 77}),
    "dora_lokr": ("lokr", {"dora_wd": True}, {"dora": 77}),
    "full": ("full", {}, {"full": 77}),
    "norm": ("lora", {"train_norm": True}, {"lora": 77, "norm": 32}),
}


def _unet(tiny_sd_path: Path):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(tiny_sd_path / "unet").eval()


def _unet_inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 4, 32, 32, generator=g), torch.tensor([500]), torch.randn(1, 7, 32, generator=g))


class Produced:
    """A lycoris network on the tiny UNet, randomised, saved by lycoris to `path`."""

    def __init__(self, tiny_sd_path: Path, folder: Path, case: str, dtype=torch.float32):
        algo, kwargs, self.variants = CASES[case]
        folder.mkdir(parents=True, exist_ok=True)
        preset = folder / "preset.toml"
        preset.write_text(PRESET)
        self.unet = _unet(tiny_sd_path)
        self.base = {k: v.clone() for k, v in self.unet.state_dict().items()}
        torch.manual_seed(11)
        self.network = lycoris_kohya.create_network(1.0, 4, 2.0, None, None, self.unet, algo=algo, conv_dim=4,
                                                    conv_alpha=2.0, preset=str(preset), **kwargs)
        self.network.apply_to(None, self.unet, apply_text_encoder=False, apply_unet=True)
        with torch.no_grad():  # lycoris zero-initialises one factor; make every module move the output
            for _, p in self.network.named_parameters():
                p.normal_(0, 0.3)
            for lm in self.network.unet_loras:
                if hasattr(lm, "dora_scale"):  # DoRA magnitudes near the base norms, as after training
                    lm.dora_scale.mul_(0).add_(self._norms(lm) * 1.2)
        self.path = folder / f"{case}.safetensors"
        self.network.save_weights(str(self.path), dtype, {})

    def _norms(self, lm):
        w = self.base[self.module_path(lm) + ".weight"]
        if lm.dora_scale.shape[0] == w.shape[0]:
            return w.reshape(w.shape[0], -1).norm(dim=1).reshape(lm.dora_scale.shape)
        return w.transpose(0, 1).reshape(w.shape[1], -1).norm(dim=1).reshape(lm.dora_scale.shape)

    def module_path(self, lm) -> str:
        from loraforge.formats.kohya_names import split_words

        return ".".join(split_words(lm.lora_name.removeprefix("lora_unet_")))


@pytest.fixture(scope="module")
def produced(tiny_sd_path, tmp_path_factory):
    folder = tmp_path_factory.mktemp("lycoris")
    cache: dict[str, Produced] = {}

    def get(case: str) -> Produced:
        if case not in cache:
            cache[case] = Produced(tiny_sd_path, folder / case, case)
        return cache[case]

    return get


def _layer_output(module, x, weight, bias):
    if weight.dim() == 4:
        return F.conv2d(x, weight, bias, module.stride, module.padding)
    return F.linear(x, weight, bias)


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_module_applies_the_delta_of_lycoris_forward(produced, case):
    made = produced(case)
    state, fmt, _ = read_adapter(made.path)
    assert fmt == "kohya" and state.variants == made.variants
    checked = 0
    g = torch.Generator().manual_seed(1)
    for lm in made.network.unet_loras:
        name = "unet." + made.module_path(lm)
        module = state[name]
        layer = lm.org_module[0]
        w = made.base[made.module_path(lm) + ".weight"]
        b = made.base.get(made.module_path(lm) + ".bias")
        if module.variant == "norm":
            continue  # norm layers are checked through the fused UNet below
        x = torch.randn(3, w.shape[1], *([6, 6] if w.dim() == 4 else []), generator=g)
        with torch.no_grad():
            want = lm(x) - _layer_output(layer, x, w, b)  # what lycoris' own forward adds
            mine = _layer_output(layer, x, w + module.delta(base_weight=w), b) - _layer_output(layer, x, w, b)
            if module.variant == "full" and "diff_b" in module.tensors:
                mine = mine + module.tensors["diff_b"].reshape(1, -1, *([1, 1] if w.dim() == 4 else []))
        assert _rel(mine, want) < 1e-4, name
        checked += 1
    assert checked >= 45


@pytest.mark.parametrize("case", ["loha", "loha_tucker", "lokr", "lokr_tucker", "locon_tucker"])
def test_structured_low_rank_factors_rebuild_the_lycoris_delta(produced, case):
    """LoHa/LoKr/Tucker factors (Khatri–Rao, Kronecker, core contraction) multiply out to lycoris' ΔW."""
    state, _, _ = read_adapter(produced(case).path)
    for name in state:
        module = state[name]
        if module.variant == "lora":
            continue
        b, a = module.lora_factors()
        assert a.shape[0] >= module.rank_bound
        want = module.delta()
        assert _rel((b @ a).reshape(want.shape), want) < 1e-5, name


@pytest.mark.parametrize("case", ["loha", "lokr_tucker", "locon_tucker", "dora", "full", "norm"])
def test_kohya_export_is_the_lycoris_file_but_its_metadata(produced, case, tmp_path):
    made = produced(case)
    state, _, _ = read_adapter(made.path)
    out = write_adapter(state, tmp_path / "again.safetensors", "kohya")[0]
    # Byte for byte but for the header's metadata (lycoris writes its hashes, loraforge `format: pt`): the
    # same tensor entries (names, dtypes, shapes, offsets) and the same data section.
    assert _entries_and_data(out) == _entries_and_data(made.path)


def test_fp16_file_round_trips_through_the_registry_with_its_dtypes(tiny_sd_path, tmp_path, home):
    made = Produced(tiny_sd_path, tmp_path / "half", "loha", dtype=torch.float16)
    run(home, "registry", "import", str(made.path), "--name", "hada", "--base", "builtin:tiny-sd")
    manifest = Registry(home).resolve("hada")
    assert manifest.adapter.variants == {"loha": 77} and manifest.adapter.dtype == "float16"
    out = tmp_path / "out.safetensors"
    run(home, "registry", "export", "hada", "--format", "kohya", "-o", str(out))
    assert _entries_and_data(out) == _entries_and_data(made.path)
    assert {t.dtype for t in read_safetensors(out)[0].values()} == {torch.float16}


@pytest.mark.parametrize("case", ["loha", "lokr", "locon_tucker", "dora", "full", "norm"])
def test_cli_fuse_gives_the_unet_output_of_the_lycoris_network(produced, case, home, tmp_path, tiny_sd_path):
    from diffusers import UNet2DConditionModel

    made = produced(case)
    out = tmp_path / "fused"
    run(home, "registry", "import", str(made.path), "--name", "lyco", "--base", "builtin:tiny-sd")
    assert Registry(home).resolve("lyco").adapter.variants == made.variants
    run(home, "lora", "fuse", "builtin:tiny-sd", "lyco:1=1.0", "--dtype", "fp32", "-o", str(out))
    fused = UNet2DConditionModel.from_pretrained(out / "unet").eval()
    sample, t, text = _unet_inputs()
    with torch.no_grad():
        want = made.unet(sample, t, text).sample  # the UNet with lycoris' network applied
        got = fused(sample, t, text).sample
        plain = _unet(tiny_sd_path)(sample, t, text).sample
    assert _rel(got, want) < 1e-4
    assert _rel(plain, want) > 1e-2, "the adapter must change the output for the test to mean anything"


def test_render_loads_variants_into_diffusers_with_their_exact_delta(produced, tiny_sd_path):
    from loraforge.models.base import base_from_path
    from loraforge.models.pipeline import load_pipeline
    from loraforge.render.adapters import apply_adapters

    sample, t, text = _unet_inputs(2)
    for case in ("loha", "dora", "full"):
        made = produced(case)
        state, _, _ = read_adapter(made.path)
        pipe = load_pipeline(base_from_path(tiny_sd_path, "builtin:tiny-sd"), device="cpu")
        pipe.unet.float()
        apply_adapters(pipe, [(state, 0.5)])
        with torch.no_grad():
            got = pipe.unet(sample, t, text).sample
            made.network.set_multiplier(0.5)
            half = made.unet(sample, t, text).sample  # lycoris' own forward at multiplier 0.5
            made.network.set_multiplier(1.0)
        if case == "dora":  # a weight w scales W' − W (ComfyUI's convention): the UNet with half of each ΔW added
            halfway = _unet(tiny_sd_path)
            with torch.no_grad():
                for name in state:
                    layer = halfway.get_submodule(name.split(".", 1)[1])
                    layer.weight.add_(0.5 * state[name].delta(base_weight=layer.weight))
                half = halfway(sample, t, text).sample
        assert _rel(got, half) < 1e-4, case


def test_loha_low_rank_is_exact_at_r_squared_and_records_the_svd_error_below(produced, home, tmp_path):
    from loraforge.ops.variant_lowrank import to_lora_module

    made = produced("loha")
    state, _, _ = read_adapter(made.path)
    name = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    module = state[name]
    assert module.rank == 4 and module.rank_bound == 16
    exact, err = to_lora_module(module, name=name)  # a to_q: Linear without a base
    assert exact.rank == 16 and err < 1e-5 and _rel(exact.delta(), module.delta()) < 1e-5

    run(home, "registry", "import", str(made.path), "--name", "hada", "--base", "builtin:tiny-sd")
    said = run(home, "lora", "resize", "hada", "--rank", "5", "--name", "small").output
    resized, manifest = load_adapter(Registry(home), "small")
    worst = 0.0
    for n in state:  # torch's own SVD of lycoris' ΔW: the best rank-5 error (Eckart–Young)
        d = state[n].delta().reshape(state[n].weight_shape[0], -1).double()
        s = torch.linalg.svdvals(d)
        best = float(s[5:].square().sum().sqrt() / s.square().sum().sqrt())
        worst = max(worst, best)
        assert abs(_rel(resized[n].delta().reshape(d.shape).double(), d) - best) < 1e-4, n
    assert manifest.adapter.variants == {"lora": 77} and manifest.adapter.rank == 5
    assert manifest.adapter.lowrank_error == pytest.approx(worst, rel=1e-3) and worst > 0.05
    assert f"largest relative error {manifest.adapter.lowrank_error:.2e}" in said


def test_merging_a_loha_with_a_lokr_is_exact_and_records_the_conversion(produced, home):
    loha, lokr = produced("loha"), produced("lokr")
    run(home, "registry", "import", str(loha.path), "--name", "hada", "--base", "builtin:tiny-sd")
    run(home, "registry", "import", str(lokr.path), "--name", "kron", "--base", "builtin:tiny-sd")
    run(home, "merge", "loras", "hada:1=0.7", "kron:1=-0.4", "--method", "concat", "--name", "both")
    merged, manifest = load_adapter(Registry(home), "both")
    a, _, _ = read_adapter(loha.path)
    b, _, _ = read_adapter(lokr.path)
    for n in a:
        shape = merged[n].weight_shape  # the base's: LoHa and factored LoKr store conv kernels flattened
        assert len(shape) == (4 if ".resnets." in n and "time_emb_proj" not in n else 2), n
        want = 0.7 * a[n].delta().reshape(shape) - 0.4 * b[n].delta().reshape(shape)
        assert _rel(merged[n].delta(), want) < 1e-5, n
    assert manifest.adapter.variants == {"lora": 77}
    assert manifest.adapter.lowrank_error is not None and manifest.adapter.lowrank_error < 1e-5


def test_refusals_are_one_line_and_leave_the_registry_unchanged(produced, home, tmp_path):
    dora = produced("dora")
    run(home, "registry", "import", str(dora.path), "--name", "wd", "--base", "builtin:tiny-sd")
    run(home, "registry", "import", str(produced("dora_loha").path), "--name", "wdh")  # PEFT's DoRA cannot spell it
    before = Registry(home).list()
    line = refused(run(home, "merge", "loras", "wd:1=1", "--name", "x", ok=False))
    assert "DoRA" in line and "base weight" in line
    line = refused(run(home, "registry", "export", "wdh", "--format", "diffusers", "-o", str(tmp_path / "d"), ok=False))
    assert "DoRA" in line and "kohya" in line
    from safetensors.torch import save_file

    oft = tmp_path / "oft.safetensors"  # a LyCORIS algorithm loraforge does not read (OFT)
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.oft_blocks": torch.zeros(4, 8, 8)}, str(oft))
    line = refused(run(home, "registry", "import", str(oft), "--name", "oft", ok=False))
    assert "lora_unet_down_blocks_0_attentions_0_proj_in.oft_blocks" in line and "hada_w1_a" in line
    half = tmp_path / "half.safetensors"  # a LoHa missing its second Hadamard half
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a": torch.zeros(32, 2),
               "lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_b": torch.zeros(2, 32)}, str(half))
    line = refused(run(home, "registry", "import", str(half), "--name", "half", ok=False))
    assert "incomplete loha module" in line
    assert Registry(home).list() == before


def test_sdxl_loha_with_sgm_block_names_fuses_exactly_and_exports_back(tiny_sdxl_path, home, tmp_path):
    """sd-scripts trains SDXL LyCORIS on a UNet with Stability (SGM) module names: a LoHa spelled so imports
    through the SGM name mapping, fuses to lycoris' own output and exports back to the same file contents."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    from loraforge.formats.kohya_names import flatten, sgm_paths, split_words

    made = Produced(tiny_sdxl_path, tmp_path / "xl", "loha")
    sd, _ = read_safetensors(made.path)
    paths = {".".join(split_words(k.split(".", 1)[0].removeprefix("lora_unet_"))) for k in sd}
    sgm = sgm_paths(paths, layers_per_block=1)
    renamed = {}
    for key, t in sd.items():
        flat, suffix = key.split(".", 1)
        path = ".".join(split_words(flat.removeprefix("lora_unet_")))
        renamed[f"lora_unet_{flatten(sgm[path])}.{suffix}"] = t
    assert any(k.startswith("lora_unet_input_blocks_") for k in renamed)
    file = tmp_path / "sgm.safetensors"
    save_file(renamed, str(file))  # safetensors' own writer, as lycoris' save_weights uses it

    run(home, "registry", "import", str(file), "--name", "xl", "--base", "builtin:tiny-sdxl")
    assert Registry(home).resolve("xl").adapter.variants == {"loha": len(paths)}
    out = tmp_path / "back.safetensors"
    run(home, "registry", "export", "xl", "--format", "kohya", "-o", str(out))
    assert _entries_and_data(out) == _entries_and_data(file)

    run(home, "lora", "fuse", "builtin:tiny-sdxl", "xl:1=1.0", "--dtype", "fp32", "-o", str(tmp_path / "fused"))
    fused = UNet2DConditionModel.from_pretrained(tmp_path / "fused" / "unet").eval()
    g = torch.Generator().manual_seed(4)
    sample, text = torch.randn(1, 4, 32, 32, generator=g), torch.randn(1, 7, 64, generator=g)
    cond = {"text_embeds": torch.randn(1, fused.config.projection_class_embeddings_input_dim - 6 * 8, generator=g),
            "time_ids": torch.randn(1, 6, generator=g)}
    with torch.no_grad():
        want = made.unet(sample, torch.tensor([500]), text, added_cond_kwargs=cond).sample
        got = fused(sample, torch.tensor([500]), text, added_cond_kwargs=cond).sample
        plain = _unet(tiny_sdxl_path)(sample, torch.tensor([500]), text, added_cond_kwargs=cond).sample
    assert _rel(got, want) < 1e-4 and _rel(plain, want) > 1e-2


def test_peft_dora_magnitudes_give_the_output_of_peft_forward():
    """PEFT's DoRA (`lora_magnitude_vector`, one number per output row, also for conv layers) as the DoRA
    variant: the layer output with W + ΔW equals PEFT's own forward."""
    from peft import LoraConfig, get_peft_model

    from loraforge.formats.lora import module_from_tensors

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(12, 10)
            self.conv = torch.nn.Conv2d(6, 8, 3, padding=1)

    torch.manual_seed(3)
    model = get_peft_model(Net(), LoraConfig(r=3, lora_alpha=5, target_modules=["lin", "conv"], use_dora=True))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.4)
    sd = model.state_dict()
    g = torch.Generator().manual_seed(0)
    for layer, x in (("lin", torch.randn(4, 12, generator=g)), ("conv", torch.randn(2, 6, 5, 5, generator=g))):
        prefix = f"base_model.model.{layer}."
        module = module_from_tensors({
            "lora_down.weight": sd[prefix + "lora_A.default.weight"],
            "lora_up.weight": sd[prefix + "lora_B.default.weight"],
            "lora_magnitude_vector": sd[prefix + "lora_magnitude_vector.default.weight"],
        }, 5.0, f"unet.{layer}")
        assert module.variant == "dora" and module.wd_on_out
        base = model.base_model.model.get_submodule(layer).base_layer
        w = base.weight.detach()
        with torch.no_grad():
            want = model.base_model.model.get_submodule(layer)(x) - base(x)
            mine = _layer_output(base, x, w + module.delta(base_weight=w), base.bias) - base(x)
        assert _rel(mine, want) < 1e-4, layer
