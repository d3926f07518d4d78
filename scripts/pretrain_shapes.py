"""Pretrain `builtin:shapes` from a seed and write it (fp16, a diffusers folder) with its provenance.

    python scripts/pretrain_shapes.py [--steps N] [--seed S] [--out-dir DIR]

The UNet and the text encoder train on the generator's pretrain split with loraforge's own loop
(`loraforge/train/shapes_pretraining.py`); the committed VAE encodes the images. The folder
(`loraforge/models/builtin/shapes_pipeline/` by default) is what `StableDiffusionPipeline.save_pretrained`
writes, less the VAE (shipped in `loraforge/world/vae/`), plus `pretraining.json`: generator version, seed,
steps, loss curve, wall time, every file's sha256, and the prompt adherence the judge measures on fresh seeds
with the fp16 weights as shipped. `make pretrain` runs it with the defaults the committed weights were built with.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from loraforge.hashing import sha256_file  # noqa: E402
from loraforge.models.builtin.shapes import WORLD_WORDS  # noqa: E402
from loraforge.models.builtin.shapes_files import MODEL_DIR, PROVENANCE_NAME, UNET_WEIGHTS, shipped_files  # noqa: E402
from loraforge.models.builtin.store import quiet_progress_bars, restore_text_model_prefix  # noqa: E402
from loraforge.models.builtin.tokenizer import write_vocab_files  # noqa: E402
from loraforge.world.vocabulary import GENERATOR_VERSION  # noqa: E402


def write_pipeline(pipe, folder: Path, facts: dict) -> dict:
    """`pipe` in fp16 into `folder` (replaced), without its VAE, with the provenance; the facts as written."""
    if folder.exists():
        shutil.rmtree(folder)
    with quiet_progress_bars():
        pipe.to(torch.float16).save_pretrained(folder, safe_serialization=True)
    pipe.to(torch.float32)
    shutil.rmtree(folder / "vae")
    restore_text_model_prefix(folder)
    write_vocab_files(folder, WORLD_WORDS)
    facts = {"generator_version": GENERATOR_VERSION, **facts,
             "weights_sha256": sha256_file(folder / UNET_WEIGHTS),
             "files_sha256": {str(p): sha256_file(folder / p) for p in shipped_files(folder)}}
    (folder / PROVENANCE_NAME).write_text(json.dumps(facts, indent=1) + "\n", encoding="utf-8")
    return facts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--pool", type=int, default=16384)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--out-dir", type=Path, default=MODEL_DIR)
    args = parser.parse_args(argv)

    from loraforge.train.shapes_pretraining import pretrain

    start = time.perf_counter()
    pipe, facts = pretrain(args.steps, seed=args.seed, batch_size=args.batch_size, pool_size=args.pool, lr=args.lr,
                           on_log=lambda step, loss: print(f"step {step}: loss {loss:.4f}", flush=True))
    facts = write_pipeline(pipe, args.out_dir, facts)
    print(f"wrote {args.out_dir} in {time.perf_counter() - start:.0f} s", flush=True)

    from diffusers import StableDiffusionPipeline

    from loraforge.evaluators.shapes_adherence import adherence
    from loraforge.models.builtin.shapes_files import copy_shapes_pipeline
    from loraforge.world.judge import load_judge

    judge = load_judge()
    scratch = ROOT / "out" / "pretrain-check"
    if scratch.exists():
        shutil.rmtree(scratch)
    shipped = StableDiffusionPipeline.from_pretrained(copy_shapes_pipeline(scratch, args.out_dir), safety_checker=None,
                                                      torch_dtype=torch.float32)
    shipped.set_progress_bar_config(disable=True)
    facts["adherence"] = {}
    for split in ("pretrain", "holdout"):
        measured = adherence(shipped, judge, split=split)
        facts["adherence"][split] = {k: measured[k] for k in ("samples", "steps", "guidance", "accuracy")}
        print(split, json.dumps(measured["accuracy"]), flush=True)
    facts["total_wall_seconds"] = round(time.perf_counter() - start, 1)
    (args.out_dir / PROVENANCE_NAME).write_text(json.dumps(facts, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
