"""`registry import` of a pickled `.ckpt`/`.pt` checkpoint (torch.save of a single-file state dict): loaded once
with weights_only=True and stored as a single-file .safetensors with the same keys, order, dtypes and tensor
bytes, so nothing downstream unpickles it again. diffusers' from_single_file and from_pretrained are the
consumers of its exports; a pickle loraforge will not read is refused in one line with the registry unchanged."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from loraforge.hashing import sha256_file
from loraforge.models import single_file as sf
from loraforge.models.builtin import ensure_builtin

from cli_helpers import refused, run_cli as run
from test_single_file_ops import _assert_states_equal, _bad_pickles, _folder_state, _loaded_from_single_file


def _single_file_state(builtin_home):
    """tiny-sd as the single-file state dict diffusers' converters map back to its folder."""
    folder = ensure_builtin("tiny-sd", builtin_home)
    keymap = sf.template_for(sf.folder_shapes(folder, "sd1"), "sd1", sf.configs_from_folder(folder, "sd1"))
    return folder, sf.to_single_file(_folder_state(folder, "sd1"), keymap)


def _file_order(path):
    """Tensor names of a safetensors file in the order their data lies in it (safetensors' reader sorts keys)."""
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    header.pop("__metadata__", None)
    return sorted(header, key=lambda k: header[k]["data_offsets"][0])


def _manifest(home, ref):
    return json.loads(run(home, "registry", "show", ref, "--json").output)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_an_imported_ckpt_exports_a_single_file_diffusers_loads_bit_exactly(home, builtin_home, tmp_path, legacy):
    folder, state = _single_file_state(builtin_home)
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": state, "global_step": 7}, ckpt, _use_new_zipfile_serialization=not legacy)
    run(home, "registry", "import", str(ckpt), "--name", "old")
    manifest = _manifest(home, "old")
    assert manifest["kind"] == "checkpoint" and manifest["layout"] == "single_file"
    assert [f["path"] for f in manifest["files"]] == ["model.safetensors"]
    params = manifest["provenance"]["params"]
    assert params["source_format"] == "pickle" and params["source_sha256"] == sha256_file(ckpt)
    assert manifest["base"]["family"] == "sd1"

    run(home, "registry", "export", "old", "--format", "single-file", "-o", str(tmp_path / "out.safetensors"))
    out = tmp_path / "out.safetensors"
    assert _file_order(out) == list(state)
    got = load_file(out)
    assert all(got[k].dtype == v.dtype and torch.equal(got[k], v) for k, v in state.items())
    _assert_states_equal(_loaded_from_single_file(out, folder, "sd1"), _folder_state(folder, "sd1"))

    from diffusers import DiffusionPipeline

    run(home, "registry", "export", "old", "--format", "diffusers", "-o", str(tmp_path / "folder"))
    pipe = DiffusionPipeline.from_pretrained(str(tmp_path / "folder"), local_files_only=True)
    _assert_states_equal({c: getattr(pipe, c).state_dict() for c in sf.COMPONENTS["sd1"]},
                         _folder_state(folder, "sd1"))


def test_a_ckpt_keeps_every_dtype_order_and_byte_of_its_tensors(home, builtin_home, tmp_path):
    """What real .ckpt files carry besides the model: int64 position ids, bf16 EMA copies, a 0-dim step counter,
    tensors sharing storage and non-contiguous views."""
    _, state = _single_file_state(builtin_home)
    prefix = sf.prefixes("sd1")["text_encoder"]
    extras = {f"{prefix}text_model.embeddings.position_ids": torch.arange(77, dtype=torch.int64)[None],
              "model_ema.num_updates": torch.tensor(1234, dtype=torch.int32)}
    for key in [k for k in state if k.startswith("model.diffusion_model.")][:5]:
        extras["model_ema." + key[len("model."):].replace(".", "")] = state[key].to(torch.bfloat16)
    weight = next(k for k, v in state.items() if v.dim() == 2 and v.shape[0] != v.shape[1])
    extras["model_ema.transposed"] = state[weight].t()  # a view: not contiguous
    extras["model_ema.tied"] = state[weight]  # the same storage as a model tensor
    state = {**state, **extras, "first_stage_model.half": torch.ones(3, 2, dtype=torch.float16)}
    torch.save(state, tmp_path / "extras.pt")
    run(home, "registry", "import", str(tmp_path / "extras.pt"), "--name", "extras", "--kind", "checkpoint")
    run(home, "registry", "export", "extras", "-o", str(tmp_path / "out.safetensors"))
    assert _file_order(tmp_path / "out.safetensors") == list(state)
    with safe_open(tmp_path / "out.safetensors", "pt") as f:
        for key, tensor in state.items():
            got = f.get_tensor(key)
            assert got.dtype == tensor.dtype and got.shape == tensor.shape, key
            assert got.reshape(-1).view(torch.uint8).equal(tensor.reshape(-1).view(torch.uint8)), key


