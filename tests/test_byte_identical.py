"""An imported adapter file exported to the format it came in is that file again, byte for byte.

Each file here is written by the program users get it from, with that program's own writer:
sd-scripts and lycoris save through `safetensors.torch.save_file` (header metadata such as `ss_*` in its
hash map's order, tensors by dtype alignment then name, the header padded to 8 bytes), diffusers through
`save_lora_weights`. The oracle is the file itself: sha256 and `filecmp` against the original.
A derived artifact (a resize, a merge) never carries its parent's header; `--with-manifest` writes
loraforge's header with the same tensors.
"""

from __future__ import annotations

import copy
import filecmp
import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cli_helpers import run_cli
from loraforge.registry import Registry
from test_hub import hub  # noqa: F401  (the local Hub fixture)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# What sd-scripts writes into a LoRA's header (a few of its entries; values are strings, some of them
# JSON, some not ASCII), in the order sd-scripts builds them, which is not sorted.
SS_METADATA = {
    "ss_session_id": "1234567890",
    "ss_network_module": "networks.lora",
    "ss_network_dim": "2",
    "ss_network_alpha": "1.0",
    "ss_base_model_version": "sd_v1",
    "ss_tag_frequency": json.dumps({"10_ayaka": {"1girl": 40, "café au lait": 3, "微笑": 7}}, ensure_ascii=False),
    "ss_output_name": "ayaka_v3",
    "sshs_model_hash": "0f" * 32,
}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def identical(a: Path, b: Path) -> bool:
    return filecmp.cmp(a, b, shallow=False) and sha256(a) == sha256(b)


def header_of(path: Path) -> dict:
    raw = path.read_bytes()
    return json.loads(raw[8: 8 + int.from_bytes(raw[:8], "little")])


def export(home: Path, ref: str, out: Path, *args: str):
    """`registry export REF ARGS -o OUT`: (the path it printed, what it said on stderr)."""
    result = run_cli(home, "registry", "export", ref, *args, "-o", str(out))
    return Path(result.stdout.split()[0]), result.stderr.strip()


@pytest.fixture()
def kohya_sd1_file(tmp_path, tiny_sd_path) -> Path:
    """A kohya SD1 LoRA on tiny-sd's modules (fp16 factors, fp32 alphas as sd-scripts saves them), written by
    `safetensors.torch.save_file` with sd-scripts' header metadata."""
    from loraforge.formats.kohya import lora_to_kohya
    from loraforge.models.targets import module_shapes
    from loraforge.synthetic import random_lora

    sd = lora_to_kohya(random_lora(module_shapes(tiny_sd_path), rank=2, seed=5, alpha=1.0))
    sd = {k: (v.float() if k.endswith(".alpha") else v.half()) for k, v in sd.items()}
    path = tmp_path / "ayaka_v3.safetensors"
    save_file(sd, str(path), metadata=SS_METADATA)
    return path


@pytest.mark.parametrize("with_base", [True, False])
def test_kohya_sd1_file_with_ss_metadata_exports_back_byte_for_byte(home, tmp_path, kohya_sd1_file, with_base):
    base = ("--base", "builtin:tiny-sd") if with_base else ()
    run_cli(home, "registry", "import", str(kohya_sd1_file), "--name", "ayaka", *base)
    for args in (("--format", "kohya"), ("--for", "a1111"), ("--for", "comfyui"), ("--for", "kohya")):
        out, said = export(home, "ayaka", tmp_path / ("-".join(a.strip("-") for a in args) + ".safetensors"), *args)
        assert identical(out, kohya_sd1_file), args
        assert said.startswith("wrote the imported file back byte for byte") and "--with-manifest" in said
    assert header_of(out)["__metadata__"] == SS_METADATA  # in the order safetensors' hash map gave them


def test_with_manifest_writes_the_same_tensors_under_loraforge_header(home, tmp_path, kohya_sd1_file):
    run_cli(home, "registry", "import", str(kohya_sd1_file), "--name", "ayaka", "--base", "builtin:tiny-sd")
    out, said = export(home, "ayaka", tmp_path / "with.safetensors", "--format", "kohya", "--with-manifest")
    assert not identical(out, kohya_sd1_file) and said == ""
    meta = header_of(out)["__metadata__"]
    assert json.loads(meta["loraforge_manifest"])["name"] == "ayaka" and "ss_network_module" not in meta
    got, want = load_file(str(out)), load_file(str(kohya_sd1_file))
    assert sorted(got) == sorted(want)
    assert all(got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]) for k in want)


