"""Latents and text embeddings of a training set: cached on disk, or encoded per batch.

Latents and text embeddings are separate entries, each keyed by everything that determines its
content: latents by the image bytes, the pixel transform and the VAE's weights; text by the token ids
of every tokenizer and the weights of every text encoder (SDXL's two). So a DreamBooth run on a folder a
text-to-image run used shares its latents but never its caption embeddings. SDXL's time ids are not
cached: they follow from the latents' size (model.unet_conditioning) at every step.
"""

from __future__ import annotations

import hashlib
import weakref
from pathlib import Path

import torch

from loraforge.hashing import sha256_file, sha256_json
from loraforge.home import cache_dir
from loraforge.train.data import IMAGE_TRANSFORM, TrainingSet, image_tensor
from loraforge.train.model import (SDXLText, Text, TrainingModel, cat_text, encode_images, encode_prompts,
                                   tokenize_all)

CACHE_VERSION = 3

_module_digests: "weakref.WeakKeyDictionary[torch.nn.Module, str]" = weakref.WeakKeyDictionary()


def module_digest(module: torch.nn.Module) -> str:
    """sha256 of a module's config and weights (names, dtypes, shapes, bytes), once per module object.

    Taken from the weights in memory, not from files, so a single-file checkpoint, a diffusers folder
    and a merge that kept its base's VAE all name the same VAE the same way.
    """
    if module in _module_digests:
        return _module_digests[module]
    h = hashlib.sha256()
    config = getattr(module, "config", None)
    h.update(repr(config.to_dict() if hasattr(config, "to_dict") else config).encode())
    for name, tensor in module.state_dict().items():
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    _module_digests[module] = digest = h.hexdigest()
    return digest


def _image_digests(data: TrainingSet) -> list[tuple[str, str]]:
    known = {e.path: e.sha256 for e in data.manifest.files}
    return [(rel, known.get(rel) or sha256_file(data.folder / rel)) for rel in data.images]


def latents_key(model: TrainingModel, data: TrainingSet, resolution: int, crop: str, seed: int) -> str:
    return sha256_json(["train-latents", CACHE_VERSION, module_digest(model.pipe.vae), str(model.autocast_dtype),
                        IMAGE_TRANSFORM, resolution, crop, seed if crop == "random" else None,
                        _image_digests(data)])[:32]


def text_key(model: TrainingModel, captions: list[str]) -> str:
    """Key of the captions' embeddings: every text encoder's weights and every tokenizer's ids."""
    token_ids = [[list(ids.shape), hashlib.sha256(ids.to(torch.int64).numpy().tobytes()).hexdigest()]
                 for ids in tokenize_all(model, captions)]
    return sha256_json(["train-text", CACHE_VERSION, model.family,
                        [module_digest(encoder) for encoder in model.text_encoders],
                        str(model.autocast_dtype), token_ids])[:32]


def _to_tensors(value) -> dict[str, torch.Tensor]:
    if isinstance(value, SDXLText):
        return {"data": value.embeds, "pooled": value.pooled}
    return {"data": value}


def _from_tensors(tensors: dict[str, torch.Tensor]):
    if "pooled" in tensors:
        return SDXLText(tensors["data"], tensors["pooled"])
    return tensors["data"]


def _load_or_build(path: Path, build):
    from loraforge.formats.safetensors_io import read_safetensors, write_safetensors

    if path.is_file():
        return _from_tensors(read_safetensors(path)[0])
    value = build()
    write_safetensors(_to_tensors(value), path)  # atomic: readers see a whole file or none
    return value


class BatchSource:
    """(latents, text embeddings) for sample indices; with `cached`, computed once and kept on disk."""

    def __init__(self, model: TrainingModel, data: TrainingSet, *, home: Path, resolution: int, crop: str = "center",
                 seed: int = 0, cached: bool = True, encode_text: bool = True):
        self.model, self.data, self.resolution, self.crop, self.seed = model, data, resolution, crop, seed
        self.encode_text = encode_text  # False while a text-encoder LoRA trains: text is encoded per step
        self.latents: torch.Tensor | None = None
        self.text: Text | None = None
        self.cache_files: list[Path] = []
        if cached:
            folder = cache_dir(Path(home)) / "train"
            path = folder / f"latents-{latents_key(model, data, resolution, crop, seed)}.safetensors"
            self.latents = _load_or_build(path, self._encode_all_images)
            self.cache_files.append(path)
            if encode_text:
                path = folder / f"text-{text_key(model, data.captions)}.safetensors"
                self.text = _load_or_build(path, self._encode_all_captions)
                self.cache_files.append(path)

    def _pixels(self, i: int) -> torch.Tensor:
        return image_tensor(self.data.folder / self.data.images[i], self.resolution, self.crop, seed=self.seed * 7919 + i)

    def _encode_all_images(self) -> torch.Tensor:
        return torch.cat([encode_images(self.model, self._pixels(i)[None]).cpu() for i in range(len(self.data))])

    def _encode_all_captions(self) -> Text:
        captions = self.data.captions
        return cat_text([encode_prompts(self.model, captions[i:i + 16]).to("cpu") for i in range(0, len(captions), 16)])

    def batch(self, indices: list[int]) -> tuple[torch.Tensor, Text | None]:
        """Latents and (unless encode_text is False) text embeddings on the model's device."""
        dev = self.model.device
        if self.latents is not None:
            latents = self.latents[indices].to(dev)
        else:
            latents = encode_images(self.model, torch.stack([self._pixels(i) for i in indices]))
        if not self.encode_text:
            return latents, None
        if self.text is not None:
            return latents, self.text[indices].to(dev)
        return latents, encode_prompts(self.model, [self.data.captions[i] for i in indices])

    def prompts(self, indices: list[int]) -> list[str]:
        return [self.data.captions[i] for i in indices]
