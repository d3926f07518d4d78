"""The words of the shapes world: every attribute's values, their colours, and what pretraining holds out.

The order of each tuple is part of the generator (labels are indices into it) and of the judge (its
heads' classes): change it only with a new `GENERATOR_VERSION`.
"""

from __future__ import annotations

# Bump when any image, caption or label the generator makes for a seed changes.
GENERATOR_VERSION = "shapes-world/1"

SHAPES = ("circle", "square", "triangle", "ring", "cross", "star", "heart")
COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "white")
BACKGROUNDS = ("black", "gray", "white", "blue")
SIZES = ("small", "big")
POSITIONS = ("left", "centre", "right")
STYLES = ("plain", "striped", "dotted")

# Attribute name -> its values, in the order of the label fields.
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES, "colour": COLOURS, "background": BACKGROUNDS,
    "size": SIZES, "position": POSITIONS, "style": STYLES,
}

COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "orange": (245, 140, 30), "yellow": (240, 220, 40), "green": (50, 170, 60),
    "blue": (40, 90, 220), "purple": (140, 60, 190), "pink": (245, 130, 190), "white": (245, 245, 245),
}
BACKGROUND_RGB: dict[str, tuple[int, int, int]] = {
    "black": (20, 20, 20), "gray": (128, 128, 128), "white": (240, 240, 240), "blue": (30, 60, 150),
}

# What pretraining never sees, so fine-tuning has something new to learn and composition can be tested:
# two whole shapes, four colour x shape combinations of seen words, and every style but plain.
HELD_OUT_SHAPES = frozenset({"star", "heart"})
HELD_OUT_COMBINATIONS = frozenset({("red", "triangle"), ("blue", "circle"), ("green", "square"),
                                   ("yellow", "cross")})
HELD_OUT_STYLES = frozenset({"striped", "dotted"})

# How captions say a position; the parser also reads the synonyms.
POSITION_PHRASES = {"left": "on the left of", "centre": "in the centre of", "right": "on the right of"}
POSITION_SYNONYMS = {"left": "left", "centre": "centre", "center": "centre", "middle": "centre", "right": "right"}
