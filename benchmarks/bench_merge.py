"""Merge-engine benchmarks on real SD1.5 shapes (random weights): the checkpoint-merge CLI vs its engine, the
I/O limit and a naive merge; QR+core-SVD LoRA merge vs dense SVD; randomized vs full SVD extraction. Prints
side-by-side ratios.

Environment: BENCH_DIR (scratch folder, default a temp dir; the two 2 GB inputs are kept there and
reused by later runs), BENCH_MERGE_ONLY (which benchmarks to run, e.g. "1" or "2,3"; default all),
BENCH_REPEAT (runs of each side of benchmark 1 — naive, engine, CLI, I/O limit — interleaved in
alternating order; the best of each is reported, default 2), BENCH_EXTRACT_MODULES (modules timed for
extraction, default 24).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

PREFIX = {"unet": "model.diffusion_model.", "text_encoder": "cond_stage_model.transformer.", "vae": "first_stage_model."}


def sd15_shapes() -> dict[str, dict[str, tuple[int, ...]]]:
    """{component: {key: shape}} of the real SD1.5 UNet, VAE and CLIP text encoder (built on the meta device)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from loraforge.models.builtin import sd15_configs

    cfg = sd15_configs()
    with torch.device("meta"):
        models = {"unet": UNet2DConditionModel(**cfg["unet"]), "vae": AutoencoderKL(**cfg["vae"]),
                  "text_encoder": CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"]))}
    return {c: {k: tuple(v.shape) for k, v in m.state_dict().items()} for c, m in models.items()}


def write_random_checkpoint(path: Path, shapes, seed: int) -> int:
    """A single-file fp16 checkpoint with A1111 prefixes, written tensor by tensor; returns #params."""
    from loraforge.formats.safetensors_io import SafetensorsWriter

    entries = [(PREFIX[c] + k, s, torch.float16) for c in shapes for k, s in shapes[c].items()]
    gen = torch.Generator().manual_seed(seed)
    total = 0
    with SafetensorsWriter(path, entries) as writer:
        for name, shape, _ in entries:
            writer.write(name, (torch.randn(shape, generator=gen) * 0.02).half())
            total += torch.Size(shape).numel()
    return total


# Peak RSS from VmHWM, which starts afresh at exec. ru_maxrss does not: Linux carries the high-water mark of
# the memory the child had before exec over, i.e. the parent's resident set when it spawned the child, so
# a child started from this (torch, diffusers, model shapes) process would report several hundred MB it
# never used.
PEAK = """
def peak_rss():
    try:
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
"""

NAIVE = """
import json, resource, sys, time
{PEAK}import torch
torch.set_num_threads(2)
from safetensors.torch import load_file, save_file
a_path, b_path, out = sys.argv[1:4]
t = time.perf_counter()
a, b = load_file(a_path), load_file(b_path)
merged = {}
for k in a:
    if k.startswith("first_stage_model."):
        merged[k] = a[k]
    else:
        merged[k] = a[k].float().mul_(1 - 0.3).add_(b[k].float(), alpha=0.3).half()
save_file(merged, out)
print(json.dumps({"seconds": time.perf_counter() - t, "peak": peak_rss()}))
""".replace("{PEAK}", PEAK)

ENGINE = """
import json, resource, sys, time
{PEAK}from pathlib import Path
import torch
torch.set_num_threads(2)
from loraforge.ops.merge import merge_checkpoints
from loraforge.ops.specs import CheckpointMergeSpec, ModelInput
from loraforge.registry import Registry
a_path, b_path, out, home = sys.argv[1:5]
registry = Registry(home)
spec = CheckpointMergeSpec(models=[ModelInput(ref=a_path), ModelInput(ref=b_path)], alpha=0.3, dtype="fp16")
t = time.perf_counter()
merge_checkpoints(registry, spec, output=out)
print(json.dumps({"seconds": time.perf_counter() - t, "peak": peak_rss()}))
""".replace("{PEAK}", PEAK)

# What any merge of these files must do at least: read both inputs and write (and sync) one output of the
# result's size, in 16 MB blocks, with no arithmetic.
IO_LIMIT = """
import json, os, sys, time
a_path, b_path, out, size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
block = 16 << 20
t = time.perf_counter()
buf_a, buf_b = bytearray(block), bytearray(block)
with open(a_path, "rb", buffering=0) as fa, open(b_path, "rb", buffering=0) as fb, open(out, "wb") as fo:
    written = 0
    while True:
        n = fa.readinto(buf_a)
        fb.readinto(buf_b)
        if not n:
            break
        m = min(n, size - written)
        if m > 0:
            fo.write(memoryview(buf_a)[:m])
            written += m
    if written < size:
        fo.write(bytes(size - written))
    fo.flush()
    os.fsync(fo.fileno())
fd = os.open(os.path.dirname(os.path.abspath(out)), os.O_RDONLY)
os.fsync(fd)
os.close(fd)
print(json.dumps({"seconds": time.perf_counter() - t, "peak": 0}))
"""


def cli_run(a: Path, b: Path, out: Path, home: Path) -> dict:
    """`loraforge merge checkpoints A B --method weighted_sum --alpha 0.3 -o OUT`, timed as a whole process."""
    env = {**os.environ, "OMP_NUM_THREADS": "2", "LORAFORGE_HOME": str(home)}
    t = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "loraforge", "merge", "checkpoints", str(a), str(b),
                             "--method", "weighted_sum", "--alpha", "0.3", "-o", str(out)],
                            capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    return {"seconds": seconds, "peak": 0}


