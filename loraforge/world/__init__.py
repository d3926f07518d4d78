"""The shapes world: a seeded, deterministic generator of small captioned images (shapes, colours,
backgrounds, sizes, positions, styles) with a declared hold-out set, and the judge that reads them."""

from loraforge.world.captions import caption, parse_prompt
from loraforge.world.generator import RESOLUTIONS, SPLITS, Labels, Sample, draw_labels, generate, render, samples, with_labels
from loraforge.world.styles import apply_style
from loraforge.world.vocabulary import ATTRIBUTES, GENERATOR_VERSION

__all__ = ["ATTRIBUTES", "GENERATOR_VERSION", "Labels", "RESOLUTIONS", "SPLITS", "Sample", "apply_style", "caption",
           "draw_labels", "generate", "parse_prompt", "render", "samples", "with_labels"]
