"""Reward fine-tuning: the stochastic DDIM log-prob, advantages, the KL penalty's hold on the adapter, provenance."""

from __future__ import annotations

import math
import textwrap

import pytest
import torch
from click.testing import CliRunner

from loraforge.cli import cli
from loraforge.errors import RewardError
from loraforge.models.pipeline import ddim_scheduler
from loraforge.plugins import REWARDS, TRAINERS
from loraforge.registry.registry import Registry
from loraforge.registry.resolve import load_adapter
from loraforge.rewards import load_reward
from loraforge.train.sampling import ddim_step_with_logprob, sample_trajectory
from loraforge.train.trainers.reward import PromptStats, RewardConfig


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _scheduler(steps=5):
    from diffusers import DDIMScheduler

    s = ddim_scheduler(DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                     clip_sample=False, set_alpha_to_one=False, steps_offset=1).config)
    s.set_timesteps(steps)
    return s


def test_ddim_step_logprob_is_the_gaussian_of_the_step():
    s = _scheduler()
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = s.timesteps[1]
    prev, lp = ddim_step_with_logprob(s, eps, t, x, eta=0.7, generator=torch.Generator().manual_seed(1))
    # Reference: DDIM formula (16) of Song et al. written out, and torch's Normal.
    a_t, a_p = s.alphas_cumprod[t], s.alphas_cumprod[t - 1000 // 5]
    x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    std = 0.7 * ((1 - a_p) / (1 - a_t) * (1 - a_t / a_p)).sqrt()
    mean = a_p.sqrt() * x0 + (1 - a_p - std**2).sqrt() * eps
    want = torch.distributions.Normal(mean, std).log_prob(prev).mean(dim=(1, 2, 3))
    torch.testing.assert_close(lp, want, atol=1e-4, rtol=1e-5)
    assert (prev - mean).std() / std == pytest.approx(1.0, abs=0.05)  # the noise really has σ_t
    # Diffusers' own DDIM step with the same noise lands on the same x_{t−1}.
    noise = (prev - mean) / std
    ref = s.step(eps, t, x, eta=0.7, variance_noise=noise).prev_sample
    torch.testing.assert_close(prev, ref, atol=1e-5, rtol=1e-5)


def test_recorded_trajectory_log_probs_replay_exactly():
    s = _scheduler(4)
    weight = torch.tensor(0.3)
    traj = sample_trajectory(lambda x, t: weight * x, s, torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2)),
                             steps=4, eta=1.0, generator=torch.Generator().manual_seed(3))
    assert traj.latents.shape == (5, 2, 4, 8, 8) and traj.log_probs.shape == (4, 2)
    for k, t in enumerate(traj.timesteps):  # per-sample timesteps, as training uses them
        _, lp = ddim_step_with_logprob(s, weight * traj.latents[k], t.repeat(2), traj.latents[k], eta=1.0,
                                       prev_sample=traj.latents[k + 1])
        torch.testing.assert_close(lp, traj.log_probs[k])  # PPO ratio exactly 1 before the first update


@pytest.mark.parametrize("config", [{}, {"timestep_spacing": "trailing"},
                                    {"timestep_spacing": "linspace", "set_alpha_to_one": False, "steps_offset": 1}])
def test_a_zero_variance_last_step_is_deterministic_and_marked(config):
    from diffusers import DDIMScheduler

    # Stock DDIM configs: the last step lands on alpha_bar = 1, or on alpha_bar_prev = alpha_bar_t; its variance is 0.
    s = ddim_scheduler(DDIMScheduler(clip_sample=False, **config).config)
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    traj = sample_trajectory(lambda x, t: 0.3 * x, s, x_T, steps=4, eta=1.0, generator=torch.Generator().manual_seed(5))
    assert torch.isfinite(traj.log_probs).all() and torch.isfinite(traj.latents).all()
    assert traj.stochastic.tolist() == [True, True, True, False]
    # The deterministic step is diffusers' own DDIM step (with eta its variance is zero, so no noise is added).
    t = traj.timesteps[-1]
    want = s.step(0.3 * traj.latents[-2], t, traj.latents[-2], eta=1.0).prev_sample
    torch.testing.assert_close(traj.latents[-1], want, atol=1e-5, rtol=1e-5)


