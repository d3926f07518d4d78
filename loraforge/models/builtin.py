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


# The VAE's GroupNorms use 8 groups: 4-8 channels per group, as real SD VAEs have (128-512 channels, 32
# groups). With one channel per group every per-channel mean (brightness, colour) would be normalised away.
_VAE_GROUPS = 8
# Latent channels are luminance, two colour differences (BT.601) and a luminance edge channel.
_YCC = torch.tensor([[0.299, 0.587, 0.114], [-0.169, -0.331, 0.5], [0.5, -0.419, -0.081]])
# Residual branches (ResNet convs, attention outputs) start at this fraction of their random init, so each block
# is close to the identity plus a small random non-linearity (zero-/small-init residuals, as in Fixup).
_RESIDUAL_GAIN = 0.1
# Constant "carrier" channels that dominate each output GroupNorm's statistics, and the offset that keeps the signal in
# the nearly linear part of SiLU: together they make norm -> SiLU an almost affine map of the signal channels.
_CARRIER = 8.0
_SILU_OFFSET = 5.0


def _vae(seed_offset: int):
    """A tiny AutoencoderKL whose encoder/decoder are an approximately inverse, nearly linear pair.

    The encoder maps 2x2 pixel blocks to (Y, Cb, Cr, edge) latents and the decoder maps them back (nearest
    upsampling), so decoded brightness and colour follow the latents as in a trained VAE; the residual blocks
    keep small random weights. `scaling_factor` is then measured as SD's was: 1 / std of the latents of a
    fixed set of images, so scaled latents have unit variance.
    """
    from diffusers import AutoencoderKL

    _seeded(seed_offset)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=_VAE_GROUPS,
        sample_size=64,
        scaling_factor=1.0,
    )
    with torch.no_grad():
        _structure_vae(vae)
    vae.register_to_config(scaling_factor=_latent_scaling_factor(vae))
    return vae


