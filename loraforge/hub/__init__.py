"""Hugging Face Hub: push registry versions as tagged commits with model cards, pull any LoRA repo back."""

from loraforge.hub.pull import parse_hub_ref, pull_reference, pull_repo
from loraforge.hub.push import PushResult, publish, push_artifact

__all__ = ["PushResult", "parse_hub_ref", "publish", "pull_reference", "pull_repo", "push_artifact"]
