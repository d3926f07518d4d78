"""Step runners, one module per step kind: each takes a StepContext and returns what it registered."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Optional

from loraforge.registry.manifest import Manifest, Parent, RecipeInfo

RUNNERS: dict[str, str] = {
    "merge": "loraforge.recipes.steps.merge:run",
    "lora_merge": "loraforge.recipes.steps.lora_merge:run",
    "stack": "loraforge.recipes.steps.stack:run",
    "train": "loraforge.recipes.steps.train:run",
    "render": "loraforge.recipes.steps.render:run",
    "synthetic": "loraforge.recipes.steps.synthetic:run",
    "import": "loraforge.recipes.steps.import_file:run",
    "publish": "loraforge.recipes.steps.publish:run",
}


@dataclass
class StepContext:
    """Everything a runner needs: the registry, the step's concrete spec and its provenance facts."""

    registry: Any
    recipe: Any  # schema.Recipe
    step: Any  # schema.Step
    spec: Any  # the step's spec with references replaced by exact registry refs and paths
    output: Optional[str]
    recipe_info: RecipeInfo
    input_digest: str
    echo: Callable[[str], None] = print

    def stamp(self, manifest: Manifest, parents: list[Parent] | None = None, method: str | None = None,
              params: dict | None = None) -> Manifest:
        """`manifest` with this step's recipe facts (and given parents/method/params) in provenance."""
        update: dict = {"recipe": self.recipe_info, "source": f"recipe:{self.recipe.name}#{self.step.id}"}
        if parents is not None:
            update["parents"] = parents
        if method is not None:
            update["method"] = method
        if params is not None:
            update["params"] = params
        return manifest.model_copy(update={"provenance": manifest.provenance.model_copy(update=update)})


def runner(kind: str) -> Callable[[StepContext], Optional[Manifest]]:
    module, attr = RUNNERS[kind].split(":")
    return getattr(importlib.import_module(module), attr)
