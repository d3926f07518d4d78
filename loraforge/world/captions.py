"""Captions of the shapes world: written from labels, and read back from any prompt that uses its words.

`caption(labels)` is the one sentence pattern ("a big red circle on the left of a blue background,
striped"); `parse_prompt` reads the attributes a free prompt names ("a red star", "something big on
the right") so an evaluator can check an image against only what was asked for.
"""

from __future__ import annotations

import re

from loraforge.world.vocabulary import (BACKGROUNDS, COLOURS, POSITION_PHRASES, POSITION_SYNONYMS, SHAPES, SIZES,
                                        STYLES)

_WORD = re.compile(r"<[^<>\s]+>|[a-z]+")  # a word, or a textual-inversion token such as <sks>


def caption(labels) -> str:
    """The caption of `labels` (a `Labels` or any object with the six attribute fields)."""
    text = (f"a {labels.size} {labels.colour} {labels.shape} {POSITION_PHRASES[labels.position]} "
            f"a {labels.background} background")
    return text if labels.style == "plain" else f"{text}, {labels.style}"


def parse_prompt(prompt: str, aliases: dict[str, str] | None = None) -> dict[str, str]:
    """Attribute -> value for every attribute `prompt` names. A colour word directly before "background"
    is the background; another colour word is the shape's colour. `aliases` maps extra words (a
    DreamBooth token) to a vocabulary word first. A word named twice for one attribute keeps the first."""
    words = [(aliases or {}).get(w, w) for w in _WORD.findall(prompt.lower())]
    found: dict[str, str] = {}
    for i, word in enumerate(words):
        following = words[i + 1] if i + 1 < len(words) else ""
        if following == "background" and word in BACKGROUNDS:
            found.setdefault("background", word)
        elif word in COLOURS:
            found.setdefault("colour", word)
        elif word in SHAPES or (word.endswith("s") and word[:-1] in SHAPES):
            found.setdefault("shape", word if word in SHAPES else word[:-1])
        elif word in SIZES:
            found.setdefault("size", word)
        elif word in POSITION_SYNONYMS:
            found.setdefault("position", POSITION_SYNONYMS[word])
        elif word in STYLES:
            found.setdefault("style", word)
    return found
