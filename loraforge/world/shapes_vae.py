"""The shapes world's VAE: a small diffusers `AutoencoderKL` trained on the generator, for `builtin:shapes`.

Its fp16 weights ship in `world/vae/` as a diffusers folder (`config.json`, `diffusion_pytorch_model.safetensors`)
that `AutoencoderKL.from_pretrained` loads, with `vae.json`: how they were trained and what they reconstruct.
`scripts/train_shapes_vae.py` (`make shapes-vae`) rebuilds them from a seed. A 64 px image becomes a 16x16x4
latent (three down blocks, factor 4): at factor 8 a small shape (radius 6 px) would be one latent cell, and the
diffusion model would have an 8x8 grid to place it on. Small shapes still come back soft (see `vae.json`: the
judge reads the shape of about 70% of reconstructions); 8 latent channels did no better in as many steps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from loraforge.world.provenance import VAE_DIR, checked_provenance
from loraforge.world.provenance import VAE_PROVENANCE as PROVENANCE_NAME
from loraforge.world.provenance import VAE_WEIGHTS as WEIGHTS_NAME

ARCHITECTURE = {
    "in_channels": 3, "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 3, "up_block_types": ["UpDecoderBlock2D"] * 3,
    "block_out_channels": [16, 32, 64], "layers_per_block": 1, "latent_channels": 4,
    "norm_num_groups": 8, "sample_size": 64,
}


def new_vae():
    """An untrained `AutoencoderKL` of `ARCHITECTURE` (from the caller's torch random state)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(**ARCHITECTURE)


def load_vae(folder: Path = VAE_DIR):
    """The shapes VAE in `folder` (the committed one by default), in fp32 and eval mode, after checking
    that its weights are the file its provenance records."""
    from diffusers import AutoencoderKL

    folder = Path(folder)
    checked_provenance(folder / WEIGHTS_NAME, folder / PROVENANCE_NAME, "the shapes VAE", "make shapes-vae")
    return AutoencoderKL.from_pretrained(folder, torch_dtype=torch.float32).eval()


def to_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    """RGB images -> float NCHW in [-1, 1] (the range diffusers' VAEs read)."""
    arrays = np.stack([np.asarray(im.convert("RGB")) for im in images])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def to_images(x: torch.Tensor) -> list[Image.Image]:
    """float NCHW in [-1, 1] -> RGB images (clamped, rounded)."""
    pixels = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(p, "RGB") for p in pixels]


@torch.no_grad()
def reconstruct(vae, images: Sequence[Image.Image]) -> list[Image.Image]:
    """`images` encoded (the posterior's mode) and decoded again."""
    x = to_tensor(images).to(vae.dtype)
    return to_images(vae.decode(vae.encode(x).latent_dist.mode()).sample.float())


def psnr(original: Sequence[Image.Image], copy: Sequence[Image.Image]) -> float:
    """Peak signal-to-noise ratio in dB over all pixels of all images (8-bit peak 255)."""
    a = np.stack([np.asarray(im.convert("RGB"), dtype=np.float64) for im in original])
    b = np.stack([np.asarray(im.convert("RGB"), dtype=np.float64) for im in copy])
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def round_trip(vae, seeds, judge=None, split: str = "all", batch: int = 64) -> dict:
    """What survives encode -> decode of `seeds`' 64 px images: PSNR (dB, mean over images and overall) and the
    judge's accuracy per attribute (every attribute at once as `all`) on the originals and on the copies."""
    from loraforge.world.generator import generate
    from loraforge.world.judge import load_judge
    from loraforge.world.vocabulary import ATTRIBUTES

    judge = judge or load_judge()
    seeds = list(seeds)
    names = [*ATTRIBUTES, "all"]
    right = {"original": dict.fromkeys(names, 0), "reconstruction": dict.fromkeys(names, 0)}
    per_image, originals, copies = [], [], []
    for begin in range(0, len(seeds), batch):
        chunk = [generate(s, 64, split=split) for s in seeds[begin:begin + batch]]
        images = [s.image for s in chunk]
        back = reconstruct(vae, images)
        originals += images
        copies += back
        per_image += [psnr([a], [b]) for a, b in zip(images, back)]
        for which, read in (("original", images), ("reconstruction", back)):
            for sample, guess in zip(chunk, judge.labels(read)):
                hits = [guess[n] == getattr(sample.labels, n) for n in ATTRIBUTES]
                for n, hit in zip(ATTRIBUTES, hits):
                    right[which][n] += hit
                right[which]["all"] += all(hits)
    return {"images": len(seeds), "split": split, "psnr_db": round(psnr(originals, copies), 2),
            "psnr_db_mean": round(float(np.mean(per_image)), 2), "psnr_db_min": round(float(np.min(per_image)), 2),
            "judge_accuracy": {w: {n: round(c / len(seeds), 4) for n, c in r.items()} for w, r in right.items()}}
