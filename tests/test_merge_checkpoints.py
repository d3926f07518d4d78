"""Checkpoint merges: every method's numbers vs a direct computation, block weights, filters, errors, memory."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraforge.ops.blocks import block_names, block_of
from loraforge.registry import Registry
from loraforge.synthetic import perturbed_checkpoint

from cli_helpers import run_cli as run
from sparsify_reference import ties_reference

UNET = "unet/diffusion_pytorch_model.safetensors"
TE = "text_encoder/model.safetensors"
VAE = "vae/diffusion_pytorch_model.safetensors"
SF_PREFIX = {"unet": "model.diffusion_model.", "text_encoder": "cond_stage_model.transformer.", "vae": "first_stage_model."}
SF_FILES = {"unet": UNET, "text_encoder": TE, "vae": VAE}


def single_file(folder: Path, dst: Path) -> Path:
    """A single-file checkpoint of a tiny diffusers folder: component keys behind A1111 prefixes."""
    state = {}
    for component, rel in SF_FILES.items():
        for k, v in load_file(folder / rel).items():
            state[SF_PREFIX[component] + k] = v
    save_file(state, dst)
    return dst


@pytest.fixture(scope="session")
def variants(tmp_path_factory, tiny_sd_path):
    root = tmp_path_factory.mktemp("variants")
    b = perturbed_checkpoint(tiny_sd_path, root / "b", seed=1, scale=0.05, components=("unet", "text_encoder", "vae"))
    c = perturbed_checkpoint(tiny_sd_path, root / "c", seed=2, scale=0.05)
    return {"a": tiny_sd_path, "b": b, "c": c}


def weights(folder: Path, rel: str) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in load_file(Path(folder) / rel).items()}


def slerp_ref(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    a64, b64 = a.double().flatten(), b.double().flatten()
    if a64.norm() == 0 or b64.norm() == 0:
        return (1 - t) * a + t * b
    cos = float(torch.dot(a64, b64) / (a64.norm() * b64.norm()))
    if 1 - abs(cos) < 1e-4:  # nearly colinear: plain interpolation
        return (1 - t) * a + t * b
    omega = math.acos(cos)
    return ((math.sin((1 - t) * omega) * a64 + math.sin(t * omega) * b64) / math.sin(omega)).reshape(a.shape).float()


CASES = {
    "weighted_sum": (["a", "b"], 0.3, {}, lambda t, a: (1 - a) * t["a"] + a * t["b"]),
    "add_difference": (["a", "b", "c"], 0.7, {}, lambda t, a: t["a"] + a * (t["b"] - t["c"])),
    "slerp": (["a", "b"], 0.35, {}, lambda t, a: slerp_ref(t["a"], t["b"], a)),
    "task_arithmetic": (["a", "b=0.5", "c"], 0.8, {},
                        lambda t, a: t["a"] + a * (0.5 * (t["b"] - t["a"]) + (t["c"] - t["a"]))),
}


@pytest.mark.parametrize("method", sorted(CASES))
def test_method_numbers_match_direct_computation(home, variants, tmp_path, method):
    models, alpha, params, ref = CASES[method]
    args = [str(variants[m.split("=")[0]]) + ("=" + m.split("=")[1] if "=" in m else "") for m in models]
    out = tmp_path / "merged"
    run(home, "merge", "checkpoints", *args, "--method", method, "--alpha", str(alpha), "--dtype", "fp32", "-o", str(out))
    for rel in (UNET, TE):
        got = weights(out, rel)
        inputs = {m.split("=")[0]: weights(variants[m.split("=")[0]], rel) for m in models}
        for key in got:
            if not got[key].is_floating_point() or key.endswith("position_ids"):
                continue
            want = ref({k: v[key] for k, v in inputs.items()}, alpha)
            torch.testing.assert_close(got[key], want, rtol=1e-5, atol=1e-6, msg=f"{method} {rel}:{key}")
    # the VAE is copied from the first model, byte for byte, even though B's VAE differs
    assert (out / VAE).read_bytes() == (variants["a"] / VAE).read_bytes()
    assert (out / "model_index.json").is_file() and (out / "unet" / "config.json").is_file()


def test_ties_engine_matches_elementwise_reference(home, variants, tmp_path):
    out = tmp_path / "ties"
    run(home, "merge", "checkpoints", str(variants["a"]), str(variants["b"]), f"{variants['c']}=0.5",
        "--method", "ties", "--alpha", "0.9", "--param", "density=0.3", "--dtype", "fp32", "-o", str(out))
    got = weights(out, UNET)
    a, b, c = (weights(variants[k], UNET) for k in "abc")
    for key in ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight", "conv_in.bias"):
        want = a[key] + 0.9 * ties_reference([b[key] - a[key], c[key] - a[key]], [1.0, 0.5], 0.3).float()
        torch.testing.assert_close(got[key], want, rtol=1e-5, atol=1e-6)


def test_slerp_endpoints(home, variants, tmp_path):
    for t, source in ((0.0, "a"), (1.0, "b")):
        out = tmp_path / f"slerp{t}"
        run(home, "merge", "checkpoints", str(variants["a"]), str(variants["b"]), "--method", "slerp",
            "--alpha", str(t), "--dtype", "fp32", "-o", str(out))
        got, want = weights(out, UNET), weights(variants[source], UNET)
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6)


def test_dare_is_reproducible_with_a_seed(home, variants, tmp_path):
    def dare(seed, name):
        out = tmp_path / name
        run(home, "merge", "checkpoints", str(variants["a"]), str(variants["b"]), "--method", "dare",
            "--param", "drop_rate=0.5", "--param", f"seed={seed}", "--dtype", "fp32", "-o", str(out))
        return weights(out, UNET)

    first, again, other = dare(7, "d1"), dare(7, "d2"), dare(8, "d3")
    a, b = weights(variants["a"], UNET), weights(variants["b"], UNET)
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first[key], other[key])
    # each entry is either the base (dropped) or base + τ/(1 − p) (kept), about half of each
    tau = b[key] - a[key]
    kept = torch.isclose(first[key], a[key] + tau / 0.5, atol=1e-6)
    dropped = torch.isclose(first[key], a[key], atol=1e-7)
    assert bool((kept | dropped).all())
    assert 0.4 < kept.float().mean().item() < 0.6


def test_block_weights_hit_the_right_keys(home, variants, tmp_path):
    out = tmp_path / "blocks"
    run(home, "merge", "checkpoints", str(variants["a"]), str(variants["b"]), "--alpha", "0",
        "--block-weights", "IN01:1,OUT03:0.5", "--dtype", "fp32", "-o", str(out))
    got, a, b = weights(out, UNET), weights(variants["a"], UNET), weights(variants["b"], UNET)
    for key in got:
        if key.startswith(("down_blocks.0.resnets.0.", "down_blocks.0.attentions.0.")):
            want = b[key]  # IN01: the first layer of the first down level
        elif key.startswith(("up_blocks.1.resnets.1.", "up_blocks.1.attentions.1.")):
            want = 0.5 * a[key] + 0.5 * b[key]  # OUT03: the last layer of the last up level
        else:
            want = a[key]
        torch.testing.assert_close(got[key], want, rtol=1e-6, atol=1e-7, msg=key)
    assert all(torch.equal(v, weights(variants["a"], TE)[k]) for k, v in weights(out, TE).items())


def test_sd1_block_map_has_25_blocks_for_both_namings():
    from diffusers import UNet2DConditionModel

    from loraforge.models.builtin import sd15_configs

    with torch.device("meta"):
        unet = UNet2DConditionModel(**sd15_configs()["unet"])
    keys = list(unet.state_dict())
    names = block_names(keys, "diffusers")
    assert names == [f"IN{i:02d}" for i in range(12)] + ["M00"] + [f"OUT{i:02d}" for i in range(12)]
    assert block_of("down_blocks.1.attentions.1.transformer_blocks.0.attn2.to_k.weight", "diffusers") == "IN05"
    assert block_of("down_blocks.2.downsamplers.0.conv.weight", "diffusers") == "IN09"
    assert block_of("up_blocks.3.attentions.2.proj_out.weight", "diffusers") == "OUT11"
    assert block_of("up_blocks.0.upsamplers.0.conv.weight", "diffusers") == "OUT02"
    assert block_of("input_blocks.5.1.transformer_blocks.0.attn2.to_k.weight", "single_file") == "IN05"
    assert block_of("middle_block.1.proj_in.weight", "single_file") == "M00"
    assert block_of("time_embed.0.weight", "single_file") is None


def test_single_files_merge_like_folders(home, variants, tmp_path):
    sa, sb = single_file(variants["a"], tmp_path / "a.safetensors"), single_file(variants["b"], tmp_path / "b.safetensors")
    out = tmp_path / "merged.safetensors"
    run(home, "merge", "checkpoints", str(sa), str(sb), "--alpha", "0.25", "-o", str(out))
    got = load_file(out)
    a, b = load_file(sa), load_file(sb)
    key = "model.diffusion_model.down_blocks.0.attentions.0.proj_in.weight"
    assert got[key].dtype == torch.float16
    torch.testing.assert_close(got[key].float(), (0.75 * a[key] + 0.25 * b[key]).half().float())
    vae_keys = [k for k in a if k.startswith("first_stage_model.")]
    assert vae_keys and all(torch.equal(got[k], a[k]) for k in vae_keys)


def test_cli_registers_provenance(home, variants):
    run(home, "registry", "import", str(variants["b"]), "--name", "bmodel", "--kind", "checkpoint")
    run(home, "merge", "checkpoints", "builtin:tiny-sd", "bmodel:1", "--alpha", "0.3", "--name", "blend")
    reg = Registry(home)
    m = reg.resolve("blend")
    b = reg.resolve("bmodel:1")
    assert m.kind == "checkpoint" and m.layout == "diffusers"
    assert m.provenance.method == "merge:weighted_sum"
    assert m.provenance.params["alpha"] == 0.3 and m.provenance.params["dtype"] == "fp16"
    assert m.provenance.params["components"] == ["unet", "text_encoder"]
    p0, p1 = m.provenance.parents
    assert (p0.ref, p0.weight) == ("builtin:tiny-sd", 0.7) and len(p0.digest) == 64
    assert (p1.ref, p1.digest, p1.weight) == ("bmodel:1", b.digest, 0.3)
    folder = reg.checkout(m)
    assert load_file(folder / UNET)["conv_in.weight"].dtype == torch.float16
    # the merged checkpoint is itself a usable input
    run(home, "merge", "checkpoints", "blend", "builtin:tiny-sd", "--method", "slerp", "--name", "blend2")
    assert Registry(home).resolve("blend2").provenance.parents[0].ref == "blend:1"


def _error(home, *args) -> str:
    result = run(home, *args, ok=False)
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert Registry(home).list() == [], "nothing may be registered after a failure"
    return lines[0]


def test_errors_are_one_line_and_register_nothing(home, variants, tmp_path):
    a = str(variants["a"])
    line = _error(home, "merge", "checkpoints", a, "builtin:tiny-sdxl", "--name", "x")
    assert "different architectures" in line and "sdxl" in line

    missing = tmp_path / "missing"
    shutil.copytree(variants["b"], missing)
    state = load_file(missing / UNET)
    del state["conv_in.bias"]
    save_file(state, missing / UNET)
    line = _error(home, "merge", "checkpoints", a, str(missing), "--name", "x")
    assert "unet/conv_in.bias" in line and "missing" in line

    reshaped = tmp_path / "reshaped"
    shutil.copytree(variants["b"], reshaped)
    state = load_file(reshaped / TE)
    key = sorted(k for k in state if k.endswith("q_proj.weight"))[0]
    state[key] = torch.zeros(state[key].shape[0] + 1, state[key].shape[1])
    save_file(state, reshaped / TE)
    line = _error(home, "merge", "checkpoints", a, str(reshaped), "--name", "x")
    assert f"text_encoder/{key}" in line and "shape" in line

    assert "fp8" in _error(home, "merge", "checkpoints", a, str(variants["b"]), "--dtype", "fp8", "--name", "x")
    assert "add_difference takes 3" in _error(home, "merge", "checkpoints", a, str(variants["b"]),
                                              "--method", "add_difference", "--name", "x")
    assert "nope" in _error(home, "merge", "checkpoints", a, str(variants["b"]), "--method", "nope", "--name", "x")
    assert "IN99" in _error(home, "merge", "checkpoints", a, str(variants["b"]), "--block-weights", "IN99:1",
                            "--name", "x")


MEMORY_CHILD = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    from loraforge.ops.merge import merge_checkpoints
    from loraforge.ops.specs import CheckpointMergeSpec, ModelInput
    from loraforge.registry import Registry
    # A single file's architecture is judged by diffusers' single-file code: importing it is setting up, not merging.
    import diffusers.loaders.single_file_utils

    def peak_mb():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024

    a, b, out, home = map(Path, sys.argv[1:5])
    registry = Registry(home)
    spec = CheckpointMergeSpec(models=[ModelInput(ref=str(a)), ModelInput(ref=str(b))], alpha=0.5, dtype="fp16")
    before = peak_mb()  # everything imported and set up: what is left is the merge itself
    merge_checkpoints(registry, spec, output=out)
    print(json.dumps({"before": before, "peak": peak_mb()}))
""")


