"""Pickled `.ckpt` checkpoints (torch.save of a state dict, the owner's writer) work where single files do,
loaded with weights_only=True; one holding anything but tensors is refused in one line."""

from __future__ import annotations

import torch
from safetensors.torch import load_file, save_file

from loraforge.models import single_file as sf
from loraforge.models.builtin import ensure_builtin

from cli_helpers import error_line, run_cli as run


def _tiny_sd_single_file(builtin_home, tmp_path):
    folder = ensure_builtin("tiny-sd", builtin_home)
    keymap = sf.template_for(sf.folder_shapes(folder, "sd1"), "sd1", sf.configs_from_folder(folder, "sd1"))
    state = {c: {k: v for f in sorted((folder / c).glob("*.safetensors")) for k, v in load_file(f).items()}
             for c in sf.COMPONENTS["sd1"]}
    return sf.to_single_file(state, keymap)


def test_fuse_from_a_ckpt_equals_fuse_from_safetensors(home, builtin_home, tmp_path):
    from test_single_file import _adapter

    state = _tiny_sd_single_file(builtin_home, tmp_path)
    save_file(state, str(tmp_path / "base.safetensors"))
    torch.save({"state_dict": state, "global_step": torch.tensor(10)}, tmp_path / "base.ckpt")
    adapter = _adapter(ensure_builtin("tiny-sd", builtin_home), "sd1", tmp_path)
    for name in ("base.safetensors", "base.ckpt"):
        run(home, "lora", "fuse", str(tmp_path / name), f"{adapter}=0.5", "--dtype", "fp32",
            "-o", str(tmp_path / f"fused-{name}.safetensors"))
    a = load_file(tmp_path / "fused-base.safetensors.safetensors")
    b = load_file(tmp_path / "fused-base.ckpt.safetensors")
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], state[k]) for k in a)


def test_a_ckpt_holding_more_than_tensors_is_refused_in_one_line(home, builtin_home, tmp_path):
    state = _tiny_sd_single_file(builtin_home, tmp_path)
    torch.save({**state, "epoch": 3}, tmp_path / "bad.ckpt")
    result = run(home, "lora", "fuse", str(tmp_path / "bad.ckpt"), f"{tmp_path / 'x.safetensors'}=1",
                 "-o", str(tmp_path / "out.safetensors"), ok=False)
    assert result.exit_code == 1
    assert "'epoch'" in error_line(result.output)
    assert not (tmp_path / "out.safetensors").exists()
