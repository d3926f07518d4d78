"""Resumable training checkpoints under `<home>/runs/<run key>/`: the trained weights (LoRA layers, or a full
fine-tune's every weight), optimiser, RNG states, step."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from loraforge.errors import TrainingError
from loraforge.hashing import sha256_json

KEEP = 2  # checkpoints kept per run: the newest may be mid-write when a run is killed


def run_key(trainer: str, config: dict, output: str, input_digest: str | None = None) -> str:
    """Names the run folder: from the recipe's input digest when given, else from the config, so a
    restarted process (or daemon) finds the checkpoints of the same run."""
    if input_digest:
        return f"{trainer}-{sha256_json([input_digest, output])[:20]}"
    return f"{trainer}-{sha256_json([trainer, config, output])[:20]}"


def runs_dir(home: Path) -> Path:
    return Path(home) / "runs"


@dataclass
class TrainState:
    """A training run as saved at one step (a `step-NNNNNNNN/` folder); not a model checkpoint, which is
    `ops.checkpoints.Checkpoint`."""

    step: int
    params: dict[str, torch.Tensor]
    optimizer: dict
    rng: dict[str, Any]
    state: dict[str, Any] = field(default_factory=dict)  # losses so far, elapsed time …


def save_checkpoint(run_dir: Path, step: int, params: dict[str, torch.nn.Parameter], optimizer,
                    state: dict[str, Any]) -> Path:
    """Write `step-NNNNNNNN/` atomically (staged, then renamed) and drop older checkpoints."""
    from loraforge.formats.safetensors_io import write_safetensors

    run_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=run_dir, prefix=".staging-"))
    try:
        write_safetensors({n: p.detach() for n, p in params.items()}, staging / "lora.safetensors")
        torch.save(optimizer.state_dict(), staging / "optimizer.pt")
        rng = {"torch": torch.random.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, staging / "rng.pt")
        (staging / "state.json").write_text(json.dumps({"step": step, **state}), encoding="utf-8")
        final = run_dir / f"step-{step:08d}"
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for old in sorted(run_dir.glob("step-*"))[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    done = [p for p in sorted(Path(run_dir).glob("step-*")) if (p / "state.json").is_file()]
    return done[-1] if done else None


def load_checkpoint(path: Path) -> TrainState:
    from loraforge.formats.safetensors_io import read_safetensors

    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
        params, _ = read_safetensors(path / "lora.safetensors")
        optimizer = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        rng = torch.load(path / "rng.pt", map_location="cpu", weights_only=True)
    except Exception as exc:
        raise TrainingError(f"checkpoint {path} is unreadable ({exc.__class__.__name__}: {exc}); delete it to restart") from None
    return TrainState(step=int(state.pop("step")), params=params, optimizer=optimizer, rng=rng, state=state)


def restore_checkpoint(ckpt: TrainState, params: dict[str, torch.nn.Parameter], optimizer) -> None:
    """Copy weights, optimiser and RNG states back; names must match the run's parameters exactly."""
    if set(ckpt.params) != set(params):
        raise TrainingError("the checkpoint's trained parameters (LoRA layers or full weights) differ from this "
                            "run's: the configuration changed; delete the run folder or train without resume")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(ckpt.params[name].to(p.device, p.dtype))
    optimizer.load_state_dict(ckpt.optimizer)
    torch.random.set_rng_state(ckpt.rng["torch"])
    if "cuda" in ckpt.rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ckpt.rng["cuda"])