def _write_pair(root: Path, blocks: int) -> tuple[Path, Path]:
    """Two fp16 single files of `blocks` 4096x2048 UNet tensors (16 MB each) and a small text-encoder one."""
    from loraforge.formats.safetensors_io import SafetensorsWriter

    names = [f"model.diffusion_model.blocks.{i}.weight" for i in range(blocks)] + ["cond_stage_model.transformer.w"]
    shapes = [(4096, 2048)] * blocks + [(8, 8)]
    paths = []
    for seed, name in ((1, "a"), (2, "b")):
        gen = torch.Generator().manual_seed(seed)
        path = root / f"{name}{blocks}.safetensors"
        with SafetensorsWriter(path, [(n, s, torch.float16) for n, s in zip(names, shapes)]) as w:
            for n, s in zip(names, shapes):
                w.write(n, torch.randn(s, generator=gen).half())
        paths.append(path)
    return paths[0], paths[1]


def _merge_peak(root: Path, a: Path, b: Path, out: Path) -> dict:
    result = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(a), str(b), str(out), str(root / "home")],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="peak RSS is read from /proc")
def test_streamed_merge_peak_memory_stays_small(tmp_path):
    small = _merge_peak(tmp_path, *_write_pair(tmp_path, 4), tmp_path / "small.safetensors")
    a, b = _write_pair(tmp_path, 20)
    numbers = _merge_peak(tmp_path, a, b, tmp_path / "out.safetensors")
    inputs_mb = (a.stat().st_size + b.stat().st_size) / 2**20
    growth = numbers["peak"] - numbers["before"]
    # loading both inputs fully would add their size (≈ 640 MB); the stream adds its scratch buffers, one
    # fp16 row chunk of 256K elements and two fp32 ones (2.5 MB; 13 MB measured), however big the model
    assert growth < 40, f"merge grew peak RSS by {growth:.0f} MB for {inputs_mb:.0f} MB of inputs"
    assert numbers["peak"] < 600, f"merge process peaked at {numbers['peak']:.0f} MB"
    small_growth = small["peak"] - small["before"]
    assert growth < small_growth + 8, (f"peak RSS grew with model size: {small_growth:.0f} MB merging 4 tensors, "
                                        f"{growth:.0f} MB merging 20")
    out, a, b = load_file(tmp_path / "out.safetensors"), load_file(a), load_file(b)
    assert set(out) == set(a)
    for key in ("model.diffusion_model.blocks.3.weight", "model.diffusion_model.blocks.19.weight"):
        torch.testing.assert_close(out[key], ((a[key].float() + b[key].float()) / 2).half())


