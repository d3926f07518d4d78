"""Pretraining `builtin:shapes` with loraforge's own training loop, from a seed, bit-reproducibly on one machine.

The data are the generator's `pretrain` split (no held-out shape, combination or style): seeds [0, pool),
each encoded once, on first use, by the committed VAE (the posterior mean times its scaling factor, as
`encode_images` gives every trainer). Each step reads a slice of a seeded permutation of the pool and captions every image
afresh: the full caption, or one with some of size, position and background left out (so "a red circle"
means any red circle), or the empty prompt (`UNCONDITIONAL`, so classifier-free guidance has an
unconditional model to push away from). The UNet and the text encoder train together on the noise loss
(`denoising_loss`) in `run_loop`, the loop every loraforge trainer runs.
"""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Callable, Optional

import torch

from loraforge.world.captions import caption
from loraforge.world.generator import Labels, draw_int, generate
from loraforge.world.judge_training import batch_seeds, state_digest
from loraforge.world.shapes_vae import to_tensor
from loraforge.world.vocabulary import POSITION_PHRASES

UNCONDITIONAL = 0.1  # the fraction of captions replaced by the empty prompt
DROP = 0.3  # the chance each of size, position and background is left out of a caption


def partial_caption(labels: Labels, seed: int) -> str:
    """The caption of step-and-image `seed`: "" (UNCONDITIONAL of the time), else the caption with each of
    size, position and background dropped with chance DROP."""
    if draw_int(seed, "unconditional", 1000) < UNCONDITIONAL * 1000:
        return ""
    keep = {part: draw_int(seed, f"keep-{part}", 1000) >= DROP * 1000 for part in ("size", "position", "background")}
    if all(keep.values()):
        return caption(labels)
    text = "a " + (f"{labels.size} " if keep["size"] else "") + f"{labels.colour} {labels.shape}"
    if keep["position"]:
        text += " " + POSITION_PHRASES[labels.position].removesuffix(" of")
        text += (" of a " + labels.background + " background") if keep["background"] else ""
    elif keep["background"]:
        text += f" on a {labels.background} background"
    return text


class Pool:
    """The pretraining images, seeds [0, size), each encoded by the VAE on first use and kept: latents
    (4 x 16 x 16, the posterior mean times the scaling factor) and labels. A step's new images are encoded
    together, so a re-run of a run's first steps encodes exactly as that run did."""

    def __init__(self, vae, size: int):
        self.vae, self.size = vae, size
        self._latents: dict[int, torch.Tensor] = {}
        self._labels: dict[int, Labels] = {}

    @torch.no_grad()
    def batch(self, seeds: list[int]) -> tuple[torch.Tensor, list[Labels]]:
        new = [s for s in dict.fromkeys(seeds) if s not in self._latents]
        if new:
            chunk = [generate(s, 64, split="pretrain") for s in new]
            latents = self.vae.encode(to_tensor([c.image for c in chunk])).latent_dist.mean
            for sample, latent in zip(chunk, latents * self.vae.config.scaling_factor):
                self._latents[sample.seed], self._labels[sample.seed] = latent.float(), sample.labels
        return torch.stack([self._latents[s] for s in seeds]), [self._labels[s] for s in seeds]


def training_model(components: dict):
    """The pipeline as the trainers' helpers take it (`loraforge.train.model.TrainingModel`), on CPU in fp32."""
    from loraforge.train.model import TrainingModel
    from loraforge.models.builtin.shapes import pipeline

    pipe = pipeline(components)
    return TrainingModel(pipe=pipe, base=SimpleNamespace(family="sd1"), device=torch.device("cpu"),
                         autocast_dtype=None, noise_scheduler=pipe.scheduler)


def pretrain(steps: int, *, seed: int = 0, batch_size: int = 32, pool_size: int = 16384, lr: float = 1e-3,
             warmup: int = 100, digest_at: tuple[int, ...] = (3,),
             log_every: int = 25, threads: int = 2, progress: bool | None = None,
             on_log: Optional[Callable[[int, float], None]] = None):
    """The shapes pipeline after `steps` optimiser steps, and the facts of the run (loss curve, digests of
    the UNet and text encoder after each step of `digest_at`, wall time). The learning rate warms up linearly
    over `warmup` steps whatever `steps` is, so a short re-run of a run's first steps (fewer than `warmup`)
    sees that run's learning rates and can check its digests. Threads are pinned for the run and the caller's
    random state is left as it was."""
    from loraforge.train.loop import run_loop
    from loraforge.train.model import denoising_loss, encode_prompts, sample_noise
    from loraforge.models.builtin.shapes import TEXT_ARCHITECTURE, UNET_ARCHITECTURE, new_components

    callers_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        components = new_components(seed)
        model = training_model(components)
        unet, text_encoder = components["unet"], components["text_encoder"]
        initial = {"unet": state_digest(unet), "text_encoder": state_digest(text_encoder)}
        pool = Pool(components["vae"], pool_size)
        unet.train()
        text_encoder.train()
        params = {f"unet.{n}": p for n, p in unet.named_parameters()}
        params.update({f"text_encoder.{n}": p for n, p in text_encoder.named_parameters()})
        scheduler_steps = model.noise_scheduler.config.num_train_timesteps

        def step_fn(step: int, micro: int):
            latents, labels = pool.batch(batch_seeds(step, batch_size, pool.size, seed))
            prompts = [partial_caption(lab, seed * 1_000_003 + step * batch_size + k) for k, lab in enumerate(labels)]
            noise, timesteps = sample_noise(latents, torch.Generator().manual_seed(seed * 7_777_777 + step),
                                            scheduler_steps)
            text = encode_prompts(model, prompts, grad=True)
            loss = denoising_loss(model, unet, latents, text, noise, timesteps)
            window.append(float(loss.detach()))
            return loss

        early: dict[str, dict[str, str]] = {}
        curve: list[list] = []
        window: list[float] = []

        def on_step(done: int) -> None:
            if done in digest_at:
                early[str(done)] = {"unet": state_digest(unet), "text_encoder": state_digest(text_encoder)}
            if done % log_every == 0 or done == steps:
                curve.append([done, round(sum(window) / len(window), 5)])
                window.clear()
                if on_log:
                    on_log(*curve[-1])

        t0 = time.perf_counter()
        run_loop(title="pretrain builtin:shapes", params=params, step_fn=step_fn, steps=steps, learning_rate=lr,
                 lr_scheduler="cosine", lr_warmup_steps=warmup, samples_per_step=batch_size, progress=progress,
                 on_step=on_step)
        unet.eval()
        text_encoder.eval()
        facts = {"architecture": {"unet": UNET_ARCHITECTURE, "text_encoder": TEXT_ARCHITECTURE},
                 "seed": seed, "steps": steps, "batch_size": batch_size, "pool": [0, pool.size], "lr": lr,
                 "warmup": warmup, "optimizer": "adamw (run_loop), cosine decay, gradient norm clipped at 1",
                 "unconditional": UNCONDITIONAL, "drop": DROP, "initial_digests": initial, "early_digests": early,
                 "loss_curve": curve, "train_seconds": round(time.perf_counter() - t0, 1), "threads": torch.get_num_threads(),
                 "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability()}
        return model.pipe, facts
    finally:
        torch.set_num_threads(callers_threads)