def test_advantages_are_normalised_per_prompt():
    stats = PromptStats(size=8, min_count=2)
    adv = stats.advantages(["a", "a", "b", "b"], torch.tensor([1.0, 3.0, 10.0, 30.0]))
    torch.testing.assert_close(adv, torch.tensor([-1.0, 1.0, -1.0, 1.0]), atol=1e-5, rtol=0)
    adv = stats.advantages(["a", "a"], torch.tensor([2.0, 2.0]))  # running buffer: [1, 3, 2, 2]
    assert adv.tolist() == pytest.approx([0.0, 0.0], abs=1e-5)
    stats = PromptStats(size=8, min_count=5)  # too few rewards for a prompt: batch statistics
    adv = stats.advantages(["a", "b"], torch.tensor([0.0, 2.0]))
    assert adv.tolist() == pytest.approx([-1.0, 1.0], abs=1e-5)


def test_reward_plugins_are_listed_and_bad_specs_are_one_line_errors():
    assert {"brightness", "gpt_illusion", "clip_score", "python"} <= set(REWARDS.names())
    with pytest.raises(RewardError, match="unknown reward 'shiny'"):
        load_reward("shiny")
    with pytest.raises(RewardError, match="unknown option.*colour.*brightness.*accepts: invert"):
        load_reward("brightness", {"colour": 1})
    with pytest.raises(RewardError, match="cannot import module 'no_such_mod'"):
        load_reward("python:no_such_mod:f")