def _count_hashed_files(monkeypatch) -> list[Path]:
    """Every file loraforge.hashing reads for a digest, from now on."""
    import loraforge.hashing

    hashed: list[Path] = []
    real = loraforge.hashing.sha256_file

    def counting(path):
        hashed.append(Path(path))
        return real(path)

    monkeypatch.setattr(loraforge.hashing, "sha256_file", counting)
    return hashed


def test_output_only_merge_reads_no_input_for_a_digest_and_leaves_nothing_in_the_home(home, variants, tmp_path,
                                                                                      monkeypatch):
    hashed = _count_hashed_files(monkeypatch)
    out = tmp_path / "merged"
    run(home, "merge", "checkpoints", str(variants["a"]), str(variants["b"]), "--alpha", "0.3", "-o", str(out))
    assert hashed == [], "nothing records the inputs' digests, so they are not hashed"
    assert not (home / "cache" / "file-digests.json").exists()
    assert [p for p in (home / "tmp").rglob("*") if p.is_file()] == []
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("merged")) == ["merged"]
    a, b = weights(variants["a"], UNET), weights(variants["b"], UNET)
    torch.testing.assert_close(weights(out, UNET)["conv_in.weight"],
                               (0.7 * a["conv_in.weight"] + 0.3 * b["conv_in.weight"]).half().float())


