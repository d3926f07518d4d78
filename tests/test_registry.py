"""Registry behaviour a user sees: versions, aliases, dedup, lineage, gc, verify, safety, concurrency."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loraforge.formats import write_adapter
from loraforge.models.targets import module_shapes
from loraforge.registry import Manifest, Parent, Provenance, Registry
from loraforge.synthetic import random_lora

from cli_helpers import run_cli as run


@pytest.fixture()
def kohya_file(tmp_path, tiny_sd_path) -> Path:
    shapes = module_shapes(tiny_sd_path)
    state = random_lora(shapes, rank=4, alpha=2.0, components=("unet", "text_encoder"),
                        targets=("to_q", "to_k", "to_v", "to_out.0", "q_proj", "v_proj"), seed=1)
    path = tmp_path / "style.safetensors"
    write_adapter(state, path, "kohya")
    return path


def blob_count(home: Path) -> int:
    return sum(1 for p in (home / "blobs" / "sha256").rglob("*") if p.is_file())


def test_import_versions_dedup_and_kohya_round_trip(home, kohya_file, tmp_path):
    first = run(home, "registry", "import", str(kohya_file), "--name", "style", "--base", "builtin:tiny-sd")
    assert "registered style:1 (lora" in first.output
    blobs_after_first = blob_count(home)
    run(home, "registry", "import", str(kohya_file), "--name", "style")
    assert blob_count(home) == blobs_after_first, "the same file imported twice must be stored once"

    rows = json.loads(run(home, "registry", "ls", "--json").output)
    assert [(r["name"], r["version"]) for r in rows] == [("style", 1), ("style", 2)]
    assert rows[0]["digest"] == rows[1]["digest"]

    out = tmp_path / "back.safetensors"
    run(home, "registry", "export", "style:1", "--format", "kohya", "-o", str(out))
    original, exported = load_file(kohya_file), load_file(out)
    assert sorted(original) == sorted(exported)
    for key in original:
        assert original[key].dtype == exported[key].dtype
        assert torch.equal(original[key], exported[key]), key

    shown = json.loads(run(home, "registry", "show", "style", "--json").output)
    assert shown["version"] == 2 and shown["adapter"]["rank"] == 4 and shown["adapter"]["alpha"] == 2.0
    assert shown["adapter"]["components"] == ["text_encoder", "unet"]
    assert shown["base"] is None
    first_manifest = json.loads(run(home, "registry", "show", "style:1", "--json").output)
    assert first_manifest["base"]["ref"] == "builtin:tiny-sd" and first_manifest["base"]["family"] == "sd1"


@pytest.mark.parametrize("fmt", ["diffusers", "peft", "loraforge"])
def test_export_import_round_trip_every_format(home, kohya_file, tmp_path, fmt):
    run(home, "registry", "import", str(kohya_file), "--name", "style")
    out = tmp_path / ("peft_out" if fmt == "peft" else f"out_{fmt}.safetensors")
    run(home, "registry", "export", "style", "--format", fmt, "-o", str(out))
    run(home, "registry", "import", str(out), "--name", "again", "--base", "builtin:tiny-sd")
    reg = Registry(home)
    from loraforge.formats import read_adapter

    a, _, _ = read_adapter(reg.primary_file(reg.resolve("style")))
    b, _, _ = read_adapter(reg.primary_file(reg.resolve("again")))
    assert sorted(a) == sorted(b)
    for name in a:
        torch.testing.assert_close(a[name].delta(), b[name].delta(), rtol=1e-5, atol=1e-7)


def test_exported_file_carries_the_manifest(home, kohya_file, tmp_path):
    run(home, "registry", "import", str(kohya_file), "--name", "style")
    out = tmp_path / "d.safetensors"
    run(home, "registry", "export", "style", "--format", "diffusers", "-o", str(out))
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["loraforge_manifest"])["name"] == "style"


def test_aliases_move_and_resolve(home, kohya_file):
    for _ in range(3):
        run(home, "registry", "import", str(kohya_file), "--name", "style")
    run(home, "registry", "tag", "style:2", "prod")
    assert json.loads(run(home, "registry", "show", "style:prod", "--json").output)["version"] == 2
    run(home, "registry", "tag", "style:3", "prod")
    assert json.loads(run(home, "registry", "show", "style:prod", "--json").output)["version"] == 3
    assert json.loads(run(home, "registry", "show", "style", "--json").output)["version"] == 3
    rows = json.loads(run(home, "registry", "ls", "--json").output)
    assert [r["aliases"] for r in rows] == [[], [], ["prod"]]
    bad = run(home, "registry", "tag", "style:3", "latest", ok=False)
    assert bad.exit_code == 1 and bad.output.startswith("Error: invalid alias 'latest'")


def test_digest_prefix_reference(home, kohya_file):
    run(home, "registry", "import", str(kohya_file), "--name", "style")
    digest = Registry(home).resolve("style").digest
    shown = json.loads(run(home, "registry", "show", f"sha256:{digest[:10]}", "--json").output)
    assert shown["name"] == "style"


def test_lineage_shows_parents_down_to_datasets(home, kohya_file, tmp_path):
    reg = Registry(home)
    run(home, "registry", "import", str(kohya_file), "--name", "a")
    run(home, "registry", "import", str(kohya_file), "--name", "b")
    a, b = reg.resolve("a"), reg.resolve("b")
    merged = Manifest(
        name="mix", kind="lora", digest="", files=a.files, adapter=a.adapter,
        provenance=Provenance(method="merge:concat", parents=[
            Parent(ref=a.ref, digest=a.digest, role="input", weight=0.7),
            Parent(ref=b.ref, digest=b.digest, role="input", weight=0.3),
            Parent(ref="photos:1", digest="f" * 64, role="dataset"),
        ]),
    )
    reg.register(merged)
    text = run(home, "registry", "lineage", "mix").output
    assert text.splitlines()[0] == "mix:1 (lora)"
    assert "[input] a:1 (lora) ×0.7" in text and "[input] b:1 (lora) ×0.3" in text
    assert "[dataset] photos:1" in text
    tree = json.loads(run(home, "registry", "lineage", "mix", "--json").output)
    assert [p["ref"] for p in tree["parents"]] == ["a:1", "b:1", "photos:1"]


def test_rm_then_gc_frees_only_unreferenced_blobs(home, kohya_file, tmp_path):
    other = tmp_path / "other.safetensors"
    shapes = module_shapes(Registry(home).home / "models" / "builtin" / "tiny-sd")
    write_adapter(random_lora(shapes, rank=2, seed=5), other, "kohya")
    run(home, "registry", "import", str(kohya_file), "--name", "keep")
    run(home, "registry", "import", str(other), "--name", "drop")
    kept = {f.sha256 for f in Registry(home).resolve("keep").files}  # blobs both reference stay
    freed = [f for f in Registry(home).resolve("drop").files if f.sha256 not in kept]
    size = sum(f.size for f in freed)
    run(home, "registry", "rm", "drop")
    result = run(home, "registry", "gc")
    assert f"deleted {len(freed)} blobs" in result.output and f"({size} bytes)" in result.output
    assert run(home, "registry", "verify").output.endswith("ok\n")
    assert run(home, "registry", "show", "drop", ok=False).exit_code == 1


def test_verify_detects_a_flipped_byte(home, kohya_file):
    run(home, "registry", "import", str(kohya_file), "--name", "style")
    manifest = Registry(home).resolve("style")
    blob = Registry(home).blobs.path(manifest.files[0].sha256)
    os.chmod(blob, 0o644)
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x01
    blob.write_bytes(bytes(data))
    result = run(home, "registry", "verify", ok=False)
    assert result.exit_code == 1
    assert f"blob {manifest.files[0].sha256} is damaged" in result.output


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_nothing_registered(home, tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "slider.pt"
    with open(path, "wb") as f:
        pickle.dump({"lora_unet_x.lora_down.weight": _Evil(marker)}, f)
    result = run(home, "registry", "import", str(path), "--name", "evil", ok=False)
    assert result.exit_code == 1
    assert result.output.startswith("Error: refusing to unpickle")
    assert len(result.output.strip().splitlines()) == 1
    assert not marker.exists()
    assert Registry(home).list() == []


def test_truncated_adapter_is_refused(home, kohya_file, tmp_path):
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(kohya_file.read_bytes()[:-100])
    result = run(home, "registry", "import", str(broken), "--name", "broken", ok=False)
    assert result.exit_code == 1 and result.output.startswith("Error: ")
    assert Registry(home).list() == []


def test_adapter_for_another_base_is_refused(home, tmp_path, tiny_sdxl_path):
    shapes = module_shapes(tiny_sdxl_path)
    path = tmp_path / "xl.safetensors"
    write_adapter(random_lora(shapes, rank=2), path, "kohya")
    result = run(home, "registry", "import", str(path), "--name", "xl", "--base", "builtin:tiny-sd", ok=False)
    assert result.exit_code == 1 and result.output.startswith("Error: ")
    assert Registry(home).list() == []


def test_usage_and_reference_errors(home):
    result = run(home, "registry", "show", "nothing", ok=False)
    assert result.exit_code == 1
    assert result.output == "Error: no artifact named 'nothing' in the registry (see `loraforge registry ls`)\n"
    assert run(home, "registry", "ls", "--kind", "bogus", ok=False).exit_code == 2
    bad = run(home, "registry", "show", "a b", ok=False)
    assert bad.exit_code == 1 and "invalid artifact name 'a b'" in bad.output


def test_checkpoint_and_dataset_import(home, tiny_sd_path, tmp_path):
    from PIL import Image

    run(home, "registry", "import", str(tiny_sd_path), "--name", "tiny")
    reg = Registry(home)
    manifest = reg.resolve("tiny")
    assert manifest.kind == "checkpoint" and manifest.layout == "diffusers" and manifest.base.family == "sd1"
    assert (reg.checkout(manifest) / "model_index.json").is_file()

    data = tmp_path / "data"
    data.mkdir()
    for i in range(3):
        Image.new("RGB", (16, 16), (i * 60, 0, 0)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"red square {i}")
    run(home, "registry", "import", str(data), "--name", "squares")
    ds = reg.resolve("squares")
    assert ds.kind == "dataset" and ds.dataset.num_images == 3
    assert ds.dataset.captions["1.png"] == "red square 1"
    run(home, "registry", "import", str(data), "--name", "squares")
    assert reg.resolve("squares:1").digest == reg.resolve("squares:2").digest


def test_unknown_manifest_keys_load_with_a_warning():
    m = Manifest(name="x", kind="dataset", digest="d", files=[])
    data = json.loads(m.to_json())
    data["from_the_future"] = {"a": 1}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = Manifest.model_validate(data)
    assert loaded.name == "x"
    assert any("from_the_future" in str(w.message) for w in caught)


def test_concurrent_imports_from_four_processes(home, kohya_file):
    script = (
        "import sys; from loraforge.registry import Registry; from loraforge.registry.importer import import_artifact;"
        "import_artifact(Registry(sys.argv[1]), sys.argv[2], 'race')"
    )
    procs = [subprocess.Popen([sys.executable, "-c", script, str(home), str(kohya_file)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(4)]
    for p in procs:
        _out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()
    rows = Registry(home).list(name="race")
    assert sorted(r["version"] for r in rows) == [1, 2, 3, 4]
    assert run(home, "registry", "verify").output.endswith("ok\n")


@pytest.mark.parametrize("fmt", ["kohya", "diffusers", "peft"])
def test_sdxl_adapter_round_trips_and_loads_in_diffusers(home, tmp_path, tiny_sdxl_path, fmt):
    """SDXL paths: kohya lora_te1_/lora_te2_ keys, both text encoders, SDXL pipeline loading."""
    shapes = module_shapes(tiny_sdxl_path)
    state = random_lora(shapes, rank=2, alpha=1.0, components=("unet", "text_encoder", "text_encoder_2"),
                        targets=("to_q", "to_v", "q_proj", "v_proj"), seed=9)
    source = tmp_path / "xl.safetensors"
    write_adapter(state, source, "kohya")
    keys = load_file(source).keys()
    assert any(k.startswith("lora_te1_") for k in keys) and any(k.startswith("lora_te2_") for k in keys)
    run(home, "registry", "import", str(source), "--name", "xl", "--base", "builtin:tiny-sdxl")
    out = tmp_path / ("xl_peft" if fmt == "peft" else f"xl_{fmt}.safetensors")
    run(home, "registry", "export", "xl", "--format", fmt, "-o", str(out))
    from loraforge.formats import read_adapter

    back, _, _ = read_adapter(out)
    assert sorted(back) == sorted(state)
    for name in state:
        torch.testing.assert_close(back[name].delta(), state[name].delta(), rtol=1e-5, atol=1e-7)
    if fmt == "kohya":
        original, exported = load_file(source), load_file(out)
        assert sorted(original) == sorted(exported)
        assert all(torch.equal(original[k], exported[k]) for k in original)
    if fmt == "diffusers":
        import logging

        from diffusers import StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path)
        records = []
        handler = logging.Handler()
        handler.emit = records.append
        logging.getLogger("diffusers").addHandler(handler)
        try:
            pipe.load_lora_weights(str(out))
        finally:
            logging.getLogger("diffusers").removeHandler(handler)
        messages = " ".join(r.getMessage() for r in records).lower()
        assert "unexpected" not in messages and "missing" not in messages, messages
        loaded = {n for n, _ in pipe.text_encoder_2.named_modules() if n.endswith("lora_A")}
        assert len(loaded) == len(state.component("text_encoder_2"))


def test_truncated_single_file_checkpoint_is_refused(home, tmp_path):
    from loraforge.formats.safetensors_io import safetensors_bytes

    data = safetensors_bytes({"model.diffusion_model.x.weight": torch.ones(64, 64),
                              "first_stage_model.y.weight": torch.ones(8, 8),
                              "cond_stage_model.z.weight": torch.ones(8, 8)})
    whole, broken = tmp_path / "model.safetensors", tmp_path / "broken.safetensors"
    whole.write_bytes(data)
    broken.write_bytes(data[:-200])
    run(home, "registry", "import", str(whole), "--name", "ckpt")
    assert Registry(home).resolve("ckpt").layout == "single_file"
    result = run(home, "registry", "import", str(broken), "--name", "ckpt", "--kind", "checkpoint", ok=False)
    assert result.exit_code == 1 and result.output.startswith("Error: ")
    assert len(result.output.strip().splitlines()) == 1
    assert [r["version"] for r in Registry(home).list(name="ckpt")] == [1]
