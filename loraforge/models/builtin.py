"""Embedded base models: tiny SD1/SDXL pipelines built deterministically in code, and real SD1.5 shapes.

`builtin:tiny-sd` and `builtin:tiny-sdxl` follow the real module naming of SD1 and SDXL (so kohya
`lora_unet_...` / `lora_te_...` keys map onto them) but are a few hundred thousand parameters, so
tests and CPU-only machines can generate, train and merge without downloading weights.
Attention `proj_in`/`proj_out` are Linear layers (`use_linear_projection=True`, as in SD2/SDXL).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

import torch

from loraforge.errors import UnresolvedReference
from loraforge.home import models_dir, tmp_dir

BUILTIN_NAMES = ("tiny-sd", "tiny-sdxl")
BUILTIN_PREFIX = "builtin:"
BUILTIN_SEED = 20240607

# A finished build is marked by this file, written last; a folder without it is not trusted.
_COMPLETE_MARKER = "model_index.json"

# Words that get a whole-word token, so usual prompts tokenize into words rather than letters.
_WORDS = """
a an the of in on at to with and or for by from into over under near behind is are was be
photo picture image painting drawing sketch portrait render illustration art artwork style
cat dog sks ohwx girl boy man woman person people child baby face eyes hair hand hands body
eating drinking holding sitting standing running walking wearing smiling looking playing
apple banana orange cake pizza food coffee tea cup bowl
red green blue yellow black white pink purple brown gray grey golden silver dark light bright
big small tiny large old young new happy sad cute beautiful ugly
house tree forest mountain river lake sea ocean beach sky cloud clouds sun moon star stars
city street road car bike boat train plane garden flower flowers grass field snow rain night day
room table chair bed window door wall floor
high quality best masterpiece detailed realistic anime cartoon oil watercolor digital
lowres blurry bad worst jpeg artifacts text watermark signature cropped
girl boy solo long short smile open closed mouth dress shirt hat
very more less no not background simple top view close up front side
asuka sunset sunrise fantasy science fiction robot castle dragon horse bird fish
""".split()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Apply BPE merges to one word the way the tokenizer does: lowest-ranked pair first."""
    while len(symbols) > 1:
        pairs = [(ranks.get(pair, len(ranks)), i) for i, pair in enumerate(zip(symbols, symbols[1:]))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        symbols = symbols[:i] + [symbols[i] + symbols[i + 1]] + symbols[i + 2:]
    return symbols


def tiny_clip_vocab() -> tuple[dict[str, int], list[str]]:
    """A small CLIP BPE vocabulary: every byte (bare and word-final), merges that make each of
    `_WORDS` one token, and the two special tokens.

    A merge is only ever appended after the merges a word already uses, so adding a word never
    changes how an earlier word is split.
    """
    byte_chars = list(_bytes_to_unicode().values())
    tokens: list[str] = byte_chars + [c + "</w>" for c in byte_chars]
    seen_tokens = set(tokens)
    ranks: dict[tuple[str, str], int] = {}
    for word in dict.fromkeys(_WORDS):
        while len(parts := _bpe(list(word[:-1]) + [word[-1] + "</w>"], ranks)) > 1:
            ranks[(parts[0], parts[1])] = len(ranks)
            merged = parts[0] + parts[1]
            if merged not in seen_tokens:
                seen_tokens.add(merged)
                tokens.append(merged)
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    merges = [f"{a} {b}" for (a, b), _ in sorted(ranks.items(), key=lambda item: item[1])]
    return {t: i for i, t in enumerate(tokens)}, merges


def _tokenizer():
    from transformers import CLIPTokenizer

    vocab, merges = tiny_clip_vocab()
    pairs = [tuple(m.split(" ")) for m in merges]
    return CLIPTokenizer(vocab=vocab, merges=pairs, model_max_length=77)


def _text_config(vocab_size: int, eos_id: int, bos_id: int, *, projection: bool):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="quick_gelu" if not projection else "gelu",
        projection_dim=32,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )


def _vae(scaling_factor: float):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=64,
        scaling_factor=scaling_factor,
    )


