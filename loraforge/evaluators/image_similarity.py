"""The `image_similarity` evaluator: identity preservation against a reference image set.

Each generated image scores the cosine similarity of its features with the most similar reference image (its
best match), so the mean over images says how close the renders stay to the subject however many reference
views there are. Features are CLIP image embeddings (`features: clip`, the CLIP-I measure of the DreamBooth
paper), or `features: pixels`: the image at 32×32 RGB with its mean removed, i.e. the pixels' correlation — a
model-free measure for small synthetic worlds where no CLIP model fits. The reference is the `reference` option
(a dataset artifact or a folder of images), else the training dataset recorded in the scored artifact's
manifest.
"""

from __future__ import annotations

from typing import Optional, Sequence

from loraforge.errors import ConfigError
from loraforge.plugins import EVALUATORS

VERSION = "1"
FEATURES = ("clip", "pixels")
PIXEL_SIDE = 32


@EVALUATORS.register("image_similarity", version=VERSION, reference_url="https://arxiv.org/abs/2208.12242",
                     description="Identity preservation: mean best-match cosine similarity of image features "
                                 "(CLIP or pixels) with a reference image set.")
class ImageSimilarityEvaluator:
    """`reference`: a dataset artifact (NAME[:VERSION]) or a folder of images (default: the scored artifact's
    training dataset); `features`: clip or pixels; `model`: the CLIP model folder for clip features."""

    def __init__(self, reference: Optional[str] = None, features: str = "clip", model: Optional[str] = None,
                 device: Optional[str] = None, registry=None):
        if features not in FEATURES:
            raise ConfigError(f"image_similarity features {features!r} is not one of {', '.join(FEATURES)}")
        if features == "pixels" and model:
            raise ConfigError("image_similarity: the model option is for features clip; pixels use no model")
        self.registry, self.reference, self.features = registry, reference, features
        self.clip = None
        if features == "clip":
            from loraforge.evaluators.clip_score import DEFAULT_MODEL, load_clip

            self.clip = load_clip(model or DEFAULT_MODEL, device)
            self.version = f"{VERSION}:clip:{model or DEFAULT_MODEL}"
        else:
            self.version = f"{VERSION}:pixels{PIXEL_SIDE}"
        self._references: dict[str, object] = {}  # reference → its features
        if reference is not None:
            self._reference_features(reference)  # a bad reference fails before anything renders

    def for_subject(self, subject) -> "_BoundSimilarity":
        reference = self.reference or training_dataset(subject)
        if reference is None:
            raise ConfigError(f"image_similarity has no reference images for {subject.label}: its manifest records "
                              "no training dataset; give the reference option (a dataset artifact or a folder "
                              "of images)")
        return _BoundSimilarity(self, self._reference_features(reference))

    def __call__(self, images: Sequence, prompts: Sequence[str]) -> list[float]:
        if self.reference is None:
            raise ConfigError("image_similarity needs the reference option (a dataset artifact or a folder) "
                              "when it scores images of no artifact")
        return _BoundSimilarity(self, self._reference_features(self.reference))(images, prompts)

    def features_of(self, images: Sequence):
        """(n, d) unit feature vectors of `images`."""
        import torch

        if self.clip is None:
            import numpy as np

            side = (PIXEL_SIDE, PIXEL_SIDE)
            feats = torch.from_numpy(np.stack([np.asarray(im.convert("RGB").resize(side, _bilinear()), dtype=np.float64)
                                               .reshape(-1) for im in images]))
            feats = feats - feats.mean(dim=1, keepdim=True)
        else:
            from loraforge.evaluators.clip_score import image_features

            feats = image_features(self.clip, images)
        return torch.nn.functional.normalize(feats, dim=1)

    def _reference_features(self, reference: str):
        if reference not in self._references:
            self._references[reference] = self.features_of(reference_images(self.registry, reference))
        return self._references[reference]


class _BoundSimilarity:
    """image_similarity against one reference set."""

    def __init__(self, parent: ImageSimilarityEvaluator, reference_features):
        self.parent, self.reference_features = parent, reference_features
        self.name, self.version = parent.name, parent.version

    def __call__(self, images: Sequence, prompts: Sequence[str]) -> list[float]:
        if not images:
            return []
        cos = self.parent.features_of(images) @ self.reference_features.T
        return cos.max(dim=1).values.tolist()


def training_dataset(subject) -> Optional[str]:
    """The exact reference of the dataset the subject's artifact was trained on (its first dataset parent)."""
    manifest = subject.manifest
    if manifest is None:
        return None
    return next((p.ref for p in manifest.provenance.parents if p.role == "dataset"), None)


def reference_images(registry, reference: str) -> list:
    """The images of a dataset artifact or of a folder, sorted by path."""
    from loraforge.reference import Reference
    from loraforge.registry.dataset import load_image, scan_dataset

    ref = Reference.parse(reference)
    if ref.kind == "path":
        folder = ref.path
    elif ref.kind in ("registry", "hub"):
        if registry is None:
            raise ConfigError(f"image_similarity reference {reference}: a registry artifact needs the registry")
        from loraforge.registry.resolve import resolve_artifact

        manifest = resolve_artifact(registry, ref)
        if manifest.kind != "dataset":
            raise ConfigError(f"image_similarity reference {reference} is a {manifest.kind}, not a dataset: give a "
                              "dataset artifact or a folder of images")
        folder = registry.checkout(manifest)
    else:
        raise ConfigError(f"image_similarity reference {reference} is a {ref.kind} reference: give a dataset "
                          "artifact or a folder of images")
    images, _captions = scan_dataset(folder)
    return [load_image(p) for p in sorted(images)]


def _bilinear():
    from PIL import Image

    return Image.BILINEAR
