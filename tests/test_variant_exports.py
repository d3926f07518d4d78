"""Exports of DoRA and LyCORIS adapters load completely in the program they are written for.

- The kohya export of a PEFT DoRA spells its magnitudes as LyCORIS' `dora_scale` (out×1…, one number per
  output row): lycoris-lora's own `create_network_from_weights`, which ComfyUI and A1111 follow, loads every
  module of it and computes what PEFT's DoRA model computes.
- `--for diffusers` / `--for peft` of a LoHa, LoKr or Tucker LoCon saved by lycoris' network writes LoRA pairs
  at each module's exact rank bound (conv layers shaped from the recorded base): `load_lora_weights` and
  `PeftModel.from_pretrained` load every module and give lycoris' own forward; what cannot be written
  exactly (a base-less conv kernel stored flattened, a DoRA over LoHa) is refused in one line.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from loraforge.formats import read_adapter, read_safetensors

from cli_helpers import refused, run_cli as run
from oracles import rel_err as _rel

import lycoris.kohya as lycoris_kohya  # noqa: E402  (a dependency: missing, the tests fail rather than skip)
pytestmark = pytest.mark.usefixtures("one_torch_thread")

UNET_WITH_CONV = """
enable_conv = true
unet_target_module = ["Transformer2DModel", "ResnetBlock2D"]
unet_target_name = []
text_encoder_target_module = []
text_encoder_target_name = []
"""


def _unet(tiny_sd_path: Path):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(tiny_sd_path / "unet").eval()


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 4, 32, 32, generator=g), torch.tensor([500]), torch.randn(1, 7, 32, generator=g)


def _out(unet, seed: int = 0) -> torch.Tensor:
    with torch.no_grad():
        return unet(*_inputs(seed)).sample


# -- 1. DoRA from PEFT, exported for ComfyUI/A1111, loaded by lycoris -------------------------------

@pytest.fixture(scope="module")
def peft_dora(tiny_sd_path, tmp_path_factory):
    """(PEFT DoRA model over the tiny UNet, its saved folder): Linear and 3×3 conv layers, alpha ≠ rank."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=2, lora_alpha=3, use_dora=True, target_modules=["to_q", "to_v", "conv1", "conv2"])
    model = get_peft_model(_unet(tiny_sd_path), config)
    gen = torch.Generator().manual_seed(80)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
            elif "lora_magnitude_vector" in name:  # magnitudes away from the base norms, as after training
                p.mul_(1 + 0.3 * torch.rand(p.shape, generator=gen))
    folder = tmp_path_factory.mktemp("peft-dora") / "dora"
    model.save_pretrained(str(folder))
    return model.eval(), folder


def _loaded_by_lycoris(path: Path, unet, monkeypatch):
    """lycoris' network built from the file `path` alone (`create_network_from_weights`), applied to `unet`."""
    # The network it builds first takes its targets from class attributes; with none it adds only the file's
    # modules (its default targets name the tiny UNet's time embedding twice and trip its duplicate check).
    for attr in ("UNET_TARGET_REPLACE_MODULE", "UNET_TARGET_REPLACE_NAME"):
        monkeypatch.setattr(lycoris_kohya.LycorisNetworkKohya, attr, [])
    network, _ = lycoris_kohya.create_network_from_weights(1.0, str(path), None, None, unet)
    return network


def test_the_kohya_export_of_a_peft_dora_loads_in_lycoris_as_peft_computes_it(peft_dora, home, tmp_path, tiny_sd_path,
                                                                            monkeypatch):
    model, folder = peft_dora
    run(home, "registry", "import", str(folder), "--name", "dora", "--base", "builtin:tiny-sd")
    out = tmp_path / "dora.safetensors"
    run(home, "registry", "export", "dora", "--for", "comfyui", "-o", str(out))
    sd, _ = read_safetensors(out)
    assert not [k for k in sd if "magnitude" in k]
    scales = {k for k in sd if k.endswith(".dora_scale")}
    assert len(scales) == len({k.split(".")[0] for k in sd}) > 8

    unet = _unet(tiny_sd_path)
    network = _loaded_by_lycoris(out, unet, monkeypatch)
    assert len(network.unet_loras) == len(scales)  # every module, each a DoRA in lycoris' eyes
    assert all(lm.wd and lm.wd_on_out for lm in network.unet_loras)
    assert {type(lm.org_module[0]).__name__ for lm in network.unet_loras} == {"Linear", "Conv2d"}
    network.apply_to(None, unet, apply_text_encoder=False, apply_unet=True)
    want = _out(model)  # PEFT's own DoRA forward
    assert _rel(_out(unet), want) < 1e-4
    assert _rel(_out(_unet(tiny_sd_path)), want) > 1e-2, "the adapter must change the output"