def child(code: str, *args: str) -> dict:
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "2"})
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def table(title: str, headers: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(r[i])) for r in [headers] + rows) for i in range(len(headers))]
    print(title)
    for r in [headers] + rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    print()


def _has_checkpoint(path: Path, shapes) -> bool:
    """Whether `path` already holds the random checkpoint of these shapes (to reuse a BENCH_DIR)."""
    from loraforge.formats.safetensors_io import TensorFile

    if not path.exists():
        return False
    try:
        with TensorFile(path) as f:
            return {k: v.shape for k, v in f.entries.items()} == {
                PREFIX[c] + k: s for c in shapes for k, s in shapes[c].items()}
    except Exception:
        return False


def bench_checkpoint_merge(scratch: Path, shapes, repeat: int) -> list:
    from benchmarks import Figure

    a, b = scratch / "a.safetensors", scratch / "b.safetensors"
    params = sum(torch.Size(s).numel() for c in shapes.values() for s in c.values())
    for path, seed in ((a, 1), (b, 2)):
        if not _has_checkpoint(path, shapes):
            write_random_checkpoint(path, shapes, seed)
    size = a.stat().st_size
    # warm the page cache the same way for every run
    for p in (a, b):
        with open(p, "rb") as f:
            while f.read(64 << 20):
                pass
    home = scratch / "home"
    out = {side: scratch / f"{side}.safetensors" for side in ("naive", "engine", "cli", "io")}
    # the I/O limit writes as many bytes as input a: the result is as big but for its few bytes of metadata
    # (fp16 in, fp16 out, the VAE copied)
    sides = {
        "naive": lambda: child(NAIVE, str(a), str(b), str(out["naive"])),
        "engine": lambda: child(ENGINE, str(a), str(b), str(out["engine"]), str(home)),
        "cli": lambda: cli_run(a, b, out["cli"], home),
        "io": lambda: child(IO_LIMIT, str(a), str(b), str(out["io"]), str(size)),
    }
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    # the machine is shared, so interleave the sides (rotating the order) and keep the best of each
    names = list(sides)
    for i in range(repeat):
        for side in (names if i % 2 == 0 else names[::-1]):
            os.sync()  # what an earlier side left unsynced (the naive one syncs nothing) is not timed here
            runs[side].append(sides[side]())
    best = {side: min(runs[side], key=lambda r: r["seconds"]) for side in sides}
    peak = {side: max(r["peak"] for r in runs[side]) for side in sides}
    from safetensors import safe_open

    with safe_open(str(out["naive"]), "pt") as f1, safe_open(str(out["engine"]), "pt") as f2, \
            safe_open(str(out["cli"]), "pt") as f3:
        same = set(f1.keys()) == set(f2.keys()) == set(f3.keys()) and all(
            torch.equal(f1.get_tensor(k), f2.get_tensor(k)) and torch.equal(f2.get_tensor(k), f3.get_tensor(k))
            for k in f1.keys())
    result_size = out["engine"].stat().st_size
    mb = 1 << 20
    times = lambda side: " / ".join(f"{r['seconds']:.1f}" for r in runs[side])  # noqa: E731
    secs = {side: best[side]["seconds"] for side in sides}
    table(f"1. weighted sum of two SD1.5-shaped fp16 single files ({params / 1e9:.3f} B params, "
          f"{size / mb:.0f} MB each, result {result_size / mb:.0f} MB; naive, engine and CLI outputs identical "
          f"tensor for tensor: {same}); best of {repeat} interleaved runs each (all runs in brackets). naive and "
          "engine are timed in their process from opening the inputs to the written output, imports excluded; "
          "the CLI as a whole process (start-up, imports, resolving the inputs); the I/O limit reads both "
          "inputs and writes and fsyncs one file of the result's size. All but naive fsync their output",
          ["approach", "wall s", "peak RSS MB"],
          [["naive (load both, add, save)", f"{secs['naive']:.1f} ({times('naive')})", f"{peak['naive'] / mb:.0f}"],
           ["engine (merge_checkpoints in process)", f"{secs['engine']:.1f} ({times('engine')})",
            f"{peak['engine'] / mb:.0f}"],
           ["CLI (loraforge merge checkpoints -o)", f"{secs['cli']:.1f} ({times('cli')})", ""],
           ["I/O limit (read both, write + fsync)", f"{secs['io']:.1f} ({times('io')})", ""],
           ["ratio naive / engine", f"{secs['naive'] / secs['engine']:.2f}x", f"{peak['naive'] / peak['engine']:.1f}x"],
           ["ratio CLI / engine", f"{secs['cli'] / secs['engine']:.2f}x", ""],
           ["ratio CLI / I/O limit", f"{secs['cli'] / secs['io']:.2f}x", ""]])
    for path in out.values():
        path.unlink(missing_ok=True)
    shutil.rmtree(home, ignore_errors=True)
    return [
        Figure("merge checkpoints A B -o OUT (CLI process)", secs["cli"], "engine alone (in process)",
               secs["engine"], goal="CLI <= 1.3x engine", met=secs["cli"] <= 1.3 * secs["engine"]),
        Figure("merge checkpoints A B -o OUT (CLI process)", secs["cli"], "I/O limit (read both, write + fsync)",
               secs["io"], goal="CLI <= 1.5x I/O limit", met=secs["cli"] <= 1.5 * secs["io"]),
        Figure("streamed merge engine (in process)", secs["engine"], "naive load/add/save (in process)",
               secs["naive"], note=f"peak RSS {peak['engine'] / mb:.0f} MB vs {peak['naive'] / mb:.0f} MB"),
    ]


