"""The one-line error contract of `registry import` / `registry export`: bad files, bad outputs,
a damaged store. Each case prints `Error: …` naming the value and the fix, exits 1, changes nothing."""

from __future__ import annotations

import collections
import os
import pickle
import struct
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from loraforge.formats import write_adapter
from loraforge.models.targets import module_shapes
from loraforge.registry import Registry
from loraforge.synthetic import random_lora

from cli_helpers import run_cli as run
from cli_helpers import refused as one_error_line



@pytest.fixture()
def kohya_file(tmp_path, tiny_sd_path) -> Path:
    state = random_lora(module_shapes(tiny_sd_path), rank=4, alpha=2.0, seed=1)
    path = tmp_path / "style.safetensors"
    write_adapter(state, path, "kohya")
    return path


# -- import ----------------------------------------------------------------------------------

def test_a_safetensors_file_whose_header_length_starts_with_0x80_imports_and_exports(home, tmp_path, kohya_file):
    from loraforge.formats import read_safetensors

    sd, _ = read_safetensors(kohya_file)
    for pad in range(256):
        path = tmp_path / "x80.safetensors"
        save_file(sd, str(path), metadata={"pad": "x" * pad})
        if path.read_bytes()[0] == 0x80:
            break
    assert struct.unpack("<Q", path.read_bytes()[:8])[0] % 256 == 0x80
    assert "registered x80:1 (lora" in run(home, "registry", "import", str(path), "--name", "x80").output
    out = tmp_path / "back.safetensors"
    run(home, "registry", "export", "x80", "--format", "kohya", "-o", str(out))
    from safetensors.torch import load_file

    back = load_file(str(out))
    assert sorted(back) == sorted(sd) and all(torch.equal(back[k], sd[k]) for k in sd)


@pytest.mark.parametrize("zip_format", [True, False])
def test_a_pickle_named_safetensors_is_refused_in_one_line(home, tmp_path, zip_format):
    path = tmp_path / "slider.safetensors"
    torch.save({"lora_unet_conv_in.lora_down.weight": torch.ones(2, 4, 3, 3),
                "lora_unet_conv_in.lora_up.weight": torch.ones(8, 2, 1, 1)}, path,
               _use_new_zipfile_serialization=zip_format)
    line = one_error_line(run(home, "registry", "import", str(path), "--name", "s", ok=False))
    assert str(path) in line and "torch pickle named .safetensors" in line and "rename it to slider.pt" in line
    assert Registry(home).list() == []


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _Custom:
    """A harmless class torch's weights-only loader does not know: it answers with allow-list advice."""


def _pickle(path: Path, payload: str, marker: Path, key: str) -> Path:
    if payload == "code":
        torch.save({key: _Evil(marker)}, path)
    elif payload == "class":
        torch.save({key: _Custom()}, path)
    else:  # an opcode torch's unpickler lacks: its answer asks to file an issue
        with open(path, "wb") as f:
            pickle.dump({key: collections.Counter()}, f, protocol=4)
    return path


