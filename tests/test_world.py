"""The shapes world's generator: bit-identical images for a seed on every machine, captions and labels
that say what the pixels show (measured on the pixels, not read back from the generator), a hold-out set
that pretraining sampling never leaves, and styles that apply to any image."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from PIL import Image

from loraforge.errors import ConfigError
from loraforge.world import GENERATOR_VERSION, Labels, apply_style, caption, generate, parse_prompt, with_labels
from loraforge.world.draw import UNITS, coverage, sample_grid, shape_coverage, shape_mask
from loraforge.world.vocabulary import (BACKGROUND_RGB, COLOUR_RGB, HELD_OUT_COMBINATIONS, HELD_OUT_SHAPES,
                                        HELD_OUT_STYLES, SHAPES)

# sha256 of the RGB bytes of four samples of `shapes-world/1`, written down when the generator was made.
# A change here is a change of GENERATOR_VERSION: every image a seed meant before is different.
GOLDEN = [
    (0, 64, "pretrain", "a big pink square in the centre of a white background",
     "1d18e6b65925a0a754560bb8fc20a86b60bee90e3cca7132918b694697f35e79"),
    (1, 64, "all", "a big red circle on the left of a gray background, dotted",
     "8e220c4e8be95e9aec2c75ae0b322212853af3694e9ec17a3da98b43795af9e5"),
    (7, 32, "holdout", "a small pink circle on the left of a black background, dotted",
     "b2690f1693ee534eb05e25d71e20e70ee0c5f1c47eda77ad9d0d9e1f0b2cca79"),
    (12345, 64, "all", "a big blue star on the left of a gray background, striped",
     "17367a219e40db303f80c496edcaf6b2d2a5db2d73bed134139c23f5ae074d2b"),
]


@pytest.mark.parametrize("seed,resolution,split,text,digest", GOLDEN)
def test_a_seed_is_the_same_image_everywhere(seed, resolution, split, text, digest):
    assert GENERATOR_VERSION == "shapes-world/1"
    sample = generate(seed, resolution, split)
    assert sample.caption == text
    assert sample.image.size == (resolution, resolution) and sample.image.mode == "RGB"
    assert hashlib.sha256(sample.image.tobytes()).hexdigest() == digest
    again = generate(seed, resolution, split)
    assert again.image.tobytes() == sample.image.tobytes() and again.labels == sample.labels


def test_different_seeds_make_different_images():
    images = {generate(seed, 32, "all").image.tobytes() for seed in range(64)}
    assert len(images) == 64


def _pixel_facts(sample):
    """What the pixels of a plain sample show: the shape's colour, its area and its centroid."""
    pixels = np.asarray(sample.image).astype(int)
    background = np.array(BACKGROUND_RGB[sample.labels.background])
    fg = np.abs(pixels - background).sum(-1) > 30
    colours, counts = np.unique(pixels[fg].reshape(-1, 3), axis=0, return_counts=True)
    ys, xs = np.nonzero(fg)
    return tuple(colours[counts.argmax()]), fg.mean(), xs.mean() / pixels.shape[1]


@pytest.mark.parametrize("resolution", [64, 32])
def test_labels_say_what_the_pixels_show(resolution):
    for seed in range(60):
        sample = generate(seed, resolution, "pretrain")
        colour, area, centre_x = _pixel_facts(sample)
        assert colour == COLOUR_RGB[sample.labels.colour], sample.caption
        if sample.labels.size == "small":
            assert 0.01 < area < 0.06, (sample.caption, area)
        else:
            assert 0.07 < area < 0.25, (sample.caption, area)
        third = {"left": (0.15, 0.38), "centre": (0.40, 0.60), "right": (0.62, 0.85)}[sample.labels.position]
        assert third[0] < centre_x < third[1], (sample.caption, centre_x)