def test_a_dora_written_as_kohya_imports_back_to_the_same_delta(peft_dora, home, tmp_path, tiny_sd_path):
    _, folder = peft_dora
    run(home, "registry", "import", str(folder), "--name", "dora", "--base", "builtin:tiny-sd")
    out = tmp_path / "dora.safetensors"
    run(home, "registry", "export", "dora", "--format", "kohya", "-o", str(out))
    peft_state, _, _ = read_adapter(folder)
    kohya_state, fmt, _ = read_adapter(out)
    assert fmt == "kohya" and set(kohya_state) == set(peft_state)
    base = _unet(tiny_sd_path)
    for name in peft_state:
        w = base.get_submodule(name.split(".", 1)[1]).weight.detach()
        assert kohya_state[name].magnitude_suffix == "dora_scale"
        assert _rel(kohya_state[name].delta(base_weight=w), peft_state[name].delta(base_weight=w)) < 1e-6, name
    again = tmp_path / "again.safetensors"  # and that file is written back byte for byte
    run(home, "registry", "import", str(out), "--name", "k", "--base", "builtin:tiny-sd")
    run(home, "registry", "export", "k", "--format", "kohya", "-o", str(again))
    assert again.read_bytes() == out.read_bytes()


# -- 2. LoHa / LoKr / Tucker LoCon for diffusers and PEFT --------------------------------------------

# name → (lycoris algo, network arguments): a LoHa of linear rank 8 (r₁·r₂ = 64, above the 32-wide layers,
# so its bound is the layer's side) and conv rank 4, a LoKr with a factored half, a Tucker LoCon.
CASES = {
    "loha": ("loha", dict(network_dim=8, conv_dim=4)),
    "lokr": ("lokr", dict(network_dim=4, conv_dim=4)),
    "locon_tucker": ("locon", dict(network_dim=4, conv_dim=4, use_tucker=True)),
}


class Lycoris:
    """A lycoris network of `case` over the tiny UNet's attention and resnet layers, randomised, saved by
    lycoris' own `save_weights`; `unet` keeps the network applied (the oracle)."""

    def __init__(self, tiny_sd_path: Path, folder: Path, case: str):
        algo, dims = CASES[case]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "preset.toml").write_text(UNET_WITH_CONV)
        self.unet = _unet(tiny_sd_path)
        torch.manual_seed(21)
        kwargs = {k: v for k, v in dims.items() if k not in ("network_dim", "conv_dim")}
        self.network = lycoris_kohya.create_network(1.0, dims["network_dim"], 2.0, None, None, self.unet, algo=algo,
                                                    conv_dim=dims["conv_dim"], conv_alpha=3.0,
                                                    preset=str(folder / "preset.toml"), **kwargs)
        self.network.apply_to(None, self.unet, apply_text_encoder=False, apply_unet=True)
        with torch.no_grad():  # lycoris zero-initialises one factor; make every module move the output
            for _, p in self.network.named_parameters():
                p.normal_(0, 0.3)
        self.path = folder / f"{case}.safetensors"
        self.network.save_weights(str(self.path), torch.float32, {})


@pytest.fixture(scope="module")
def lycoris_file(tiny_sd_path, tmp_path_factory):
    cache: dict[str, Lycoris] = {}

    def get(case: str) -> Lycoris:
        if case not in cache:
            cache[case] = Lycoris(tiny_sd_path, tmp_path_factory.mktemp(case), case)
        return cache[case]

    return get


@pytest.fixture(scope="module")
def sd_pipe(tiny_sd_path):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(str(tiny_sd_path), safety_checker=None, requires_safety_checker=False)


def _exported(home: Path, made: Lycoris, consumer: str, out: Path) -> str:
    """Import `made`'s file with its base and export it `--for consumer`; the one line export says on stderr."""
    run(home, "registry", "import", str(made.path), "--name", "lyco", "--base", "builtin:tiny-sd")
    result = run(home, "registry", "export", "lyco", "--for", consumer, "-o", str(out))
    notes = result.stderr.strip().splitlines()
    assert len(notes) == 1, result.stderr
    return notes[0]


def _adapted(state) -> set[str]:
    return {n.split(".", 1)[1] for n in state if n.startswith("unet.")}