def test_the_import_survives_verify_and_gc(home, tmp_path, kohya_sd1_file):
    run_cli(home, "registry", "import", str(kohya_sd1_file), "--name", "ayaka", "--base", "builtin:tiny-sd")
    run_cli(home, "registry", "verify")
    run_cli(home, "registry", "gc")
    manifest = Registry(home).resolve("ayaka")
    assert manifest.provenance.params["source_sha256"] == sha256(kohya_sd1_file)
    assert {f.path for f in manifest.files} == {"adapter.safetensors", "source-header.json"}
    out, _ = export(home, "ayaka", tmp_path / "after-gc.safetensors", "--format", "kohya")
    assert identical(out, kohya_sd1_file)


@pytest.mark.parametrize("push_format", ["kohya", "diffusers"])
def test_the_import_survives_hub_push_and_pull_into_another_home(home, hub, tmp_path, kohya_sd1_file, push_format):
    from test_hub import second_home

    run_cli(home, "registry", "import", str(kohya_sd1_file), "--name", "ayaka", "--base", "builtin:tiny-sd")
    run_cli(home, "hub", "push", "ayaka:1", "--repo", "me/ayaka", "--format", push_format)
    other = second_home(tmp_path, home)
    run_cli(other, "hub", "pull", "me/ayaka@v1")
    assert Registry(other).resolve("ayaka").digest == Registry(home).resolve("ayaka").digest
    out, said = export(other, "ayaka", tmp_path / "pulled.safetensors", "--for", "comfyui")
    assert identical(out, kohya_sd1_file) and said.startswith("wrote the imported file back byte for byte")


def test_derived_artifacts_have_their_own_header(home, tmp_path, kohya_sd1_file):
    """A resize of the import (a new adapter with its own manifest) keeps none of sd-scripts' entries."""
    run_cli(home, "registry", "import", str(kohya_sd1_file), "--name", "ayaka", "--base", "builtin:tiny-sd")
    run_cli(home, "lora", "resize", "ayaka", "--rank", "1", "--name", "small")
    manifest = Registry(home).resolve("small")
    assert "source-header.json" not in {f.path for f in manifest.files}
    out, said = export(home, "small", tmp_path / "small.safetensors", "--format", "kohya")
    meta = header_of(out)["__metadata__"]
    assert said == "" and not [k for k in meta if k.startswith("ss")]
    assert json.loads(meta["loraforge_manifest"])["name"] == "small"


def test_export_to_another_format_carries_loraforge_header(home, tmp_path, kohya_sd1_file):
    run_cli(home, "registry", "import", str(kohya_sd1_file), "--name", "ayaka", "--base", "builtin:tiny-sd")
    out, said = export(home, "ayaka", tmp_path / "d.safetensors", "--format", "diffusers")
    meta = header_of(out)["__metadata__"]
    assert said == "" and "loraforge_manifest" in meta and "ss_network_module" not in meta


def test_a_file_with_bytes_after_its_last_tensor_is_not_reproduced_and_export_says_why(home, tmp_path,
                                                                                      kohya_sd1_file):
    padded = tmp_path / "padded.safetensors"
    padded.write_bytes(kohya_sd1_file.read_bytes() + b"\0" * 16)  # bytes no tensor owns
    run_cli(home, "registry", "import", str(padded), "--name", "padded", "--base", "builtin:tiny-sd")
    out, said = export(home, "padded", tmp_path / "out.safetensors", "--format", "kohya")
    assert said == ("could not write the imported file back byte for byte: the imported file has 16 bytes after "
                    "its last tensor; wrote loraforge's header")
    assert identical(out, export(home, "padded", tmp_path / "with.safetensors", "--format", "kohya",
                                 "--with-manifest")[0])
    got, want = load_file(str(out)), load_file(str(kohya_sd1_file))
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)


# -- SDXL kohya files in SGM names -----------------------------------------------------------

