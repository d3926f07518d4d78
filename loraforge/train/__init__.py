"""Trainers: LoRA, DreamBooth-LoRA, Concept Sliders and multi-adapter joint training."""

from loraforge.train.base import Trainer, TrainConfig

__all__ = ["TrainConfig", "Trainer"]
