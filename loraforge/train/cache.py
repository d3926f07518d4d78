"""Latents and text embeddings of a training set: cached on disk by dataset + model digest, or encoded per batch."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from loraforge.hashing import sha256_json
from loraforge.home import cache_dir
from loraforge.train.data import TrainingSet, image_tensor
from loraforge.train.model import TrainingModel, encode_images, encode_prompts

CACHE_VERSION = 1


def cache_key(dataset_digest: str, model_digest: str, resolution: int, crop: str, seed: int) -> str:
    return sha256_json(["train-cache", CACHE_VERSION, dataset_digest, model_digest, resolution, crop,
                        seed if crop == "random" else 0])[:32]


class BatchSource:
    """(latents, text embeddings) for sample indices; with `cached`, computed once and kept on disk."""

    def __init__(self, model: TrainingModel, data: TrainingSet, *, home: Path, resolution: int, crop: str = "center",
                 seed: int = 0, cached: bool = True, encode_text: bool = True):
        self.model, self.data, self.resolution, self.crop, self.seed = model, data, resolution, crop, seed
        self.encode_text = encode_text  # False while a text-encoder LoRA trains: text is encoded per step
        self.latents: torch.Tensor | None = None
        self.text: torch.Tensor | None = None
        self.cache_file: Path | None = None
        if cached:
            key = cache_key(data.digest, model.base.digest, resolution, crop, seed)
            self.cache_file = cache_dir(Path(home)) / "train" / f"{key}.safetensors"
            self._load_or_build()

    def _pixels(self, i: int) -> torch.Tensor:
        return image_tensor(self.data.folder / self.data.images[i], self.resolution, self.crop, seed=self.seed * 7919 + i)

    def _load_or_build(self) -> None:
        from safetensors.torch import load_file, save_file

        if self.cache_file.is_file():
            stored = load_file(self.cache_file)
            self.latents, self.text = stored["latents"], stored["text"]
            return
        latents, texts = [], []
        for i in range(len(self.data)):
            latents.append(encode_images(self.model, self._pixels(i)[None]).cpu())
        for start in range(0, len(self.data), 16):
            texts.append(encode_prompts(self.model, self.data.captions[start:start + 16]).cpu())
        self.latents, self.text = torch.cat(latents), torch.cat(texts)
        self.cache_file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.cache_file.parent, suffix=".tmp")
        os.close(fd)
        save_file({"latents": self.latents.contiguous(), "text": self.text.contiguous()}, tmp)
        os.replace(tmp, self.cache_file)  # readers see a whole file or none

    def batch(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
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
