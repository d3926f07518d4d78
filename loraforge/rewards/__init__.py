"""Reward models for reward fine-tuning; every module here registers its rewards in the REWARDS plugin group."""

from loraforge.rewards.base import Reward, load_reward

__all__ = ["Reward", "load_reward"]
