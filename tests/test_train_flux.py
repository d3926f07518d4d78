"""LoRA and Concept-Slider training on Flux (builtin:tiny-flux): the flow-matching objective as diffusers computes
it, a loss that falls on fixed draws, exact resume, cached T5/CLIP embeddings, adapters diffusers' FluxPipeline
loads, and the trainers that cannot train Flux refusing it in one line.

Oracles: diffusers' own helpers (compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3, FluxPipeline's
_pack_latents/_unpack_latents/_prepare_latent_image_ids/encode_prompt) for the objective; W + ΔW worked out here from
the registry's tensors, merged into a fresh transformer, for what a trained adapter does; FluxPipeline
.load_lora_weights as the consumer of its names.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from cli_helpers import link_builtins, refused, run_cli
from loraforge.plugins import TRAINERS
from loraforge.registry import Registry
from test_train import Killed, adapter_state, pattern_images

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RES = 32  # pixels: 8×8 latents, 4×4 = 16 image tokens
PROMPT = "red stripes"
FAST = {"base": "builtin:tiny-flux", "resolution": RES, "rank": 4, "validation_steps": 2, "learning_rate": 1e-2,
        "batch_size": 2, "seed": 1}
TRAIN = ["--base", "builtin:tiny-flux", "--resolution", str(RES), "--rank", "4", "--validation-steps", "2",
         "--learning-rate", "1e-2", "--batch-size", "2", "--seed", "1"]


@pytest.fixture(scope="module")
def flux_path(tiny_flux_path) -> Path:
    return tiny_flux_path


@pytest.fixture(scope="module")
def flux_home(tmp_path_factory, tiny_flux_path, tiny_sd_path) -> Path:
    return link_builtins(tmp_path_factory.mktemp("flux-home"), {"tiny-flux": tiny_flux_path, "tiny-sd": tiny_sd_path})


@pytest.fixture(scope="module")
def stripes(tmp_path_factory) -> Path:
    return pattern_images(tmp_path_factory.mktemp("stripes") / "data", "stripes", n=2, caption=PROMPT)


def train(home: Path, method: str, output: str, resume: bool = False, **values):
    trainer = TRAINERS.get(method)
    config = trainer.config_class.model_validate({**FAST, **values})
    return trainer().train(config, registry=Registry(home), output=output, progress=False, resume=resume)


@pytest.fixture(scope="module")
def pipe(flux_path):
    from diffusers import FluxPipeline

    p = FluxPipeline.from_pretrained(str(flux_path))
    p.set_progress_bar_config(disable=True)
    return p


def fused(pipe, state, scale: float = 1.0):
    """A copy of the base transformer with W + scale·ΔW of every `transformer.` module of `state`."""
    transformer = copy.deepcopy(pipe.transformer)
    weights = dict(transformer.named_parameters())
    with torch.no_grad():
        for name, module in state.component("transformer").items():
            weights[name + ".weight"].add_(scale * module.delta().to(weights[name + ".weight"].dtype))
    return transformer


def text_of(pipe, prompt: str, n: int):
    with torch.no_grad():
        embeds, pooled, text_ids = pipe.encode_prompt([prompt], max_sequence_length=pipe.tokenizer_2.model_max_length)
    return embeds.expand(n, -1, -1), pooled.expand(n, -1), text_ids


def velocity(pipe, transformer, noisy: torch.Tensor, sigmas: torch.Tensor, prompt: str) -> torch.Tensor:
    """diffusers' Flux call on unpacked latents, as its LoRA example makes it (timestep = σ, guidance 1)."""
    from diffusers import FluxPipeline

    b, c, h, w = noisy.shape
    embeds, pooled, text_ids = text_of(pipe, prompt, b)
    ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, noisy.device, noisy.dtype)
    with torch.no_grad():
        out = transformer(hidden_states=FluxPipeline._pack_latents(noisy, b, c, h, w), timestep=sigmas,
                          guidance=torch.tensor([1.0]).expand(b), pooled_projections=pooled,
                          encoder_hidden_states=embeds, txt_ids=text_ids, img_ids=ids, return_dict=False)[0]
    return FluxPipeline._unpack_latents(out, h * pipe.vae_scale_factor, w * pipe.vae_scale_factor, pipe.vae_scale_factor)


