"""The checks a trained world model passes before it loads (world.provenance), for the judge and the VAE alike."""

from __future__ import annotations

import json

import pytest

from loraforge.errors import ConfigError, FormatError
from loraforge.world.judge import PROVENANCE_PATH, WEIGHTS_PATH, load_judge
from loraforge.world.shapes_vae import load_vae


def test_a_vae_folder_without_weights_is_a_one_line_error_naming_the_rebuild(tmp_path):
    with pytest.raises(ConfigError, match="the shapes VAE's weights are missing .*make shapes-vae"):
        load_vae(tmp_path)


def test_weights_of_another_generator_version_are_refused(tmp_path):
    weights, provenance = tmp_path / "judge.safetensors", tmp_path / "judge.json"
    weights.write_bytes(WEIGHTS_PATH.read_bytes())
    facts = json.loads(PROVENANCE_PATH.read_text())
    provenance.write_text(json.dumps({**facts, "generator_version": "shapes-world/0"}))
    with pytest.raises(FormatError, match="trained on 'shapes-world/0'.*make judge"):
        load_judge(weights, provenance)
