"""Train the shapes-world VAE from a seed and write it (fp16, a diffusers folder) with its provenance.

    python scripts/train_shapes_vae.py [--steps N] [--seed S] [--out-dir DIR]

The folder (`loraforge/world/vae/` by default) holds `config.json` and `diffusion_pytorch_model.safetensors`,
written by diffusers' own `save_pretrained`, and `vae.json`: generator version, seed, steps, loss curve, wall
time, the weights' sha256 and the reconstruction figures on fresh generator images (PSNR, and the judge's
accuracy on originals and reconstructions), measured with the fp16 weights as shipped. `make shapes-vae`
runs it with the defaults the committed weights were built with.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from loraforge.hashing import sha256_file  # noqa: E402
from loraforge.world.shapes_vae import PROVENANCE_NAME, VAE_DIR, WEIGHTS_NAME, load_vae, round_trip  # noqa: E402
from loraforge.world.shapes_vae_training import FRESH_SEEDS, train_vae  # noqa: E402
from loraforge.world.vocabulary import GENERATOR_VERSION  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out-dir", type=Path, default=VAE_DIR)
    args = parser.parse_args(argv)

    start = time.perf_counter()
    vae, facts = train_vae(args.steps, seed=args.seed, batch_size=args.batch_size,
                           progress=lambda step, loss: print(f"step {step}: loss {loss:.4f}", flush=True))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    vae.to(torch.float16).save_pretrained(args.out_dir, safe_serialization=True)
    provenance = args.out_dir / PROVENANCE_NAME
    facts = {"generator_version": GENERATOR_VERSION, **facts,
             "weights_sha256": sha256_file(args.out_dir / WEIGHTS_NAME)}
    provenance.write_text(json.dumps(facts, indent=1) + "\n", encoding="utf-8")
    torch.set_num_threads(2)
    shipped = load_vae(args.out_dir)
    facts["fresh_seeds"] = [FRESH_SEEDS.start, FRESH_SEEDS.stop]
    facts["round_trip"] = {split: round_trip(shipped, FRESH_SEEDS, split=split) for split in ("all", "pretrain", "holdout")}
    facts["total_wall_seconds"] = round(time.perf_counter() - start, 1)
    provenance.write_text(json.dumps(facts, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(facts["round_trip"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
