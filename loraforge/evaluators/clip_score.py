"""CLIP scores: text–image agreement, scale · cos(CLIP_image(I), CLIP_text(prompt)), and CLIP image features.

This module is the one home of loraforge's CLIP computations: the `clip_score` evaluator here, the `clip_score`
reward (rewards.clip_score) and image_similarity's CLIP features all call `load_clip` and the functions below,
so a reward fine-tune and its evaluation measure the same number.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

from loraforge.errors import ConfigError
from loraforge.plugins import EVALUATORS

VERSION = "1"
DEFAULT_MODEL = "openai/clip-vit-base-patch32"


class Clip(NamedTuple):
    """A CLIP model, its processor and the device it runs on."""

    model: object
    processor: object
    device: object


def load_clip(model: str = DEFAULT_MODEL, device: Optional[str] = None, error: type[Exception] = ConfigError) -> Clip:
    """CLIP from a folder or the local Hub cache (never downloaded); `error` is what a model that does not load
    raises (the reward raises RewardError), in one line naming the model and the fix."""
    import torch
    from transformers import CLIPModel, CLIPProcessor

    try:
        clip_model = CLIPModel.from_pretrained(model, local_files_only=True).eval()
        processor = CLIPProcessor.from_pretrained(model, local_files_only=True)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise error(f"cannot load CLIP model {model!r} ({first}); give a local folder with a CLIPModel "
                    "and its processor as the model option") from None
    where = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return Clip(clip_model.to(where), processor, where)


def text_image_cosines(clip: Clip, images: Sequence, prompts: Sequence[str], batch_size: int = 16) -> list[float]:
    """cos(CLIP_image(image_i), CLIP_text(prompt_i)) for each pair."""
    import torch

    scores: list[float] = []
    with torch.no_grad():
        for lo in range(0, len(images), batch_size):
            ims = [im.convert("RGB") for im in images[lo:lo + batch_size]]
            texts = list(prompts[lo:lo + batch_size])
            inputs = clip.processor(text=texts, images=ims, return_tensors="pt", padding="max_length", truncation=True)
            inputs = {k: v.to(clip.device) for k, v in inputs.items()}
            img = _tensor(clip.model.get_image_features(pixel_values=inputs["pixel_values"]))
            txt = _tensor(clip.model.get_text_features(input_ids=inputs["input_ids"],
                                                       attention_mask=inputs.get("attention_mask")))
            scores += torch.nn.functional.cosine_similarity(img.float(), txt.float(), dim=-1).tolist()
    return scores


def image_features(clip: Clip, images: Sequence, batch_size: int = 16):
    """(n, d) CLIP image embeddings (float64, on the CPU, not normalised)."""
    import torch

    out = []
    with torch.no_grad():
        for lo in range(0, len(images), batch_size):
            batch = [im.convert("RGB") for im in images[lo:lo + batch_size]]
            pixels = clip.processor(images=batch, return_tensors="pt")["pixel_values"].to(clip.device)
            out.append(_tensor(clip.model.get_image_features(pixel_values=pixels)).double().cpu())
    return torch.cat(out)


def _tensor(out):
    """transformers 5 may return a model output instead of a tensor from get_*_features."""
    import torch

    if isinstance(out, torch.Tensor):
        return out
    for attr in ("pooler_output", "image_embeds", "text_embeds"):
        if getattr(out, attr, None) is not None:
            return getattr(out, attr)
    raise ConfigError("unexpected output of the CLIP model's feature functions")


@EVALUATORS.register("clip_score", version=VERSION, reference_url="https://arxiv.org/abs/2104.08718",
                     description="CLIP text-image cosine similarity of each image with its prompt (times scale).")
class ClipScoreEvaluator:
    """`model`: a CLIP model folder (a CLIPModel with its processor) or a Hub id in the local cache; `scale`
    multiplies the cosine (CLIPScore papers report 100 · cos)."""

    def __init__(self, model: str = DEFAULT_MODEL, scale: float = 1.0, device: Optional[str] = None,
                 batch_size: int = 16):
        self.clip = load_clip(model, device)
        self.scale, self.batch_size = float(scale), int(batch_size)
        self.version = f"{VERSION}:{model}"  # another CLIP model is another evaluator version

    def __call__(self, images: Sequence, prompts: Sequence[str]) -> list[float]:
        return [self.scale * c for c in text_image_cosines(self.clip, images, prompts, self.batch_size)]