def _seeded(offset: int) -> None:
    torch.manual_seed(BUILTIN_SEED + offset)


def _tiny_sd_components() -> dict[str, Any]:
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    tokenizer = _tokenizer()
    _seeded(1)
    unet = UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=32,
        use_linear_projection=True,
    )
    _seeded(2)
    vae = _vae(scaling_factor=0.18215)
    _seeded(3)
    text_encoder = CLIPTextModel(
        _text_config(len(tokenizer), tokenizer.eos_token_id, tokenizer.bos_token_id, projection=False)
    )
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": scheduler,
        "safety_checker": None,
        "feature_extractor": None,
        "image_encoder": None,
        "requires_safety_checker": False,
    }


def _tiny_sdxl_components() -> dict[str, Any]:
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = _tokenizer()
    tokenizer_2 = _tokenizer()
    time_embed_dim = 8
    text_2_projection = 32
    _seeded(11)
    unet = UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        transformer_layers_per_block=(1, 2),
        cross_attention_dim=64,  # hidden sizes of text_encoder (32) + text_encoder_2 (32)
        attention_head_dim=(2, 4),
        norm_num_groups=32,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        # six micro-conditioning numbers (size, crop, target size) + the pooled text embedding
        projection_class_embeddings_input_dim=6 * time_embed_dim + text_2_projection,
    )
    _seeded(12)
    vae = _vae(scaling_factor=0.13025)
    _seeded(13)
    text_encoder = CLIPTextModel(
        _text_config(len(tokenizer), tokenizer.eos_token_id, tokenizer.bos_token_id, projection=False)
    )
    _seeded(14)
    text_encoder_2 = CLIPTextModelWithProjection(
        _text_config(len(tokenizer_2), tokenizer_2.eos_token_id, tokenizer_2.bos_token_id, projection=True)
    )
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer_2,
        "scheduler": scheduler,
        "image_encoder": None,
        "feature_extractor": None,
        "force_zeros_for_empty_prompt": True,
    }


_BUILDERS = {"tiny-sd": _tiny_sd_components, "tiny-sdxl": _tiny_sdxl_components}
_FAMILIES = {"tiny-sd": "sd1", "tiny-sdxl": "sdxl"}
_BUILD_LOCK = threading.Lock()


def _check_name(name: str) -> str:
    if name.startswith(BUILTIN_PREFIX):
        name = name[len(BUILTIN_PREFIX):]
    if name not in _BUILDERS:
        known = ", ".join(BUILTIN_PREFIX + n for n in BUILTIN_NAMES)
        raise UnresolvedReference(f"unknown builtin model {BUILTIN_PREFIX}{name!s}; known: {known}")
    return name


def builtin_family(name: str) -> str:
    """"sd1" or "sdxl" for a builtin name (with or without the `builtin:` prefix)."""
    return _FAMILIES[_check_name(name)]


def build_tiny_components(name: str) -> dict[str, Any]:
    """The modules of a builtin pipeline, in memory; pass them as `Pipeline(**components)`."""
    name = _check_name(name)
    # Modules draw their initial weights from the global RNG, reseeded per component: hold a lock so
    # two threads building at once cannot interleave draws, and give the caller its RNG state back.
    with _BUILD_LOCK:
        state = torch.random.get_rng_state()
        try:
            return _BUILDERS[name]()
        finally:
            torch.random.set_rng_state(state)


