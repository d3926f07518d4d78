"""Training and measuring the judge on the generator, from a seed, bit-reproducibly on one machine.

Training images come from seeds [0, pool): each seed is drawn in the 'all' split (held-out
concepts included: the judge must recognise what fine-tuning teaches) at 64 px or, for one in two, at
32 px read back at 64 (the judge's own resize), plus seeded Gaussian pixel noise so a model's slightly
noisy output reads the same. Accuracy is measured on `FRESH_SEEDS`, a range training never reaches.
"""

from __future__ import annotations

import time
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from loraforge.hashing import sha256_bytes
from loraforge.world.generator import draw_int, generate
from loraforge.world.judge import JudgeNet, to_array, to_batch
from loraforge.world.vocabulary import ATTRIBUTES

FRESH_SEEDS = range(10**9, 10**9 + 2048)
MAX_NOISE = 0.08  # the largest noise standard deviation, in the [-1, 1] pixel scale


class TrainingImages:
    """The training pool: seeds [0, size), each rendered once, on first use, and kept (as the judge
    reads it, with its targets). Rendering costs about as much as a training step, so the pool is
    reused for several epochs rather than drawn fresh each step."""

    def __init__(self, size: int):
        self.size = size
        self._cache: dict[int, tuple[np.ndarray, dict[str, int]]] = {}

    def __getitem__(self, image_seed: int) -> tuple[np.ndarray, dict[str, int]]:
        if image_seed not in self._cache:
            resolution = (32, 64)[draw_int(image_seed, "judge-resolution", 2)]
            sample = generate(image_seed, resolution, split="all")
            self._cache[image_seed] = (to_array(sample.image), sample.labels.indices())
        return self._cache[image_seed]


def batch_seeds(step: int, batch_size: int, pool: int, seed: int) -> list[int]:
    """The image seeds of step `step`: consecutive slices of a seeded permutation of the pool per epoch."""
    per_epoch = pool // batch_size
    epoch, index = divmod(step, per_epoch)
    order = torch.randperm(pool, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
    return order[index * batch_size:(index + 1) * batch_size].tolist()


def training_batch(step: int, batch_size: int, seed: int, images: TrainingImages) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The images (with seeded Gaussian noise) and targets of training step `step`."""
    chosen = [images[s] for s in batch_seeds(step, batch_size, images.size, seed)]
    x = to_batch([a for a, _ in chosen])
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    sigma = torch.rand(batch_size, 1, 1, 1, generator=g) * MAX_NOISE
    x = x + sigma * torch.randn(x.shape, generator=g)
    return x, {name: torch.tensor([t[name] for _, t in chosen]) for name in ATTRIBUTES}


def state_digest(net: nn.Module) -> str:
    """sha256 over the names and fp32 bytes of every parameter, in name order."""
    chunks = []
    for name, tensor in sorted(net.state_dict().items()):
        chunks.append(name.encode() + tensor.detach().float().contiguous().numpy().tobytes())
    return sha256_bytes(b"".join(chunks))


def train_judge(steps: int, *, seed: int = 0, batch_size: int = 64, pool: int = 16384, lr: float = 3e-3, width: int = 16,
                hidden: int = 128, log_every: int = 50, digest_at: tuple[int, ...] = (3,),
                schedule_steps: int | None = None, threads: int = 2,
                progress: Optional[Callable[[int, float], None]] = None) -> tuple[JudgeNet, dict]:
    """A judge trained for `steps` Adam steps (cosine-decayed `lr`) and the facts of the run, among them
    the digest of the weights after each step of `digest_at` (what a reproducibility check re-runs to).
    `schedule_steps` (default `steps`) is the length of the cosine decay: a re-run of a run's first steps
    gives it that run's steps, so every step sees the same learning rate.

    Threads are pinned for the run (to `threads`, whatever the caller had set) so a re-run on the same machine
    sums in the same order; the global torch random state is left untouched (the initial weights come from a
    forked one)."""
    callers_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.random.fork_rng(devices=[]):  # the caller's random state is left as it was
            torch.manual_seed(seed)
            net = JudgeNet(width, hidden)
        initial = state_digest(net)
        optimizer = torch.optim.Adam(net.parameters(), lr=lr)
        length = schedule_steps or steps
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: 0.5 * (1 + np.cos(np.pi * min(s, length) / max(length, 1))))
        images = TrainingImages(pool)
        losses, start = [], time.perf_counter()
        running, early = 0.0, {}
        for step in range(steps):
            x, targets = training_batch(step, batch_size, seed, images)
            logits = net(x)
            loss = sum(nn.functional.cross_entropy(logits[name], targets[name]) for name in ATTRIBUTES)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            running += float(loss.detach())
            if step + 1 in digest_at:
                early[str(step + 1)] = state_digest(net)
            if (step + 1) % log_every == 0 or step + 1 == steps:
                span = (step % log_every) + 1
                losses.append([step + 1, round(running / span, 5)])
                running = 0.0
                if progress:
                    progress(step + 1, losses[-1][1])
        facts = {"seed": seed, "steps": steps, "batch_size": batch_size, "pool": pool, "lr": lr, "optimizer": "adam, cosine decay",
                 "architecture": {"width": width, "hidden": hidden}, "train_seeds": [0, pool],
                 "max_noise": MAX_NOISE, "initial_digest": initial, "early_digests": early,
                 "loss_curve": losses,
                 "wall_seconds": round(time.perf_counter() - start, 1), "threads": torch.get_num_threads(),
                 "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability()}
        return net.eval(), facts
    finally:
        torch.set_num_threads(callers_threads)


@torch.no_grad()
def accuracy(judge, seeds=FRESH_SEEDS, resolution: int = 64, split: str = "all", batch: int = 256) -> dict[str, float]:
    """Fraction of `seeds`' images (in `split`, at `resolution`) whose every attribute the judge reads
    right, per attribute, and `all` (every attribute right at once)."""
    right = {name: 0 for name in ATTRIBUTES}
    right["all"] = 0
    seeds = list(seeds)
    for begin in range(0, len(seeds), batch):
        chunk = [generate(s, resolution, split=split) for s in seeds[begin:begin + batch]]
        predicted = judge.labels([s.image for s in chunk])
        for sample, guess in zip(chunk, predicted):
            truth = sample.labels.as_dict()
            hits = [guess[name] == truth[name] for name in ATTRIBUTES]
            for name, hit in zip(ATTRIBUTES, hits):
                right[name] += hit
            right["all"] += all(hits)
    return {name: round(count / len(seeds), 4) for name, count in right.items()}
