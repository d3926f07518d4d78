"""Single files and pickled `.ckpt` checkpoints wherever a checkpoint is accepted: extract, merge and export give
the numbers the same work gives with the equivalent diffusers folders, and the exports load in diffusers' own
`from_single_file` / `from_pretrained` bit for bit.

The single files are written by models.single_file from the builtin folders (proven against from_single_file in
test_single_file.py); the tuned model is the builtin with a low-rank change added to its attention and MLP layers.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraforge.formats import read_adapter
from loraforge.models import single_file as sf
from loraforge.models.builtin import ensure_builtin
from loraforge.registry import Registry

from cli_helpers import refused, run_cli as run

CASES = [("tiny-sd", "sd1"), ("tiny-sdxl", "sdxl")]
CHANGED = ("to_q.weight", "to_v.weight", "proj_in.weight", "q_proj.weight", "v_proj.weight", "fc1.weight")


def _folder_state(folder, family):
    return {c: {k: v for f in sorted((folder / c).glob("*.safetensors")) for k, v in load_file(f).items()}
            for c in sf.COMPONENTS[family]}


def _write_single_file(folder, family, path):
    keymap = sf.template_for(sf.folder_shapes(folder, family), family, sf.configs_from_folder(folder, family))
    state = sf.to_single_file(_folder_state(folder, family), keymap)
    save_file(state, str(path))
    return state


def _tuned_folder(base, family, out):
    """`base` with W += B·A (rank 2) on every layer named in CHANGED of the UNet and text encoders."""
    shutil.copytree(base, out, symlinks=False)
    gen = torch.Generator().manual_seed(11)
    for component in sf.COMPONENTS[family]:
        if component == "vae":
            continue
        path = out / component / sf.WEIGHT_NAMES[component]
        state = load_file(path)
        for key, w in state.items():
            if key.endswith(CHANGED) and w.dim() in (2, 4):
                b = torch.randn(w.shape[0], 2, generator=gen)
                a = torch.randn(2, w[0].numel(), generator=gen)
                state[key] = (w.float() + 0.05 * (b @ a).reshape(w.shape)).to(w.dtype)
        save_file(state, str(path))
    return out


@pytest.fixture(scope="module", params=CASES, ids=[c[0] for c in CASES])
def models(request, tmp_path_factory, builtin_home):
    """(family, {name: path}): base and tuned as diffusers folders, single files and (tuned) a .ckpt."""
    name, family = request.param
    root = tmp_path_factory.mktemp(f"{name}-ops")
    base = ensure_builtin(name, builtin_home)
    tuned = _tuned_folder(base, family, root / "tuned")
    paths = {"base": base, "tuned": tuned}
    _write_single_file(base, family, root / "base.safetensors")
    tuned_state = _write_single_file(tuned, family, root / "tuned.safetensors")
    torch.save({"state_dict": tuned_state, "global_step": 7}, root / "tuned.ckpt")
    # torch's pickle format before zip archives (torch < 1.6), read in full rather than memory-mapped
    torch.save(tuned_state, root / "tuned-legacy.ckpt", _use_new_zipfile_serialization=False)
    paths.update({"base.safetensors": root / "base.safetensors", "tuned.safetensors": root / "tuned.safetensors",
                  "tuned.ckpt": root / "tuned.ckpt", "tuned-legacy.ckpt": root / "tuned-legacy.ckpt"})
    return family, paths


def _adapter(home, name):
    registry = Registry(home)
    return read_adapter(registry.primary_file(registry.resolve(name)))[0]


# ---- lora extract -----------------------------------------------------------------------------------

EXTRACT_PAIRS = [("tuned.safetensors", "base.safetensors"), ("tuned.ckpt", "base"), ("tuned", "base.safetensors"),
                 ("tuned.ckpt", "base.safetensors"), ("tuned-legacy.ckpt", "base")]


def test_extract_from_single_files_equals_extract_from_folders(models, home):
    family, paths = models
    run(home, "lora", "extract", str(paths["tuned"]), "--base", str(paths["base"]), "--rank", "4", "--name", "folders")
    want = _adapter(home, "folders")
    assert any(n.startswith("text_encoder.") for n in want) and any(n.startswith("unet.") for n in want)
    if family == "sdxl":
        assert any(n.startswith("text_encoder_2.") for n in want), "the fused open-clip q/k/v must be extracted too"
    pairs = [(t, b, []) for t, b in EXTRACT_PAIRS] + [("tuned.safetensors", "base.safetensors", ["--config", str(paths["base"])])]
    for i, (tuned, base, config) in enumerate(pairs):
        run(home, "lora", "extract", str(paths[tuned]), "--base", str(paths[base]), "--rank", "4", "--name", f"x{i}",
            *config)
        got = _adapter(home, f"x{i}")
        assert sorted(got) == sorted(want), (tuned, base)
        for module in want:
            assert torch.equal(got[module].delta(), want[module].delta()), (tuned, base, module)


def test_extract_config_with_two_folders_is_refused(models, home):
    _, paths = models
    line = refused(run(home, "lora", "extract", str(paths["tuned"]), "--base", str(paths["base"]), "--config",
                       str(paths["base"]), "--name", "x", ok=False))
    assert "--config" in line and "diffusers folders" in line
    assert Registry(home).list() == []


# ---- merge checkpoints ------------------------------------------------------------------------------

def _merge(home, *inputs, out):
    run(home, "merge", "checkpoints", *map(str, inputs), "--alpha", "0.3", "--dtype", "fp32", "-o", str(out))
    return out


def _assert_same_folder(got, want, family):
    a, b = _folder_state(got, family), _folder_state(want, family)
    for component in b:
        assert list(a[component]) == list(b[component]), component
        for key in b[component]:
            assert torch.equal(a[component][key], b[component][key]), f"{component}.{key}"


def test_merges_mixing_layouts_equal_the_folder_merge(models, home, tmp_path):
    family, paths = models
    folders = _merge(home, paths["base"], paths["tuned"], out=tmp_path / "folders")
    # first model a folder: the output is a folder, whatever the other inputs are
    for other in ("tuned.safetensors", "tuned.ckpt", "tuned-legacy.ckpt"):
        _assert_same_folder(_merge(home, paths["base"], paths[other], out=tmp_path / f"f-{other}"), folders, family)
    # first model a single file: a single file in its layout, the same as merging two single files
    singles = load_file(_merge(home, paths["base.safetensors"], paths["tuned.safetensors"], out=tmp_path / "s.safetensors"))
    mixed = load_file(_merge(home, paths["base.safetensors"], paths["tuned"], out=tmp_path / "m.safetensors"))
    assert list(mixed) == list(singles) == list(load_file(paths["base.safetensors"]))
    assert all(torch.equal(mixed[k], singles[k]) for k in singles)
    keymap = sf.KeyMap.build({k: tuple(v.shape) for k, v in mixed.items()}, family,
                             sf.configs_from_folder(paths["base"], family))
    converted, expected = sf.to_diffusers(mixed, keymap), _folder_state(folders, family)
    for component, tensors in expected.items():
        for key, tensor in tensors.items():
            assert torch.equal(converted[component][key], tensor), f"{component}.{key}"
    base = _folder_state(paths["base"], family)
    assert sum(not torch.equal(base[c][k], t) for c, ts in expected.items() for k, t in ts.items()) > 10


def test_a_registered_mixed_merge_records_both_parents(models, home):
    family, paths = models
    run(home, "merge", "checkpoints", str(paths["base.safetensors"]), str(paths["tuned"]), "--alpha", "0.5",
        "--name", "mixed")
    manifest = Registry(home).resolve("mixed")
    assert manifest.layout == "single_file"
    assert [p.ref for p in manifest.provenance.parents] == [str(paths["base.safetensors"]), str(paths["tuned"])]
    assert all(len(p.digest) == 64 for p in manifest.provenance.parents)


def test_a_merge_of_different_architectures_across_layouts_is_refused(models, home, tmp_path, builtin_home):
    family, paths = models
    other = ensure_builtin("tiny-sd" if family == "sdxl" else "tiny-sdxl", builtin_home)
    line = refused(run(home, "merge", "checkpoints", str(paths["base.safetensors"]), str(other), "--name", "bad",
                       ok=False))
    assert "different architectures" in line
    assert Registry(home).list() == []


# ---- registry export of checkpoints in the other layout ---------------------------------------------

def _loaded_from_single_file(path, folder, family):
    """{component: state dict} diffusers' from_single_file loads from `path` with `folder`'s configs. tiny-sdxl's
    two text encoders are equally wide, so from_single_file takes embedders.0 for both (it tells them apart by
    width): text_encoder_2 is what diffusers' open-clip converter makes of the file."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    pipe = cls.from_single_file(str(path), config=str(folder), local_files_only=True, dtype=torch.float32)
    out = {c: getattr(pipe, c).state_dict() for c in sf.COMPONENTS[family]}
    if family == "sdxl":
        out["text_encoder_2"] = convert_open_clip_checkpoint(pipe.text_encoder_2, load_file(path),
                                                             prefix="conditioner.embedders.1.model.")
    return out