def lora_shapes(shapes) -> dict[str, dict[str, tuple[int, ...]]]:
    unet = {k[:-7]: s for k, s in shapes["unet"].items()
            if k.endswith((".to_q.weight", ".to_k.weight", ".to_v.weight", ".to_out.0.weight"))}
    te = {k[:-7]: s for k, s in shapes["text_encoder"].items()
          if k.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "out_proj.weight"))}
    return {"unet": unet, "text_encoder": te}


def dense_svd_merge(states, weights, rank):
    """What kohya's svd_merge_lora and PEFT's svd combination do: dense ΔW, full SVD, truncate."""
    out = {}
    for name in states[0]:
        delta = sum(w * s[name].delta().flatten(1) for s, w in zip(states, weights))
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        out[name] = (u[:, :rank] * s[:rank], vh[:rank])
    return out


def bench_lora_svd(shapes) -> None:
    from loraforge.ops.lora_merge import combine_states
    from loraforge.synthetic import random_lora

    targets = lora_shapes(shapes)
    states = [random_lora(targets, rank=32, targets=("to_q", "to_k", "to_v", "to_out.0", "q_proj", "k_proj",
                                                    "v_proj", "out_proj"), components=("unet", "text_encoder"),
                          seed=s, std=0.05) for s in (1, 2, 3)]
    weights = [0.5, 0.3, -0.2]
    n = len(states[0])

    def errors(get):
        num = den = 0.0
        for name in states[0]:
            exact = sum(w * s[name].delta().double().flatten(1) for s, w in zip(states, weights))
            num += float((get(name) - exact).norm() ** 2)
            den += float(exact.norm() ** 2)
        return (num / den) ** 0.5

    t = time.perf_counter()
    ours = combine_states(states, weights, "svd", 32)
    t_ours = time.perf_counter() - t
    t = time.perf_counter()
    dense = dense_svd_merge(states, weights, 32)
    t_dense = time.perf_counter() - t
    e_ours = errors(lambda name: ours[name].delta().double().flatten(1))
    e_dense = errors(lambda name: (dense[name][0] @ dense[name][1]).double())
    t = time.perf_counter()
    full = combine_states(states, weights, "svd", 96)
    t_full = time.perf_counter() - t
    e_full = errors(lambda name: full[name].delta().double().flatten(1))
    table(f"2. SVD merge of 3 rank-32 SD1.5 LoRAs ({n} modules, weights 0.5/0.3/-0.2)",
          ["approach", "target rank", "wall s", "rel. Frobenius error vs exact sum"],
          [["dense ΔW + torch.linalg.svd", "32", f"{t_dense:.2f}", f"{e_dense:.3e}"],
           ["QR + core SVD (loraforge)", "32", f"{t_ours:.2f}", f"{e_ours:.3e}"],
           ["QR + core SVD (loraforge)", "96", f"{t_full:.2f}", f"{e_full:.3e}"],
           ["speed-up dense / loraforge", "32", f"{t_dense / t_ours:.1f}x", f"error ratio {e_ours / e_dense:.4f}"]])


