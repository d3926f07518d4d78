"""Styles: transforms that apply to any RGB image (a generated one or a model's output), each with the
word captions use for it. Integer arithmetic only, like the rasteriser."""

from __future__ import annotations

import numpy as np
from PIL import Image


def _contrast_ink(pixels: np.ndarray) -> np.ndarray:
    """Per pixel, white where the image is dark and black where it is light (integer luma)."""
    p = pixels.astype(np.int64)
    luma = (299 * p[..., 0] + 587 * p[..., 1] + 114 * p[..., 2]) // 1000
    return np.where(luma[..., None] < 128, 255, 0).astype(np.int64)


def _ink(pixels: np.ndarray, where: np.ndarray) -> np.ndarray:
    p = pixels.astype(np.int64)
    inked = (p + _contrast_ink(pixels) + 1) // 2  # half way to the contrasting ink
    return np.where(where[..., None], inked, p).astype(np.uint8)


def striped(pixels: np.ndarray) -> np.ndarray:
    """Diagonal bands, one eighth of the image wide per light+dark pair, half way to a contrasting ink."""
    h, w = pixels.shape[:2]
    period = max(4, w // 8)
    y, x = np.mgrid[0:h, 0:w]
    return _ink(pixels, ((x + y) % period) < period // 2)


def dotted(pixels: np.ndarray) -> np.ndarray:
    """A square grid of round dots (8 per row), half way to a contrasting ink."""
    h, w = pixels.shape[:2]
    period = max(4, w // 8)
    y, x = np.mgrid[0:h, 0:w]
    # Distances in doubled units so the dot centre sits between pixels, exactly.
    dx = 2 * (x % period) + 1 - period
    dy = 2 * (y % period) + 1 - period
    radius = period * 7 // 10  # doubled units: a dot 0.7 of the period across
    return _ink(pixels, dx * dx + dy * dy <= radius * radius)


STYLE_TRANSFORMS = {"plain": lambda pixels: pixels, "striped": striped, "dotted": dotted}


def apply_style(image: Image.Image, style: str) -> Image.Image:
    """`image` (any size, converted to RGB) in `style`: one of `STYLE_TRANSFORMS`."""
    if style not in STYLE_TRANSFORMS:
        from loraforge.errors import ConfigError

        raise ConfigError(f"unknown style {style!r}: choose one of {', '.join(STYLE_TRANSFORMS)}")
    return Image.fromarray(STYLE_TRANSFORMS[style](np.asarray(image.convert("RGB"))), "RGB")
