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

import copy
import re
from pathlib import Path

import pytest
import torch

from loraforge.formats import read_adapter, read_safetensors
from loraforge.registry import Registry

from cli_helpers import refused, run_cli as run

lycoris_kohya = pytest.importorskip("lycoris.kohya")
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


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


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