def test_registry_inputs_keep_their_digests_and_local_ones_are_hashed_once_when_registering(home, variants,
                                                                                           monkeypatch):
    from loraforge.hashing import sha256_folder

    run(home, "registry", "import", str(variants["b"]), "--name", "bmodel", "--kind", "checkpoint")
    hashed = _count_hashed_files(monkeypatch)
    run(home, "merge", "checkpoints", str(variants["c"]), "bmodel:1", "--alpha", "0.3", "--name", "blend")
    local = Path(variants["c"]).resolve()
    assert hashed and all(local in p.parents for p in hashed), "only the local input is read"
    hashed.clear()
    parents = Registry(home).resolve("blend").provenance.parents
    assert parents[0].digest == sha256_folder(variants["c"]) and parents[1].digest == Registry(home).resolve("bmodel").digest
    hashed.clear()
    run(home, "merge", "checkpoints", str(variants["c"]), "bmodel:1", "--alpha", "0.4", "--name", "blend")
    assert hashed == [], "the digest index keeps the local input's digest"


def test_output_is_replaced_whole_and_refused_when_it_cannot_be(home, variants, tmp_path):
    sa, sb = single_file(variants["a"], tmp_path / "a.safetensors"), single_file(variants["b"], tmp_path / "b.safetensors")
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"an older file")
    run(home, "merge", "checkpoints", str(sa), str(sb), "--alpha", "0.25", "-o", str(out))
    assert len(load_file(out)) == len(load_file(sa))
    (tmp_path / "folder").mkdir()
    assert "is a folder" in _error(home, "merge", "checkpoints", str(sa), str(sb), "-o", str(tmp_path / "folder"))
    assert "is a file" in _error(home, "merge", "checkpoints", str(variants["a"]), str(variants["b"]), "-o", str(out))
    empty = tmp_path / "empty"
    empty.mkdir()
    run(home, "merge", "checkpoints", str(variants["a"]), str(variants["b"]), "-o", str(empty))
    assert (empty / UNET).is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]


