"""builtin:shapes: the committed, trained text-to-image model of the shapes world.

It installs as a diffusers folder that diffusers' own StableDiffusionPipeline loads, its files are the ones
its provenance records, its pretraining re-runs bit-identically from the seed, and what it draws for a
caption is what the judge reads back.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from loraforge.errors import IntegrityError
from loraforge.models.builtin import ensure_builtin
from loraforge.models.builtin.shapes import WORLD_WORDS
from loraforge.models.builtin.shapes_files import MODEL_DIR, PROVENANCE_NAME, UNET_WEIGHTS, check_shipped
from loraforge.world.judge_training import state_digest

FACTS = json.loads((MODEL_DIR / PROVENANCE_NAME).read_text())


@pytest.fixture(scope="module")
def shapes_pipe(tmp_path_factory):
    from diffusers import StableDiffusionPipeline

    folder = ensure_builtin("shapes", tmp_path_factory.mktemp("home"))
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_the_builtin_installs_as_a_diffusers_pipeline_of_the_shipped_files(shapes_pipe, tmp_path):
    folder = ensure_builtin("shapes", tmp_path)
    assert (folder / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    assert (folder / UNET_WEIGHTS).read_bytes() == (MODEL_DIR / UNET_WEIGHTS).read_bytes()
    tokens = shapes_pipe.tokenizer.tokenize(" ".join(WORLD_WORDS))
    assert len(tokens) == len(WORLD_WORDS)  # every word of the world is one token
    assert shapes_pipe.unet.config.sample_size * shapes_pipe.vae_scale_factor == 64


def test_a_changed_shipped_file_is_refused_in_one_line(tmp_path):
    copy = tmp_path / "pipeline"
    shutil.copytree(MODEL_DIR, copy)
    weights = copy / "text_encoder" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=r"^builtin:shapes file text_encoder/model.safetensors is not the one "
                                             r"pretraining.json records .*make pretrain`$"):
        check_shipped(copy)


def test_the_first_pretraining_steps_rerun_bit_identically():
    from loraforge.train.shapes_pretraining import pretrain

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the caller's thread count must not change the sums: the run pins its own
    try:
        pipe, run = pretrain(3, seed=FACTS["seed"], batch_size=FACTS["batch_size"], pool_size=FACTS["pool"][1],
                             lr=FACTS["lr"], warmup=FACTS["warmup"], threads=FACTS["threads"], progress=False)
    finally:
        torch.set_num_threads(before)
    assert run["initial_digests"] == FACTS["initial_digests"]  # the committed run started from these weights
    assert run["early_digests"]["3"] == {"unet": state_digest(pipe.unet), "text_encoder": state_digest(pipe.text_encoder)}
    same_machine = (run["torch"], run["cpu_capability"]) == (FACTS["torch"], FACTS["cpu_capability"])
    if not same_machine:
        pytest.skip(f"float sums differ between {FACTS['torch']} on {FACTS['cpu_capability']} (the committed run) "
                    f"and {run['torch']} on {run['cpu_capability']}")
    assert run["early_digests"]["3"] == FACTS["early_digests"]["3"]
