"""CLIP image-text similarity as a reward, with a configurable CLIP model (a local folder offline)."""

from __future__ import annotations

from typing import Sequence

import torch

from loraforge.errors import RewardError
from loraforge.plugins import REWARDS

VERSION = "1"


@REWARDS.register("clip_score", version=VERSION, reference_url="https://arxiv.org/abs/2104.08718",
                  description="CLIP image-text cosine similarity (times scale) with a configurable CLIP model.")
class ClipScoreReward:
    """scale · cos(CLIP_image(I), CLIP_text(prompt)); `model` is a Hub id (cached locally) or a folder."""

    name = "clip_score"

    def __init__(self, model: str = "openai/clip-vit-base-patch32", scale: float = 1.0, device: str | None = None,
                 batch_size: int = 16):
        from transformers import CLIPModel, CLIPProcessor

        try:
            self.model = CLIPModel.from_pretrained(model, local_files_only=True).eval()
            self.processor = CLIPProcessor.from_pretrained(model, local_files_only=True)
        except (OSError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
            raise RewardError(f"cannot load CLIP model {model!r} ({first}); give a local folder with a CLIPModel "
                              "and its processor as the model option") from None
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model.to(self.device)
        self.model_id, self.scale, self.batch_size = model, float(scale), int(batch_size)
        self.version = f"{VERSION}:{model}"  # another CLIP model is another reward

    @torch.no_grad()
    def __call__(self, images: Sequence, prompts: Sequence[str]) -> list[float]:
        scores: list[float] = []
        for lo in range(0, len(images), self.batch_size):
            ims = [im.convert("RGB") for im in images[lo:lo + self.batch_size]]
            texts = list(prompts[lo:lo + self.batch_size])
            inputs = self.processor(text=texts, images=ims, return_tensors="pt", padding="max_length", truncation=True)
            inputs = {k: v.to(self.device) for k, v in inputs.items()}
            img = self.model.get_image_features(pixel_values=inputs["pixel_values"])
            txt = self.model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"))
            img, txt = _tensor(img), _tensor(txt)
            cos = torch.nn.functional.cosine_similarity(img.float(), txt.float(), dim=-1)
            scores += (self.scale * cos).tolist()
        return scores


def _tensor(out):
    """transformers 5 may return a model output instead of a tensor from get_*_features."""
    if isinstance(out, torch.Tensor):
        return out
    for attr in ("pooler_output", "image_embeds", "text_embeds"):
        if getattr(out, attr, None) is not None:
            return getattr(out, attr)
    raise RewardError("unexpected output of the CLIP model's feature functions")
