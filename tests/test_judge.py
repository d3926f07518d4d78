"""The shapes-world judge as shipped: its accuracy on fresh generator images (seeds its training never
reached), the `shapes` evaluator against matching and mismatching prompts, the plugin listing, and a
re-run of the first training steps from the seed."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from loraforge.cli import cli
from loraforge.errors import ConfigError, IntegrityError
from loraforge.formats.safetensors_io import read_header
from loraforge.hashing import sha256_file
from loraforge.plugins import EVALUATORS
from loraforge.world import GENERATOR_VERSION, generate, with_labels
from loraforge.world.judge import PROVENANCE_PATH, WEIGHTS_PATH, JudgeNet, load_judge
from loraforge.world.judge_training import FRESH_SEEDS, accuracy, state_digest, train_judge
from loraforge.world.vocabulary import ATTRIBUTES

# The specification (issue 14: at least 98% per attribute). The committed judge measured 99.07% or more
# on every attribute, split and resolution over 2,048 fresh images each (judge.json, accuracy_fresh);
# here fewer images of the same fresh range are read, so 98% leaves about a point of margin.
REQUIRED = dict.fromkeys(ATTRIBUTES, 0.98)


@pytest.fixture(scope="module")
def evaluator():
    return EVALUATORS.get("shapes")()


def test_the_shipped_weights_are_the_recorded_ones():
    facts = json.loads(PROVENANCE_PATH.read_text())
    assert facts["generator_version"] == GENERATOR_VERSION
    assert sha256_file(WEIGHTS_PATH) == facts["weights_sha256"]
    header, metadata = read_header(WEIGHTS_PATH)
    floats = [v["dtype"] for k, v in header.items() if not k.endswith("num_batches_tracked")]
    assert set(floats) == {"F16"} and metadata["seed"] == str(facts["seed"])
    assert WEIGHTS_PATH.stat().st_size < 2 << 20
    # The file is plain safetensors: the library's own reader loads it into the network, strictly.
    from safetensors.torch import load_file

    state = load_file(WEIGHTS_PATH)
    net = JudgeNet(facts["architecture"]["width"], facts["architecture"]["hidden"])
    net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, strict=True)
    judge = load_judge()
    for name, tensor in judge.net.state_dict().items():
        assert torch.equal(tensor, net.state_dict()[name]), name


@pytest.mark.parametrize("resolution,count", [(64, 384), (32, 192)])
def test_the_judge_reads_fresh_images(resolution, count):
    seeds = range(FRESH_SEEDS.stop - count, FRESH_SEEDS.stop)
    measured = accuracy(load_judge(), seeds, resolution=resolution, split="all")
    for name, floor in REQUIRED.items():
        assert measured[name] >= floor, (name, measured)


def test_the_judge_reads_blurred_and_noisy_images():
    # A model's output is softer and noisier than the generator's: measured 99.2% (blur) and 99.4%
    # (noise) shape accuracy on 512 fresh images, every other attribute 100%.
    from PIL import Image, ImageFilter

    samples = [generate(seed, 64, "all") for seed in range(FRESH_SEEDS.start, FRESH_SEEDS.start + 256)]
    rng = np.random.default_rng(0)
    blurred = [s.image.filter(ImageFilter.GaussianBlur(1)) for s in samples]
    noisy = [Image.fromarray(np.clip(np.asarray(s.image) + rng.normal(0, 8, (64, 64, 3)), 0, 255).astype(np.uint8))
             for s in samples]
    judge = load_judge()
    for images in (blurred, noisy):
        read = judge.labels(images)
        for name in ATTRIBUTES:
            right = np.mean([r[name] == getattr(s.labels, name) for r, s in zip(read, samples)])
            assert right >= 0.97, (name, right)


def test_a_matching_prompt_scores_high_and_a_mismatching_one_low(evaluator):
    samples = [generate(seed, 64, "all") for seed in range(FRESH_SEEDS.start, FRESH_SEEDS.start + 24)]
    images = [s.image for s in samples]
    right = evaluator(images, [s.caption for s in samples])
    assert sorted(right)[len(right) // 2] > 0.9, right
    wrong_colour = [s.caption.replace(f" {s.labels.colour} ", " purple " if s.labels.colour != "purple" else " red ", 1)
                    for s in samples]
    wrong = evaluator(images, wrong_colour)
    assert max(wrong) < 0.1, wrong
    # A prompt that names fewer attributes is scored on those only.
    [score] = evaluator.evaluate([images[0]], [f"a {samples[0].labels.shape}"])
    assert score.expected == {"shape": samples[0].labels.shape} and score.score > 0.9
    assert set(score.distribution) == set(ATTRIBUTES)


def test_size_and_alias_are_judged(evaluator):
    small = generate(FRESH_SEEDS.start + 100, 64, "all", size="small", shape="star")
    big = with_labels(small, size="big")
    token = EVALUATORS.get("shapes")(aliases={"sks": "star"})
    assert token([big.image], ["a big sks"])[0] > 0.9
    assert evaluator([small.image], ["a big star"])[0] < 0.1


def test_attributes_limit_the_score_to_what_is_named(evaluator):
    sample = generate(FRESH_SEEDS.start + 7, 64, "all", shape="star", colour="red", size="big")
    prompt = f"a big blue <sks> on a {sample.labels.background} background"  # right shape, wrong colour
    everything = EVALUATORS.get("shapes")(aliases={"<sks>": "star"})
    shape_only = EVALUATORS.get("shapes")(aliases={"<sks>": "star"}, attributes=["shape"])
    [all_of_it], [shape] = everything.evaluate([sample.image], [prompt]), shape_only.evaluate([sample.image], [prompt])
    assert all_of_it.score < 0.1 and shape.score > 0.9 and shape.expected == {"shape": "star"}
    assert shape.score == pytest.approx(all_of_it.probabilities["shape"])
    with pytest.raises(ConfigError, match="names none of the scored attributes"):
        shape_only([sample.image], ["a big blue thing"])
    with pytest.raises(ConfigError, match="attributes texture of the shapes evaluator"):
        EVALUATORS.get("shapes")(attributes=["texture"])


def test_refusals_are_one_line(evaluator):
    image = generate(0).image
    with pytest.raises(ConfigError, match="names no shapes-world attribute"):
        evaluator([image], ["a photo of a dog"])
    with pytest.raises(ConfigError, match="1 images for 2 prompts"):
        evaluator([image], ["a circle", "a square"])
    with pytest.raises(ConfigError, match="alias target"):
        EVALUATORS.get("shapes")(aliases={"sks": "dog"})


def test_a_damaged_or_missing_judge_is_a_one_line_error(tmp_path):
    weights, provenance = tmp_path / "judge.safetensors", tmp_path / "judge.json"
    data = bytearray(WEIGHTS_PATH.read_bytes())
    data[-1] ^= 0x40
    weights.write_bytes(bytes(data))
    provenance.write_text(PROVENANCE_PATH.read_text())
    with pytest.raises(IntegrityError, match="sha256 differs"):
        load_judge(weights, provenance)
    with pytest.raises(ConfigError, match="make judge"):
        load_judge(tmp_path / "absent.safetensors", provenance)


def test_the_evaluator_is_listed_by_loraforge_plugins():
    result = CliRunner().invoke(cli, ["plugins", "--group", "evaluators", "--json"])
    assert result.exit_code == 0, result.output
    [row] = [r for r in json.loads(result.output) if r["name"] == "shapes"]
    assert row["source"] == "builtin" and row["version"] == "1" and "judge" in row["description"]


def test_the_first_training_steps_rerun_bit_identically():
    facts = json.loads(PROVENANCE_PATH.read_text())
    kwargs = dict(seed=facts["seed"], batch_size=facts["batch_size"], pool=facts["pool"], lr=facts["lr"],
                  width=facts["architecture"]["width"], hidden=facts["architecture"]["hidden"], threads=facts["threads"])
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # a caller's thread count (other tests set 1) must not change the sums: the run pins its own
    try:
        first, run = train_judge(3, schedule_steps=facts["steps"], **kwargs)
        second, _ = train_judge(3, schedule_steps=facts["steps"], **kwargs)
    finally:
        torch.set_num_threads(before)
    assert state_digest(first) == state_digest(second)
    assert run["initial_digest"] == facts["initial_digest"]  # the committed run started from these weights
    same_machine = (run["torch"], run["cpu_capability"]) == (facts["torch"], facts["cpu_capability"])
    if not same_machine:
        pytest.skip(f"float sums differ between {facts['torch']} on {facts['cpu_capability']} (the committed run) "
                    f"and {run['torch']} on {run['cpu_capability']}")
    assert state_digest(first) == facts["early_digests"]["3"]  # the committed run's weights after 3 steps
