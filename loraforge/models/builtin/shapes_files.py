"""builtin:shapes on disk: the shipped pipeline folder, the check against its provenance, the copy into a home.

Torch-free, so finding or installing the builtin imports neither torch nor diffusers.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from loraforge.errors import IntegrityError
from loraforge.hashing import sha256_file
from loraforge.world.provenance import VAE_DIR, VAE_PROVENANCE, VAE_WEIGHTS, checked_provenance

MODEL_DIR = Path(__file__).with_name("shapes_pipeline")
PROVENANCE_NAME = "pretraining.json"
UNET_WEIGHTS = Path("unet") / "diffusion_pytorch_model.safetensors"


def shipped_files(folder: Path = MODEL_DIR) -> list[Path]:
    """The files of the committed pipeline folder, relative to it, in sorted order (provenance excluded)."""
    return sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file() and p.name != PROVENANCE_NAME)


def check_shipped(folder: Path = MODEL_DIR) -> dict:
    """The pretraining facts of the pipeline in `folder`, after checking that it exists, was trained on this
    generator version, and that every file is the one the provenance records."""
    facts = checked_provenance(folder / UNET_WEIGHTS, folder / PROVENANCE_NAME, "builtin:shapes", "make pretrain")
    recorded = facts.get("files_sha256", {})
    present = [str(p) for p in shipped_files(folder)]
    if sorted(recorded) != present:
        raise IntegrityError(f"builtin:shapes holds {present}, not the files {PROVENANCE_NAME} records "
                             f"({sorted(recorded)}): restore {folder.name}/ from the repository or run `make pretrain`")
    for name, digest in recorded.items():
        if sha256_file(folder / name) != digest:
            raise IntegrityError(f"builtin:shapes file {name} is not the one {PROVENANCE_NAME} records (sha256 "
                                 "differs): restore it from the repository or run `make pretrain`")
    return facts


def copy_shapes_pipeline(target: Path, folder: Path = MODEL_DIR) -> Path:
    """The pipeline in `folder` (the committed one; checked) and the committed VAE, copied into `target` as one
    diffusers folder."""
    check_shipped(folder)
    checked_provenance(VAE_DIR / VAE_WEIGHTS, VAE_DIR / VAE_PROVENANCE, "the shapes VAE", "make shapes-vae")
    shutil.copytree(folder, target)
    (target / "vae").mkdir()
    for name in ("config.json", VAE_WEIGHTS):
        shutil.copyfile(VAE_DIR / name, target / "vae" / name)
    return target
