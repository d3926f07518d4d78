"""The optimisation loop every trainer shares: AdamW, LR schedule, accumulation, clipping, checkpoints,
progress and the metrics that go into the manifest."""

from __future__ import annotations

import logging
import math
import os
import resource
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from loraforge.errors import TrainingError
from loraforge.train.checkpoint import latest_checkpoint, load_checkpoint, restore_checkpoint, save_checkpoint

log = logging.getLogger("loraforge.train")

# step_fn(step, micro) -> loss of that micro-batch (a scalar tensor that still needs backward()).
StepFn = Callable[[int, int], torch.Tensor]


@dataclass
class LoopResult:
    losses: list[float]
    metrics: dict
    resumed_from: int


def make_optimizer(params: list[torch.nn.Parameter], lr: float, use_8bit: bool = False) -> torch.optim.Optimizer:
    """AdamW; bitsandbytes' 8-bit AdamW when asked, installed and on CUDA."""
    if use_8bit and params and params[0].is_cuda:
        try:
            import bitsandbytes as bnb  # type: ignore[import-not-found]

            return bnb.optim.AdamW8bit(params, lr=lr)
        except ImportError:
            log.warning("bitsandbytes is not installed; using torch AdamW")
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

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def run_loop(*, title: str, params: dict[str, torch.nn.Parameter], step_fn: StepFn, steps: int, learning_rate: float,
             lr_scheduler: str = "constant", lr_warmup_steps: int = 0, gradient_accumulation: int = 1,
             max_grad_norm: float = 1.0, samples_per_step: int = 1, use_8bit_adam: bool = False,
             checkpoint_every: int = 0, run_dir: Path | None = None, resume: bool = False,
             device: torch.device = torch.device("cpu"), progress: bool | None = None,
             on_step: Callable[[int], None] | None = None) -> LoopResult:
    """Train `params` for `steps` optimiser steps of `gradient_accumulation` micro-batches each.

    With `checkpoint_every` and `run_dir`, a checkpoint is written every N steps; `resume` continues from
    the newest one. step_fn must draw its randomness from the step number (not from running state), so a
    resumed run computes exactly what an uninterrupted one would.
    """
    plist = list(params.values())
    optimizer = make_optimizer(plist, learning_rate, use_8bit_adam)
    losses: list[float] = []
    start, elapsed_before = 0, 0.0
    if resume and run_dir is not None and (path := latest_checkpoint(run_dir)) is not None:
        ckpt = load_checkpoint(path)
        restore_checkpoint(ckpt, params, optimizer)
        start = ckpt.step
        losses = list(ckpt.state.get("losses", []))
        elapsed_before = float(ckpt.state.get("elapsed_s", 0.0))
        log.info("%s: resuming from step %d (%s)", title, start, path)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    reporter = _Reporter(title, steps, start, progress)
    per_step = samples_per_step * gradient_accumulation
    t0 = time.perf_counter()
    stop = _StopOnSigterm()
    try:
        for step in range(start, steps):
            for group in optimizer.param_groups:
                group["lr"] = learning_rate * lr_factor(step, steps, lr_scheduler, lr_warmup_steps)
            total = 0.0
            for micro in range(gradient_accumulation):
                loss = step_fn(step, micro) / gradient_accumulation
                loss.backward()
                total += float(loss.detach())
            torch.nn.utils.clip_grad_norm_(plist, max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(total)
            done = step + 1
            run_time = time.perf_counter() - t0
            reporter.update(done, total, (done - start) * per_step / max(run_time, 1e-9))
            if checkpoint_every and run_dir is not None and done % checkpoint_every == 0 and done < steps:
                save_checkpoint(run_dir, done, params, optimizer,
                                {"losses": losses, "elapsed_s": elapsed_before + run_time})
            if on_step is not None:
                on_step(done)
            if stop.requested and done < steps:
                where = "no checkpoint folder"
                if run_dir is not None:
                    save_checkpoint(run_dir, done, params, optimizer,
                                    {"losses": losses, "elapsed_s": elapsed_before + run_time})
                    where = "checkpoint saved; run again with resume to continue"
                raise TrainingError(f"{title}: stopped by SIGTERM after step {done} of {steps} ({where})")
    finally:
        stop.restore()
        reporter.close()
    run_time = time.perf_counter() - t0
    trained = steps - start
    metrics = {
        "steps": steps,
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "loss_min": min(losses) if losses else None,
        "loss_mean_last_10pct": _tail_mean(losses),
        "time_s": round(elapsed_before + run_time, 3),
        "samples_per_s": round(trained * per_step / max(run_time, 1e-9), 3),
        "peak_memory_mb": round(peak_memory_mb(device), 1),
        "resumed_from_step": start,
    }
    return LoopResult(losses=losses, metrics=metrics, resumed_from=start)


class _StopOnSigterm:
    """Turns SIGTERM into a request to stop after the current step (the daemon sends it to let a job
    checkpoint). Only the main thread can own signal handlers; elsewhere SIGTERM keeps its default."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.requested:  # a second SIGTERM: stop at once
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
        self.requested = True

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _tail_mean(losses: list[float]) -> float | None:
    tail = losses[-max(1, len(losses) // 10):]
    return sum(tail) / len(tail) if tail else None