@pytest.mark.parametrize("case", sorted(CASES))
def test_for_diffusers_writes_exact_pairs_load_lora_weights_applies_as_lycoris(lycoris_file, case, home, tmp_path,
                                                                               sd_pipe, tiny_sd_path):
    from test_layouts import loaded_by_diffusers

    made = lycoris_file(case)
    state, _, _ = read_adapter(made.path)
    out = tmp_path / "d.safetensors"
    line = _exported(home, made, "diffusers", out)
    counts = {v: n for v, n in state.variants.items() if v != "lora"}
    ranks = sorted({m.rank_bound for m in state.values() if m.variant != "lora"})
    assert re.fullmatch(rf"wrote the {', '.join(f'{n} {v}' for v, n in sorted(counts.items()))} modules, which the "
                        rf"diffusers format cannot spell, as LoRA pairs of the same ΔW at their exact rank bound "
                        rf"\(rank {ranks[0]}( to {ranks[-1]})?; no approximation\); --format kohya keeps the LyCORIS "
                        rf"tensors", line), line
    pairs, fmt, _ = read_adapter(out)
    assert fmt == "diffusers" and set(pairs.variants) == {"lora"}
    for name, module in state.items():
        assert pairs[name].rank == module.rank_bound, name
    if case == "loha":  # r₁·r₂ = 64 above a 32-wide layer's side: the pair is that side's identity against ΔW
        assert any(m.rank == 8 and m.rank_bound == 32 for m in state.values())

    pipe = loaded_by_diffusers(sd_pipe, out)  # no missing, unexpected or unapplied key
    loaded = {p for p, m in pipe.unet.named_modules() if hasattr(m, "lora_A")}
    assert loaded == _adapted(state)
    want = _out(made.unet)  # lycoris' own forward
    assert _rel(_out(pipe.unet), want) < 1e-4
    assert _rel(_out(_unet(tiny_sd_path)), want) > 1e-2, "the adapter must change the output"


@pytest.mark.parametrize("case", ["loha", "lokr"])
def test_for_peft_writes_a_folder_peft_loads_with_lycoris_output(lycoris_file, case, home, tmp_path, tiny_sd_path):
    from peft import PeftModel

    made = lycoris_file(case)
    out = tmp_path / "peft"
    line = _exported(home, made, "peft", out)
    assert "which the peft format cannot spell" in line and "exact rank bound" in line
    model = PeftModel.from_pretrained(_unet(tiny_sd_path), str(out)).eval()
    loaded = {p.removeprefix("base_model.model.") for p, m in model.named_modules() if hasattr(m, "lora_A")
              and "default" in getattr(m, "lora_A", {})}
    assert loaded == _adapted(read_adapter(made.path)[0])
    assert _rel(_out(model), _out(made.unet)) < 1e-4


def test_what_cannot_be_written_exactly_is_refused_in_one_line(lycoris_file, home, tmp_path, tiny_sd_path):
    made = lycoris_file("loha")
    run(home, "registry", "import", str(made.path), "--name", "flat")  # no base: conv kernels stay flattened
    line = refused(run(home, "registry", "export", "flat", "--for", "diffusers", "-o", str(tmp_path / "a"), ok=False))
    assert re.fullmatch(r"Error: module unet\.\S+ is a loha module whose file does not say whether it adapts a Linear "
                        r"layer or a conv layer .* import it again with --base", line), line
    folder = tmp_path / "doha"  # a DoRA over LoHa: PEFT's DoRA normalises a LoRA pair only
    folder.mkdir()
    (folder / "preset.toml").write_text(UNET_WITH_CONV)
    unet = _unet(tiny_sd_path)
    network = lycoris_kohya.create_network(1.0, 2, 2.0, None, None, unet, algo="loha", conv_dim=2, conv_alpha=2.0,
                                           preset=str(folder / "preset.toml"), dora_wd=True)
    network.apply_to(None, unet, apply_text_encoder=False, apply_unet=True)
    network.save_weights(str(folder / "doha.safetensors"), torch.float32, {})
    run(home, "registry", "import", str(folder / "doha.safetensors"), "--name", "doha", "--base", "builtin:tiny-sd")
    for consumer in ("diffusers", "peft"):
        line = refused(run(home, "registry", "export", "doha", "--for", consumer, "-o", str(tmp_path / consumer),
                           ok=False))
        assert re.fullmatch(r"Error: DoRA module unet\.\S+ normalises a loha module, which PEFT's DoRA cannot spell "
                            r"\(a LoRA pair normalised per output row\); export it as kohya or loraforge", line), line
        assert not (tmp_path / consumer).exists()
