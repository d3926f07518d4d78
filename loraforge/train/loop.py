"""The optimisation loop every trainer shares: AdamW, LR schedule, accumulation, clipping, checkpoints,
progress and the metrics that go into the manifest."""

from __future__ import annotations

import logging
import math
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from loraforge.errors import ConfigError, Stopped, TrainingError
from loraforge.stopping import sigterm_stops, stop_requested
from loraforge.train.checkpoint import latest_checkpoint, load_checkpoint, restore_checkpoint, save_checkpoint
from loraforge.train.distributed import SINGLE, Ranks

log = logging.getLogger("loraforge.train")

# step_fn(step, micro) -> loss of that micro-batch: a scalar tensor that still needs backward(), or a float
# when step_fn has back-propagated it itself in parts (to bound memory; it then scales by accumulation itself).
StepFn = Callable[[int, int], "torch.Tensor | float"]


@dataclass
class LoopResult:
    losses: list[float]
    metrics: dict
    resumed_from: int


def make_optimizer(params: list[torch.nn.Parameter], lr: float, use_8bit: bool = False) -> torch.optim.Optimizer:
    """AdamW; bitsandbytes' 8-bit AdamW when asked (CUDA and bitsandbytes, else a one-line refusal)."""
    if use_8bit:
        if not (params and params[0].is_cuda):
            raise ConfigError("use_8bit_adam needs the trained weights on a CUDA GPU; drop --use-8bit-adam")
        try:
            import bitsandbytes as bnb  # type: ignore[import-not-found]
        except ImportError:
            raise ConfigError("use_8bit_adam needs bitsandbytes, which is not installed; "
                              "pip install bitsandbytes or drop --use-8bit-adam") from None
        return bnb.optim.AdamW8bit(params, lr=lr)
    return torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)


def lr_factor(step: int, steps: int, schedule: str, warmup: int) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, steps - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return rss / 1024


