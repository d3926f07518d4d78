"""Gaps between what a user brings and what loraforge checks: a single-file (or .ckpt) base checks an adapter's
modules exactly as its diffusers folder does (the folder is the oracle); a pickled diffusers LoRA is recorded as
the diffusers file it is; a PEFT folder without a name hint is placed by its base's shapes, or refused; a .ckpt
base is unpickled once per command for its shapes."""

from __future__ import annotations

import json

import pytest
import torch

from loraforge.formats import write_adapter
from loraforge.models.builtin import ensure_builtin
from loraforge.models.single_file import write_single_file
from loraforge.models.targets import module_shapes
from loraforge.synthetic import random_lora

from cli_helpers import refused, run_cli as run


def _manifest(home, ref):
    return json.loads(run(home, "registry", "show", ref, "--json").output)


@pytest.fixture(scope="module")
def sd_bases(tmp_path_factory, builtin_home):
    """tiny-sd as its diffusers folder, as the single file write_single_file makes of it, and as that file's .ckpt."""
    from safetensors.torch import load_file

    folder = ensure_builtin("tiny-sd", builtin_home)
    where = tmp_path_factory.mktemp("sd-bases")
    single = write_single_file(folder, "sd1", where / "tiny-sd.safetensors")
    torch.save({"state_dict": load_file(single)}, where / "tiny-sd.ckpt")
    return {"folder": folder, "single": single, "ckpt": where / "tiny-sd.ckpt"}


def _adapters(folder, tmp_path):
    """A kohya LoRA on the base's attention layers, and diffusers LoRAs with a module the base lacks and with a
    module of the wrong width."""
    shapes = module_shapes(folder)
    good = tmp_path / "good.safetensors"
    write_adapter(random_lora(shapes, rank=2, seed=1), good, "kohya")
    missing = {c: dict(s) for c, s in shapes.items()}
    missing["unet"]["down_blocks.0.attentions.0.transformer_blocks.0.attn9.to_q"] = (32, 32)
    lacks = tmp_path / "lacks.safetensors"
    write_adapter(random_lora(missing, rank=2, seed=2, targets=("attn9.to_q",)), lacks, "diffusers")
    wide = {c: dict(s) for c, s in shapes.items()}
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    out, inp = wide["unet"][name]
    wide["unet"] = {name: (out, inp + 8)}
    wrong = tmp_path / "wrong.safetensors"
    write_adapter(random_lora(wide, rank=2, seed=3, targets=("attn1.to_q",)), wrong, "diffusers")
    return good, lacks, wrong


@pytest.mark.parametrize("kind", ["single", "ckpt"])
def test_a_single_file_base_checks_an_adapter_as_its_folder_does(home, tmp_path, sd_bases, kind):
    folder, base = sd_bases["folder"], sd_bases[kind]
    good, lacks, wrong = _adapters(folder, tmp_path)
    for i, ref in enumerate((folder, base)):
        run(home, "registry", "import", str(good), "--name", f"good{i}", "--base", str(ref))
    a, b = _manifest(home, "good0"), _manifest(home, "good1")
    assert a["adapter"] == b["adapter"] and a["digest"] == b["digest"]
    for adapter in (lacks, wrong):
        lines = [refused(run(home, "registry", "import", str(adapter), "--name", "bad", "--base", str(ref), ok=False))
                 for ref in (folder, base)]
        assert lines[0] == lines[1].replace(str(base), str(folder)), lines
        assert "does not exist in the base" in lines[0] or "has shape" in lines[0]
    assert run(home, "registry", "show", "bad", ok=False).exit_code != 0


def test_a_single_file_base_has_its_folder_s_targets(home, sd_bases):
    """Every module the folder offers an adapter, the single file and its .ckpt offer under the same diffusers
    name and shape (text-encoder names compared without CLIP's text_model. wrapper)."""
    from loraforge.models.base import base_from_path
    from loraforge.registry.resolve import base_targets

    def spelled(targets):
        return {c: {k.removeprefix("text_model."): tuple(s) for k, s in m.items()} for c, m in targets.items()}

    want = spelled(base_targets(base_from_path(sd_bases["folder"], "folder", home, digest=False)))
    for kind in ("single", "ckpt"):
        assert spelled(base_targets(base_from_path(sd_bases[kind], kind, home, digest=False), home)) == want


# -- a pickled diffusers LoRA is a diffusers file in a pickle ------------------------------------------------

