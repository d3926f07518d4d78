"""The judge: a small CNN that reads a shapes-world image and gives a probability for every value of
every attribute (shape — held-out ones included —, colour, background, size, position, style).

Its weights ship next to this module (`judge.safetensors`, fp16, with `judge.json`: how they were
trained and what they score); `scripts/train_judge.py` rebuilds them from a seed. Any image is read at
64 px: a smaller or larger one is resized first, bilinearly, as training did for its 32 px images.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from loraforge.world.provenance import checked_provenance
from loraforge.world.vocabulary import ATTRIBUTES

INPUT_SIZE = 64
WEIGHTS_PATH = Path(__file__).with_name("judge.safetensors")
PROVENANCE_PATH = Path(__file__).with_name("judge.json")


class JudgeNet(nn.Module):
    """Five 3x3 convolutions with batch norm (the first at full resolution, so a 7 px shape keeps its
    corners; three of stride 2) to an 8x8 map, pooled to 4x4 so position survives, one hidden layer,
    one linear head per attribute."""

    def __init__(self, width: int = 16, hidden: int = 128):
        super().__init__()
        w = width
        layers: list[nn.Module] = []
        for c_in, c_out, stride in [(3, w, 1), (w, 2 * w, 2), (2 * w, 4 * w, 2), (4 * w, 6 * w, 2), (6 * w, 6 * w, 1)]:
            layers += [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
        self.features = nn.Sequential(*layers, nn.AvgPool2d(2), nn.Flatten(), nn.Linear(6 * w * 16, hidden), nn.ReLU())
        self.heads = nn.ModuleDict({name: nn.Linear(hidden, len(values)) for name, values in ATTRIBUTES.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.features(x)
        return {name: head(h) for name, head in self.heads.items()}


def to_array(image: Image.Image) -> np.ndarray:
    """`image` as the judge reads it: RGB, INPUT_SIZE² (bilinear resize when it differs), uint8 HWC."""
    image = image.convert("RGB")
    if image.size != (INPUT_SIZE, INPUT_SIZE):
        image = image.resize((INPUT_SIZE, INPUT_SIZE), Image.BILINEAR)
    return np.asarray(image)


def to_batch(arrays: Sequence[np.ndarray]) -> torch.Tensor:
    """uint8 HWC arrays -> float NCHW in [-1, 1]."""
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


class Judge:
    """The trained judge: `probabilities(images)` per image, attribute and value."""

    def __init__(self, net: JudgeNet, provenance: dict):
        self.net, self.provenance = net.eval(), provenance

    @torch.no_grad()
    def probabilities(self, images: Sequence[Image.Image]) -> list[dict[str, dict[str, float]]]:
        if not images:
            return []
        logits = self.net(to_batch([to_array(im) for im in images]))
        probs = {name: torch.softmax(v.float(), dim=-1) for name, v in logits.items()}
        return [{name: dict(zip(ATTRIBUTES[name], map(float, probs[name][i]))) for name in ATTRIBUTES}
                for i in range(len(images))]

    def labels(self, images: Sequence[Image.Image]) -> list[dict[str, str]]:
        """The most probable value of each attribute, per image."""
        return [{name: max(p, key=p.get) for name, p in probs.items()} for probs in self.probabilities(images)]


def net_from_state(state: dict[str, torch.Tensor], hyper: dict) -> JudgeNet:
    net = JudgeNet(width=int(hyper["width"]), hidden=int(hyper["hidden"]))
    net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    return net


def load_judge(weights: Path = WEIGHTS_PATH, provenance: Path = PROVENANCE_PATH) -> Judge:
    """The judge whose weights are `weights`; the committed one by default (read once per process)."""
    return _load(Path(weights), Path(provenance))


@lru_cache(maxsize=4)
def _load(weights: Path, provenance: Path) -> Judge:
    from loraforge.formats.safetensors_io import read_safetensors

    facts = checked_provenance(weights, provenance, "the shapes judge", "make judge")
    state, _ = read_safetensors(weights)
    return Judge(net_from_state(state, facts["architecture"]), facts)
