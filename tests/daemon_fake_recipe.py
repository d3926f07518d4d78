"""A stand-in for `loraforge recipe plan|apply` that follows the recipe engine's CLI contract.

Recipe files are YAML: `name` (required), `dataset` (a folder, relative to the recipe), `seconds`
(simulated training time, checkpointed every 0.05 s), `plan_seconds` (simulated planning time), `fail` (apply fails with this message),
`ignore_sigterm` (apply keeps running after SIGTERM), `processes` (the plan's step trains on N processes). apply registers one artifact per input digest.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import yaml

from loraforge.hashing import sha256_folder, sha256_json
from loraforge.registry import Manifest, Provenance, RecipeInfo, Registry


def load(path: Path) -> tuple[dict, str | None, str]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ValueError(f"{path.name}: not valid YAML ({str(exc).splitlines()[0]})")
    if not isinstance(data, dict) or not data.get("name"):
        raise ValueError(f"{path.name}: a recipe needs a 'name'")
    dataset = None
    if data.get("dataset"):
        folder = (path.parent / data["dataset"]).resolve()
        if not folder.is_dir():
            raise ValueError(f"{path.name}: dataset folder {folder} does not exist")
        dataset = str(folder)
    dataset_digest = sha256_folder(dataset) if dataset else None
    return data, dataset, sha256_json({"recipe": data, "dataset": dataset_digest})


def plan(path: Path) -> int:
    try:
        data, dataset, input_digest = load(path)
    except ValueError as exc:
        print(json.dumps({"valid": False, "error": str(exc)}))
        return 1
    time.sleep(float(data.get("plan_seconds", 0)))
    done = Registry().find_by_input_digest(input_digest, name=data["name"]) is not None
    step = {"id": "train", "kind": "train", "status": "up-to-date" if done else "stale",
            "reason": "output registered" if done else "inputs changed", "input_digest": input_digest,
            "output": data["name"], "depends_on": []}
    if int(data.get("processes", 1)) > 1:
        step["processes"] = int(data["processes"])
    print(json.dumps({"recipe": str(path.resolve()), "name": data["name"], "digest": input_digest,
                      "valid": True, "steps": [step], "watch": [dataset] if dataset else []}))
    return 0


def apply(path: Path, publish: bool) -> int:
    try:
        data, dataset, input_digest = load(path)
    except ValueError as exc:
        print(f"Error: {exc}")
        return 1
    registry = Registry()
    print(f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r} publish={publish}")
    if registry.find_by_input_digest(input_digest, name=data["name"]) is not None:
        print("train: up to date, skipped")
        return 0
    if data.get("fail"):
        print(f"Error: {data['fail']}")
        return 1
    stop = {"asked": False}

    def on_term(signum, frame):
        stop["asked"] = True

    signal.signal(signal.SIGTERM, on_term)
    # Checkpoints as the real trainers lay them out (train.checkpoint): the run folder under the home's runs/,
    # one complete step-NNNNNNNN/ folder (state.json written last) per step, the newest two kept.
    run = registry.home / "runs" / f"fake-{input_digest[:16]}"
    done = sorted(p for p in run.glob("step-*") if (p / "state.json").is_file())
    start = json.loads((done[-1] / "state.json").read_text())["step"] if done else 0
    if start:
        print(f"resumed from step {start}")
    total = round(float(data.get("seconds", 0)) / 0.05)
    for step in range(start, total):
        if stop["asked"] and not data.get("ignore_sigterm"):
            print(f"interrupted: checkpoint saved at step {step}")
            return 143
        time.sleep(0.05)
        folder = run / f"step-{step + 1:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / ".state.tmp").write_text(json.dumps({"step": step + 1}))
        os.replace(folder / ".state.tmp", folder / "state.json")
        for old in sorted(run.glob("step-*"))[:-2]:
            shutil.rmtree(old, ignore_errors=True)
        print(f"step {step + 1}/{total}")
    result = registry.home / "tmp" / f"fake-{input_digest[:16]}.txt"
    result.parent.mkdir(exist_ok=True)  # the registry makes scratch folders only when it writes
    result.write_text(input_digest)
    manifest = Manifest(
        name=data["name"], kind="dataset", digest="", files=[],
        provenance=Provenance(
            method="fake:train", dataset_digest=sha256_folder(dataset) if dataset else None,
            recipe=RecipeInfo(name=data["name"], path=str(path), digest=input_digest, step="train",
                              input_digest=input_digest),
        ),
    )
    manifest = registry.register(manifest, [(result, "result.txt")], input_digest=input_digest)
    shutil.rmtree(run, ignore_errors=True)
    print(f"train: registered {manifest.ref}")
    return 0


def main(argv: list[str]) -> int:
    args = [a for a in argv if not a.startswith("--home")]
    if args[:2] == ["recipe", "plan"]:
        return plan(Path(args[2]))
    if args[:2] == ["recipe", "apply"]:
        return apply(Path(args[2]), publish="--no-publish" not in args)
    print(f"Error: the fake recipe CLI does not know {argv}")
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
