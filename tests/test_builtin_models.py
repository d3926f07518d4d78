"""The embedded tiny SD1/SDXL models, base-model resolution and the pipeline helpers."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors import safe_open
from safetensors.torch import save_file

from loraforge import hashing
from loraforge.errors import ConfigError, FormatError, UnresolvedReference, UnsafePickleError
from loraforge.hashing import sha256_file, sha256_folder
from loraforge.home import tmp_dir
from loraforge.models import (
    BUILTIN_NAMES,
    base_from_path,
    default_dtype,
    ensure_builtin,
    generate,
    load_pipeline,
    locate_base,
    lora_target_names,
    pick_device,
    sd15_configs,
)
from loraforge.models.builtin import save_tiny_pipeline, tiny_clip_vocab
from loraforge.render.grid import GRID_GAP, image_grid

PIPELINES = [
    ("tiny-sd", StableDiffusionPipeline, "sd1"),
    ("tiny-sdxl", StableDiffusionXLPipeline, "sdxl"),
    ("tiny-flux", FluxPipeline, "flux"),
]


@pytest.fixture
def builtin_paths(tiny_sd_path, tiny_sdxl_path, shapes_path, tiny_flux_path) -> dict[str, Path]:
    return {"tiny-sd": tiny_sd_path, "tiny-sdxl": tiny_sdxl_path, "shapes": shapes_path, "tiny-flux": tiny_flux_path}


def _pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.float32)


@pytest.mark.parametrize("name,cls,family", PIPELINES)
def test_plain_diffusers_loads_builtin_and_generates_seeded_images(builtin_paths, name, cls, family):
    pipe = cls.from_pretrained(builtin_paths[name])
    pipe.set_progress_bar_config(disable=True)

    # FluxPipeline draws at a fixed 128 latent tokens a side by default: the tiny one is asked for 64 px
    size = {"height": 64, "width": 64, "max_sequence_length": 32} if family == "flux" else {}

    def run(seed):
        generator = torch.Generator("cpu").manual_seed(seed)
        return pipe("a photo of a cat", num_inference_steps=4, guidance_scale=5.0, generator=generator, **size).images[0]

    first, again, other = run(0), run(0), run(1)
    assert first.size == (64, 64)
    assert _pixels(first).std() > 1.0, "image is constant"
    assert np.array_equal(_pixels(first), _pixels(again))
    assert not np.array_equal(_pixels(first), _pixels(other))


@pytest.mark.parametrize("name,cls,family", PIPELINES)
def test_load_pipeline_and_generate_helper(home, name, cls, family):
    base = locate_base(f"builtin:{name}", home)
    pipe = load_pipeline(base, device="cpu")
    assert isinstance(pipe, cls)
    image = generate(pipe, "1girl eating an apple", seed=3, steps=3)
    assert image.size == (64, 64)
    assert np.array_equal(_pixels(image), _pixels(generate(pipe, "1girl eating an apple", seed=3, steps=3)))


def test_module_names_follow_sd1_and_sdxl(home):
    sd = lora_target_names(load_pipeline(locate_base("builtin:tiny-sd", home), device="cpu"))
    assert set(sd) == {"unet", "text_encoder"}
    for proj in ("to_q", "to_k", "to_v", "to_out.0"):
        assert f"down_blocks.0.attentions.0.transformer_blocks.0.attn1.{proj}" in sd["unet"]
    assert sd["unet"]["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"] == (32, 32)
    assert sd["unet"]["down_blocks.0.attentions.0.proj_in"] == (32, 32)  # use_linear_projection=True
    assert sd["unet"]["conv_in"] == (32, 4, 3, 3)
    # transformers 5 dropped CLIPTextModel's `text_model.` wrapper in memory (it stays in the files).
    assert sd["text_encoder"]["encoder.layers.0.self_attn.q_proj"] == (32, 32)

    xl = lora_target_names(load_pipeline(locate_base("builtin:tiny-sdxl", home), device="cpu"))
    assert set(xl) == {"unet", "text_encoder", "text_encoder_2"}
    assert xl["unet"]["down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k"] == (64, 64)
    assert "add_embedding.linear_1" in xl["unet"]
    assert "text_model.encoder.layers.0.self_attn.q_proj" in xl["text_encoder_2"]


@pytest.mark.parametrize("name", BUILTIN_NAMES)
def test_text_encoder_files_use_classic_text_model_keys(builtin_paths, name):
    with safe_open(str(builtin_paths[name] / "text_encoder" / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert "text_model.encoder.layers.0.self_attn.q_proj.weight" in keys
    assert all(k.startswith("text_model.") for k in keys)


def test_tokenizer_keeps_common_words_whole(builtin_paths):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(builtin_paths["tiny-sd"] / "tokenizer")
    assert tokenizer.tokenize("a photo of a cat, 1girl eating an apple, sks dog") == [
        "a</w>", "photo</w>", "of</w>", "a</w>", "cat</w>", ",</w>", "1</w>", "girl</w>",
        "eating</w>", "an</w>", "apple</w>", ",</w>", "sks</w>", "dog</w>",
    ]
    ids = tokenizer("sks dog", padding="max_length", max_length=tokenizer.model_max_length).input_ids
    assert len(ids) == 77 and ids[0] == tokenizer.bos_token_id and ids[3] == tokenizer.eos_token_id
    vocab, merges = tiny_clip_vocab()
    assert len(tokenizer) == len(vocab)
    assert (builtin_paths["tiny-sd"] / "tokenizer" / "merges.txt").read_text().count("\n") == len(merges) + 1


@pytest.mark.parametrize("name", BUILTIN_NAMES)
def test_builds_are_byte_identical(tmp_path, builtin_paths, name):
    first = save_tiny_pipeline(name, tmp_path / "a")
    second = save_tiny_pipeline(name, tmp_path / "b")
    assert sha256_folder(first) == sha256_folder(second) == sha256_folder(builtin_paths[name])


def test_building_leaves_the_callers_rng_alone(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    save_tiny_pipeline("tiny-sd", tmp_path / "sd")
    assert torch.equal(torch.rand(3), expected)


def test_ensure_builtin_is_idempotent_and_race_safe(tmp_path):
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(ensure_builtin("tiny-sd", tmp_path))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2 and results[0] == results[1]
    folder = results[0]
    digest = sha256_folder(folder)
    mtime = (folder / "model_index.json").stat().st_mtime_ns
    assert ensure_builtin("builtin:tiny-sd", tmp_path) == folder
    assert (folder / "model_index.json").stat().st_mtime_ns == mtime
    assert sha256_folder(folder) == digest
    assert list(tmp_dir(tmp_path).iterdir()) == []  # the loser's scratch folder is gone


def test_unknown_builtin_names_it_and_the_known_ones(tmp_path):
    with pytest.raises(UnresolvedReference) as err:
        locate_base("builtin:tiny-sd3", tmp_path)
    message = str(err.value)
    assert "builtin:tiny-flux" in message and "builtin:tiny-sd" in message and "builtin:tiny-sdxl" in message
    assert "\n" not in message


@pytest.mark.parametrize("name,cls,family", PIPELINES)
def test_resolve_builtin_and_folder(home, builtin_paths, name, cls, family):
    base = locate_base(f"builtin:{name}", home)
    assert (base.ref, base.family, base.layout) == (f"builtin:{name}", family, "diffusers")
    assert base.digest == sha256_folder(builtin_paths[name])
    by_folder = locate_base(str(builtin_paths[name]), home)
    assert (by_folder.family, by_folder.layout, by_folder.digest) == (family, "diffusers", base.digest)


def test_digest_is_cached_until_the_folder_changes(home, builtin_paths, monkeypatch):
    folder = home / "copy"
    shutil.copytree(builtin_paths["tiny-sd"], folder)
    digest = locate_base(str(folder), home).digest

    def no_hashing(path):
        raise AssertionError("digest recomputed although nothing changed")

    monkeypatch.setattr(hashing, "sha256_file", no_hashing)  # what the digest index reads files with
    assert locate_base(str(folder), home).digest == digest
    monkeypatch.undo()

    scheduler = folder / "scheduler" / "scheduler_config.json"
    scheduler.write_text(scheduler.read_text().replace('"steps_offset": 1', '"steps_offset": 0'))
    changed = locate_base(str(folder), home).digest
    assert changed != digest and changed == sha256_folder(folder)


def _single_file(path: Path, prefix: str, conv_in_channels: int = 320) -> Path:
    save_file({
        "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(conv_in_channels, 4, 3, 3),
        f"{prefix}transformer.text_model.final_layer_norm.weight": torch.ones(8),
    }, path)
    return path


@pytest.mark.parametrize("prefix,family", [("cond_stage_model.", "sd1"), ("conditioner.embedders.1.", "sdxl")])
def test_resolve_single_file_family_from_keys(home, prefix, family):
    path = _single_file(home / "model.safetensors", prefix)
    base = locate_base(str(path), home)
    assert (base.family, base.layout, base.digest) == (family, "single_file", sha256_file(path))
    assert base_from_path(path, "my-merge:2", home=home) == base.__class__(
        ref="my-merge:2", path=path, digest=base.digest, family=family, layout="single_file")


def test_single_file_without_text_encoder_keys_is_rejected(home):
    path = home / "unet_only.safetensors"
    save_file({"model.diffusion_model.out.2.weight": torch.zeros(4, 320, 3, 3)}, path)
    with pytest.raises(FormatError, match="neither cond_stage_model"):
        locate_base(str(path), home)


def test_ckpt_pickles_load_only_when_weights_only(home):
    safe = home / "plain.ckpt"
    torch.save({"state_dict": {"cond_stage_model.transformer.w": torch.ones(2)}}, safe)
    assert locate_base(str(safe), home).family == "sd1"

    unsafe = home / "unsafe.ckpt"
    torch.save({"state_dict": {"cond_stage_model.transformer.w": torch.ones(2)}, "cfg": ConfigError("x")}, unsafe)
    with pytest.raises(UnsafePickleError, match="unsafe.ckpt"):
        locate_base(str(unsafe), home)


def test_single_file_of_unknown_shapes_needs_configs(home, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    base = locate_base(str(_single_file(home / "sd15.safetensors", "cond_stage_model.")), home)
    with pytest.raises(UnresolvedReference, match="diffusers folder"):
        load_pipeline(base, device="cpu")


def test_hub_id_offline_is_one_line_unresolved(home, monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'\nmore detail")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(UnresolvedReference) as err:
        locate_base("runwayml/stable-diffusion-v1-5", home)
    assert "runwayml/stable-diffusion-v1-5" in str(err.value) and "\n" not in str(err.value)


def test_missing_local_path_is_unresolved(home):
    with pytest.raises(UnresolvedReference, match="no-such-folder"):
        locate_base("./no-such-folder", home)


def test_folder_without_model_index_is_rejected(home):
    (home / "empty").mkdir()
    with pytest.raises(FormatError, match="model_index.json"):
        locate_base(str(home / "empty"), home)


def test_device_and_dtype_defaults():
    assert pick_device("cpu") == torch.device("cpu")
    assert default_dtype(torch.device("cpu")) == torch.float32
    if not torch.cuda.is_available():
        assert pick_device() == torch.device("cpu")
        with pytest.raises(ConfigError, match="cuda"):
            pick_device("cuda")


def test_image_grid_scales_small_images_and_labels_them():
    from PIL import Image

    colours = [[(255, 0, 0), (0, 255, 0), (0, 0, 255)], [(255, 255, 0), (0, 255, 255), (255, 0, 255)]]
    images = [[Image.new("RGB", (64, 64), c) for c in row] for row in colours]
    grid = image_grid(images, ["scale -1", "scale 1"], ["seed 0", "seed 1", "seed 2"], title="slider: age")
    width, height = grid.size
    label_width, header_height = width - 3 * 128 - 2 * GRID_GAP, height - 2 * 128 - GRID_GAP
    assert label_width > 20 and header_height > 20
    for i, row in enumerate(colours):
        for j, colour in enumerate(row):
            left, top = label_width + j * (128 + GRID_GAP), header_height + i * (128 + GRID_GAP)
            cell = grid.crop((left, top, left + 128, top + 128))
            assert cell.getcolors() == [(128 * 128, colour)]
    # the label strips carry dark text on white
    assert min(grid.crop((0, 0, width, header_height)).convert("L").getdata()) < 128

    untitled = image_grid(images, ["a", "b"], ["x", "y", "z"])
    assert untitled.height < height
    with pytest.raises(ConfigError, match="row labels"):
        image_grid(images, ["only one"], ["x", "y", "z"])


def test_sd15_configs_have_real_sizes():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    configs = sd15_configs()
    with torch.device("meta"):
        unet = UNet2DConditionModel(**configs["unet"])
        vae = AutoencoderKL(**configs["vae"])
        text = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))

    def millions(module):
        return round(sum(p.numel() for p in module.parameters()) / 1e6, 1)

    assert (millions(unet), millions(vae), millions(text)) == (859.5, 83.7, 123.1)