@pytest.mark.parametrize("payload", ["code", "class", "opcode"])
@pytest.mark.parametrize("where", ["adapter", "base"])
def test_pickle_refusals_never_suggest_turning_weights_only_off(home, tmp_path, kohya_file, payload, where):
    marker = tmp_path / "pwned"
    if where == "adapter":
        path = _pickle(tmp_path / "slider.pt", payload, marker, "lora_unet_conv_in.lora_down.weight")
        args = ["registry", "import", str(path), "--name", "evil"]
    else:
        path = _pickle(tmp_path / "model.ckpt", payload, marker, "cond_stage_model.x")
        args = ["registry", "import", str(kohya_file), "--name", "style", "--base", str(path)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns about pickle protocol 4 on its own
        line = one_error_line(run(home, *args, ok=False))
    assert line.startswith(f"Error: refusing to unpickle {path}: it contains objects other than tensors (")
    assert "weights_only" not in line and "safe_globals" not in line and "trust" not in line, line
    assert line.endswith("; use a .safetensors copy of it"), line
    assert not marker.exists()
    assert Registry(home).list() == []


@pytest.mark.parametrize("module, shape", [
    ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", (32, 32)),
    ("unet.down_blocks.0.resnets.0.conv1", (32, 32, 3, 3)),
])
@pytest.mark.parametrize("with_base", [False, True])
def test_a_rank_above_min_in_out_is_refused_on_import(home, tmp_path, tiny_sd_path, module, shape, with_base):
    from loraforge.formats import LoraModule

    assert module_shapes(tiny_sd_path)["unet"][module.split(".", 1)[1]] == shape
    state = random_lora(module_shapes(tiny_sd_path), rank=4, seed=2)
    rank = 33  # one more than min(out, in·k·k) = 32
    gen = torch.Generator().manual_seed(0)
    down = torch.randn(rank, *shape[1:], generator=gen) * 0.01
    up = torch.randn(shape[0], rank, *(1,) * (len(shape) - 2), generator=gen) * 0.01
    state[module] = LoraModule(down, up, 8.0)
    path = tmp_path / "too_high.safetensors"
    write_adapter(state, path, "kohya")
    args = ["registry", "import", str(path), "--name", "high"] + (["--base", "builtin:tiny-sd"] if with_base else [])
    line = one_error_line(run(home, *args, ok=False))
    assert f"module {module} has rank 33" in line and "min(out, in) = 32" in line, line
    assert str(tmp_path / "too_high.safetensors") in line and "rank 32 or less" in line, line
    assert Registry(home).list() == []


@pytest.mark.parametrize("hints", ["{not json", "[1, 2]", '{"unet.conv_in": 3}', "null",
                                   '{"kohya_alpha_dtype": "system"}', '{"kohya_te_prefix": "lora_unet_"}'])
def test_a_malformed_hints_header_entry_is_refused_in_one_line(home, tmp_path, tiny_sd_path, hints):
    state = random_lora(module_shapes(tiny_sd_path), rank=2, seed=3)
    path = tmp_path / "hinted.safetensors"
    write_adapter(state, path, "loraforge", metadata={"loraforge.hints": hints})
    line = one_error_line(run(home, "registry", "import", str(path), "--name", "h", ok=False))
    assert str(path) in line and "loraforge.hints" in line and "remove the loraforge.hints header entry" in line, line
    assert Registry(home).list() == []


# -- export ----------------------------------------------------------------------------------

@pytest.fixture()
def imported(home, kohya_file) -> str:
    run(home, "registry", "import", str(kohya_file), "--name", "style")
    return "style:1"


@pytest.mark.parametrize("fmt", ["diffusers", "peft", "kohya", "loraforge"])
def test_export_to_an_existing_folder_is_refused(home, tmp_path, imported, fmt):
    folder = tmp_path / "exports"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    line = one_error_line(run(home, "registry", "export", imported, "--format", fmt, "-o", str(folder), ok=False))
    assert f"{folder} is an existing folder" in line, line
    assert sorted(p.name for p in folder.iterdir()) == ["keep.txt"]


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_export_over_an_existing_file_is_refused(home, tmp_path, imported, fmt):
    target = tmp_path / "taken.safetensors"
    target.write_bytes(b"not yours to overwrite")
    line = one_error_line(run(home, "registry", "export", imported, "--format", fmt, "-o", str(target), ok=False))
    assert f"{target} already exists" in line and "remove it first" in line, line
    assert target.read_bytes() == b"not yours to overwrite"


@pytest.mark.parametrize("fmt", ["kohya", "peft"])
def test_export_to_an_uncreatable_path_is_refused(home, tmp_path, imported, fmt):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    out = blocker / "sub" / "out.safetensors"
    line = one_error_line(run(home, "registry", "export", imported, "--format", fmt, "-o", str(out), ok=False))
    assert "cannot create" in line and str(blocker) in line and "a folder you can write to" in line, line
    assert blocker.read_text() == "x"


def test_export_into_a_read_only_folder_leaves_nothing_behind(home, tmp_path, imported):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("running as a user who can write anywhere")
        out = folder / "x.safetensors"
        line = one_error_line(run(home, "registry", "export", imported, "--format", "kohya", "-o", str(out),
                                  ok=False))
        assert "cannot create" in line and str(folder) in line, line
        assert list(folder.iterdir()) == []
    finally:
        folder.chmod(0o755)


def test_export_with_a_blob_missing_from_the_store_is_refused(home, tmp_path, imported):
    import shutil

    manifest = Registry(home).resolve(imported)
    blob = Registry(home).blob_path(manifest.files[0])
    blob.unlink()
    shutil.rmtree(home / "checkouts", ignore_errors=True)
    out = tmp_path / "out.safetensors"
    line = one_error_line(run(home, "registry", "export", imported, "--format", "kohya", "-o", str(out), ok=False))
    assert manifest.files[0].sha256[:12] in line and "missing from the store" in line, line
    assert "registry verify" in line
    assert not out.exists()


def test_diffusers_export_without_an_extension_writes_a_folder_diffusers_loads(home, tmp_path, imported,
                                                                               tiny_sd_path):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "style_for_diffusers"
    result = run(home, "registry", "export", imported, "--format", "diffusers", "-o", str(out))
    weights = out / "pytorch_lora_weights.safetensors"
    assert result.output.strip().splitlines() == [str(weights)]
    assert sorted(p.name for p in out.iterdir()) == ["pytorch_lora_weights.safetensors"]

    from loraforge.formats import read_adapter

    state = read_adapter(Registry(home).primary_file(Registry(home).resolve(imported)))[0]
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd_path), safety_checker=None)
    pipe.load_lora_weights(str(out), adapter_name="style")  # finds the standard file name itself
    pipe.unet.load_lora_adapter(str(out), weight_name="pytorch_lora_weights.safetensors", prefix="unet",
                                adapter_name="again")
    modules = dict(pipe.unet.named_modules())
    for name, module in state.component("unet").items():
        for adapter in ("style", "again"):
            torch.testing.assert_close(modules[name].get_delta_weight(adapter), module.delta(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fmt", ["kohya", "loraforge"])
def test_file_export_without_an_extension_gets_one_and_says_so(home, tmp_path, imported, fmt):
    out = tmp_path / "exported"
    result = run(home, "registry", "export", imported, "--format", fmt, "-o", str(out))
    assert result.stdout.strip() == str(tmp_path / "exported.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("exported", ".exported"))) == [
        "exported.safetensors"]
    from loraforge.formats import detect_format

    assert detect_format(tmp_path / "exported.safetensors") == fmt
