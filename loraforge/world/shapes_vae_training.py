"""Training the shapes VAE on the generator, from a seed, bit-reproducibly on one machine.

Step `s` reads the 64 px images of seeds [s * batch, (s + 1) * batch) in the `all` split (held-out shapes
and styles included: fine-tuning will ask the VAE for them), so no image is seen twice and the fresh seeds
(10^9 on) are never reached. The loss is L1 + MSE on pixels of a posterior sample's decoding, weighted
FOREGROUND_WEIGHT times more where a pixel differs from the image's corner (the background: no shape reaches
it), plus a small KL term that keeps the latents near a unit Gaussian, as SD's VAE was trained. Unweighted,
the shape (a few percent of the pixels) came back in one brown for every colour after 800 steps.
"""

from __future__ import annotations

import time
from typing import Callable, Optional

import numpy as np
import torch

from loraforge.world.generator import generate
from loraforge.world.judge_training import state_digest
from loraforge.world.shapes_vae import new_vae, to_tensor

FRESH_SEEDS = range(10**9, 10**9 + 512)
KL_WEIGHT = 1e-6
FOREGROUND_WEIGHT = 10.0


def training_batch(step: int, batch_size: int) -> torch.Tensor:
    seeds = range(step * batch_size, (step + 1) * batch_size)
    return to_tensor([generate(s, 64, split="all").image for s in seeds])


@torch.no_grad()
def latent_scaling_factor(vae, batches: int = 8, batch_size: int = 64) -> float:
    """1 / std of the latents (posterior means) of fixed training images, as SD's `scaling_factor` was set."""
    means = [vae.encode(training_batch(b, batch_size)).latent_dist.mode() for b in range(batches)]
    return float(1.0 / torch.cat(means).std())


def train_vae(steps: int, *, seed: int = 0, batch_size: int = 16, lr: float = 2e-3, log_every: int = 25,
              digest_at: tuple[int, ...] = (3,), schedule_steps: int | None = None, threads: int = 2,
              progress: Optional[Callable[[int, float], None]] = None):
    """A VAE trained for `steps` Adam steps (cosine-decayed `lr`) and the facts of the run, among them the
    digest of the weights after each step of `digest_at`. `schedule_steps` (default `steps`) is the length of
    the decay, so a re-run of a run's first steps sees that run's learning rates. Threads are pinned for the
    run and the caller's random state is left as it was."""
    callers_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            vae = new_vae().train()
        initial = state_digest(vae)
        optimizer = torch.optim.Adam(vae.parameters(), lr=lr)
        length = schedule_steps or steps
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: 0.5 * (1 + np.cos(np.pi * min(s, length) / max(length, 1))))
        losses, early, running, start = [], {}, 0.0, time.perf_counter()
        for step in range(steps):
            x = training_batch(step, batch_size)
            posterior = vae.encode(x).latent_dist
            noise = torch.Generator().manual_seed(seed * 1_000_003 + step)
            y = vae.decode(posterior.sample(generator=noise)).sample
            weight = 1.0 + FOREGROUND_WEIGHT * (x != x[:, :, :1, :1]).any(dim=1, keepdim=True).float()
            error = y - x
            loss = (weight * (error.abs() + error ** 2)).mean() + KL_WEIGHT * posterior.kl().mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            running += float(loss.detach())
            if step + 1 in digest_at:
                early[str(step + 1)] = state_digest(vae)
            if (step + 1) % log_every == 0 or step + 1 == steps:
                losses.append([step + 1, round(running / ((step % log_every) + 1), 5)])
                running = 0.0
                if progress:
                    progress(step + 1, losses[-1][1])
        vae.eval()
        scaling = latent_scaling_factor(vae)
        vae.register_to_config(scaling_factor=scaling)
        facts = {"seed": seed, "steps": steps, "batch_size": batch_size, "lr": lr, "optimizer": "adam, cosine decay",
                 "loss": "foreground-weighted L1 + MSE on pixels + KL_WEIGHT * KL", "kl_weight": KL_WEIGHT,
                 "foreground_weight": FOREGROUND_WEIGHT,
                 "train_seeds": [0, steps * batch_size], "scaling_factor": round(scaling, 6),
                 "initial_digest": initial, "early_digests": early, "loss_curve": losses,
                 "wall_seconds": round(time.perf_counter() - start, 1), "threads": torch.get_num_threads(),
                 "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability()}
        return vae, facts
    finally:
        torch.set_num_threads(callers_threads)
