"""The check every trained world model (the judge, the VAE) passes before it loads: its weights and their
provenance exist, it was trained on this generator version, and the weights are the file the provenance records."""

from __future__ import annotations

import json
from pathlib import Path

from loraforge.errors import ConfigError, FormatError, IntegrityError
from loraforge.world.vocabulary import GENERATOR_VERSION

# Where the shapes VAE ships (a diffusers folder); here, not in `shapes_vae`, so checking and copying the files
# needs no torch.
VAE_DIR = Path(__file__).with_name("vae")
VAE_WEIGHTS = "diffusion_pytorch_model.safetensors"
VAE_PROVENANCE = "vae.json"


def checked_provenance(weights: Path, provenance: Path, what: str, rebuild: str) -> dict:
    """The provenance facts of `weights`, after the checks; `what` names the model in errors ("the shapes judge")
    and `rebuild` is the command that retrains it."""
    if not weights.is_file() or not provenance.is_file():
        raise ConfigError(f"{what}'s weights are missing ({weights.name}, {provenance.name}): "
                          f"rebuild them with `{rebuild}`")
    facts = json.loads(provenance.read_text(encoding="utf-8"))
    if facts.get("generator_version") != GENERATOR_VERSION:
        raise FormatError(f"{what} was trained on {facts.get('generator_version')!r}, not on "
                          f"{GENERATOR_VERSION!r}: retrain it with `{rebuild}`")
    from loraforge.hashing import sha256_file

    if facts.get("weights_sha256") != sha256_file(weights):
        raise IntegrityError(f"{weights.name} is not the file {provenance.name} records (sha256 differs): "
                             f"restore it from the repository or retrain with `{rebuild}`")
    return facts
