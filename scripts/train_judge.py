"""Train the shapes-world judge from a seed and write its weights (fp16) and provenance beside the module.

    python scripts/train_judge.py [--steps N] [--seed S] [--out-dir DIR]

The provenance (`judge.json`) records the generator version, seed, steps, loss curve, wall time and the
judge's accuracy per attribute on fresh generator images (seeds training never reaches), measured with
the fp16 weights as shipped. `make judge` runs it with the defaults the committed weights were built with.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from loraforge.formats.safetensors_io import write_safetensors  # noqa: E402
from loraforge.hashing import sha256_file  # noqa: E402
from loraforge.world.judge import PROVENANCE_PATH, WEIGHTS_PATH, load_judge  # noqa: E402
from loraforge.world.judge_training import FRESH_SEEDS, accuracy, train_judge  # noqa: E402
from loraforge.world.vocabulary import GENERATOR_VERSION  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out-dir", type=Path, default=WEIGHTS_PATH.parent)
    args = parser.parse_args(argv)

    start = time.perf_counter()
    net, facts = train_judge(args.steps, seed=args.seed, batch_size=args.batch_size,
                             progress=lambda step, loss: print(f"step {step}: loss {loss:.4f}", flush=True))
    weights = args.out_dir / WEIGHTS_PATH.name
    provenance = args.out_dir / PROVENANCE_PATH.name
    write_safetensors({k: (v.detach().half() if v.is_floating_point() else v).contiguous()
                       for k, v in net.state_dict().items()}, weights,
                      {"generator_version": GENERATOR_VERSION, "seed": str(args.seed), "steps": str(args.steps)})
    facts = {"generator_version": GENERATOR_VERSION, **facts, "weights_sha256": sha256_file(weights)}
    provenance.write_text(json.dumps(facts, indent=1) + "\n", encoding="utf-8")
    judge = load_judge(weights, provenance)
    facts["fresh_seeds"] = [FRESH_SEEDS.start, FRESH_SEEDS.stop]
    facts["accuracy_fresh"] = {f"{split}@{res}": accuracy(judge, resolution=res, split=split)
                               for split in ("all", "pretrain", "holdout") for res in (64, 32)}
    facts["total_wall_seconds"] = round(time.perf_counter() - start, 1)
    provenance.write_text(json.dumps(facts, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(facts["accuracy_fresh"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
