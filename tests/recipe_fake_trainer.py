"""A fake trainer for recipe tests: a seeded random LoRA, optionally slow, registered as `recipe_fake`.

Run as a script it is the `loraforge` CLI with the fake registered (for the crash test's subprocess).
`RECIPE_FAKE_SLEEP` seconds are spent after the blobs are stored and before the catalog row is
written, so a kill then lands in the middle of a registration.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional

from pydantic import Field

from loraforge.plugins import TRAINERS
from loraforge.train.base import TrainConfig


class FakeConfig(TrainConfig):
    dataset: str = Field(description="Folder of images.")
    instance_prompt: Optional[str] = None


class FakeTrainer:
    """Random LoRA whose seed mixes the config seed and the number of dataset files."""

    config_class = FakeConfig
    calls: list = []

    def train(self, config, *, registry, output, recipe=None, input_digest=None, resume=False, progress=None):
        from loraforge.models.targets import module_shapes
        from loraforge.registry.importer import adapter_info, register_adapter
        from loraforge.registry.manifest import BaseInfo, Manifest, Provenance
        from loraforge.registry.resolve import resolve_base
        from loraforge.synthetic import random_lora

        FakeTrainer.calls.append(output)
        base = resolve_base(registry, config.base)
        n_files = len(list(Path(config.dataset).iterdir()))
        state = random_lora(module_shapes(Path(base.path)), rank=config.rank, seed=config.seed * 1000 + n_files)
        manifest = Manifest(name=output, kind="lora", digest="", files=[],
                            adapter=adapter_info(state, "loraforge"),
                            base=BaseInfo(ref=base.ref, digest=base.digest, family=base.family),
                            provenance=Provenance(method="train:recipe_fake", recipe=recipe))
        sleep = float(os.environ.get("RECIPE_FAKE_SLEEP", "0"))
        if sleep:
            original = registry.store_files

            def slow_store(files, *args, **kwargs):
                entries = original(files, *args, **kwargs)
                print("FAKE-TRAINER-STORED", flush=True)
                time.sleep(sleep)
                return entries

            registry.store_files = slow_store
        return [register_adapter(registry, state, manifest, input_digest=input_digest)]


if "recipe_fake" not in TRAINERS:  # imported twice when run as a script (as __main__ and by name)
    TRAINERS.register("recipe_fake")(FakeTrainer)


if __name__ == "__main__":
    from loraforge.cli import main

    main()
