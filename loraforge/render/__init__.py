"""Rendering images: a base pipeline with weighted adapters, one image or a labelled grid."""

from loraforge.render.adapters import apply_adapters, load_pipeline_with_adapters
from loraforge.render.generate import generate_image

__all__ = ["apply_adapters", "generate_image", "load_pipeline_with_adapters"]