def latents_of(pipe, folder: Path) -> torch.Tensor:
    from loraforge.train.data import image_tensor

    pixels = torch.stack([image_tensor(p, RES) for p in sorted(folder.glob("*.png"))])
    with torch.no_grad():
        z = pipe.vae.encode(pixels).latent_dist.mean
    return (z - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor


def flow_loss(pipe, transformer, latents: torch.Tensor, prompt: str, draws: int = 4, seed: int = 7) -> float:
    """The mean velocity loss at fixed noise and noise levels (the same for every transformer compared)."""
    g = torch.Generator().manual_seed(seed)
    total = 0.0
    for _ in range(draws):
        noise = torch.randn(latents.shape, generator=g)
        sigmas = torch.rand(len(latents), generator=g) * 0.8 + 0.1
        s = sigmas.view(-1, 1, 1, 1)
        pred = velocity(pipe, transformer, (1 - s) * latents + s * noise, sigmas, prompt)
        total += float(torch.nn.functional.mse_loss(pred, noise - latents))
    return total / draws


# ---- the objective ---------------------------------------------------------------------------

@pytest.mark.parametrize("scheme", ["logit_normal", "mode", "cosmap"])
def test_the_flow_objective_is_diffusers_flux_objective(flux_home, stripes, pipe, scheme):
    from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

    from loraforge.train.flow_matching import FlowOptions
    from loraforge.train.model import denoising_loss, encode_images, encode_prompts, load_training_model, \
        sample_training_noise

    model = load_training_model(Registry(flux_home), "builtin:tiny-flux", families=("flux",))
    from loraforge.train.data import image_tensor

    pixels = torch.stack([image_tensor(p, RES) for p in sorted(stripes.glob("*.png"))])
    latents = encode_images(model, pixels)
    expected_latents = latents_of(pipe, stripes)
    assert torch.allclose(latents, expected_latents, atol=1e-6)

    options = FlowOptions(weighting_scheme=scheme)
    noise, sigmas = sample_training_noise(model, latents, torch.Generator().manual_seed(3), options)
    g = torch.Generator().manual_seed(3)  # the same draws by hand, as diffusers' example makes them
    hand_noise = torch.randn(latents.shape, generator=g)
    u = compute_density_for_timestep_sampling(scheme, len(latents), logit_mean=0.0, logit_std=1.0, mode_scale=1.29,
                                              generator=g)
    timesteps = model.noise_scheduler.timesteps[(u * 1000).long()]
    assert torch.equal(noise, hand_noise)
    assert torch.allclose(sigmas, timesteps / 1000, atol=1e-6)

    text = encode_prompts(model, [PROMPT] * len(latents))
    loss = denoising_loss(model, model.denoiser, latents, text, noise, sigmas, options=options, reduce=False)
    s = sigmas.view(-1, 1, 1, 1)
    pred = velocity(pipe, pipe.transformer, (1 - s) * latents + s * noise, timesteps / 1000, PROMPT)
    weighting = compute_loss_weighting_for_sd3(scheme, s)
    hand = (weighting * (pred - (noise - latents)) ** 2).reshape(len(latents), -1).mean(dim=1)
    assert torch.allclose(loss, hand, rtol=1e-5), (loss, hand)


# ---- LoRA ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(flux_home, stripes):
    run_cli(flux_home, "train", "lora", "--name", "fl", *TRAIN, "--steps", "40", "--dataset", str(stripes))
    manifest = Registry(flux_home).resolve("fl:1")
    return manifest, adapter_state(flux_home, manifest)


def test_flux_lora_lowers_the_flow_loss_on_fixed_draws(trained, stripes, pipe):
    manifest, state = trained
    assert manifest.base.family == "flux" and manifest.adapter.components == ["transformer"]
    assert {k.split(".")[1] for k in state} == {"transformer_blocks", "single_transformer_blocks"}
    assert {k.rsplit(".", 1)[-1] for k in state} >= {"add_q_proj", "to_add_out", "to_q"}  # both streams' attention
    latents = latents_of(pipe, stripes)
    before = flow_loss(pipe, pipe.transformer, latents, PROMPT)
    after = flow_loss(pipe, fused(pipe, state), latents, PROMPT)
    assert after < 0.9 * before, (before, after)
    assert manifest.metrics["loss_mean_last_10pct"] < manifest.metrics["loss_first"]
    assert any(f.path == "validation.png" for f in manifest.files)


def test_flux_pipeline_loads_the_adapter_by_its_names_with_the_hand_merged_output(trained, flux_path, pipe):
    from diffusers import FluxPipeline

    _manifest, state = trained
    lora = {}
    for name, module in state.items():  # diffusers' PEFT layout: alpha = rank, so the scale is 1
        assert module.alpha == module.down.shape[0]
        lora[f"{name}.lora_A.weight"] = module.down
        lora[f"{name}.lora_B.weight"] = module.up
    consumer = FluxPipeline.from_pretrained(str(flux_path))
    consumer.load_lora_weights(lora)
    g = torch.Generator().manual_seed(2)
    latents = torch.randn(1, 16, 8, 8, generator=g)
    sigmas = torch.tensor([0.6])
    loaded = velocity(consumer, consumer.transformer, latents, sigmas, PROMPT)
    merged = velocity(pipe, fused(pipe, state), latents, sigmas, PROMPT)
    base = velocity(pipe, pipe.transformer, latents, sigmas, PROMPT)
    assert float((loaded - merged).norm() / merged.norm()) < 1e-4
    assert float((merged - base).norm() / base.norm()) > 1e-3  # the adapter changes the transformer's output


def test_resume_after_kill_gives_identical_weights(flux_home, stripes, monkeypatch):
    import loraforge.train.loop as loop_module

    values = dict(dataset=str(stripes), steps=8, checkpoint_every=3, validation_prompts=[PROMPT])
    [whole] = train(flux_home, "lora", "flux-whole", **values)
    real_loop = loop_module.run_loop

    def dying_loop(**kwargs):
        def on_step(step):
            if step == 7:  # killed after step 7: the newest checkpoint is step 6
                raise Killed()
        return real_loop(**{**kwargs, "on_step": on_step})

    monkeypatch.setattr(loop_module, "run_loop", dying_loop)
    with pytest.raises(Killed):
        train(flux_home, "lora", "flux-resumed", **values)
    monkeypatch.setattr(loop_module, "run_loop", real_loop)
    [resumed] = train(flux_home, "lora", "flux-resumed", resume=True, **values)
    assert resumed.metrics["resumed_from_step"] == 6
    a, b = adapter_state(flux_home, whole), adapter_state(flux_home, resumed)
    assert sorted(a) == sorted(b)
    for name in a:
        assert torch.equal(a[name].down, b[name].down) and torch.equal(a[name].up, b[name].up), name


def test_a_second_run_reads_cached_t5_and_clip_embeddings_and_a_changed_caption_misses(flux_home, tmp_path,
                                                                                      monkeypatch):
    import loraforge.train.cache as cache
    from loraforge.home import cache_dir

    data = pattern_images(tmp_path / "d", "checks", n=2, caption="blue checks")
    values = dict(dataset=str(data), steps=2, validation_prompts=[PROMPT])
    folder = cache_dir(flux_home) / "train"
    before = set(folder.glob("*")) if folder.exists() else set()
    [first] = train(flux_home, "lora", "cache-a", **values)
    new = sorted(p.name for p in set(folder.glob("*")) - before)
    assert [n.split("-")[0] for n in new] == ["latents", "text"]
    from loraforge.formats.safetensors_io import read_safetensors

    cached = read_safetensors(folder / new[1])[0]  # the T5 sequence and the CLIP pooled vector
    assert cached["data"].shape[1:] == (32, 32) and cached["pooled"].shape[1:] == (32,)

    def no_encoding(*args, **kwargs):
        raise AssertionError("encoded again although the cache holds this entry")

    with monkeypatch.context() as m:
        m.setattr(cache, "encode_prompts", no_encoding)
        m.setattr(cache, "encode_images", no_encoding)
        [second] = train(flux_home, "lora", "cache-b", **values)
    a, b = adapter_state(flux_home, first), adapter_state(flux_home, second)
    assert all(torch.equal(a[k].up, b[k].up) for k in a)
    (data / "img0.txt").write_text("green checks")
    train(flux_home, "lora", "cache-c", **values)
    added = sorted(p.name.split("-")[0] for p in set(folder.glob("*")) - before)
    assert added == ["latents", "text", "text"]  # a new caption is a new text entry; the latents are reused


def test_train_text_encoder_trains_clip_and_leaves_t5_frozen(flux_home, stripes):
    [m] = train(flux_home, "lora", "fl-te", dataset=str(stripes), steps=2, train_text_encoder=True)
    assert m.adapter.components == ["text_encoder", "transformer"]
    state = adapter_state(flux_home, m)
    keys = list(state.component("text_encoder"))
    assert keys and all(k.startswith("text_model.encoder.layers.") for k in keys), keys


def test_dreambooth_lora_trains_on_flux_with_generated_class_images(flux_home, stripes):
    [m] = train(flux_home, "dreambooth_lora", "db", dataset=str(stripes), steps=2, batch_size=1,
                instance_prompt="a sks pattern", prior_preservation=True, class_prompt="a pattern", num_class_images=2,
                class_generation_steps=2)
    assert m.adapter.components == ["transformer"]
    assert [p.role for p in m.provenance.parents] == ["base", "dataset", "dataset"]  # instance and class images


# ---- sliders ---------------------------------------------------------------------------------

def test_flux_slider_moves_the_velocity_along_positive_minus_negative(flux_home, pipe):
    [m] = train(flux_home, "slider", "old", steps=30, target="a person", positive="an old person",
                negative="a young person", guidance=4.0, denoise_steps=4, batch_size=1, learning_rate=2e-2)
    assert m.kind == "slider" and m.base.family == "flux"
    state = adapter_state(flux_home, m)
    assert state.components == ["transformer"]
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 16, 8, 8, generator=g)
    sigmas = torch.tensor([0.5, 0.8])
    base = pipe.transformer
    direction = velocity(pipe, base, x, sigmas, "an old person") - velocity(pipe, base, x, sigmas, "a young person")
    at_zero = velocity(pipe, base, x, sigmas, "a person")
    moved = {s: float(((velocity(pipe, fused(pipe, state, s), x, sigmas, "a person") - at_zero) * direction).sum())
             for s in (1.0, -1.0)}
    assert moved[1.0] > 0 > moved[-1.0], moved


