"""The base class of the built-in trainers: the `train(...)` entry point and a run's set-up, written once."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from loraforge.registry.manifest import Manifest, RecipeInfo
from loraforge.train.base import TrainConfig

if TYPE_CHECKING:  # pragma: no cover
    from loraforge.registry.registry import Registry
    from loraforge.train.session import Session


class SessionTrainer:
    """A trainer that runs one `Session`: a subclass sets `config_class` and `method` and implements `run`.

    `train` (the Trainer protocol's entry point, called by `loraforge train` and recipe train steps) opens
    the Session — output name, option checks, run folder, run id — from the arguments every trainer takes;
    `run` says only what the method does: its data, adapters, objective and outputs.
    """

    config_class: ClassVar[type[TrainConfig]]
    method: ClassVar[str]  # recorded in manifests and the run key; the name the trainer is registered under
    # Model families whose conditioning the trainer's objective computes; other bases are refused in one line.
    families: ClassVar[tuple[str, ...]] = ("sd1",)
    # The registry kind of the run's main output as recipes see it before it runs: "adapter" (a LoRA or a
    # slider), "checkpoint" or "embedding".
    artifact_kind: ClassVar[str] = "adapter"
    # Whether `run` trains correctly on several processes (each rank its slice of the batch, rank 0 registers);
    # others refuse `processes` > 1 in one line.
    supports_processes: ClassVar[bool] = False

    def train(self, config: TrainConfig, *, registry: Registry, output: str, recipe: RecipeInfo | None = None,
              input_digest: str | None = None, resume: bool = False, progress: bool | None = None) -> list[Manifest]:
        from loraforge.train.distributed import in_worker, launch
        from loraforge.train.session import Session

        if config.processes > 1 and not in_worker():
            return launch(self, config, registry=registry, output=output, recipe=recipe, input_digest=input_digest,
                          resume=resume, progress=progress)
        session = Session(self.method, config, registry=registry, output=output, recipe=recipe,
                          input_digest=input_digest, resume=resume, progress=progress, families=self.families)
        return self.run(session)

    def run(self, session: Session) -> list[Manifest]:
        """Train with `session.config` and register the adapters (`session.finish`); returns their manifests."""
        raise NotImplementedError(f"{type(self).__name__} must implement run(session)")
