"""`registry import` checks and stores an adapter from its file's bytes, without torch, and stores exactly
what reading it with torch and writing it canonically gives."""

from __future__ import annotations

import json
import math
import random
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from loraforge.formats import read_adapter, scan_adapter, write_adapter
from loraforge.hashing import sha256_file
from loraforge.formats.safetensors_io import DTYPE_SIZES, RawTensor, TORCH_NAMES
from loraforge.registry import Registry
from loraforge.registry.importer import adapter_info
from cli_helpers import run_cli

R = 4  # rank of the test adapters
SD15_UNET = [  # (module path, in, out) of real SD1.5 UNet modules, shrunk to 8-16 features
    ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", 8, 8),
    ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0", 8, 8),
    ("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k", 12, 8),
    ("down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj", 8, 16),
    ("mid_block.attentions.0.transformer_blocks.0.attn1.to_v", 16, 16),
    ("up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_q", 16, 16),
]
SD15_TE = [("text_model.encoder.layers.0.self_attn.q_proj", 12, 12), ("text_model.encoder.layers.11.mlp.fc1", 12, 16)]


def _factors(gen, n_in, n_out, dtype, conv=False):
    extra = (1, 1) if conv else ()
    down = torch.randn((R, n_in, *extra), generator=gen) * 0.1
    up = torch.randn((n_out, R, *extra), generator=gen) * 0.1
    return down.to(dtype), up.to(dtype)


def _kohya(prefixes=("lora_unet_", "lora_te_"), dtype=torch.float16, alpha_dtype=torch.float16, with_alpha=True):
    gen = torch.Generator().manual_seed(1)
    sd = {}
    modules = [(prefixes[0] + p.replace(".", "_"), i, o) for p, i, o in SD15_UNET]
    for te in prefixes[1:]:
        modules += [(te + p.replace(".", "_"), i, o) for p, i, o in SD15_TE]
    modules.append((prefixes[0] + "down_blocks_0_attentions_0_proj_in", 8, 8))  # SD1.5's 1×1 conv
    for name, n_in, n_out in modules:
        down, up = _factors(gen, n_in, n_out, dtype, conv=name.endswith("proj_in"))
        sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"] = down, up
        if with_alpha:
            sd[f"{name}.alpha"] = torch.tensor(2.0, dtype=alpha_dtype)
    return sd


def _write_kohya(path: Path, **kwargs) -> Path:
    save_file(_kohya(**kwargs), str(path), metadata={"ss_network_dim": str(R), "ss_network_alpha": "2"})
    return path


def _write_kohya_conv(path: Path) -> Path:
    gen = torch.Generator().manual_seed(2)
    name = "lora_unet_down_blocks_0_resnets_0_conv1"
    down = torch.randn((R, 8, 3, 3), generator=gen)
    up = torch.randn((8, R, 1, 1), generator=gen)
    save_file({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(1.0)},
              str(path))
    return path


def _write_diffusers(path: Path) -> Path:
    gen = torch.Generator().manual_seed(3)
    sd = {}
    for component, modules in (("unet", SD15_UNET), ("text_encoder", SD15_TE)):
        for module, n_in, n_out in modules:
            down, up = _factors(gen, n_in, n_out, torch.bfloat16)
            sd[f"{component}.{module}.lora_A.weight"], sd[f"{component}.{module}.lora_B.weight"] = down, up
    meta = {"unet.r": R, "unet.lora_alpha": 8, "unet.alpha_pattern": {"attn2.to_q": 2},
            "text_encoder.r": R, "text_encoder.lora_alpha": 4, "text_encoder.use_rslora": True}
    save_file(sd, str(path), metadata={"lora_adapter_metadata": json.dumps(meta)})
    return path


def _write_diffusers_old(path: Path) -> Path:
    gen = torch.Generator().manual_seed(4)
    sd = {}
    for proj in ("to_q", "to_out"):
        down, up = _factors(gen, 8, 8, torch.float32)
        base = f"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.{proj}_lora"
        sd[f"{base}.down.weight"], sd[f"{base}.up.weight"] = down, up
        base = f"text_encoder.text_model.encoder.layers.0.self_attn.{proj}_lora"
        sd[f"{base}.down.weight"], sd[f"{base}.up.weight"] = _factors(gen, 8, 8, torch.float32)
    save_file(sd, str(path))
    return path


