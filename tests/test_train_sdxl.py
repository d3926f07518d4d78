"""LoRA training on SDXL: conditioned as diffusers' SDXL pipeline conditions inference, trained on the UNet and
both text encoders, and loaded by diffusers' own StableDiffusionXLPipeline.load_lora_weights.

The oracle of what a trained file does is W + ΔW worked out here (ΔW = alpha/rank · up·down from the tensors
the registry holds), merged into a fresh copy of the base; the oracle of the conditioning is the UNet call
diffusers' StableDiffusionXLPipeline makes itself during inference.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import pytest
import torch

from cli_helpers import link_builtins, refused, run_cli
from loraforge.registry import Registry
from test_train import RES, adapter_state, pattern_images

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPT = "red stripes"
TRAIN = ["--base", "builtin:tiny-sdxl", "--steps", "20", "--resolution", str(RES), "--rank", "2", "--alpha", "4",
         "--learning-rate", "2e-2", "--validation-steps", "2", "--seed", "1", "--batch-size", "2"]
REL_TOL = 1e-4


@pytest.fixture(scope="module")
def xl_home(tmp_path_factory, builtin_folders) -> Path:
    return link_builtins(tmp_path_factory.mktemp("sdxl-home"), builtin_folders)


@pytest.fixture(scope="module")
def stripes(tmp_path_factory) -> Path:
    return pattern_images(tmp_path_factory.mktemp("stripes") / "data", "stripes", n=2, caption=PROMPT)


@pytest.fixture(scope="module")
def trained(xl_home, stripes, tmp_path_factory):
    """(LoraState, exported diffusers file) of an SDXL LoRA trained on the UNet and both text encoders."""
    run_cli(xl_home, "train", "lora", "--name", "xl", *TRAIN, "--dataset", str(stripes), "--train-text-encoder")
    manifest = Registry(xl_home).resolve("xl:1")
    out = tmp_path_factory.mktemp("export") / "xl.safetensors"
    run_cli(xl_home, "registry", "export", "xl", "--format", "diffusers", "-o", str(out))
    return adapter_state(xl_home, manifest), out, manifest


def fresh_pipeline(tiny_sdxl_path):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl_path))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def latents_of(pipe, seed: int = 5) -> torch.Tensor:
    with torch.no_grad():
        return pipe(PROMPT, num_inference_steps=3, guidance_scale=5.0, height=RES, width=RES, output_type="latent",
                    generator=torch.Generator().manual_seed(seed)).images


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def module_at(pipe, key: str) -> torch.nn.Module:
    """The module of a canonical adapter key: text encoders' paths keep CLIP's `text_model.` wrapper, which
    transformers 5 dropped from CLIPTextModel in memory."""
    component, path = key.split(".", 1)
    model = getattr(pipe, component)
    try:
        return model.get_submodule(path)
    except AttributeError:
        return model.get_submodule(path.removeprefix("text_model."))


def _layer_numbers(state, component: str) -> set[int]:
    return {int(k.split(".layers.")[1].split(".")[0]) for k in state.component(component)}


def test_the_trained_adapter_covers_unet_and_both_text_encoders(trained):
    state, _file, manifest = trained
    assert state.components == ["text_encoder", "text_encoder_2", "unet"]
    assert manifest.base.family == "sdxl"
    trained_up = {key: bool(m.up.abs().max() > 0) for key, m in state.items()}  # B started at zero
    # SDXL reads text_encoder's penultimate hidden states, so its last layer gets no gradient (as in diffusers'
    # own SDXL LoRA training); text_encoder_2's last layer feeds the pooled text_embeds and does.
    last = f"text_encoder.text_model.encoder.layers.{max(_layer_numbers(state, 'text_encoder'))}."
    assert {k: v for k, v in trained_up.items() if not v} == {k: False for k in trained_up if k.startswith(last)}
    assert any(k.startswith(last) for k in trained_up)
    assert all(v for k, v in trained_up.items() if k.startswith(("unet.", "text_encoder_2.")))


def test_diffusers_loads_the_sdxl_export_fully_and_computes_w_plus_delta(trained, tiny_sdxl_path, caplog):
    from peft.tuners.lora import LoraLayer

    state, file, _manifest = trained
    base = latents_of(fresh_pipeline(tiny_sdxl_path))

    loaded = fresh_pipeline(tiny_sdxl_path)
    with caplog.at_level(logging.WARNING):
        loaded.load_lora_weights(str(file))
    assert not [r for r in caplog.records if r.name.startswith(("diffusers", "peft"))], caplog.text
    for component in ("unet", "text_encoder", "text_encoder_2"):
        layers = [n for n, m in getattr(loaded, component).named_modules() if isinstance(m, LoraLayer)]
        assert len(layers) == len(state.component(component)), component
    with_lora = latents_of(loaded)

    merged = fresh_pipeline(tiny_sdxl_path)
    with torch.no_grad():
        for key, module in state.items():
            target = module_at(merged, key)
            target.weight += module.alpha / module.down.shape[0] * (module.up @ module.down)
    reference = latents_of(merged)

    assert rel_err(with_lora, reference) < REL_TOL
    assert rel_err(with_lora, base) > 1e-2  # the adapter changes what the pipeline makes


def test_the_adapter_lowers_the_denoising_loss_on_its_data(xl_home, stripes, trained):
    """The noise-prediction loss on the training images, over fixed noise and timesteps, with the adapter
    loaded by diffusers into the pipeline against without it."""
    from loraforge.train.cache import BatchSource
    from loraforge.train.data import prepare_dataset
    from loraforge.train.model import denoising_loss, load_training_model

    _state, file, _manifest = trained
    registry = Registry(xl_home)
    model = load_training_model(registry, "builtin:tiny-sdxl", device="cpu")
    source = BatchSource(model, prepare_dataset(registry, str(stripes), output="loss-check"), home=xl_home,
                         resolution=RES, cached=False)
    latents, text = source.batch([0, 1])
    gen = torch.Generator().manual_seed(0)
    draws = [(torch.randn(latents.shape, generator=gen), torch.randint(0, 1000, (2,), generator=gen))
             for _ in range(16)]

    def loss() -> float:
        with torch.no_grad():
            return sum(float(denoising_loss(model, model.unet, latents, text, n, t)) for n, t in draws) / len(draws)

    before = loss()
    model.pipe.load_lora_weights(str(file))
    text = source.batch([0, 1])[1]  # re-encoded through the text encoders' LoRA
    after = loss()
    assert after < 0.98 * before, (before, after)


def test_training_conditions_the_unet_as_the_sdxl_pipeline_does(xl_home):
    """encoder_hidden_states, text_embeds and time_ids of a training step equal those diffusers' pipeline passes
    to the UNet when it renders the same prompt at the training resolution."""
    from loraforge.train.cache import text_key
    from loraforge.train.model import encode_prompts, load_training_model, unet_conditioning

    model = load_training_model(Registry(xl_home), "builtin:tiny-sdxl", device="cpu")
    seen = {}

    def grab(_module, _args, kwargs):
        seen.setdefault("kwargs", kwargs)

    handle = model.pipe.unet.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model.pipe(PROMPT, num_inference_steps=1, guidance_scale=1.0, height=RES, width=RES, output_type="latent")
    finally:
        handle.remove()
    pipeline = seen["kwargs"]
    latents = torch.zeros(1, 4, RES // model.pipe.vae_scale_factor, RES // model.pipe.vae_scale_factor)
    ours = unet_conditioning(model, encode_prompts(model, [PROMPT]), latents)
    assert torch.equal(ours["encoder_hidden_states"], pipeline["encoder_hidden_states"])
    for name in ("text_embeds", "time_ids"):
        assert torch.equal(ours["added_cond_kwargs"][name], pipeline["added_cond_kwargs"][name]), name
    assert ours["added_cond_kwargs"]["time_ids"].tolist() == [[RES, RES, 0, 0, RES, RES]]

    # The cached caption embeddings are keyed by the second encoder's weights too.
    key = text_key(model, [PROMPT])
    changed = copy.deepcopy(model.pipe.text_encoder_2)
    with torch.no_grad():
        changed.text_projection.weight.mul_(1.5)
    model.pipe.text_encoder_2 = changed
    assert text_key(model, [PROMPT]) != key


def test_cached_sdxl_text_equals_fresh_encoding(xl_home, stripes):
    from loraforge.train.cache import BatchSource
    from loraforge.train.data import prepare_dataset
    from loraforge.train.model import SDXLText, load_training_model

    registry = Registry(xl_home)
    model = load_training_model(registry, "builtin:tiny-sdxl", device="cpu")
    data = prepare_dataset(registry, str(stripes), output="cache-check")
    cached = BatchSource(model, data, home=xl_home, resolution=RES, cached=True)
    again = BatchSource(model, data, home=xl_home, resolution=RES, cached=True)  # read back from disk
    fresh = BatchSource(model, data, home=xl_home, resolution=RES, cached=False)
    (_, a), (_, b), (_, c) = cached.batch([1, 0]), again.batch([1, 0]), fresh.batch([1, 0])
    assert isinstance(b, SDXLText) and b.embeds.shape[0] == 2
    for x in (a, b):
        assert torch.allclose(x.embeds, c.embeds, atol=1e-6) and torch.allclose(x.pooled, c.pooled, atol=1e-6)
    assert any(p.name.startswith("text-") for p in again.cache_files)


def test_dreambooth_lora_trains_on_sdxl_with_prior_preservation(xl_home, stripes):
    run_cli(xl_home, "train", "dreambooth_lora", "--name", "xl-db", *TRAIN[:-2], "--steps", "2",
            "--dataset", str(stripes), "--instance-prompt", "a photo of sks stripes", "--prior-preservation",
            "--class-prompt", "a photo of stripes", "--num-class-images", "2", "--class-generation-steps", "2")
    manifest = Registry(xl_home).resolve("xl-db:1")
    assert manifest.base.family == "sdxl"
    assert len([p for p in manifest.provenance.parents if p.role == "dataset"]) == 2  # instance and class images


def test_joint_trains_an_sdxl_lora_per_adapter_on_unet_and_both_text_encoders(xl_home, stripes, tmp_path):
    import json

    checks = pattern_images(tmp_path / "checks", "checks", n=2, caption="blue checks")
    adapters = json.dumps({"a": {"dataset": str(stripes)}, "b": {"dataset": str(checks)}})
    run_cli(xl_home, "train", "joint", "--name", "xl-joint", *TRAIN[:TRAIN.index("--steps")], "--steps", "3",
            *TRAIN[TRAIN.index("--steps") + 2:], "--adapters", adapters, "--train-text-encoder")
    registry = Registry(xl_home)
    states = {k: adapter_state(xl_home, registry.resolve(f"xl-joint-{k}:1")) for k in "ab"}
    for state in states.values():
        assert state.components == ["text_encoder", "text_encoder_2", "unet"]
    for component in ("unet", "text_encoder_2"):
        key = sorted(states["a"].component(component))[0]
        a, b = (states[k].component(component)[key].up for k in "ab")
        assert a.abs().max() > 0 and not torch.equal(a, b)  # each adapter trained its own layers


@pytest.mark.parametrize("method,args", [
    ("slider", ["--target", "a person", "--positive", "an old person", "--negative", "a young person",
                "--denoise-steps", "2"]),
    ("reward", ["--reward", "brightness", "--prompts", "a cat", "--iterations", "1"]),
])
def test_trainers_without_sdxl_conditioning_refuse_sdxl_in_one_line(xl_home, method, args):
    before = Registry(xl_home).list()
    common = TRAIN[:TRAIN.index("--batch-size")] if method == "reward" else TRAIN  # reward has no batch size
    line = refused(run_cli(xl_home, "train", method, "--name", "no-xl", *common, *args, ok=False))
    families = {"slider": "sd1 or flux", "reward": "sd1"}[method]
    assert line == (f"Error: {method} does not train on sdxl bases (builtin:tiny-sdxl); use a {families} base")
    assert Registry(xl_home).list() == before
