"""The SVD merge of two LoRAs (ranks 8 and 32, weights 0.6/0.4, to rank 16) over the 128 SD1.5 UNet attention
modules: loraforge's QR + core SVD against the dense SVD of the summed ΔW, idle and next to CPU-bound
processes, in-process and end to end.

- In-process, loraforge: `combine_states(..., "svd", 16)` on all 128 modules, best of 3 (BENCH_LOWRANK_REPEAT).
- In-process, dense: PEFT's `add_weighted_adapter(combination_type="svd")` (its defaults), one module of
  each of the 6 distinct shapes timed and multiplied by how many modules have that shape (a full run
  takes a minute or more); its result is checked against loraforge's. It is timed idle only: next to busy
  processes torch's threads make it many times slower still (minutes), so the busy figure is compared
  with the idle dense one, which flatters the baseline.
- "Busy": one `while True: pass` process per CPU runs for the duration (a training daemon next to a merge).
  BENCH_LOWRANK_UNPINNED=1 adds, busy, one run of loraforge's merge with every problem on torch's threads
  (`loraforge.ops.threads.SMALL_FLOPS = 0`), as it ran before small problems got one thread (10–40 s).
- End to end: `python -m loraforge merge loras A=0.6 B=0.4 --method svd --rank 16 --name m` on two kohya
  files, against a `python -c` script that loads the same files with safetensors, sums ΔW and takes its
  SVD (kohya's svd_merge_lora): the script times the SVD of one module per shape and its wall time is
  extrapolated the same way. Both are timed idle from spawning the process to its exit (loraforge best
  of 2, the dense script once).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from benchmarks import Figure, best_of
from benchmarks.bench_merge import lora_shapes, sd15_shapes

TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
RANKS = (8, 32)
WEIGHTS = (0.6, 0.4)
RANK = 16
LABELS = ("one", "two")  # PEFT adapter names

# kohya's svd_merge_lora, per module: dense ΔW = Σ wᵢ·scaleᵢ·upᵢ·downᵢ, full SVD, truncate. The SVD runs on the
# first module of each shape only; the others count as that one's time (the script reports both walls).
DENSE_SCRIPT = """
import json, sys, time
start = time.perf_counter()
import torch
from safetensors.torch import load_file, save_file
paths, weights, rank, out = sys.argv[1:3], (0.6, 0.4), int(sys.argv[3]), sys.argv[4]
files = [load_file(p) for p in paths]
modules = sorted({k.rsplit(".", 2)[0] for k in files[0] if k.endswith(".lora_down.weight")})
timed, per_shape, skipped, result = {}, {}, 0.0, {}
for name in modules:
    delta = 0
    for f, w in zip(files, weights):
        down, up = f[name + ".lora_down.weight"].float(), f[name + ".lora_up.weight"].float()
        delta = delta + w * float(f[name + ".alpha"]) / down.shape[0] * (up @ down)
    shape = tuple(delta.shape)
    if shape in timed:
        skipped += timed[shape]
        continue
    t = time.perf_counter()
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    result[name + ".lora_up.weight"] = (u[:, :rank] * s[:rank]).contiguous()
    result[name + ".lora_down.weight"] = vh[:rank].contiguous()
    timed[shape] = time.perf_counter() - t
save_file(result, out)
wall = time.perf_counter() - start
print(json.dumps({"wall": wall, "extrapolated": wall + skipped}))
"""


@contextmanager
def busy(processes: int):
    """`processes` CPU-bound python processes running for the duration of the block."""
    children = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(processes)]
    time.sleep(0.5)  # let them reach the scheduler before anything is timed
    try:
        yield
    finally:
        for child in children:
            child.kill()
            child.wait()


def adapters():
    from loraforge.synthetic import random_lora

    targets = {"unet": lora_shapes(sd15_shapes())["unet"]}
    return [random_lora(targets, rank=r, alpha=float(r) / 2, targets=TARGETS, components=("unet",), seed=seed,
                        std=0.05) for seed, r in zip((1, 2), RANKS)]


def peft_module(states, name):
    """A one-layer PEFT model holding the two adapters of module `name` as adapters "a" and "b"."""
    from peft import LoraConfig, get_peft_model

    m, n = states[0][name].weight_shape
    base = torch.nn.Sequential()
    base.add_module("proj", torch.nn.Linear(n, m, bias=False))
    model = None
    for label, state in zip(LABELS, states):
        module = state[name]
        config = LoraConfig(r=module.rank, lora_alpha=module.alpha, target_modules=["proj"], init_lora_weights=False)
        if model is None:
            model = get_peft_model(base, config, adapter_name=label)
        else:
            model.add_adapter(label, config)
        with torch.no_grad():
            model.base_model.model.proj.lora_A[label].weight.copy_(module.down)
            model.base_model.model.proj.lora_B[label].weight.copy_(module.up)
    return model


def peft_svd_merge(states, by_shape: dict) -> tuple[float, dict]:
    """Seconds of PEFT's svd `add_weighted_adapter` extrapolated to every module, and ΔW of each module timed."""
    total, deltas = 0.0, {}
    for shape, names in by_shape.items():
        model = peft_module(states, names[0])
        t = time.perf_counter()
        model.add_weighted_adapter(list(LABELS), list(WEIGHTS), "merged", combination_type="svd", svd_rank=RANK)
        total += (time.perf_counter() - t) * len(names)
        deltas[names[0]] = model.base_model.model.proj.get_delta_weight("merged").detach()
    return total, deltas


