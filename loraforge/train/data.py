"""Training data: snapshot a folder (or resolve a registry dataset), then load its images and captions."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from loraforge.errors import ArtifactNotFound, ConfigError, DatasetError
from loraforge.hashing import digest_of_files, sha256_file
from loraforge.reference import Reference
from loraforge.registry.dataset import complete_captions, dataset_files, load_image, scan_dataset
from loraforge.registry.manifest import Manifest
from loraforge.registry.registry import Registry


@dataclass
class TrainingSet:
    """A snapshotted dataset: the registry artifact, its checked-out folder, and one caption per image."""

    manifest: Manifest
    folder: Path
    images: list[str]  # paths inside the artifact, sorted
    captions: list[str]  # same order as images

    @property
    def digest(self) -> str:
        return self.manifest.digest

    def __len__(self) -> int:
        return len(self.images)


def folder_digest(folder: Path) -> str:
    """The digest the registry gives a dataset artifact of this folder (same content, same digest)."""
    return digest_of_files((rel, sha256_file(src)) for src, rel in dataset_files(folder))


def _dataset_name(output: str, source: str) -> str:
    stem = re.sub(r"[^a-z0-9_-]+", "-", Path(source).name.lower()).strip("-") or "data"
    return f"{output}-{stem}"[:100]


def prepare_dataset(registry: Registry, source: str, *, output: str,
                    instance_prompt: Optional[str] = None) -> TrainingSet:
    """Snapshot folder `source` as a dataset artifact (reusing an identical earlier snapshot), or resolve
    `source` as a registry dataset reference. Every check runs before anything is registered."""
    from loraforge.registry.importer import import_dataset

    ref = Reference.parse(source)
    if ref.kind == "path":
        path = ref.path
        if not path.is_dir():
            raise DatasetError(f"dataset folder {source} does not exist; give a folder of images or a dataset reference")
        images, captions = scan_dataset(path)
        rels = [p.relative_to(path).as_posix() for p in images]
        complete_captions(captions, rels, instance_prompt, folder=source)
        for image in images:  # decode every image now, so a bad file fails before registration
            load_image(image)
        digest = folder_digest(path)
        key = f"dataset:{digest}"
        manifest = registry.find_by_input_digest(key)
        if manifest is None:
            manifest = import_dataset(registry, path, _dataset_name(output, source),
                                      instance_prompt=instance_prompt, input_digest=key)
    else:
        try:
            manifest = registry.resolve(source)
        except ArtifactNotFound as exc:
            if Path(source).is_dir():  # a bare folder name is a registry name; say how to mean the folder
                raise DatasetError(f"{exc}; for the folder {source}, write ./{source}") from None
            raise
        if manifest.kind != "dataset":
            raise ConfigError(f"{source} is a {manifest.kind}, not a dataset")
    folder = registry.checkout(manifest)
    info = manifest.dataset
    rels = sorted(info.captions) if info and info.captions else sorted(
        e.path for e in manifest.files if not e.path.endswith((".txt", ".jsonl")))
    if not rels:
        raise DatasetError(f"dataset {manifest.ref} holds no images")
    prompt = instance_prompt or (info.instance_prompt if info else None)
    captions = complete_captions(dict(info.captions) if info else {}, rels, prompt, folder=manifest.ref)
    return TrainingSet(manifest=manifest, folder=folder, images=rels, captions=[captions[r] for r in rels])


# Names the pixel transform of image_tensor in cache keys: change it whenever the transform changes.
IMAGE_TRANSFORM = "rgb-shorter-side-bicubic-crop-v1"


def image_tensor(path: Path, resolution: int, crop: str = "center", seed: int = 0) -> torch.Tensor:
    """A 3×res×res tensor in [-1, 1]: shorter side resized to `resolution`, then a centre or seeded random crop."""
    from PIL import Image

    im = load_image(path)
    scale = resolution / min(im.size)
    w, h = max(resolution, round(im.width * scale)), max(resolution, round(im.height * scale))
    im = im.resize((w, h), Image.BICUBIC)
    if crop == "random":
        g = torch.Generator().manual_seed(seed)
        left = int(torch.randint(0, w - resolution + 1, (1,), generator=g))
        top = int(torch.randint(0, h - resolution + 1, (1,), generator=g))
    elif crop == "center":
        left, top = (w - resolution) // 2, (h - resolution) // 2
    else:
        raise ConfigError(f"unknown crop {crop!r}; use center or random")
    im = im.crop((left, top, left + resolution, top + resolution))
    data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).reshape(resolution, resolution, 3)
    return data.permute(2, 0, 1).float().div(127.5).sub(1.0)


def batch_indices(n: int, batch_size: int, step: int, micro: int, seed: int, accumulation: int = 1) -> list[int]:
    """Which samples a micro-batch uses: a permutation per epoch, drawn from (seed, epoch) only, so any
    step can be recomputed after a resume without replaying earlier ones."""
    flat = (step * accumulation + micro) * batch_size
    out = []
    for i in range(flat, flat + batch_size):
        epoch, pos = divmod(i, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        out.append(int(perm[pos]))
    return out


def step_generator(seed: int, step: int, micro: int = 0, stream: int = 0) -> torch.Generator:
    """A CPU generator for one (step, micro-batch, stream): noise and timesteps never depend on history."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 1_009 + micro) * 17 + stream)