@pytest.fixture(scope="module")
def sdxl_pipeline(tiny_sdxl_path):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl_path))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sgm_named_sdxl_kohya_file_exports_back_byte_for_byte(home, tmp_path, sdxl_pipeline, dtype):
    from test_kohya_sgm import sgm_kohya_file

    source = sgm_kohya_file(sdxl_pipeline, tmp_path / "xl.safetensors", dtype=dtype)
    run_cli(home, "registry", "import", str(source), "--name", "xl", "--base", "builtin:tiny-sdxl")
    for args in (("--format", "kohya"), ("--for", "comfyui"), ("--for", "a1111"), ("--for", "kohya"),
                 ("--format", "kohya", "--kohya-names", "sgm")):
        out, said = export(home, "xl", tmp_path / ("-".join(a.strip("-") for a in args) + ".safetensors"), *args)
        assert identical(out, source), args
        assert said.startswith("wrote the imported file back byte for byte")
    # the other naming is another file, and export says so
    out, said = export(home, "xl", tmp_path / "diffusers-names.safetensors", "--format", "kohya",
                       "--kohya-names", "diffusers")
    assert not identical(out, source)
    assert said == ("wrote the UNet keys in diffusers names, not the sgm names of the imported file "
                    "(--kohya-names sgm writes that file back byte for byte)"), said


# -- which UNet names an SDXL kohya export uses -------------------------------------------------

def sgm_unet_modules(tiny_sdxl_path: Path, tmp_path: Path) -> set[str]:
    """The kohya names ComfyUI and A1111 look SDXL UNet modules up by: `lora_unet_` + the module's path in
    the single-file checkpoint (`model.diffusion_model.<path>.weight`, a Linear or Conv2d) with `_` for `.`;
    the single file is tiny-sdxl's, which diffusers' from_single_file loads back bit-exactly
    (tests/test_single_file.py)."""
    from loraforge.formats.safetensors_io import tensor_shapes
    from loraforge.models.single_file import write_single_file

    out = write_single_file(tiny_sdxl_path, "sdxl", tmp_path / "tiny-sdxl-single.safetensors")
    return {"lora_unet_" + k.removeprefix("model.diffusion_model.").removesuffix(".weight").replace(".", "_")
            for k, shape in tensor_shapes(out).items()
            if k.startswith("model.diffusion_model.") and k.endswith(".weight") and len(shape) in (2, 4)}


def unet_key_bases(path: Path) -> set[str]:
    return {k.split(".", 1)[0] for k in load_file(str(path)) if k.startswith("lora_unet_")}


@pytest.mark.parametrize("args", [("--format", "kohya"), ("--for", "comfyui"), ("--for", "a1111")])
def test_an_sdxl_adapter_from_diffusers_exports_to_kohya_in_the_sgm_names_of_real_modules(
        home, tmp_path, sdxl_pipeline, tiny_sdxl_path, args):
    source = unet_lora_saved_by_diffusers(sdxl_pipeline, tmp_path / "saved")
    run_cli(home, "registry", "import", str(source), "--name", "d", "--base", "builtin:tiny-sdxl")
    out, said = export(home, "d", tmp_path / "k.safetensors", *args)
    bases = unet_key_bases(out)
    assert said == "" and bases and bases <= sgm_unet_modules(tiny_sdxl_path, tmp_path), sorted(bases)[:3]
    assert len(bases) == len({k.split(".lora_")[0] for k in load_file(str(source))})


def test_a_diffusers_named_sdxl_kohya_import_keeps_its_names_under_format_kohya(home, tmp_path, sdxl_pipeline,
                                                                               tiny_sdxl_path):
    """`--format kohya` gives the file back as it came; `--for comfyui|a1111|kohya` give those programs the
    SGM names they build SDXL with."""
    from loraforge.formats.kohya import lora_to_kohya
    from loraforge.formats import read_adapter

    diffusers_file = unet_lora_saved_by_diffusers(sdxl_pipeline, tmp_path / "saved")
    source = tmp_path / "diffusers-named.safetensors"
    save_file(lora_to_kohya(read_adapter(diffusers_file)[0]), str(source), metadata={"ss_network_dim": "4"})
    assert all(b.startswith(("lora_unet_down_blocks_", "lora_unet_mid_block_", "lora_unet_up_blocks_"))
               for b in unet_key_bases(source))
    run_cli(home, "registry", "import", str(source), "--name", "k", "--base", "builtin:tiny-sdxl")
    out, _ = export(home, "k", tmp_path / "same.safetensors", "--format", "kohya")
    assert identical(out, source)
    out, said = export(home, "k", tmp_path / "sgm.safetensors", "--for", "a1111")
    assert unet_key_bases(out) <= sgm_unet_modules(tiny_sdxl_path, tmp_path)
    assert said == ("wrote the UNet keys in sgm names, not the diffusers names of the imported file "
                    "(--kohya-names diffusers writes that file back byte for byte)")