class _Reporter:
    """A rich bar with loss and samples/s on a terminal, else a plain log line every ~10% of the run."""

    def __init__(self, title: str, steps: int, start: int, progress: bool | None):
        self.steps, self.every = steps, max(1, steps // 10)
        self.bar = self.task = None
        self.plain = progress is None and not sys.stderr.isatty()
        if progress or (progress is None and sys.stderr.isatty()):
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                                TextColumn("{task.fields[info]}"), TimeRemainingColumn(), transient=True)
            self.bar.start()
            self.task = self.bar.add_task(title, total=steps, completed=start, info="")
        self.title = title

    def update(self, step: int, loss: float, samples_per_s: float) -> None:
        info = f"loss {loss:.4f}  {samples_per_s:.1f} samples/s"
        if self.bar is not None:
            self.bar.update(self.task, completed=step, info=info)
        elif self.plain and (step % self.every == 0 or step == self.steps):
            print(f"{self.title}: step {step}/{self.steps}  {info}", file=sys.stderr, flush=True)
        log.debug("%s step %d %s", self.title, step, info)

    def note(self, message: str) -> None:
        """A line the user should see (a resume) whether or not a bar is shown."""
        if self.bar is not None:
            self.bar.console.print(message)
        elif self.plain:
            print(message, file=sys.stderr, flush=True)
        log.info("%s", message)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def run_loop(*, title: str, params: dict[str, torch.nn.Parameter], step_fn: StepFn, steps: int, learning_rate: float,
             lr_scheduler: str = "constant", lr_warmup_steps: int = 0, gradient_accumulation: int = 1,
             max_grad_norm: float = 1.0, samples_per_step: float = 1, use_8bit_adam: bool = False,
             checkpoint_every: int = 0, run_dir: Path | None = None, resume: bool = False,
             device: torch.device = torch.device("cpu"), progress: bool | None = None,
             on_step: Callable[[int], None] | None = None, checkpoint_unit: int = 1,
             save_state: Callable[[], dict] | None = None, load_state: Callable[[dict], None] | None = None,
             ranks: Ranks = SINGLE) -> LoopResult:
    """Train `params` for `steps` optimiser steps of `gradient_accumulation` micro-batches each.

    With `checkpoint_every` and `run_dir`, a checkpoint is written every N steps; `resume` continues from
    the newest one. step_fn must draw its randomness from the step number (not from running state), so a
    resumed run computes exactly what an uninterrupted one would.

    A trainer whose steps come in groups that only make sense whole (reward fine-tuning: one sampled batch,
    then `checkpoint_unit` steps on it) checkpoints only after a whole group: `checkpoint_every` then counts
    groups. `save_state` returns the trainer's own JSON state to store with a checkpoint; `load_state` gets
    it back on resume. SIGTERM stops the run at the next checkpointable step, after saving a checkpoint there.

    With several `ranks`, step_fn computes this rank's slice of the global batch; the loss and gradients are
    averaged over the ranks before clipping, so every rank takes the same step as one process would; rank 0
    alone writes checkpoints, and a SIGTERM on any rank stops all of them at the same step.
    """
    plist = list(params.values())
    optimizer = make_optimizer(plist, learning_rate, use_8bit_adam)
    losses: list[float] = []
    norm = None  # the last step's gradient norm before clipping (a sum over ranks instead of a mean shows here)
    start, elapsed_before, resumed = 0, 0.0, None
    if resume and run_dir is not None and (path := latest_checkpoint(run_dir)) is not None:
        ckpt = load_checkpoint(path)
        restore_checkpoint(ckpt, params, optimizer)
        start = ckpt.step
        losses = list(ckpt.state.get("losses", []))
        elapsed_before = float(ckpt.state.get("elapsed_s", 0.0))
        if load_state is not None:
            if "trainer" not in ckpt.state:
                raise TrainingError(f"checkpoint {path} has no trainer state; delete it to restart")
            load_state(ckpt.state["trainer"])
        resumed = f"{title}: resumed from step {start} of {steps} ({path.name})"
    ranks.broadcast(plist)
    reporter = _Reporter(title, steps, start, progress)
    if resumed:
        reporter.note(resumed)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    per_step = samples_per_step * gradient_accumulation
    t0 = time.perf_counter()

    def checkpoint(done: int) -> None:
        if not ranks.main:
            return
        state = {"losses": losses, "elapsed_s": elapsed_before + time.perf_counter() - t0}
        if save_state is not None:
            state["trainer"] = save_state()
        save_checkpoint(run_dir, done, params, optimizer, state)

    with sigterm_stops():
        try:
            for step in range(start, steps):
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate * lr_factor(step, steps, lr_scheduler, lr_warmup_steps)
                total = 0.0
                for micro in range(gradient_accumulation):
                    loss = step_fn(step, micro)
                    if isinstance(loss, torch.Tensor):
                        loss = loss / gradient_accumulation
                        loss.backward()
                        loss = loss.detach()
                    total += float(loss)
                total = ranks.mean(total)
                ranks.average_gradients(plist)
                norm = float(torch.nn.utils.clip_grad_norm_(plist, max_grad_norm))
                done = step + 1
                if not (math.isfinite(total) and math.isfinite(norm)):
                    # Refused before the step, so the weights are those of step `step`, never NaN.
                    raise TrainingError(f"{title}: training diverged at step {done} of {steps} (loss {total:.4g}, "
                                        f"gradient norm {norm:.4g}); no adapter was registered; lower learning_rate "
                                        f"(now {learning_rate:g})")
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(total)
                run_time = time.perf_counter() - t0
                reporter.update(done, total, (done - start) * per_step / max(run_time, 1e-9))
                whole = done % checkpoint_unit == 0
                if (checkpoint_every and run_dir is not None and whole and done < steps
                        and (done // checkpoint_unit) % checkpoint_every == 0):
                    checkpoint(done)
                if on_step is not None:
                    on_step(done)
                if whole and done < steps and ranks.any(stop_requested()):
                    where = "no checkpoint folder, nothing kept"
                    if run_dir is not None:
                        checkpoint(done)
                        where = "checkpoint saved; run again with resume to continue"
                    raise Stopped(f"{title}: stopped by SIGTERM after step {done} of {steps} ({where})")
        finally:
            reporter.close()
    run_time = time.perf_counter() - t0
    trained = steps - start
    metrics = {
        "steps": steps,
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "loss_min": min(losses) if losses else None,
        "loss_mean_last_10pct": _tail_mean(losses),
        "grad_norm_last": norm,
        "time_s": round(elapsed_before + run_time, 3),
        "samples_per_s": round(trained * per_step / max(run_time, 1e-9), 3),
        "peak_memory_mb": round(peak_memory_mb(device), 1),
        "resumed_from_step": start,
    }
    return LoopResult(losses=losses, metrics=metrics, resumed_from=start)


def _tail_mean(losses: list[float]) -> float | None:
    tail = losses[-max(1, len(losses) // 10):]
    return sum(tail) / len(tail) if tail else None