def test_python_reward_versions_follow_the_source(tmp_path, monkeypatch):
    from PIL import Image

    (tmp_path / "my_reward.py").write_text(textwrap.dedent("""
        def score(images, prompts):
            return [len(p) for p in prompts]
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    reward = load_reward("python:my_reward:score")
    assert reward([Image.new("RGB", (4, 4))] * 2, ["ab", "abcd"]) == [2.0, 4.0]
    assert reward.name == "python:my_reward:score" and reward.version.startswith("src-")


def _train(registry, output, **overrides):
    values = dict(reward="brightness", prompts=["a cat", "a dog"], iterations=3, sample_batch_size=8, batch_size=8,
                  sample_steps=2, guidance=1.0, resolution=8, rank=4, learning_rate=3e-2, seed=0,
                  validation_steps=2)
    values.update(overrides)
    trainer = TRAINERS.get("reward")()
    return trainer.train(RewardConfig(**values), registry=registry, output=output, progress=False)


def _delta_norm(registry, ref) -> float:
    state, _ = load_adapter(registry, ref)
    return math.sqrt(sum(float(m.delta().pow(2).sum()) for m in state.values()))


def test_large_kl_weight_keeps_the_adapter_near_the_base(home):
    registry = Registry(home)
    free = _train(registry, "free", kl_weight=0.0, iterations=6)[0]
    held = _train(registry, "held", kl_weight=1000.0, iterations=6)[0]
    free_norm, held_norm = _delta_norm(registry, "free"), _delta_norm(registry, "held")
    # Measured: ‖ΔW‖ 2.9 vs 4.5, prediction drift ‖ε_θ − ε_ref‖² 0.0007 vs 0.011.
    assert held_norm < 0.8 * free_norm, (held_norm, free_norm)
    assert held.metrics["eps_drift"] < 0.2 * free.metrics["eps_drift"], (held.metrics["eps_drift"], free.metrics["eps_drift"])
    assert held.metrics["kl_per_iteration"][0] == 0.0 and held.metrics["kl_per_iteration"][-1] > 0  # B starts at 0

    # What the user sees in the registry: a LoRA with the reward's name and version and the reward history.
    assert free.kind == "lora" and free.provenance.method == "train:reward"
    assert free.provenance.training["reward"] == "brightness" and free.provenance.training["reward_version"] == "1"
    assert free.provenance.params["kl_weight"] == 0.0
    means = free.metrics["reward_mean_per_iteration"]
    assert len(means) == 6 and len(free.metrics["reward_std_per_iteration"]) == 6
    assert all(0.3 < m < 0.7 for m in means)
    assert free.metrics["reward_first"] == means[0]


def test_joint_illusion_policy_registers_one_adapter_per_view(home, tmp_path):
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("# upright | flipped\na cat | a dog\n")
    registry = Registry(home)
    manifests = _train(registry, "anagram", prompts=[], prompt_file=str(prompt_file), sampler="illusion",
                       views=["identity", "vflip"], joint_adapters=True, iterations=1, sample_batch_size=2,
                       batch_size=2, guidance=2.0)
    assert [m.name for m in manifests] == ["anagram-identity", "anagram-vflip"]
    assert manifests[0].provenance.training["views"] == ["identity", "vflip"]
    assert manifests[0].provenance.training["prompt_count"] == 1
    assert _delta_norm(registry, "anagram-identity") > 0 and _delta_norm(registry, "anagram-vflip") > 0


def test_cli_train_reward_bad_input_fails_before_training(home, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    runner = CliRunner()
    result = runner.invoke(cli, ["train", "reward", "-n", "x", "--reward", "gpt_illusion", "--prompts", "a cat"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1].startswith("Error: gpt_illusion reward needs an API key: set $OPENAI_API_KEY")
    result = runner.invoke(cli, ["train", "reward", "-n", "x", "--reward", "brightness", "--prompts", "a cat | a dog",
                                 "--sampler", "illusion", "--views", "identity", "--views", "vflip", "--views", "rot90"])
    assert result.exit_code == 1 and "has 2 part(s) but there are 3 views" in result.output
    assert Registry(home).list() == []


def test_cli_train_reward_registers_one_version(home):
    args = ["train", "reward", "-n", "bright", "--reward", "brightness", "--prompts", "a cat", "--prompts", "a dog",
            "--iterations", "2", "--sample-batch-size", "2", "--batch-size", "2", "--sample-steps", "2",
            "--resolution", "16", "--rank", "2", "--guidance", "1", "--validation-steps", "1"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    [manifest] = Registry(home).list()  # the adapter, complete; no other version
    assert (manifest["name"], manifest["version"], manifest["kind"]) == ("bright", 1, "lora")
    m = Registry(home).resolve("bright").metrics
    assert f"registered bright:1 (lora, rank 2, 2 steps, final loss {m['loss_last']:.4f}" in result.output
    assert len(m["reward_mean_per_iteration"]) == 2 and m["iterations"] == 2
    assert not list((home / "runs").glob("*/step-*"))


def test_clip_score_is_the_cosine_of_clip_features(tiny_sd_path, tmp_path):
    from PIL import Image
    from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTextConfig,
                              CLIPTokenizer, CLIPVisionConfig)

    tokenizer = CLIPTokenizer.from_pretrained(tiny_sd_path / "tokenizer")
    torch.manual_seed(0)
    config = CLIPConfig(text_config=CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37,
                                                   num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                                                   eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id).to_dict(),
                        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                                       num_attention_heads=4, image_size=32, patch_size=8).to_dict(),
                        projection_dim=16)
    model = CLIPModel(config).eval()
    folder = tmp_path / "tiny-clip"
    model.save_pretrained(folder)
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                  tokenizer=tokenizer).save_pretrained(folder)
    reward = load_reward("clip_score", {"model": str(folder), "scale": 100.0, "device": "cpu"})
    images = [Image.new("RGB", (40, 40), (200, 30, 30)), Image.new("RGB", (40, 40), (20, 30, 220))]
    scores = reward(images, ["a red apple", "a blue sky"])
    processor = CLIPProcessor.from_pretrained(folder)
    with torch.no_grad():
        inputs = processor(text=["a red apple", "a blue sky"], images=images, return_tensors="pt", padding="max_length")
        out = model(**inputs)
    want = 100 * torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds, dim=-1)
    assert scores == pytest.approx(want.tolist(), abs=1e-3)
    assert reward.version == f"1:{folder}"
    with pytest.raises(RewardError, match="cannot load CLIP model"):
        load_reward("clip_score", {"model": str(tmp_path / "missing")})