def _assert_states_equal(got, want):
    for component, tensors in want.items():
        for key, tensor in tensors.items():
            if key.endswith(sf.DROPPED_BY_CONVERTERS):
                continue
            other = got[component].get(key, got[component].get(key.removeprefix("text_model.")))
            assert other is not None, f"{component}.{key} not loaded"
            assert other.dtype == tensor.dtype and torch.equal(other, tensor), f"{component}.{key} differs"


def test_a_folder_checkpoint_exports_as_a_single_file_from_single_file_loads_exactly(models, home, tmp_path):
    family, paths = models
    run(home, "registry", "import", str(paths["tuned"]), "--name", "tunedf")
    out = run(home, "registry", "export", "tunedf", "--format", "single-file", "-o", str(tmp_path / "tuned")).output
    assert out.strip().splitlines() == [str(tmp_path / "tuned.safetensors")]
    assert list(load_file(tmp_path / "tuned.safetensors")) == list(load_file(paths["tuned.safetensors"]))
    _assert_states_equal(_loaded_from_single_file(tmp_path / "tuned.safetensors", paths["base"], family),
                         _folder_state(paths["tuned"], family))
    # --for comfyui asks for the single file A1111/ComfyUI load: the same conversion
    run(home, "registry", "export", "tunedf", "--for", "comfyui", "-o", str(tmp_path / "c.safetensors"))
    a, b = load_file(tmp_path / "c.safetensors"), load_file(tmp_path / "tuned.safetensors")
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_a_single_file_checkpoint_exports_as_a_folder_from_pretrained_loads_exactly(models, home, tmp_path):
    from diffusers import DiffusionPipeline

    family, paths = models
    run(home, "registry", "import", str(paths["tuned.safetensors"]), "--name", "tuneds")
    run(home, "registry", "export", "tuneds", "--format", "diffusers", "-o", str(tmp_path / "folder"))
    pipe = DiffusionPipeline.from_pretrained(str(tmp_path / "folder"), local_files_only=True)
    loaded = {c: getattr(pipe, c).state_dict() for c in sf.COMPONENTS[family]}
    _assert_states_equal(loaded, _loaded_from_single_file(paths["tuned.safetensors"], paths["base"], family))
    _assert_states_equal(loaded, _folder_state(paths["tuned"], family))
    # with --config naming the configs folder: the same files
    run(home, "registry", "export", "tuneds", "--format", "diffusers", "--config", str(paths["base"]),
        "-o", str(tmp_path / "folder2"))
    for component in sf.COMPONENTS[family]:
        name = sf.WEIGHT_NAMES[component]
        assert (tmp_path / "folder" / component / name).read_bytes() == (tmp_path / "folder2" / component / name).read_bytes()