def build_tiny_pipeline(name: str):
    """A builtin pipeline in memory (StableDiffusionPipeline or StableDiffusionXLPipeline)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    name = _check_name(name)
    cls = StableDiffusionXLPipeline if _FAMILIES[name] == "sdxl" else StableDiffusionPipeline
    pipe = cls(**build_tiny_components(name))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_pipeline(name: str, folder: Path) -> Path:
    """Write a builtin pipeline in diffusers format (safetensors) into `folder`."""
    folder = Path(folder)
    pipe = build_tiny_pipeline(name)
    with quiet_progress_bars():
        pipe.save_pretrained(folder, safe_serialization=True)
    _restore_text_model_prefix(folder)
    _write_vocab_files(folder)
    return folder


def _restore_text_model_prefix(folder: Path) -> None:
    """Store CLIPTextModel weights under their classic `text_model.` names, as every SD repository does.

    transformers 5 dropped the `text_model` wrapper of CLIPTextModel and strips the prefix on load, so a
    model built in code saves bare `encoder.layers...` keys that older transformers and single-file
    converters cannot read. CLIPTextModelWithProjection kept its wrapper and needs no fix.
    """
    from safetensors.torch import load_file, save_file

    weights = folder / "text_encoder" / "model.safetensors"
    if not weights.is_file():
        return
    state = load_file(weights)
    if all(k.startswith("text_model.") for k in state):
        return
    renamed = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in state.items()}
    save_file({k: renamed[k] for k in sorted(renamed)}, weights, metadata={"format": "pt"})


def _write_vocab_files(folder: Path) -> None:
    """Add the classic vocab.json + merges.txt next to tokenizer.json, for tools that read only those."""
    vocab, merges = tiny_clip_vocab()
    for sub in ("tokenizer", "tokenizer_2"):
        if (folder / sub).is_dir():
            (folder / sub / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
            (folder / sub / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


@contextlib.contextmanager
def quiet_progress_bars():
    """Silence the tqdm bars diffusers and transformers print while loading and saving."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    restore = []
    for lib in (diffusers_logging, transformers_logging):
        if lib.is_progress_bar_enabled():
            lib.disable_progress_bar()
            restore.append(lib)
    try:
        yield
    finally:
        for lib in restore:
            lib.enable_progress_bar()


def builtin_path(name: str, home: Path) -> Path:
    return models_dir(home) / "builtin" / _check_name(name)


def ensure_builtin(name: str, home: Path) -> Path:
    """The folder of builtin model `name` under `home`, built (atomically) only if missing."""
    name = _check_name(name)
    target = builtin_path(name, home)
    if (target / _COMPLETE_MARKER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f"builtin-{name}-", dir=tmp_dir(home)))
    try:
        save_tiny_pipeline(name, scratch / name)
        try:
            os.replace(scratch / name, target)
        except OSError:
            # Another process finished first (the target now exists and is not empty): keep theirs.
            if not (target / _COMPLETE_MARKER).is_file():
                # A stale, incomplete folder is in the way: move it aside and try again.
                stale = scratch / "stale"
                os.replace(target, stale)
                os.replace(scratch / name, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def sd15_configs() -> dict[str, dict[str, Any]]:
    """The real Stable Diffusion 1.5 configs (UNet, VAE, CLIP ViT-L/14 text), for random-weight builds.

    Use `UNet2DConditionModel(**cfg["unet"])`, `AutoencoderKL(**cfg["vae"])`,
    `CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"]))`.
    """
    unet = {
        "sample_size": 64,
        "in_channels": 4,
        "out_channels": 4,
        "center_input_sample": False,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        "only_cross_attention": False,
        "block_out_channels": (320, 640, 1280, 1280),
        "layers_per_block": 2,
        "downsample_padding": 1,
        "mid_block_scale_factor": 1,
        "act_fn": "silu",
        "norm_num_groups": 32,
        "norm_eps": 1e-5,
        "cross_attention_dim": 768,
        "attention_head_dim": 8,
        "use_linear_projection": False,
    }
    vae = {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "block_out_channels": (128, 256, 512, 512),
        "layers_per_block": 2,
        "act_fn": "silu",
        "latent_channels": 4,
        "norm_num_groups": 32,
        "sample_size": 512,
        "scaling_factor": 0.18215,
    }
    text_encoder = {
        "vocab_size": 49408,
        "hidden_size": 768,
        "intermediate_size": 3072,
        "projection_dim": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "initializer_factor": 1.0,
        "pad_token_id": 1,
        "bos_token_id": 0,
        "eos_token_id": 2,
    }
    scheduler = {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
        "skip_prk_steps": True,
    }
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "scheduler": scheduler}
