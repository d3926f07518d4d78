"""DreamBooth-LoRA: a subject bound to a trigger token, with optional prior preservation on class images."""

from __future__ import annotations

from loraforge.plugins import TRAINERS
from loraforge.train.dreambooth_data import (  # noqa: F401 (class_images_folder: imported from here by callers)
    DreamBoothData,
    DreamBoothDataConfig,
    class_images_folder,
    generate_class_images,
)
from loraforge.train.trainers.lora import LoraTrainer


class DreamBoothLoraConfig(DreamBoothDataConfig):
    """DreamBooth's data (instance prompt, prior preservation) with the LoRA fields of every trainer."""


@TRAINERS.register("dreambooth_lora", reference_url="https://arxiv.org/abs/2208.12242", version="1")
class DreamBoothLoraTrainer(DreamBoothData, LoraTrainer):
    """DreamBooth-LoRA: instance prompt with a trigger token, optional prior preservation."""

    config_class = DreamBoothLoraConfig
    method = "dreambooth_lora"