def _write_kohya_flux(path: Path) -> Path:
    """A kohya Flux file in fp16: fused qkv and linear1 (split into row views of the file's bytes on import) and the
    final layer's modulation (its halves swapped)."""
    g = torch.Generator().manual_seed(4)
    sd = {}
    for name, (out, inp) in {"double_blocks_0_img_attn_qkv": (96, 32), "single_blocks_1_linear1": (224, 32),
                             "final_layer_adaLN_modulation_1": (64, 32), "img_in": (32, 64)}.items():
        sd[f"lora_unet_{name}.lora_down.weight"] = torch.randn(2, inp, generator=g).half()
        sd[f"lora_unet_{name}.lora_up.weight"] = torch.randn(out, 2, generator=g).half()
        sd[f"lora_unet_{name}.alpha"] = torch.tensor(1.0).half()
    save_file(sd, str(path))
    return path


def _write_format(fmt: str):
    def write(path: Path) -> Path:
        state, _, _ = read_adapter(_write_kohya(path.with_name("src.safetensors"), alpha_dtype=torch.float32))
        target = path.with_suffix("") if fmt == "peft" else path
        write_adapter(state, target, fmt)
        return target
    return write


CASES = {
    "kohya-sd15-fp16": lambda p: _write_kohya(p),
    "kohya-fp32-alpha": lambda p: _write_kohya(p, alpha_dtype=torch.float32),
    "kohya-sdxl-bf16-no-alpha": lambda p: _write_kohya(p, prefixes=("lora_unet_", "lora_te1_", "lora_te2_"),
                                                       dtype=torch.bfloat16, with_alpha=False),
    "kohya-conv3x3": _write_kohya_conv,
    "diffusers-peft-keys": _write_diffusers,
    "kohya-flux-fp16": _write_kohya_flux,
    "diffusers-old-keys": _write_diffusers_old,
    "loraforge-with-hints": _write_format("loraforge"),
    "peft-folder": _write_format("peft"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_import_stores_what_the_torch_round_trip_writes(tmp_path, case):
    src = CASES[case](tmp_path / "adapter.safetensors")
    home = tmp_path / "home"
    result = run_cli(home, "registry", "import", str(src), "--name", "a", "--json")
    manifest = json.loads(result.output)
    stored = Registry(home).primary_file(Registry(home).resolve("a:1")).read_bytes()

    state, fmt, _ = read_adapter(src)  # with torch, as every import did before
    [expected] = write_adapter(state, tmp_path / "expected.safetensors", "loraforge")
    assert stored == expected.read_bytes()
    assert manifest["adapter"] == adapter_info(state, fmt).model_dump()
    # a file's own header is kept so that exporting it to its format gives it back (test_byte_identical)
    source = {} if src.is_dir() else {"source_sha256": sha256_file(src), "source_size": src.stat().st_size}
    assert manifest["provenance"]["params"] == {"format": fmt, **source}


SHOW_HEAVY = textwrap.dedent("""
    import sys
    from loraforge.cli import cli
    try:
        cli.main(sys.argv[1:], standalone_mode=False)
    finally:
        print("imported:", sorted(m for m in ("torch", "diffusers", "transformers", "peft") if m in sys.modules))
""")


@pytest.mark.parametrize("case", ["kohya-sd15-fp16", "diffusers-peft-keys", "kohya-flux-fp16"])
def test_registry_import_does_not_import_torch(tmp_path, case):
    src = CASES[case](tmp_path / "adapter.safetensors")
    home = tmp_path / "home"
    for version in (1, 2):
        out = subprocess.run([sys.executable, "-c", SHOW_HEAVY, "--home", str(home), "registry", "import", str(src),
                              "--name", "fast"], capture_output=True, text=True, check=True).stdout
        assert f"registered fast:{version} (lora" in out and "imported: []" in out, out
    run_cli(home, "registry", "verify")


def test_loading_the_formats_plugin_group_does_not_import_torch():
    code = ("import sys; from loraforge.plugins import FORMATS; print(FORMATS.names()); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["['bfl',", "'diffusers',", "'kohya',", "'loraforge',", "'peft',", "'slider_pt',",
                           "'xlabs']", "False"], out


def test_a_non_finite_weight_is_refused_by_import_as_before(tmp_path):
    sd = _kohya()
    key = "lora_te_text_model_encoder_layers_11_mlp_fc1.lora_up.weight"
    sd[key][3, 1] = float("inf")
    save_file(sd, str(tmp_path / "bad.safetensors"))
    home = tmp_path / "home"
    result = run_cli(home, "registry", "import", str(tmp_path / "bad.safetensors"), "--name", "bad", ok=False)
    assert result.exit_code == 1
    assert result.output.strip() == f"Error: {tmp_path / 'bad.safetensors'}: tensor {key} contains NaN or Inf values"
    assert Registry(home).list() == []


# -- the byte-level checks against torch, on every bit pattern that matters -------------------

FLOATS = ["F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2"]


def _patterns(st: str) -> bytes:
    """Every value of the top 16 bits (every byte of a float8), the lower bytes random."""
    size = DTYPE_SIZES[st]
    if size == 1:
        return bytes(range(256))
    rnd = random.Random(size)
    return b"".join(rnd.randbytes(size - 2) + struct.pack("<H", top) for top in range(1 << 16))


@pytest.mark.parametrize("st", FLOATS)
def test_the_byte_level_finite_check_agrees_with_torch_on_every_exponent(st):
    data = _patterns(st)
    size = DTYPE_SIZES[st]
    values = torch.frombuffer(bytearray(data), dtype=getattr(torch, TORCH_NAMES[st]))
    finite = torch.isfinite(values.float() if st.startswith("F8") else values).tolist()
    n = len(data) // size
    assert [RawTensor(st, (), data, i * size, (i + 1) * size).all_finite() for i in range(n)] == finite
    assert RawTensor(st, (n,), data).all_finite() is False
    good = b"".join(data[i * size:(i + 1) * size] for i in range(n) if finite[i])
    assert RawTensor(st, (len(good) // size,), good).all_finite() is True


@pytest.mark.parametrize("st", sorted(TORCH_NAMES))
def test_scalars_are_decoded_as_torch_reads_them(st):
    size = DTYPE_SIZES[st]
    rnd = random.Random(7)
    samples = [bytes(range(256))[i:i + 1] for i in range(256)] if size == 1 else [rnd.randbytes(size) for _ in range(300)]
    if st == "BOOL":
        samples = [b"\x00", b"\x01"]
    for raw in samples:
        want = torch.frombuffer(bytearray(raw), dtype=getattr(torch, TORCH_NAMES[st])).reshape(()).item()
        got = RawTensor(st, (), raw).item()
        assert (math.isnan(got) and math.isnan(want)) or (got == want and type(got) is type(want)), (st, raw, got, want)


@pytest.mark.parametrize("value", [2.0, 1 / 3, 1e-45, 3.4028235e38, 3.5e38, -1e39, 0.1, -0.0])
def test_a_float32_alpha_is_rounded_as_torch_rounds_it(value):
    assert RawTensor.float32_scalar(value).data.tobytes() == torch.tensor(value, dtype=torch.float32).numpy().tobytes()


def test_scanning_gives_the_summary_reading_gives(tmp_path):
    path = _write_kohya(tmp_path / "a.safetensors", alpha_dtype=torch.float32)
    scanned, fmt, meta = scan_adapter(path)
    read, fmt_read, meta_read = read_adapter(path)
    assert (fmt, meta, scanned.hints) == (fmt_read, meta_read, read.hints)
    assert adapter_info(scanned, fmt) == adapter_info(read, fmt)
    assert scanned.alphas == read.alphas and scanned.ranks == read.ranks
    assert all(isinstance(m.down, RawTensor) for m in scanned.values())



def _blobs(home: Path) -> set[str]:
    return {p.name for p in (home / "blobs").rglob("*") if p.is_file()}


def test_the_canonical_file_is_moved_into_the_store_and_a_refused_import_leaves_nothing(tmp_path):
    from loraforge.home import tmp_dir

    src = _write_kohya(tmp_path / "a.safetensors")
    home = tmp_path / "home"
    scratch = tmp_dir(home)  # run_cli runs in this process: its scratch folder is this one
    run_cli(home, "registry", "import", str(src), "--name", "a")
    stored = _blobs(home)
    # the canonical file and the imported file's header (`source-header.json`), both moved, not copied
    assert src.exists() and len(stored) == 2 and list(scratch.iterdir()) == []

    other = _write_kohya(tmp_path / "b.safetensors", dtype=torch.float32)
    refused = run_cli(home, "registry", "import", str(other), "--name", "a", "--kind", "slider", ok=False)
    assert refused.exit_code == 1 and "already holds lora artifacts" in refused.output
    assert _blobs(home) == stored and list(scratch.iterdir()) == []
    run_cli(home, "registry", "verify")


def test_a_file_outside_the_staging_area_is_copied_not_moved(tmp_path):
    reg = Registry(tmp_path / "home")
    src = reg.blobs.scratch() / "adapter.safetensors"  # in scratch, but not at a staging path
    src.write_bytes(b"payload")
    digest, size = reg.blobs.put_file(src)
    assert src.read_bytes() == b"payload" and reg.blobs.path(digest).read_bytes() == b"payload" and size == 7
    staged = reg.blobs.staging_path("x")
    staged.write_bytes(b"other payload")
    digest, _ = reg.blobs.put_file(staged)
    assert not staged.exists() and reg.blobs.verify(digest)
