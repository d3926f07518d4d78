"""A stochastic DDIM sampler whose every step has a Gaussian log-prob log π(x_{t−1} | x_t, c) (DDPO/DPOK)."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

# eps_fn(x_t, t) -> the (guided) noise prediction ε(x_t, t) the step uses.
EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _alphas(scheduler, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ᾱ_t and ᾱ_{t−1} (the previous inference timestep) for the scheduler's current timestep spacing."""
    step = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    t = t.detach().cpu().long().reshape(-1)
    prev = t - step
    acp = scheduler.alphas_cumprod
    a_t = acp[t]
    a_prev = torch.where(prev >= 0, acp[prev.clamp(min=0)], torch.as_tensor(scheduler.final_alpha_cumprod))
    return a_t, a_prev


def ddim_step_with_logprob(scheduler, model_output: torch.Tensor, t: torch.Tensor, x_t: torch.Tensor, *,
                           eta: float, prev_sample: torch.Tensor | None = None,
                           generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM step x_t → x_{t−1} with noise scale η, and the log-prob of x_{t−1} under the step's Gaussian.

    The step is N(μ_θ, σ_t²) with σ_t = η·√((1−ᾱ_{t−1})/(1−ᾱ_t)·(1−ᾱ_t/ᾱ_{t−1})) and μ_θ the DDIM mean.
    With `prev_sample` given (recomputing the log-prob of a recorded trajectory) no noise is drawn.
    The log-prob is averaged over the latent's elements (as DDPO does) so its scale does not depend on
    the resolution. `t` is a scalar or one timestep per sample; noise comes from `generator` on CPU.

    A step with σ_t = 0 (the last step of most stock DDIM configs: onto ᾱ = 1 with set_alpha_to_one, or
    onto ᾱ_{t−1} = ᾱ_t when the schedule ends at t = 0) is deterministic, x_{t−1} = μ_θ, as in diffusers'
    own step. It has no density: its log-prob is reported as 0 and `step_is_stochastic` says so, so that
    training never divides by its zero variance.
    """
    if eta <= 0:
        raise ValueError("a log-prob needs a stochastic step: eta must be > 0")
    a_t, a_prev = _alphas(scheduler, t)
    shape = (-1,) + (1,) * (x_t.dim() - 1)
    a_t = a_t.to(x_t.device, torch.float32).reshape(shape)
    a_prev = a_prev.to(x_t.device, torch.float32).reshape(shape)
    x_t = x_t.float()
    out = model_output.float()
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        eps = out
        x0 = (x_t - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    elif kind == "v_prediction":
        x0 = a_t.sqrt() * x_t - (1 - a_t).sqrt() * out
        eps = a_t.sqrt() * out + (1 - a_t).sqrt() * x_t
    else:
        raise ValueError(f"prediction_type {kind!r} is not supported by the stochastic DDIM step")
    std = eta * _variance(a_t, a_prev).sqrt()
    mean = a_prev.sqrt() * x0 + (1 - a_prev - std**2).clamp(min=0).sqrt() * eps
    if prev_sample is None:
        noise = torch.randn(x_t.shape, generator=generator, dtype=torch.float32).to(x_t.device)
        prev_sample = mean + std * noise
    prev_sample = prev_sample.float()
    stochastic = std > 0
    safe_std = torch.where(stochastic, std, torch.ones_like(std))
    log_prob = (-((prev_sample.detach() - mean) ** 2) / (2 * safe_std**2) - torch.log(safe_std)
                - 0.5 * math.log(2 * math.pi))
    log_prob = torch.where(stochastic, log_prob, torch.zeros_like(log_prob))
    return prev_sample, log_prob.mean(dim=tuple(range(1, x_t.dim())))


def _variance(a_t: torch.Tensor, a_prev: torch.Tensor) -> torch.Tensor:
    """σ_t²/η² of the DDIM step ᾱ_t → ᾱ_{t−1} (Song et al. eq. 16); exactly 0 when ᾱ_{t−1} is 1 or ᾱ_t."""
    return ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).clamp(min=0)


def step_is_stochastic(scheduler, t: torch.Tensor) -> torch.Tensor:
    """Whether the DDIM step at each timestep in `t` has a non-zero variance (so a log-prob) for any η > 0."""
    a_t, a_prev = _alphas(scheduler, t)
    return _variance(a_t.float(), a_prev.float()) > 0


@dataclass
class Trajectory:
    """A sampled trajectory: latents[k] → latents[k+1] at timesteps[k], with the step's log-prob."""

    latents: torch.Tensor     # (steps + 1, batch, C, H, W): x_T … x_0
    log_probs: torch.Tensor   # (steps, batch); 0 for a deterministic step
    timesteps: torch.Tensor   # (steps,)
    stochastic: torch.Tensor  # (steps,) bool: the steps that have a log-prob, the only ones a policy gradient can use

    @property
    def final(self) -> torch.Tensor:
        return self.latents[-1]


@torch.no_grad()
def sample_trajectory(eps_fn: EpsFn, scheduler, x_T: torch.Tensor, *, steps: int, eta: float,
                      generator: torch.Generator | None = None) -> Trajectory:
    """Denoise x_T in `steps` stochastic DDIM steps with `eps_fn`, recording latents and log-probs."""
    scheduler.set_timesteps(steps)
    x = x_T.float()
    latents, log_probs = [x], []
    for t in scheduler.timesteps:
        eps = eps_fn(x, t)
        x, lp = ddim_step_with_logprob(scheduler, eps, t, x, eta=eta, generator=generator)
        latents.append(x)
        log_probs.append(lp)
    timesteps = scheduler.timesteps.clone()
    return Trajectory(torch.stack(latents), torch.stack(log_probs), timesteps, step_is_stochastic(scheduler, timesteps))


def guided_eps(unet, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor,
               guidance: float) -> torch.Tensor:
    """Classifier-free guidance ε_∅ + γ(ε_c − ε_∅), both halves in one UNet call (`uncond` may have batch 1;
    `t` is a scalar or one timestep per sample)."""
    n = x.shape[0]
    t = torch.as_tensor(t, device=x.device)
    if guidance == 1.0:  # no guidance: the unconditional half would be multiplied by zero
        return unet(x, t, encoder_hidden_states=cond).sample.float()
    both = unet(torch.cat([x, x]), t.repeat(2) if t.dim() else t,
                encoder_hidden_states=torch.cat([uncond.expand(n, -1, -1), cond])).sample.float()
    e_uncond, e_cond = both[:n], both[n:]
    return e_uncond + guidance * (e_cond - e_uncond)


@contextlib.contextmanager
def lora_disabled(model: torch.nn.Module) -> Iterator[None]:
    """Run `model` as its frozen base: every PEFT LoRA layer bypassed (no change to requires_grad)."""
    from loraforge.models.peft_layers import lora_layers

    layers = [layer for _, layer in lora_layers(model)]
    before = [layer._disable_adapters for layer in layers]
    for layer in layers:
        layer._disable_adapters = True
    try:
        yield
    finally:
        for layer, state in zip(layers, before):
            layer._disable_adapters = state
