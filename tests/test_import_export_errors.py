"""The one-line error contract of `registry import` / `registry export`: bad files, bad outputs,
a damaged store. Each case prints `Error: …` naming the value and the fix, exits 1, changes nothing."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from loraforge.formats import write_adapter
from loraforge.models.targets import module_shapes
from loraforge.registry import Registry
from loraforge.synthetic import random_lora

from cli_helpers import run_cli as run


def one_error_line(result) -> str:
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


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