# -- LyCORIS files written by lycoris-lora ---------------------------------------------------

@pytest.mark.parametrize("case, dtype", [("loha", torch.float32), ("loha", torch.float16), ("lokr", torch.float32)])
def test_lycoris_file_saved_by_lycoris_exports_back_byte_for_byte(home, tmp_path, tiny_sd_path, case, dtype):
    from test_lycoris_variants import Produced

    made = Produced(tiny_sd_path, tmp_path / case, case, dtype=dtype)
    assert header_of(made.path)["__metadata__"], "lycoris writes its own metadata (hashes)"
    run_cli(home, "registry", "import", str(made.path), "--name", "hada", "--base", "builtin:tiny-sd")
    out, said = export(home, "hada", tmp_path / "back.safetensors", "--for", "comfyui")
    assert identical(out, made.path)
    assert said.startswith("wrote the imported file back byte for byte")


# -- diffusers files written by save_lora_weights --------------------------------------------

def unet_lora_saved_by_diffusers(pipe, folder: Path) -> Path:
    """A UNet LoRA (alpha != rank, a rank pattern) saved by diffusers' `save_lora_weights` with its adapter
    metadata, as diffusers' training scripts save one."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    unet = copy.deepcopy(pipe.unet)
    config = LoraConfig(r=4, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                        rank_pattern={"attn2.to_k": 2})
    inject_adapter_in_model(config, unet)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    type(pipe).save_lora_weights(str(folder), unet_lora_layers=get_peft_model_state_dict(unet),
                                 unet_lora_adapter_metadata=config.to_dict())
    return folder / "pytorch_lora_weights.safetensors"


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_diffusers_file_saved_by_save_lora_weights_exports_back_byte_for_byte(home, tmp_path, pipelines, family):
    source = unet_lora_saved_by_diffusers(pipelines[family], tmp_path / "saved")
    assert "lora_adapter_metadata" in header_of(source)["__metadata__"]
    run_cli(home, "registry", "import", str(source), "--name", "d", "--base", FAMILIES[family])
    for args, name in ((("--for", "diffusers"), "folder"), (("--format", "diffusers"), "file.safetensors")):
        out, said = export(home, "d", tmp_path / name, *args)
        assert identical(out, source), (args, said)
        assert said.startswith("wrote the imported file back byte for byte")


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_a_diffusers_file_with_text_encoders_saved_without_text_model_exports_back_byte_for_byte(
        home, tmp_path, pipelines, family):
    """diffusers under transformers 5 saves CLIP text-encoder keys without the `text_model.` wrapper
    (`text_encoder.encoder.layers.0…`), which loraforge reads into its canonical `text_model.` paths; the
    file still comes back as it was, with every component's alphas in its adapter metadata."""
    from test_layouts import _saved_by_diffusers

    source, _ = _saved_by_diffusers(pipelines[family], tmp_path / "saved")
    assert [k for k in load_file(str(source)) if k.startswith("text_encoder.encoder.")]
    run_cli(home, "registry", "import", str(source), "--name", "d", "--base", FAMILIES[family])
    out, said = export(home, "d", tmp_path / "out", "--for", "diffusers")
    assert identical(out, source), said
    assert said.startswith("wrote the imported file back byte for byte")


FAMILIES = {"sd1": "builtin:tiny-sd", "sdxl": "builtin:tiny-sdxl"}


@pytest.fixture(scope="module")
def pipelines(tiny_sd_path, tiny_sdxl_path):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return {"sd1": StableDiffusionPipeline.from_pretrained(str(tiny_sd_path), safety_checker=None,
                                                           requires_safety_checker=False),
            "sdxl": StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl_path))}