def test_export_config_is_refused_where_it_means_nothing(models, home, tmp_path):
    _, paths = models
    run(home, "registry", "import", str(paths["tuned"]), "--name", "tunedf")
    line = refused(run(home, "registry", "export", "tunedf", "--format", "single-file", "--config", str(paths["base"]),
                       "-o", str(tmp_path / "x.safetensors"), ok=False))
    assert "--config" in line and "tunedf:1" in line
    assert not (tmp_path / "x.safetensors").exists()


# ---- pickles that cannot be read safely ------------------------------------------------------------

class _Hparams:
    """Stands for the training objects (Lightning callbacks, hyper-parameters) old checkpoints pickle."""


def _bad_pickles(folder, tmp_path):
    """name → (path, words the refusal must say): pickles loraforge will not read, each beside a good state."""
    import argparse
    import pickle

    state = _write_single_file(folder, "sd1", tmp_path / "good.safetensors")
    out = {}
    torch.save({"state_dict": {**state, "epoch": 3}}, tmp_path / "entry.ckpt")
    out["entry"] = (tmp_path / "entry.ckpt", "'epoch' is a int, not a tensor")
    torch.save({"state_dict": state, "hparams": argparse.Namespace(lr=1e-4)}, tmp_path / "class-legacy.ckpt",
               _use_new_zipfile_serialization=False)
    out["class-legacy"] = (tmp_path / "class-legacy.ckpt", "argparse.Namespace")
    torch.save({"state_dict": state, "callbacks": _Hparams()}, tmp_path / "class.ckpt")
    out["class"] = (tmp_path / "class.ckpt", "_Hparams")
    with open(tmp_path / "plain.ckpt", "wb") as f:
        pickle.dump({"state_dict": {k: v.numpy() for k, v in list(state.items())[:3]}}, f, protocol=4)
    out["plain"] = (tmp_path / "plain.ckpt", "a pickle not written by torch.save")
    (tmp_path / "text.ckpt").write_text("version https://git-lfs.github.com/spec/v1\n")
    out["text"] = (tmp_path / "text.ckpt", "is not a torch checkpoint")
    return out


