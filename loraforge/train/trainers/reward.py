"""Reward fine-tuning of a LoRA (DDPO / DPOK): online policy gradient on images from a stochastic DDIM sampler.

Each iteration samples a batch with the current policy (recording per-step log-probs), scores it with a
reward plugin, normalises advantages per prompt, then takes PPO-clipped policy-gradient steps over a
fraction of the timesteps, with DPOK's KL penalty w_KL·‖ε_θ − ε_ref‖² to the frozen base.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict, deque
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Optional

from pydantic import Field, model_validator

from loraforge.errors import ConfigError, TrainingError
from loraforge.hashing import sha256_json
from loraforge.plugins import TRAINERS
from loraforge.registry.manifest import Manifest
from loraforge.train.base import TrainConfig
from loraforge.train.trainer import SessionTrainer

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from loraforge.train.session import Session

log = logging.getLogger("loraforge.train")


class RewardConfig(TrainConfig):
    reward: str = Field(description="Reward plugin: brightness, gpt_illusion, clip_score, … or python:module:function.")
    reward_options: dict[str, Any] = Field(default_factory=dict, description='Options of the reward plugin, as JSON (e.g. {"model": "gpt-4o-mini"}); never an API key.')
    prompts: list[str] = Field(default_factory=list, description="Prompts to sample; for the illusion sampler one prompt per view separated by '|'.")
    prompt_file: Optional[str] = Field(None, description="Text file with one prompt per line (added to prompts).")
    iterations: int = Field(10, ge=1, description="Sample-then-train iterations.")
    steps: int = Field(1, ge=1, description="Optimiser steps per iteration: passes over the freshly sampled batch (DDPO's inner epochs).")
    learning_rate: float = Field(3e-4, gt=0, description="Peak learning rate of AdamW.")
    checkpoint_every: int = Field(0, ge=0, description="Save a resumable checkpoint every N iterations (0: never); SIGTERM also saves one after the current iteration.")
    sample_batch_size: int = Field(4, ge=1, description="Images sampled (and scored) per iteration.")
    sample_steps: int = Field(20, ge=2, description="Denoising steps of the stochastic DDIM sampler.")
    eta: float = Field(1.0, gt=0, le=1, description="DDIM noise scale η (> 0: every step has a Gaussian log-prob).")
    guidance: float = Field(5.0, ge=0, description="Classifier-free guidance scale while sampling and training.")
    negative_prompt: str = Field("", description="Unconditional / negative prompt of CFG.")
    timestep_fraction: float = Field(1.0, gt=0, le=1, description="Fraction of each trajectory's steps trained on (chosen at random).")
    clip_range: float = Field(1e-4, gt=0, description="PPO ratio clipping: ratio kept in [1 − c, 1 + c].")
    adv_clip_max: float = Field(5.0, gt=0, description="Advantages are clipped to ±this.")
    reward_weight: float = Field(1.0, ge=0, description="w_r, weight of the policy-gradient term.")
    kl_weight: float = Field(0.0, ge=0, description="w_KL, weight of the KL penalty ‖ε_θ − ε_ref‖² to the frozen base (DPOK).")
    kl_warmup: int = Field(0, ge=0, description="Iterations over which w_KL ramps up linearly from 0.")
    per_prompt_stats: bool = Field(True, description="Normalise advantages with running per-prompt reward statistics.")
    stats_buffer: int = Field(32, ge=2, description="Rewards kept per prompt for the running statistics.")
    stats_min_count: int = Field(4, ge=1, description="Below this many rewards for a prompt, use the batch's statistics.")
    shared_initial_noise: bool = Field(False, description="Start every sample of a prompt in an iteration from the same x_T (less variance: rewards differ only by step noise).")
    sampler: Literal["ddim", "illusion"] = Field("ddim", description="ddim: plain images; illusion: visual anagrams over views.")
    views: list[str] = Field(default_factory=list, description="Illusion views (identity, vflip, hflip, rot90, rot180, rot270, negate, jigsaw).")
    joint_adapters: bool = Field(False, description="Illusion sampler: one LoRA per view (named after it) as the policy, registered as <output>-<view>.")

    @model_validator(mode="after")
    def _check(self) -> "RewardConfig":
        if not self.prompts and not self.prompt_file:
            raise ValueError("give prompts or a prompt_file")
        if self.sampler == "illusion" and not self.views:
            raise ValueError("the illusion sampler needs views (e.g. identity, vflip)")
        if self.sampler != "illusion" and (self.views or self.joint_adapters):
            raise ValueError("views and joint_adapters need sampler 'illusion'")
        if self.gradient_accumulation != 1:
            raise ValueError("reward fine-tuning accumulates over the whole sampled batch; leave gradient_accumulation at 1")
        if self.train_text_encoder:
            raise ValueError("reward fine-tuning trains UNet LoRAs only; set train_text_encoder to false")
        return self


class PromptStats:
    """Running reward statistics per prompt (the last `size` rewards), for advantage normalisation."""

    def __init__(self, size: int, min_count: int, per_prompt: bool = True):
        self.size, self.min_count, self.per_prompt = size, min_count, per_prompt
        self.buffers: dict[str, deque] = defaultdict(lambda: deque(maxlen=size))

    def advantages(self, prompts: list[str], rewards: torch.Tensor) -> torch.Tensor:
        import torch

        batch_mean, batch_std = rewards.mean(), rewards.std(unbiased=False)
        out = torch.empty_like(rewards)
        for prompt in dict.fromkeys(prompts):
            idx = torch.tensor([i for i, p in enumerate(prompts) if p == prompt])
            mean, std = batch_mean, batch_std
            if self.per_prompt:
                buf = self.buffers[prompt]
                buf.extend(rewards[idx].tolist())
                if len(buf) >= self.min_count:
                    values = torch.tensor(list(buf), dtype=rewards.dtype)
                    mean, std = values.mean(), values.std(unbiased=False)
            out[idx] = (rewards[idx] - mean) / (std + 1e-6)
        return out

    def state(self) -> dict:
        return {p: list(b) for p, b in self.buffers.items()}

    def load(self, state: dict) -> None:
        for p, values in state.items():
            self.buffers[p].extend(values)


def read_prompts(config: RewardConfig) -> list[str]:
    prompts = [p for p in config.prompts if p.strip()]
    if config.prompt_file:
        path = Path(config.prompt_file).expanduser()
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise ConfigError(f"cannot read prompt_file {config.prompt_file!r}: {exc.strerror or exc}") from None
        prompts += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise ConfigError(f"no prompts: prompts is empty and prompt_file {config.prompt_file!r} has no lines")
    return prompts


def adapter_names_for(views) -> list[str]:
    """Adapter names from view names ("jigsaw:4:0" → "jigsaw_4_0"), made unique."""
    names: list[str] = []
    for v in views:
        base = "".join(ch if ch.isalnum() else "_" for ch in v.name)
        name, k = base, 2
        while name in names:
            name, k = f"{base}_{k}", k + 1
        names.append(name)
    return names


@TRAINERS.register("reward", reference_url="https://arxiv.org/abs/2305.16381", version="1")
class RewardTrainer(SessionTrainer):
    """Reward fine-tuning of a LoRA (DDPO/DPOK) with a pluggable reward and an optional illusion sampler."""

    config_class = RewardConfig
    method = "reward"

    def run(self, session: Session) -> list[Manifest]:
        from loraforge.registry.refs import check_name
        from loraforge.render.illusion import get_views, split_view_prompts
        from loraforge.rewards import load_reward
        from loraforge.train.peft_lora import lora_state_from_module
        from loraforge.train.session import AdapterOutput

        config, registry, output = session.config, session.registry, session.output
        # Everything that can fail cheaply fails before the model loads (a missing API key, bad prompts).
        prompts = read_prompts(config)
        views = get_views(config.views) if config.sampler == "illusion" else []
        view_prompts = {p: split_view_prompts(p, len(views)) for p in prompts} if views else {}
        reward = load_reward(config.reward, config.reward_options, registry=registry)
        adapters = adapter_names_for(views) if config.joint_adapters else ["default"]
        names = {a: (f"{output}-{a}" if config.joint_adapters else output) for a in adapters}
        for name in names.values():
            check_name(name)
        session.check_lora_targets({"unet": list(config.target_modules)})
        model = session.load_model()
        params: dict[str, torch.nn.Parameter] = {}
        for i, a in enumerate(adapters):
            params.update(session.add_lora(model.unet, "unet", config.target_modules, adapter_name=a,
                                           seed=config.seed + i))
        # With joint adapters each view activates its own adapter (illusion_eps); else "default" is the policy.
        run = _RewardRun(config, session, reward, prompts, views, view_prompts, adapters if config.joint_adapters else None)
        metrics = run.train(params)
        outputs = []
        for a in adapters:
            state = lora_state_from_module(model.unet, "unet", adapter_name=a)
            view_i = adapters.index(a) if config.joint_adapters else 0
            first = prompts[0]
            val_prompt = view_prompts[first][view_i] if views else first
            outputs.append(AdapterOutput(name=names[a], state=state, adapter_name=a, validation_prompts=[val_prompt],
                                         metrics={"adapter": a} if config.joint_adapters else {}))
        training = {"reward": reward.name, "reward_version": reward.version, "sampler": config.sampler,
                    "views": [v.name for v in views], "iterations": config.iterations,
                    "prompts_digest": sha256_json(prompts), "prompt_count": len(prompts)}
        return session.finish(outputs, metrics, training=training)


class _RewardRun:
    """The state of one reward fine-tuning run: text embeddings, sampler, statistics, history."""

    def __init__(self, config: RewardConfig, session: Session, reward, prompts, views, view_prompts, adapters):
        from loraforge.train.model import encode_prompts
        from loraforge.models.pipeline import ddim_scheduler

        self.c, self.session, self.model, self.reward = config, session, session.model, reward
        self.prompts, self.views, self.view_prompts, self.adapters = prompts, views, view_prompts, adapters
        self.unet = session.forward_denoiser()
        self.scheduler = ddim_scheduler(self.model.pipe.scheduler.config)
        self.scheduler.set_timesteps(config.sample_steps)
        texts = sorted({t for p in prompts for t in (view_prompts[p] if views else [p])})
        embeds = encode_prompts(self.model, texts)
        self.text = {t: embeds[i:i + 1] for i, t in enumerate(texts)}
        self.uncond = encode_prompts(self.model, [config.negative_prompt])
        scale = self.model.pipe.vae_scale_factor
        if config.resolution % scale:
            raise ConfigError(f"resolution {config.resolution} must be a multiple of {scale} for this base")
        self.latent_shape = (self.model.unet.config.in_channels, config.resolution // scale, config.resolution // scale)
        self.stats = PromptStats(config.stats_buffer, config.stats_min_count, config.per_prompt_stats)
        self.history: dict[str, list] = {"reward_mean": [], "reward_std": [], "loss": [], "kl": [], "clip_fraction": []}

    def eps(self, x: torch.Tensor, t: torch.Tensor, batch_prompts: list[str]) -> torch.Tensor:
        """The policy's guided noise estimate for latents `x` of `batch_prompts` (illusion: averaged over views)."""
        import torch

        from loraforge.render.illusion import illusion_eps
        from loraforge.train.sampling import guided_eps

        dtype = self.model.unet.dtype
        with self.model.autocast():
            if self.views:
                conds = [torch.cat([self.text[self.view_prompts[p][i]] for p in batch_prompts]).to(dtype)
                         for i in range(len(self.views))]
                return illusion_eps(self.unet, x.to(dtype), t, self.views, conds, self.uncond.to(dtype), self.c.guidance,
                                    adapters=self.adapters).float()
            cond = torch.cat([self.text[p] for p in batch_prompts]).to(dtype)
            return guided_eps(self.unet, x.to(dtype), t, cond, self.uncond.to(dtype), self.c.guidance).float()

    def sample(self, iteration: int):
        import torch

        from loraforge.render.illusion import decode_latents
        from loraforge.train.sampling import sample_trajectory

        c = self.c
        gen = torch.Generator("cpu").manual_seed(c.seed * 1_000_003 + iteration)
        picks = torch.randint(len(self.prompts), (c.sample_batch_size,), generator=gen).tolist()
        batch_prompts = [self.prompts[i] for i in picks]
        if c.shared_initial_noise:  # one x_T per prompt: rewards then differ only by the sampler's step noise
            first = {p: torch.randn(self.latent_shape, generator=gen) for p in dict.fromkeys(batch_prompts)}
            x_T = torch.stack([first[p] for p in batch_prompts]).to(self.model.device)
        else:
            x_T = torch.randn((c.sample_batch_size, *self.latent_shape), generator=gen).to(self.model.device)
        traj = sample_trajectory(lambda x, t: self.eps(x, t, batch_prompts), self.scheduler, x_T,
                                 steps=c.sample_steps, eta=c.eta, generator=gen)
        images = decode_latents(self.model.pipe, traj.final)
        return batch_prompts, traj, images, gen

    def kl_weight(self, iteration: int) -> float:
        if not self.c.kl_warmup:
            return self.c.kl_weight
        return self.c.kl_weight * min(1.0, (iteration + 1) / self.c.kl_warmup)

    def train(self, params: dict[str, torch.nn.Parameter]) -> dict:
        """Run the iterations in the shared loop: each is one sampled, scored batch and then `steps`
        optimiser steps on it, so checkpoints (and SIGTERM stops) fall between iterations."""
        import torch

        from loraforge.rewards.base import check_scores, reward_metrics
        from loraforge.train.loop import run_loop

        c = self.c
        batch: dict[str, Any] = {}  # the current iteration's samples, advantages and generator
        parts: dict[str, list[float]] = {}

        def step_fn(step: int, micro: int) -> float:
            it, inner = divmod(step, c.steps)
            if inner == 0:
                prompts, traj, images, gen = self.sample(it)
                rewards = torch.tensor(check_scores(self.reward.name, self.reward(images, prompts), len(images)))
                adv = self.stats.advantages(prompts, rewards).clamp(-c.adv_clip_max, c.adv_clip_max)
                self.history["reward_mean"].append(float(rewards.mean()))
                self.history["reward_std"].append(float(rewards.std(unbiased=False)))
                batch.update(prompts=prompts, traj=traj, adv=adv.to(self.model.device), gen=gen)
                parts.update(loss=[], kl=[], clip_fraction=[])
            loss, kl, clip = self.update(batch["traj"], batch["prompts"], batch["adv"], self.kl_weight(it), batch["gen"])
            parts["loss"].append(loss), parts["kl"].append(kl), parts["clip_fraction"].append(clip)
            if inner == c.steps - 1:
                for key, values in parts.items():
                    self.history[key].append(sum(values) / len(values))
                log.info("reward %s: iteration %d/%d reward %.4f ± %.4f kl %.3g", self.session.output, it + 1,
                         c.iterations, self.history["reward_mean"][-1], self.history["reward_std"][-1],
                         self.history["kl"][-1])
            return loss  # already back-propagated, one timestep at a time

        def load_state(state: dict) -> None:
            self.history = state["history"]
            self.stats.load(state["stats"])

        loop = {**self.session.loop_kwargs(), "steps": c.iterations * c.steps}
        result = run_loop(title=f"train reward {self.session.output}", params=params, step_fn=step_fn,
                          samples_per_step=c.sample_batch_size / c.steps, checkpoint_unit=c.steps,
                          save_state=lambda: {"history": self.history, "stats": self.stats.state()},
                          load_state=load_state, **loop)
        means = self.history["reward_mean"]
        tail = means[-max(1, len(means) // 4):]
        return {
            **result.metrics,
            **{f"{k}_per_iteration": list(vals) for k, vals in self.history.items()},
            "iterations": c.iterations,
            "reward_first": means[0],
            "reward_last": means[-1],
            "reward_mean_last_25pct": sum(tail) / len(tail),
            "eps_drift": self.drift(),
            "resumed_from_iteration": result.resumed_from // c.steps,
            **reward_metrics(self.reward),
        }

    def update(self, traj, batch_prompts: list[str], adv: torch.Tensor, kl_weight: float, gen: torch.Generator):
        """Accumulate the gradient of one pass over the sampled batch; returns (loss, mean KL term, clip fraction)."""
        import torch

        from loraforge.train.sampling import ddim_step_with_logprob, lora_disabled

        c = self.c
        # Only stochastic steps have a log-prob; a deterministic last step (σ = 0) is not an action of the policy.
        steps = traj.stochastic.nonzero().flatten()
        if not len(steps):
            raise TrainingError(f"no denoising step of this base's scheduler is stochastic at sample_steps "
                                f"{c.sample_steps}; raise sample_steps")
        n_train = max(1, round(c.timestep_fraction * len(steps)))
        # Each sample trains on its own random subset of steps, drawn from the iteration's generator.
        chosen = torch.stack([steps[torch.randperm(len(steps), generator=gen)[:n_train]] for _ in batch_prompts])
        B = len(batch_prompts)
        n_terms = math.ceil(B / c.batch_size) * n_train
        total_loss = total_kl = total_clip = 0.0
        for lo in range(0, B, c.batch_size):
            rows = torch.arange(lo, min(B, lo + c.batch_size))
            prompts = [batch_prompts[i] for i in rows.tolist()]
            for k in range(n_train):
                j = chosen[rows, k]
                x_t = traj.latents[j, rows]
                x_prev = traj.latents[j + 1, rows]
                old_lp = traj.log_probs[j, rows]
                t = traj.timesteps[j].to(x_t.device)
                eps = self.eps(x_t, t, prompts)
                _, lp = ddim_step_with_logprob(self.scheduler, eps, t, x_t, eta=c.eta, prev_sample=x_prev)
                ratio = torch.exp(lp - old_lp)
                a = adv[rows]
                pg = torch.maximum(-a * ratio, -a * ratio.clamp(1 - c.clip_range, 1 + c.clip_range)).mean()
                loss = c.reward_weight * pg
                if kl_weight > 0:
                    with torch.no_grad(), lora_disabled(self.model.unet):
                        eps_ref = self.eps(x_t, t, prompts)
                    kl = ((eps - eps_ref) ** 2).mean(dim=tuple(range(1, eps.dim()))).mean()
                    loss = loss + kl_weight * kl
                    total_kl += float(kl.detach())
                (loss / n_terms).backward()
                total_loss += float(loss.detach())
                total_clip += float(((ratio - 1).abs() > c.clip_range).float().mean())
        return total_loss / n_terms, total_kl / n_terms, total_clip / n_terms

    def drift(self) -> float:
        """Prediction drift ‖ε_θ − ε_ref‖² (mean per element) of the final policy on fixed noisy latents."""
        import torch

        from loraforge.train.sampling import lora_disabled

        with torch.no_grad():
            gen = torch.Generator("cpu").manual_seed(self.c.seed + 7)
            n = min(4, len(self.prompts))
            x = torch.randn((n, *self.latent_shape), generator=gen).to(self.model.device)
            t = self.scheduler.timesteps[torch.randint(len(self.scheduler.timesteps), (n,), generator=gen)].to(x.device)
            prompts = self.prompts[:n]
            eps = self.eps(x, t, prompts)
            with lora_disabled(self.model.unet):
                ref = self.eps(x, t, prompts)
            return float(((eps - ref) ** 2).mean())