def _signal_channels(channels: int) -> list[int]:
    """The channel carrying latent channel j is the first one of GroupNorm group j (one signal per group)."""
    per_group = max(channels // _VAE_GROUPS, 1)  # latents and images: channels 0-3 themselves
    return [j * per_group for j in range(4)]


def _set_carriers(bias: torch.Tensor) -> None:
    """Put +-carrier constants on the non-signal channels of a bias feeding an output GroupNorm: in each group
    of a signal channel the k-th other channel gets (-1)^k * carrier (the pattern `_linearise_norm` assumes)."""
    per_group = len(bias) // _VAE_GROUPS
    for c in range(len(bias)):
        k = c % per_group - 1  # the signal is the group's first channel
        bias[c] = 0.0 if k < 0 else (1.0 if k % 2 == 0 else -1.0) * _CARRIER


def _linearise_norm(norm: torch.nn.GroupNorm) -> None:
    """Affine of an output GroupNorm so a signal channel x leaves it as x + offset (given `_set_carriers`)."""
    n = norm.num_channels // norm.num_groups
    carriers = torch.tensor([(1.0 if k % 2 == 0 else -1.0) * _CARRIER for k in range(n - 1)])
    values = torch.cat([torch.zeros(1), carriers])
    mean, std = values.mean(), values.std(unbiased=False)
    # normalised signal = (x (1 - 1/n) - mean) / std; undo the gain and the shift, add the SiLU offset.
    for c in _signal_channels(norm.num_channels):
        norm.weight[c] = std / (1 - 1 / n)
        norm.bias[c] = _SILU_OFFSET + mean / (1 - 1 / n)


def _route(conv: torch.nn.Conv2d, taps: list[tuple[int, int]], weights: torch.Tensor) -> None:
    """Set conv to map input signal channels to output signal channels with `weights` [out j, in k], spread over
    the kernel `taps` (averaged), and nothing else on the main path."""
    conv.weight.zero_()
    conv.bias.zero_()
    outs, ins = _signal_channels(conv.out_channels), _signal_channels(conv.in_channels)
    for j, o in enumerate(outs[: weights.shape[0]]):
        for k, i in enumerate(ins[: weights.shape[1]]):
            for ty, tx in taps:
                conv.weight[o, i, ty, tx] = weights[j, k] / len(taps)


def _damp_residuals(module: torch.nn.Module) -> None:
    for name, sub in module.named_modules():
        if name.endswith("conv2") or name.endswith("to_out.0"):
            sub.weight.mul_(_RESIDUAL_GAIN)
            sub.bias.mul_(_RESIDUAL_GAIN)


def _structure_vae(vae) -> None:
    enc, dec = vae.encoder, vae.decoder
    _damp_residuals(vae)
    centre, eye = [(1, 1)], torch.eye(4)
    # encoder: RGB -> (Y, Cb, Cr) at the centre tap, and a horizontal luminance edge for the fourth channel.
    enc.conv_in.weight.zero_()
    enc.conv_in.bias.zero_()
    sig = _signal_channels(enc.conv_in.out_channels)
    for j in range(3):
        enc.conv_in.weight[sig[j], :, 1, 1] = _YCC[j]
    enc.conv_in.weight[sig[3], :, 1, 0] = -0.5 * _YCC[0]
    enc.conv_in.weight[sig[3], :, 1, 2] = 0.5 * _YCC[0]
    _route(enc.down_blocks[0].downsamplers[0].conv, [(0, 0), (0, 1), (1, 0), (1, 1)], eye)  # 2x2 mean, stride 2
    _route(enc.down_blocks[1].resnets[0].conv_shortcut, [(0, 0)], eye)
    _set_carriers(enc.mid_block.resnets[-1].conv2.bias)
    _linearise_norm(enc.conv_norm_out)
    _route(enc.conv_out, centre, eye)
    enc.conv_out.bias[:4] = -_SILU_OFFSET
    enc.conv_out.bias[4:] = -8.0  # log-variance: a nearly deterministic posterior, as trained VAEs have
    vae.quant_conv.weight.copy_(torch.eye(8)[:, :, None, None])
    vae.quant_conv.bias.zero_()
    # decoder: the inverse colour transform after nearest upsampling; the edge channel is not rendered.
    vae.post_quant_conv.weight.copy_(eye[:, :, None, None])
    vae.post_quant_conv.bias.zero_()
    _route(dec.conv_in, centre, eye)
    _route(dec.up_blocks[0].upsamplers[0].conv, centre, eye)
    _route(dec.up_blocks[1].resnets[0].conv_shortcut, [(0, 0)], eye)
    _set_carriers(dec.up_blocks[-1].resnets[-1].conv2.bias)
    _linearise_norm(dec.conv_norm_out)
    rgb = torch.linalg.inv(_YCC)
    _route(dec.conv_out, centre, torch.cat([rgb, torch.zeros(3, 1)], dim=1))
    dec.conv_out.bias.copy_(-_SILU_OFFSET * rgb.sum(dim=1))


def calibration_images(n: int = 16, size: int = 32) -> torch.Tensor:
    """Fixed smooth synthetic images in [-1, 1]: a random colour, a colour gradient and a little noise."""
    g = torch.Generator().manual_seed(BUILTIN_SEED)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    images = []
    for _ in range(n):
        colour = torch.rand(3, 1, 1, generator=g) * 2 - 1
        slope = torch.rand(2, 3, 1, 1, generator=g) - 0.5
        noise = 0.1 * torch.randn(3, size, size, generator=g)
        images.append((colour + slope[0] * xx + slope[1] * yy + noise).clamp(-1, 1))
    return torch.stack(images)


def _latent_scaling_factor(vae) -> float:
    """1 / std of the encoder's latents on the calibration images (how SD chose 0.18215), to 4 significant digits."""
    with torch.no_grad():
        latents = vae.encode(calibration_images()).latent_dist.mean
    return float(f"{1.0 / float(latents.std()):.4g}")


# CLIP draws token and position embeddings with the same std (0.02), so a random tiny encoder's output hardly
# depends on the prompt. Token embeddings with std 1 dominate the residual stream: prompts differ where words do.
_TOKEN_EMBEDDING_STD = 1.0
# attn2.to_q/to_k start at this multiple of their random init: sharper cross-attention (logits x9) that
# picks out content tokens instead of spreading uniformly over the 77 mostly-padding tokens.
_CROSS_ATTENTION_QK_GAIN = 6.0


def _text_encoder(cls, config):
    model = cls(config)
    embeddings = model.text_model.embeddings if hasattr(model, "text_model") else model.embeddings
    with torch.no_grad():
        embeddings.token_embedding.weight.mul_(_TOKEN_EMBEDDING_STD / (config.initializer_range * config.initializer_factor))
    return model


def _sharpen_cross_attention(unet) -> None:
    with torch.no_grad():
        for name, module in unet.named_modules():
            if name.endswith(("attn2.to_q", "attn2.to_k")):
                module.weight.mul_(_CROSS_ATTENTION_QK_GAIN)


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
    _sharpen_cross_attention(unet)
    vae = _vae(seed_offset=2)
    _seeded(3)
    text_encoder = _text_encoder(
        CLIPTextModel,
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
    _sharpen_cross_attention(unet)
    vae = _vae(seed_offset=12)
    _seeded(13)
    text_encoder = _text_encoder(
        CLIPTextModel,
        _text_config(len(tokenizer), tokenizer.eos_token_id, tokenizer.bos_token_id, projection=False)
    )
    _seeded(14)
    text_encoder_2 = _text_encoder(
        CLIPTextModelWithProjection,
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
    from loraforge.formats.safetensors_io import read_safetensors, write_safetensors

    weights = folder / "text_encoder" / "model.safetensors"
    if not weights.is_file():
        return
    state, _ = read_safetensors(weights)
    if all(k.startswith("text_model.") for k in state):
        return
    renamed = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in state.items()}
    write_safetensors(renamed, weights, {"format": "pt"})


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