def test_a_flux_image_pair_slider_trains(flux_home, tmp_path):
    low = pattern_images(tmp_path / "low", "dark", n=2)
    high = pattern_images(tmp_path / "high", "bright", n=2)
    [m] = train(flux_home, "slider", "bright", steps=2, low_images=str(low), high_images=str(high), target="a wall")
    assert m.kind == "slider" and adapter_state(flux_home, m).components == ["transformer"]


# ---- refusals --------------------------------------------------------------------------------

@pytest.mark.parametrize("method,args", [
    ("dreambooth", ["--instance-prompt", "a sks dog"]),
    ("textual_inversion", ["--token", "<sks>", "--initializer", "dog"]),
    ("reward", ["--reward", "brightness", "--prompts", "a cat", "--iterations", "1"]),
    ("joint", []),
])
def test_trainers_that_cannot_train_flux_refuse_it_in_one_line(flux_home, stripes, method, args):
    before = Registry(flux_home).list()
    common = ["--base", "builtin:tiny-flux", "--resolution", str(RES), "--steps", "1"]
    if method == "joint":
        args = ["--adapters", json.dumps({"a": {"dataset": str(stripes)}})]
    elif method != "reward":
        common += ["--dataset", str(stripes)]
    families = TRAINERS.get(method).families
    line = refused(run_cli(flux_home, "train", method, "--name", "no-flux", *common, *args, ok=False))
    assert line == (f"Error: {method} does not train on flux bases (builtin:tiny-flux); "
                    f"use a {' or '.join(families)} base")
    assert Registry(flux_home).list() == before


def test_flux_only_options_are_refused_on_a_noise_model_and_xattn_on_flux(flux_home, stripes):
    line = refused(run_cli(flux_home, "train", "lora", "--name", "sd", "--base", "builtin:tiny-sd", "--steps", "1",
                           "--dataset", str(stripes), "--weighting-scheme", "mode", ok=False))
    assert line == ("Error: weighting_scheme='mode': flow-matching options of Flux bases, but builtin:tiny-sd is a "
                    "SD1.x base trained to predict noise; drop them")
    line = refused(run_cli(flux_home, "train", "lora", "--name", "sd", "--base", "builtin:tiny-sd", "--steps", "1",
                           "--dataset", str(stripes), "--embedded-guidance", "1.0", ok=False))  # its default: not ignored
    assert line.startswith("Error: embedded_guidance=1.0: flow-matching options of Flux bases"), line
    line = refused(run_cli(flux_home, "train", "slider", "--name", "xa", *TRAIN, "--steps", "1", "--layers", "xattn",
                           "--target", "a", "--positive", "b", "--negative", "c", ok=False))
    assert line == ("Error: layers xattn has no meaning on Flux bases (builtin:tiny-flux), whose text and image tokens "
                    "attend jointly; use noxattn, full or custom")