def _diffusers_bin(folder, out):
    """pytorch_lora_weights.bin as diffusers' save_lora_weights writes it without safe_serialization, of a PEFT
    LoRA on tiny-sd's UNet."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    unet.add_adapter(LoraConfig(r=2, lora_alpha=4, target_modules=["to_q", "to_v"], init_lora_weights=False))
    StableDiffusionPipeline.save_lora_weights(out, unet_lora_layers=get_peft_model_state_dict(unet),
                                              safe_serialization=False)
    return out / "pytorch_lora_weights.bin"


def test_a_pickled_diffusers_lora_is_recorded_as_a_diffusers_file(home, tmp_path, sd_bases):
    from diffusers import StableDiffusionPipeline

    path = _diffusers_bin(sd_bases["folder"], tmp_path / "hub")
    run(home, "registry", "import", str(path), "--name", "bin")
    manifest = _manifest(home, "bin")
    assert manifest["kind"] == "lora"
    assert manifest["adapter"]["format"] == "diffusers"
    assert manifest["provenance"]["params"]["format"] == "diffusers"
    assert manifest["provenance"]["params"]["container"] == "pickle"
    out = tmp_path / "export"
    result = run(home, "registry", "export", "bin", "-o", str(out))
    assert "byte for byte" not in result.output.replace("could not write the imported file back byte for byte", "")
    want = StableDiffusionPipeline.lora_state_dict(str(path.parent), weight_name=path.name)[0]
    got = StableDiffusionPipeline.lora_state_dict(str(out))[0]
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)


# -- a PEFT folder for a text encoder with no name hint ------------------------------------------------------

def _wide_sdxl(folder, out):
    """tiny-sdxl with a wider text_encoder_2 (48 wide, the first stays 32), as real SDXL's second encoder is wider
    than its first; returns (base folder, that encoder built in memory: PEFT records no path for it)."""
    import shutil

    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    shutil.copytree(folder, out, symlinks=True)
    config = CLIPTextConfig.from_pretrained(out / "text_encoder_2")
    config.hidden_size, config.intermediate_size = 48, 96
    torch.manual_seed(0)
    encoder = CLIPTextModelWithProjection(config)
    shutil.rmtree(out / "text_encoder_2")
    encoder.save_pretrained(out / "text_encoder_2")
    return out, encoder


def _peft_text_folder(encoder, out):
    """A PEFT LoRA on `encoder`'s attention, saved by PEFT's own save_pretrained into `out` (named after no
    component); its paths keep CLIP's text_model. wrapper, as transformers 4 saved either encoder."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(encoder, LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "v_proj"],
                                               init_lora_weights=False))
    model.save_pretrained(out)
    config = json.loads((out / "adapter_config.json").read_text())
    assert not config.get("base_model_name_or_path")  # no hint in the folder, none in its name
    return out


def test_a_peft_text_encoder_folder_without_a_name_is_placed_by_its_base_or_refused(home, tmp_path, builtin_home):
    from loraforge.formats import read_adapter
    from loraforge.models.base import base_from_path
    from loraforge.registry.resolve import base_targets

    sdxl = ensure_builtin("tiny-sdxl", builtin_home)
    base, wide = _wide_sdxl(sdxl, tmp_path / "wide-sdxl")
    adapter = _peft_text_folder(wide, tmp_path / "adapter")
    line = refused(run(home, "registry", "import", str(adapter), "--name", "te", ok=False))
    assert "text_encoder_2" in line and "--base" in line
    assert run(home, "registry", "show", "te", ok=False).exit_code != 0
    run(home, "registry", "import", str(adapter), "--name", "te", "--base", str(base))
    assert _manifest(home, "te")["adapter"]["components"] == ["text_encoder_2"]
    # what PEFT saved, module by module, now under text_encoder_2
    from safetensors.torch import load_file

    saved = load_file(adapter / "adapter_model.safetensors")
    state = read_adapter(adapter, module_names=base_targets(base_from_path(base, "wide", home, digest=False)))[0]
    assert sorted(state) == sorted("text_encoder_2." + k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
                                   for k in saved if ".lora_A." in k)
    for key, tensor in saved.items():
        name, factor = key.removeprefix("base_model.model.").rsplit(".lora_", 1)
        got = state[f"text_encoder_2.{name}"].down if factor.startswith("A") else state[f"text_encoder_2.{name}"].up
        assert torch.equal(got, tensor)
    # tiny-sdxl's two encoders are equally wide: its base cannot tell them apart either
    from transformers import CLIPTextModelWithProjection

    same = _peft_text_folder(CLIPTextModelWithProjection(CLIPTextModelWithProjection.config_class.from_pretrained(
        sdxl / "text_encoder_2")), tmp_path / "same")
    line = refused(run(home, "registry", "import", str(same), "--name", "te2", "--base", str(sdxl), ok=False))
    assert "text_encoder_2" in line and "text_encoder " in line.replace(",", " ")


# -- a .ckpt base is unpickled once per command ----------------------------------------------------------------

@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_lora_fuse_unpickles_a_ckpt_base_once(home, tmp_path, sd_bases, monkeypatch, legacy):
    """The family check, the architecture check and the fuse read of a .ckpt base share one torch.load (old
    non-zip pickles are read in full each time), and the fused file is the .safetensors twin's."""
    from safetensors.torch import load_file

    ckpt = tmp_path / "base.ckpt"
    torch.save({"state_dict": load_file(sd_bases["single"])}, ckpt, _use_new_zipfile_serialization=not legacy)
    adapter = tmp_path / "style.safetensors"
    write_adapter(random_lora(module_shapes(sd_bases["folder"]), rank=2, seed=5), adapter, "kohya")
    loads, load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a[:1]) or load(*a, **k))
    run(home, "lora", "fuse", str(ckpt), f"{adapter}=0.5", "-o", str(tmp_path / "from-ckpt.safetensors"))
    assert len(loads) == 1, loads
    run(home, "lora", "fuse", str(sd_bases["single"]), f"{adapter}=0.5", "-o", str(tmp_path / "from-st.safetensors"))
    a, b = load_file(tmp_path / "from-ckpt.safetensors"), load_file(tmp_path / "from-st.safetensors")
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
