"""The seeded generator of the shapes world: one seed, one captioned image with its labels.

Every random choice is read from sha256 of (generator version, seed, what is being chosen), never
from a library's random stream, so a seed means the same image on every machine and every version of
numpy or Python. Labels are drawn first; the jitter (exact size and position) comes from the seed
alone, so two label sets rendered from one seed differ only where their labels differ (a small and a
big circle at the same spot, for image-pair sliders).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, fields, replace
from typing import Iterator

import numpy as np
from PIL import Image

from loraforge.errors import ConfigError
from loraforge.world.captions import caption
from loraforge.world.draw import UNITS, blend, shape_coverage
from loraforge.world.styles import STYLE_TRANSFORMS
from loraforge.world.vocabulary import (ATTRIBUTES, BACKGROUND_RGB, COLOUR_RGB, GENERATOR_VERSION,
                                        HELD_OUT_COMBINATIONS, HELD_OUT_SHAPES, HELD_OUT_STYLES)

RESOLUTIONS = (32, 64)
SPLITS = ("pretrain", "holdout", "all")

# Shape radius as a fraction of the image side, in thousandths: (lowest, highest) per size.
_RADIUS = {"small": (100, 130), "big": (200, 240)}
_CENTRE_X = {"left": 270, "centre": 500, "right": 730}
_JITTER = 30  # the centre moves up to this many thousandths of the side in x and in y


@dataclass(frozen=True)
class Labels:
    """What an image shows: one value of each attribute in `vocabulary.ATTRIBUTES`."""

    shape: str
    colour: str
    background: str
    size: str
    position: str
    style: str = "plain"

    def __post_init__(self):
        for name, values in ATTRIBUTES.items():
            if getattr(self, name) not in values:
                raise ConfigError(f"unknown {name} {getattr(self, name)!r}: choose one of {', '.join(values)}")
        if self.colour == self.background:
            raise ConfigError(f"a {self.colour} shape on a {self.background} background is invisible: "
                              "choose another colour or background")

    def as_dict(self) -> dict[str, str]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def indices(self) -> dict[str, int]:
        """Attribute -> class index (the judge's targets)."""
        return {name: ATTRIBUTES[name].index(value) for name, value in self.as_dict().items()}

    @property
    def held_out(self) -> bool:
        """Whether pretraining never sees these labels (a held-out shape, combination or style)."""
        return (self.shape in HELD_OUT_SHAPES or (self.colour, self.shape) in HELD_OUT_COMBINATIONS
                or self.style in HELD_OUT_STYLES)


@dataclass(frozen=True)
class Sample:
    """One generated image, its caption and its labels."""

    image: Image.Image
    caption: str
    labels: Labels
    seed: int


def draw_int(seed: int, what: str, n: int) -> int:
    """A number in [0, n) fixed by (generator version, seed, what), the same everywhere."""
    digest = hashlib.sha256(f"{GENERATOR_VERSION}|{seed}|{what}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % n


def in_split(labels: Labels, split: str) -> bool:
    if split == "pretrain":
        return not labels.held_out
    if split == "holdout":
        return labels.held_out
    return True


def draw_labels(seed: int, split: str = "pretrain", **fixed: str) -> Labels:
    """Labels for `seed` in `split`, with any attribute given in `fixed` kept as given.

    Attributes are drawn independently and uniformly; a draw that is invisible (shape colour =
    background) or outside the split is drawn again from the next attempt's hashes.
    """
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")
    unknown = sorted(set(fixed) - set(ATTRIBUTES))
    if unknown:
        raise ConfigError(f"unknown attribute(s) {', '.join(unknown)}: choose from {', '.join(ATTRIBUTES)}")
    for attempt in range(1000):
        values = {name: fixed.get(name) or values_[draw_int(seed, f"{name}#{attempt}", len(values_))]
                  for name, values_ in ATTRIBUTES.items()}
        if values["colour"] == values["background"] and not ("colour" in fixed and "background" in fixed):
            continue
        labels = Labels(**values)
        if in_split(labels, split):
            return labels
        if all(name in fixed for name in ATTRIBUTES):
            break
    shown = ", ".join(f"{k}={v}" for k, v in sorted(fixed.items()))
    raise ConfigError(f"no {split} image has {shown}: ask the 'all' or 'holdout' split for held-out concepts")


def render(labels: Labels, seed: int, resolution: int = 64) -> Image.Image:
    """The image of `labels`, with the exact size and position jitter of `seed`, `resolution`² RGB."""
    if resolution not in RESOLUTIONS:
        raise ConfigError(f"unsupported resolution {resolution}: choose one of {', '.join(map(str, RESOLUTIONS))}")
    side = resolution * UNITS
    low, high = _RADIUS[labels.size]
    radius = side * (low + draw_int(seed, "radius", high - low + 1)) // 1000
    cx = side * (_CENTRE_X[labels.position] - _JITTER + draw_int(seed, "x", 2 * _JITTER + 1)) // 1000
    cy = side * (500 - _JITTER + draw_int(seed, "y", 2 * _JITTER + 1)) // 1000
    cover = shape_coverage(labels.shape, cx, cy, radius, resolution)
    background = np.empty((resolution, resolution, 3), dtype=np.uint8)
    background[:] = BACKGROUND_RGB[labels.background]
    pixels = STYLE_TRANSFORMS[labels.style](blend(background, COLOUR_RGB[labels.colour], cover))
    return Image.fromarray(pixels, "RGB")


def generate(seed: int, resolution: int = 64, split: str = "pretrain", **fixed: str) -> Sample:
    """The sample of `seed`: labels drawn in `split` (attributes in `fixed` kept), rendered."""
    labels = draw_labels(seed, split, **fixed)
    return Sample(render(labels, seed, resolution), caption(labels), labels, seed)


def samples(seeds, resolution: int = 64, split: str = "pretrain", **fixed: str) -> Iterator[Sample]:
    """`generate` for each seed of `seeds`, in order."""
    for seed in seeds:
        yield generate(seed, resolution, split, **fixed)


def with_labels(sample: Sample, resolution: int | None = None, **changes: str) -> Sample:
    """`sample` with some labels changed, drawn at the same jitter: the other half of an image pair."""
    labels = replace(sample.labels, **changes)
    size = resolution or sample.image.width
    return Sample(render(labels, sample.seed, size), caption(labels), labels, sample.seed)