def test_a_registered_ckpt_is_a_base_without_unpickling_again(home, builtin_home, tmp_path, monkeypatch):
    """Fusing into the registered .ckpt gives what fusing into its .safetensors twin gives, with torch.load
    unavailable after the import."""
    from loraforge.formats import write_adapter
    from loraforge.models.targets import module_shapes
    from loraforge.synthetic import random_lora

    folder, state = _single_file_state(builtin_home)
    torch.save({"state_dict": state}, tmp_path / "base.ckpt")
    save_file(state, str(tmp_path / "base.safetensors"))
    adapter = tmp_path / "style.safetensors"
    write_adapter(random_lora(module_shapes(folder), rank=2, seed=5), adapter, "kohya")
    run(home, "registry", "import", str(tmp_path / "base.ckpt"), "--name", "base")

    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load called after the import")

    monkeypatch.setattr(torch, "load", no_unpickling)
    run(home, "lora", "fuse", "base", f"{adapter}=0.5", "--dtype", "fp32", "-o", str(tmp_path / "a.safetensors"))
    run(home, "lora", "fuse", str(tmp_path / "base.safetensors"), f"{adapter}=0.5", "--dtype", "fp32",
        "-o", str(tmp_path / "b.safetensors"))
    a, b = load_file(tmp_path / "a.safetensors"), load_file(tmp_path / "b.safetensors")
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], state[k]) for k in a)


@pytest.mark.parametrize("kind", [None, "checkpoint"], ids=["detected", "kind-checkpoint"])
def test_a_bad_pickle_is_refused_in_one_line_and_leaves_the_registry_unchanged(home, builtin_home, tmp_path, kind):
    folder, state = _single_file_state(builtin_home)
    save_file(state, str(tmp_path / "good.safetensors"))
    run(home, "registry", "import", str(tmp_path / "good.safetensors"), "--name", "good")
    before = run(home, "registry", "ls", "--json").output
    blobs = sorted(p.name for p in (home / "blobs").rglob("*") if p.is_file()) if (home / "blobs").exists() else None
    bad = tmp_path / "bad"
    bad.mkdir()
    for name, (path, words) in _bad_pickles(folder, bad).items():
        args = ["--kind", kind] if kind else []
        line = refused(run(home, "registry", "import", str(path), "--name", "good", *args, ok=False))
        assert str(path) in line and words in line, (name, line)
        assert "weights_only=False" not in line and "safe_globals" not in line, line
        assert run(home, "registry", "ls", "--json").output == before, name
        if blobs is not None:
            assert sorted(p.name for p in (home / "blobs").rglob("*") if p.is_file()) == blobs, name


def test_a_pickle_without_checkpoint_keys_is_not_imported_as_a_checkpoint(home, tmp_path):
    torch.save({"lora_unet_down.lora_down.weight": torch.zeros(2, 4)}, tmp_path / "adapter.pt")
    line = refused(run(home, "registry", "import", str(tmp_path / "adapter.pt"), "--name", "x", "--kind", "checkpoint",
                       ok=False))
    assert "is not a checkpoint" in line and "model.diffusion_model." in line


def test_fuse_reads_a_ckpt_base_s_tensors_once(home, builtin_home, tmp_path, monkeypatch):
    """lora fuse of a .ckpt base learns the file's shapes from the tensors it opens to fuse, instead of loading
    them a second time for that, and fuses as before."""
    from loraforge.formats import pickles, write_adapter
    from loraforge.models.targets import module_shapes
    from loraforge.synthetic import random_lora

    folder, state = _single_file_state(builtin_home)
    torch.save({"state_dict": state}, tmp_path / "base.ckpt")
    save_file(state, str(tmp_path / "base.safetensors"))
    adapter = tmp_path / "style.safetensors"
    write_adapter(random_lora(module_shapes(folder), rank=2, seed=5), adapter, "kohya")
    reads, read = [], pickles.tensor_state_dict
    monkeypatch.setattr(pickles, "tensor_state_dict", lambda path: reads.append(str(path)) or read(path))
    for name in ("base.ckpt", "base.safetensors"):
        run(home, "lora", "fuse", str(tmp_path / name), f"{adapter}=0.5", "-o", str(tmp_path / f"{name}.fused"))
    assert reads == [str(tmp_path / "base.ckpt")]
    a, b = load_file(tmp_path / "base.ckpt.fused"), load_file(tmp_path / "base.safetensors.fused")
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