def bench_extract(shapes, modules: int) -> None:
    from loraforge.ops.lowrank import dense_factors

    # every distinct linear shape of the SD1.5 UNet and text encoder, then a spread of the rest
    linear = [(c, k, s) for c in ("unet", "text_encoder") for k, s in shapes[c].items()
              if len(s) == 2 and k.endswith(".weight") and "embedding" not in k]
    by_shape = {}
    for item in linear:
        by_shape.setdefault(item[2], item)
    chosen = list(by_shape.values())
    step = max(1, len(linear) // max(1, modules - len(chosen)))
    chosen += [x for x in linear[::step] if x not in chosen][: max(0, modules - len(chosen))]
    gen = torch.Generator().manual_seed(0)
    t_rand = t_full = 0.0
    err_rand = err_full = 0.0
    for _, _, (m, n) in chosen:
        # a fine-tune delta: a decaying spectrum of rank 128 plus noise
        k = min(128, m, n)
        u = torch.linalg.qr(torch.randn(m, k, generator=gen))[0]
        v = torch.linalg.qr(torch.randn(n, k, generator=gen))[0]
        s = 0.05 * torch.exp(-torch.arange(k, dtype=torch.float32) / 12)
        delta = (u * s) @ v.T + 1e-4 * torch.randn(m, n, generator=gen)
        t = time.perf_counter()
        b, a, _ = dense_factors(delta, 32, randomized=True)
        t_rand += time.perf_counter() - t
        err_rand += float((b @ a - delta).norm() ** 2)
        t = time.perf_counter()
        uu, ss, vh = torch.linalg.svd(delta, full_matrices=False)
        approx = (uu[:, :32] * ss[:32]) @ vh[:32]
        t_full += time.perf_counter() - t
        err_full += float((approx - delta).norm() ** 2)
    scale = len(linear) / len(chosen)
    table(f"3. extract rank 32: {len(chosen)} of the {len(linear)} SD1.5 linear layers timed "
          f"(all {len(by_shape)} distinct shapes); full-model time extrapolated x{scale:.1f}",
          ["approach", "wall s (timed)", "≈ full model s", "residual norm (sum)"],
          [["full torch.linalg.svd", f"{t_full:.2f}", f"{t_full * scale:.0f}", f"{err_full ** 0.5:.4e}"],
           ["randomized range finder (loraforge)", f"{t_rand:.2f}", f"{t_rand * scale:.0f}", f"{err_rand ** 0.5:.4e}"],
           ["ratio full / randomized", f"{t_full / t_rand:.1f}x", "", f"error ratio {(err_rand / err_full) ** 0.5:.4f}"]])


def main() -> list:
    torch.set_num_threads(2)
    only = {x.strip() for x in os.environ.get("BENCH_MERGE_ONLY", "1,2,3").split(",") if x.strip()}
    shapes = sd15_shapes()
    figures = []
    if "1" in only:
        root = os.environ.get("BENCH_DIR")
        scratch = Path(root) if root else Path(tempfile.mkdtemp(prefix="bench-merge-"))
        scratch.mkdir(parents=True, exist_ok=True)
        try:
            figures += bench_checkpoint_merge(scratch, shapes, max(1, int(os.environ.get("BENCH_REPEAT", "2"))))
        finally:
            if not root:
                shutil.rmtree(scratch, ignore_errors=True)
    if "2" in only:
        bench_lora_svd(shapes)
    if "3" in only:
        bench_extract(shapes, int(os.environ.get("BENCH_EXTRACT_MODULES", "24")))
    return figures


if __name__ == "__main__":
    main()