@pytest.mark.parametrize("command", ["fuse", "extract", "merge-base", "merge-other"])
def test_unreadable_pickles_are_refused_in_one_line_through_every_command(home, builtin_home, tmp_path, command):
    from loraforge.formats import write_adapter
    from loraforge.models.targets import module_shapes
    from loraforge.synthetic import random_lora

    folder = ensure_builtin("tiny-sd", builtin_home)
    adapter = tmp_path / "style.safetensors"
    write_adapter(random_lora(module_shapes(folder), rank=2, seed=3), adapter, "kohya")
    for name, (path, words) in _bad_pickles(folder, tmp_path).items():
        args = {"fuse": ["lora", "fuse", str(path), f"{adapter}=1"],
                "extract": ["lora", "extract", str(path), "--base", str(folder)],
                "merge-base": ["merge", "checkpoints", str(path), str(folder)],
                "merge-other": ["merge", "checkpoints", str(folder), str(path)]}[command]
        line = refused(run(home, *args, "--name", "out", ok=False))
        assert str(path) in line or path.name in line, (name, line)
        assert words in line, (name, line)
        assert "weights_only=False" not in line and "safe_globals" not in line, line
        assert Registry(home).list() == [], name


def test_a_single_file_with_the_extras_real_files_carry_merges_and_extracts_with_a_folder(models, home, tmp_path):
    """EMA copies, schedule buffers and CLIP's position ids have no place in a diffusers folder: merged with
    one, they are copied from the single file that has them, and every converted tensor is merged."""
    family, paths = models
    state = load_file(paths["base.safetensors"])
    prefix = sf.prefixes(family)["text_encoder"]
    extras = {f"{prefix}text_model.embeddings.position_ids": torch.arange(77)[None],
              "alphas_cumprod": torch.linspace(1, 0, 10), "model_ema.decay": torch.tensor(0.999)}
    save_file({**state, **extras}, str(tmp_path / "real.safetensors"))
    got = load_file(_merge(home, tmp_path / "real.safetensors", paths["tuned"], out=tmp_path / "m.safetensors"))
    want = load_file(_merge(home, paths["base.safetensors"], paths["tuned.safetensors"], out=tmp_path / "s.safetensors"))
    assert list(got) == list(load_file(tmp_path / "real.safetensors"))
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert all(torch.equal(got[k], v) and got[k].dtype == v.dtype for k, v in extras.items())
    # and extracts against the folder it was converted from the same adapter
    for i, base in enumerate((paths["base"], tmp_path / "real.safetensors")):
        run(home, "lora", "extract", str(paths["tuned"]), "--base", str(base), "--rank", "2", "--name", f"x{i}")
    a, b = _adapter(home, "x0"), _adapter(home, "x1")
    assert sorted(a) == sorted(b) and all(torch.equal(a[m].delta(), b[m].delta()) for m in a)