def process_seconds(argv: list[str], env=None) -> float:
    t = time.perf_counter()
    result = subprocess.run(argv, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t
    if result.returncode != 0:
        raise RuntimeError(result.stdout[-2000:] + result.stderr[-3000:])
    return seconds


def main() -> list[Figure]:
    from loraforge.formats import write_adapter
    from loraforge.ops.lora_merge import combine_states

    repeat = max(1, int(os.environ.get("BENCH_LOWRANK_REPEAT", "3")))
    states = adapters()
    by_shape: dict = {}
    for name in sorted(states[0]):
        by_shape.setdefault(states[0][name].weight_shape, []).append(name)
    n = len(states[0])
    cpus = os.cpu_count() or 2

    def ours():
        return combine_states(states, list(WEIGHTS), "svd", RANK)

    merged = ours()
    _, peft_deltas = peft_svd_merge(states, by_shape)
    agree = max(float((merged[k].delta() - d).norm() / d.norm()) for k, d in peft_deltas.items())
    idle = best_of(ours, repeat)
    dense_idle = peft_svd_merge(states, by_shape)[0]  # once more: the first run above built PEFT's caches
    unpinned = None
    with busy(cpus):
        contended = best_of(ours, repeat)
        if os.environ.get("BENCH_LOWRANK_UNPINNED") == "1":
            from loraforge.ops import threads

            small, threads.SMALL_FLOPS = threads.SMALL_FLOPS, 0.0
            try:
                unpinned = best_of(ours, 1)
            finally:
                threads.SMALL_FLOPS = small

    with tempfile.TemporaryDirectory(prefix="bench-lowrank-") as tmp:
        files = [Path(tmp) / f"{label}.safetensors" for label in "ab"]
        for state, path in zip(states, files):
            write_adapter(state, path, "kohya")
        cli = [sys.executable, "-m", "loraforge", "--home", str(Path(tmp) / "home"), "merge", "loras",
               *(f"{p}={w}" for p, w in zip(files, WEIGHTS)), "--method", "svd", "--rank", str(RANK), "--name"]
        e2e = min(process_seconds(cli + [f"m{i}"]) for i in range(2))
        out = subprocess.run([sys.executable, "-c", DENSE_SCRIPT, *map(str, files), str(RANK),
                              str(Path(tmp) / "dense.safetensors")], capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(out.stderr[-3000:])
        dense_e2e = json.loads(out.stdout.strip().splitlines()[-1])["extrapolated"]

    print(f"SVD merge of 2 LoRAs (ranks {RANKS[0]}, {RANKS[1]}) over the {n} SD1.5 UNet attention modules to "
          f"rank {RANK}; {cpus} busy processes for 'busy'; PEFT's ΔW vs loraforge's: rel. difference {agree:.1e}")
    note = f"dense: {len(by_shape)} shapes timed, x module count"
    figures = [
        Figure(f"SVD merge, {n} SD1.5 modules, idle", idle, "PEFT add_weighted_adapter svd, idle", dense_idle,
               note=note),
        Figure(f"SVD merge, {n} SD1.5 modules, {cpus} busy processes", contended,
               "PEFT add_weighted_adapter svd, idle", dense_idle, goal="<= 1 s under contention",
               met=contended <= 1.0, note=note + "; dense busy is slower still"),
    ]
    if unpinned is not None:
        figures.append(Figure(f"SVD merge, {n} SD1.5 modules, busy", contended,
                              "same, every problem on torch's threads, busy", unpinned, note="one run"))
    return figures + [
        Figure("loraforge merge loras A B --method svd (process)", e2e,
               "load, dense ΔW SVD, save (process)", dense_e2e, goal=">= 20x dense end to end",
               met=dense_e2e / e2e >= 20, note="dense: SVD of one module per shape timed, x module count"),
    ]


if __name__ == "__main__":
    from benchmarks import summary

    print(summary(main()))
