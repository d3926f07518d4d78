"""loraforge: version, combine, train and publish LoRA adapters for diffusion models."""

__version__ = "0.1.0"