@pytest.mark.parametrize("layout", ["diffusers", "single_file"])
def test_a_merge_that_fails_midway_leaves_no_output_and_no_partial_file(home, variants, tmp_path, monkeypatch,
                                                                        layout):
    import loraforge.ops.merge
    from loraforge.errors import MergeError

    real, calls = loraforge.ops.merge._merge_tensor, []

    def failing(*args):
        calls.append(1)
        if len(calls) == 3:
            raise MergeError("the disk went away")
        return real(*args)

    monkeypatch.setattr(loraforge.ops.merge, "_merge_tensor", failing)
    if layout == "diffusers":
        a, b, out = str(variants["a"]), str(variants["b"]), tmp_path / "out" / "merged"
    else:
        a = str(single_file(variants["a"], tmp_path / "a.safetensors"))
        b, out = str(single_file(variants["b"], tmp_path / "b.safetensors")), tmp_path / "out" / "m.safetensors"
    out.parent.mkdir()
    assert "the disk went away" in _error(home, "merge", "checkpoints", a, b, "-o", str(out))
    assert list(out.parent.iterdir()) == []


def test_a_registered_merge_is_moved_into_the_blob_store_not_copied(home, variants, monkeypatch):
    from loraforge.registry.blobs import BlobStore

    def copying(*args, **kwargs):
        raise AssertionError("the merged files were copied into the store")

    monkeypatch.setattr(BlobStore, "put_stream", copying)
    run(home, "merge", "checkpoints", str(variants["a"]), str(variants["b"]), "--alpha", "0.3", "--name", "blend")
    folder = Registry(home).checkout(Registry(home).resolve("blend"))
    a, b = weights(variants["a"], UNET), weights(variants["b"], UNET)
    torch.testing.assert_close(weights(folder, UNET)["conv_in.weight"],
                               (0.7 * a["conv_in.weight"] + 0.3 * b["conv_in.weight"]).half().float())
    assert run(home, "registry", "verify").output.endswith("ok\n")
    assert [p for p in (home / "tmp").rglob("*") if p.is_file()] == []
