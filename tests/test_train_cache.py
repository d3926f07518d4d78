"""The on-disk cache of training latents and text embeddings: every entry is keyed by what made it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loraforge.home import cache_dir
from test_train import adapter_state, pattern_images, train

STEPS = 3


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def cache_files(home: Path) -> list[str]:
    return sorted(p.name for p in (cache_dir(home) / "train").glob("*.safetensors"))


def weights(home: Path, manifest) -> dict[str, torch.Tensor]:
    state = adapter_state(home, manifest)
    return {f"{n}.{k}": t for n in state for k, t in (("down", state[n].down), ("up", state[n].up))}


def max_difference(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_dreambooth_after_lora_on_the_same_folder_uses_its_own_prompt(home, tmp_path):
    data = pattern_images(tmp_path / "subject", "checks", caption="blue checks")
    common = dict(dataset=str(data), steps=STEPS, validation_prompts=["x"])
    [t2i] = train(home, "lora", "t2i", **common)
    after_lora = cache_files(home)
    assert len(after_lora) == 2  # the folder's latents and its captions' embeddings

    [db] = train(home, "dreambooth_lora", "db", instance_prompt="a photo of sks dog", **common)
    # The latents are shared (same images, VAE and transform); the instance prompt has its own entry.
    assert len(cache_files(home)) == 3 and set(after_lora) < set(cache_files(home))
    [db_uncached] = train(home, "dreambooth_lora", "db-uncached", instance_prompt="a photo of sks dog",
                          cache_latents=False, **common)
    # Cached and uncached runs differ only by float rounding (images encoded one at a time vs per batch);
    # a different prompt moves the weights well over an order of magnitude more (about 44x with the
    # libraries installed today; it was above 50x with earlier ones, on the same code).
    by_prompt = max_difference(weights(home, db), weights(home, t2i))
    by_rounding = max_difference(weights(home, db), weights(home, db_uncached))
    assert by_prompt > 1e-3 and by_rounding < 0.05 * by_prompt, (by_prompt, by_rounding)


def test_same_config_twice_reads_the_cache_and_gives_the_same_adapter(home, tmp_path, monkeypatch):
    import loraforge.train.cache as cache

    data = pattern_images(tmp_path / "d", "stripes", caption="red stripes")
    common = dict(dataset=str(data), steps=STEPS, validation_prompts=["x"])
    [first] = train(home, "lora", "a", **common)
    files = cache_files(home)

    def no_encoding(*args, **kwargs):
        raise AssertionError("encoded again although the cache holds this entry")

    monkeypatch.setattr(cache, "encode_images", no_encoding)
    monkeypatch.setattr(cache, "encode_prompts", no_encoding)
    [second] = train(home, "lora", "b", **common)
    assert cache_files(home) == files
    a, b = weights(home, first), weights(home, second)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_changed_caption_or_crop_is_a_new_entry(home, tmp_path):
    data = pattern_images(tmp_path / "d", "stripes", caption="red stripes")
    common = dict(dataset=str(data), steps=1, validation_prompts=["x"])
    train(home, "lora", "a", **common)
    assert len(cache_files(home)) == 2
    train(home, "lora", "a", instance_prompt="ignored: every image has a caption", **common)
    assert len(cache_files(home)) == 2
    (data / "img0.txt").write_text("green stripes")
    train(home, "lora", "a", **common)
    # New caption text means a new text entry; the image files did not change, so neither do latents.
    assert len(cache_files(home)) == 3
    train(home, "lora", "a", crop="random", **common)
    assert len(cache_files(home)) == 4  # new latents; same captions, same text entry


def test_generated_class_images_depend_only_on_what_generates_them(home, tmp_path):
    """A DreamBooth run's class images must not depend on which runs came before it."""
    import shutil

    data = pattern_images(tmp_path / "subject", "checks")
    common = dict(dataset=str(data), instance_prompt="a photo of sks dog", steps=1, prior_preservation=True,
                  class_prompt="a photo of dog", num_class_images=2, validation_prompts=["x"])

    def class_digest(name: str, **values) -> str:
        [m] = train(home, "dreambooth_lora", name, **common, **values)
        base, instance, images = m.provenance.parents  # the class images are the second dataset
        return images.digest

    first = class_digest("a", class_generation_steps=2)
    after_other_run = class_digest("b", class_generation_steps=3)
    assert class_digest("a2", class_generation_steps=2) == first  # the same settings reuse the images
    shutil.rmtree(cache_dir(home) / "class_images")
    assert class_digest("b2", class_generation_steps=3) == after_other_run  # generated afresh: the same images
    assert after_other_run != first


def test_module_digest_changes_with_any_weight_or_the_config(tiny_sd_path):
    from diffusers import AutoencoderKL

    from loraforge.train.cache import module_digest

    def vae(**config):
        return AutoencoderKL.from_pretrained(tiny_sd_path / "vae", **config)

    reference = module_digest(vae())
    assert module_digest(vae()) == reference  # a fresh load of the same files
    nudged = vae()
    with torch.no_grad():
        w = nudged.decoder.conv_out.weight.view(-1)
        w[0] = torch.nextafter(w[0], torch.tensor(float("inf")))  # one ulp
    assert module_digest(nudged) != reference
    assert module_digest(vae(scaling_factor=0.5)) != reference  # the latents' scale is part of the config
