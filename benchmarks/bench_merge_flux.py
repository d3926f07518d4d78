"""Streamed Flux checkpoint merges on FLUX.1-dev-shaped random bf16 weights: a slice of the real model (its real
widths: hidden 3072, MLP 12288, 24 heads of 128, T5 context 4096; fewer blocks), as Black Forest Labs single
files and as a diffusers folder. The engine (`merge_checkpoints`) against the naive merge that loads both files
whole, side by side: wall seconds, peak RSS, throughput (GB of input read per second).

`python -m benchmarks merge_flux` runs it (2 double + 4 single blocks, 2.6 GB a file, about 11 % of the 12 B
model); `python -m benchmarks.bench_merge_flux --gb 8` sizes the slice to about that many GB a file (the
double : single ratio kept at 1 : 2). BENCH_DIR keeps the inputs for later runs (default: a temp dir).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.bench_merge import PEAK, child, table

HIDDEN, MLP, HEAD, IN_CHANNELS, CONTEXT, POOLED, TIME = 3072, 12288, 128, 64, 4096, 768, 256
DEV_DOUBLE, DEV_SINGLE = 19, 38


def bfl_shapes(double: int, single: int) -> dict[str, tuple[int, ...]]:
    """{BFL key: shape} of FLUX.1-dev with `double` double and `single` single blocks (guidance embedder kept)."""
    linear = {"img_in": (HIDDEN, IN_CHANNELS), "txt_in": (HIDDEN, CONTEXT), "time_in.in_layer": (HIDDEN, TIME),
              "time_in.out_layer": (HIDDEN, HIDDEN), "vector_in.in_layer": (HIDDEN, POOLED),
              "vector_in.out_layer": (HIDDEN, HIDDEN), "guidance_in.in_layer": (HIDDEN, TIME),
              "guidance_in.out_layer": (HIDDEN, HIDDEN), "final_layer.linear": (IN_CHANNELS, HIDDEN),
              "final_layer.adaLN_modulation.1": (2 * HIDDEN, HIDDEN)}
    norms = []
    for i in range(double):
        for side in ("img", "txt"):
            p = f"double_blocks.{i}.{side}_"
            linear.update({p + "attn.qkv": (3 * HIDDEN, HIDDEN), p + "attn.proj": (HIDDEN, HIDDEN),
                           p + "mlp.0": (MLP, HIDDEN), p + "mlp.2": (HIDDEN, MLP), p + "mod.lin": (6 * HIDDEN, HIDDEN)})
            norms += [p + "attn.norm.query_norm", p + "attn.norm.key_norm"]
    for i in range(single):
        p = f"single_blocks.{i}."
        linear.update({p + "linear1": (3 * HIDDEN + MLP, HIDDEN), p + "linear2": (HIDDEN, HIDDEN + MLP),
                       p + "modulation.lin": (3 * HIDDEN, HIDDEN)})
        norms += [p + "norm.query_norm", p + "norm.key_norm"]
    shapes = {}
    for name, shape in linear.items():
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = shape, (shape[0],)
    shapes.update({f"{n}.scale": (HEAD,) for n in norms})
    return shapes


def params_of(shapes) -> int:
    return sum(torch.Size(s).numel() for s in shapes.values())


def blocks_for(gb: float) -> tuple[int, int]:
    """The largest (k double, 2k single) slice whose bf16 file is at most `gb` GB (at least one of each)."""
    k = 1
    while k < DEV_DOUBLE and params_of(bfl_shapes(k + 1, 2 * (k + 1))) * 2 <= gb * 1e9:
        k += 1
    return k, min(2 * k, DEV_SINGLE)


def write_random(path: Path, shapes: dict[str, tuple[int, ...]], seed: int) -> None:
    """A bf16 safetensors file of `shapes`, tensor by tensor; values are windows of one seeded random pool (what
    is merged does not change the work, and drawing 10⁹ normals would dominate the run)."""
    from loraforge.formats.safetensors_io import SafetensorsWriter

    pool = (torch.randn(1 << 24, generator=torch.Generator().manual_seed(seed)) * 0.02).to(torch.bfloat16)
    with SafetensorsWriter(path, [(k, s, torch.bfloat16) for k, s in shapes.items()]) as writer:
        for i, (key, shape) in enumerate(shapes.items()):
            n = torch.Size(shape).numel()
            start = (i * 7919) % (pool.numel() // 2)
            flat = pool[start:start + n] if n <= pool.numel() - start else pool.repeat(n // pool.numel() + 2)[start:start + n]
            writer.write(key, flat.reshape(shape))


def write_diffusers_folder(single: Path, folder: Path) -> None:
    """BFL file `single` as the transformer of a diffusers Flux folder (weights through models.flux_single_file,
    one tensor at a time) with the model_index and transformer config a merge reads."""
    from loraforge.formats.safetensors_io import SafetensorsWriter, TensorFile
    from loraforge.models.flux_single_file import assemble, diffusers_plans

    (folder / "transformer").mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline",
                                                         "transformer": ["diffusers", "FluxTransformer2DModel"]}))
    with TensorFile(single) as f:
        plans, _ = diffusers_plans({k: e.shape for k, e in f.entries.items()})
        double = max(int(k.split(".")[1]) for k in plans if k.startswith("transformer_blocks.")) + 1
        single_n = max(int(k.split(".")[1]) for k in plans if k.startswith("single_transformer_blocks.")) + 1
        (folder / "transformer" / "config.json").write_text(json.dumps({
            "_class_name": "FluxTransformer2DModel", "patch_size": 1, "in_channels": IN_CHANNELS, "num_layers": double,
            "num_single_layers": single_n, "attention_head_dim": HEAD, "num_attention_heads": HIDDEN // HEAD,
            "joint_attention_dim": CONTEXT, "pooled_projection_dim": POOLED, "guidance_embeds": True}))
        entries = [(k, p.shape, torch.bfloat16) for k, p in plans.items()]
        with SafetensorsWriter(folder / "transformer" / "diffusion_pytorch_model.safetensors", entries) as writer:
            for key, plan in plans.items():
                writer.write(key, assemble(plan, lambda k, r: f.get(k, r if f.entries[k].shape else None)))


NAIVE = """
import json, resource, sys, time
{PEAK}import torch
torch.set_num_threads(2)
from safetensors.torch import load_file, save_file
a_path, b_path, out = sys.argv[1:4]
t = time.perf_counter()
a, b = load_file(a_path), load_file(b_path)
merged = {k: a[k].float().mul_(0.7).add_(b[k].float(), alpha=0.3).to(torch.bfloat16) for k in a}
save_file(merged, out)
print(json.dumps({"seconds": time.perf_counter() - t, "peak": peak_rss()}))
""".replace("{PEAK}", PEAK)

ENGINE = """
import json, resource, sys, time
{PEAK}import torch
torch.set_num_threads(2)
from loraforge.ops.merge import merge_checkpoints
from loraforge.ops.specs import CheckpointMergeSpec, ModelInput
from loraforge.registry import Registry
a_path, b_path, out, home = sys.argv[1:5]
spec = CheckpointMergeSpec(models=[ModelInput(ref=a_path), ModelInput(ref=b_path)], alpha=0.3, dtype="bf16")
t = time.perf_counter()
merge_checkpoints(Registry(home), spec, output=out)
print(json.dumps({"seconds": time.perf_counter() - t, "peak": peak_rss()}))
""".replace("{PEAK}", PEAK)


def _holds(path: Path, shapes) -> bool:
    """Whether `path` is an input of these shapes already (a kept BENCH_DIR)."""
    from loraforge.formats.safetensors_io import tensor_shapes

    return path.exists() and dict(tensor_shapes(path)) == shapes


def same_tensors(x: Path, y: Path) -> bool:
    from safetensors import safe_open

    with safe_open(str(x), "pt") as f, safe_open(str(y), "pt") as g:
        return set(f.keys()) == set(g.keys()) and all(torch.equal(f.get_tensor(k), g.get_tensor(k)) for k in f.keys())


def run(scratch: Path, double: int, single: int) -> list:
    from benchmarks import Figure

    shapes = bfl_shapes(double, single)
    params = params_of(shapes)
    full = params_of(bfl_shapes(DEV_DOUBLE, DEV_SINGLE))
    a, b, folder = scratch / "a.safetensors", scratch / "b.safetensors", scratch / "b-folder"
    if not all(_holds(p, shapes) for p in (a, b)) or not (folder / "model_index.json").exists():
        shutil.rmtree(folder, ignore_errors=True)  # inputs of another size, or none yet
        for path, seed in ((a, 1), (b, 2)):
            write_random(path, shapes, seed)
        write_diffusers_folder(b, folder)
    home = scratch / "home"
    out = {side: scratch / f"{side}.safetensors" for side in ("naive", "engine", "mixed")}
    folder_file = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    sides = {"engine": ((a, b), lambda: child(ENGINE, str(a), str(b), str(out["engine"]), str(home))),
             "mixed": ((a, folder_file), lambda: child(ENGINE, str(a), str(folder), str(out["mixed"]), str(home))),
             "naive": ((a, b), lambda: child(NAIVE, str(a), str(b), str(out["naive"])))}
    runs = {}
    for side, (inputs, go) in sides.items():
        os.sync()  # what the side before wrote is on disk, not flushed during this one
        for path in inputs:  # each side starts with its inputs in the page cache
            with open(path, "rb") as f:
                while f.read(64 << 20):
                    pass
        runs[side] = go()
    same = same_tensors(out["engine"], out["naive"]) and same_tensors(out["engine"], out["mixed"])
    gb, mb = 1e9, 1 << 20
    read = 2 * a.stat().st_size / gb
    rate = {side: read / r["seconds"] for side, r in runs.items()}
    table(f"weighted sum (alpha 0.3, bf16) of two FLUX.1-dev-shaped transformers: {double} double + {single} single "
          f"blocks at the real widths, {params / 1e9:.2f} B params ({100 * params / full:.0f} % of the "
          f"{full / 1e9:.1f} B model), {a.stat().st_size / gb:.2f} GB a file; outputs identical tensor for tensor: "
          f"{same}. Timed in their process from opening the inputs to the written output (the engine fsyncs it, "
          "naive does not); throughput = GB of input read per second",
          ["approach", "wall s", "GB/s", "peak RSS MB"],
          [["naive (load both files, add, save)", f"{runs['naive']['seconds']:.1f}", f"{rate['naive']:.2f}",
            f"{runs['naive']['peak'] / mb:.0f}"],
           ["engine, two BFL files", f"{runs['engine']['seconds']:.1f}", f"{rate['engine']:.2f}",
            f"{runs['engine']['peak'] / mb:.0f}"],
           ["engine, BFL file + diffusers folder (fused qkv/linear1 streamed from q/k/v rows)",
            f"{runs['mixed']['seconds']:.1f}", f"{rate['mixed']:.2f}", f"{runs['mixed']['peak'] / mb:.0f}"],
           ["ratio naive / engine", f"{runs['naive']['seconds'] / runs['engine']['seconds']:.2f}x", "",
            f"{runs['naive']['peak'] / runs['engine']['peak']:.1f}x"]])
    for path in out.values():
        path.unlink(missing_ok=True)
    shutil.rmtree(home, ignore_errors=True)
    note = (f"peak RSS {runs['engine']['peak'] / mb:.0f} MB vs {runs['naive']['peak'] / mb:.0f} MB; "
            f"{rate['engine']:.2f} GB/s read; {100 * params / full:.0f} % of FLUX.1-dev")
    return [
        Figure("streamed Flux merge, BFL files (in process)", runs["engine"]["seconds"],
               "naive load/add/save (in process)", runs["naive"]["seconds"], note=note),
        Figure("streamed Flux merge, BFL file + diffusers folder", runs["mixed"]["seconds"],
               "the same merge of two BFL files", runs["engine"]["seconds"],
               note=f"peak RSS {runs['mixed']['peak'] / mb:.0f} MB"),
    ]


def main(argv: list[str] | None = None) -> list:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_merge_flux")
    parser.add_argument("--gb", type=float, help="size of each input in GB (default: 2 double + 4 single blocks)")
    args = parser.parse_args(argv if argv is not None else [])
    torch.set_num_threads(2)
    double, single = blocks_for(args.gb) if args.gb else (2, 4)
    root = os.environ.get("BENCH_DIR")
    scratch = Path(root) if root else Path(tempfile.mkdtemp(prefix="bench-merge-flux-"))
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        return run(scratch, double, single)
    finally:
        if not root:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