def test_a_pair_differs_only_in_the_changed_label():
    small = generate(3, 64, "pretrain", size="small")
    big = with_labels(small, size="big")
    assert big.labels.size == "big" and big.caption == small.caption.replace("small", "big")
    (c_small, a_small, x_small), (c_big, a_big, x_big) = _pixel_facts(small), _pixel_facts(big)
    assert c_small == c_big and a_big > 3 * a_small and abs(x_big - x_small) < 0.02


def test_pretraining_never_sees_the_hold_out_and_fine_tuning_can_ask_for_it():
    pretrain = [generate(seed, 32, "pretrain").labels for seed in range(400)]
    assert not any(l.shape in HELD_OUT_SHAPES or (l.colour, l.shape) in HELD_OUT_COMBINATIONS
                   or l.style in HELD_OUT_STYLES for l in pretrain)
    assert {l.shape for l in pretrain} == set(SHAPES) - HELD_OUT_SHAPES
    assert all(generate(seed, 32, "holdout").labels.held_out for seed in range(100))
    stars = [generate(seed, 32, "holdout", shape="star") for seed in range(20)]
    assert all(s.labels.shape == "star" and " star " in s.caption for s in stars)
    assert generate(0, 32, "all", colour="red", shape="triangle").labels.held_out
    with pytest.raises(ConfigError, match="no pretrain image has shape=star"):
        generate(0, 32, "pretrain", shape="star")
    with pytest.raises(ConfigError, match="unknown shape 'hexagon'"):
        generate(0, 32, "all", shape="hexagon")
    with pytest.raises(ConfigError, match="invisible"):
        Labels("circle", "white", "white", "big", "left")


def test_only_pixels_within_a_shapes_reach_are_tested():
    # The rasteriser tests only a box around the shape; every sample of the image must agree with it,
    # including shapes cut by the image's edge.
    for resolution in (32, 64):
        x, y = sample_grid(resolution)
        side = resolution * UNITS
        for shape in SHAPES:
            for cx, cy, r in [(side * 27 // 100, side // 2, side * 24 // 100), (side * 3 // 100, side * 97 // 100, side // 4),
                              (side // 2, side // 2, side // 10)]:
                full = coverage(shape_mask(shape, x, y, cx, cy, r), resolution)
                assert np.array_equal(full, shape_coverage(shape, cx, cy, r, resolution)), shape


def test_captions_parse_back_to_their_labels():
    for seed in range(200):
        sample = generate(seed, 32, "all")
        want = sample.labels.as_dict()
        if want["style"] == "plain":
            del want["style"]  # a plain image's caption names no style
        assert parse_prompt(sample.caption) == want
    assert parse_prompt("two white hearts in the middle, on a blue background") == {
        "colour": "white", "shape": "heart", "position": "centre", "background": "blue"}
    assert parse_prompt("a photo of sks", {"sks": "star"}) == {"shape": "star"}
    # A textual-inversion token is one word, brackets included: it is aliased whole, never read as "sks".
    assert parse_prompt("a big <sks> on a black background", {"<sks>": "star"}) == {
        "size": "big", "shape": "star", "background": "black"}
    assert parse_prompt("a <sks>", {"sks": "star"}) == {}
    assert caption(Labels("ring", "green", "black", "small", "right", "striped")) == (
        "a small green ring on the right of a black background, striped")


def test_a_style_applies_to_any_image_and_shows():
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8))
    for style in ("striped", "dotted"):
        styled = np.asarray(apply_style(photo, style)).astype(int)
        changed = (styled != np.asarray(photo)).any(-1).mean()
        assert styled.shape == (40, 56, 3) and 0.2 < changed < 0.6, (style, changed)
    assert np.array_equal(np.asarray(apply_style(photo, "plain")), np.asarray(photo))
    plain = generate(5, 64, "pretrain")
    striped = with_labels(plain, style="striped")
    assert striped.caption == plain.caption + ", striped"
    assert np.array_equal(np.asarray(striped.image), np.asarray(apply_style(plain.image, "striped")))
    with pytest.raises(ConfigError, match="unknown style 'wavy'"):
        apply_style(photo, "wavy")
