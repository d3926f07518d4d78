"""The step DAG of a recipe: dependencies from `${step}` references, `after:` and a kind's `runs_after`; order."""

from __future__ import annotations

from dataclasses import dataclass

from loraforge.recipes.loader import step_ref
from loraforge.recipes.schema import Recipe, Step
from loraforge.recipes.step_kind import ROLE_ACCEPTS


@dataclass(frozen=True)
class Graph:
    order: tuple[str, ...]
    deps: dict[str, tuple[str, ...]]

    def descendants(self, step_id: str) -> set[str]:
        out: set[str] = set()
        frontier = [step_id]
        while frontier:
            current = frontier.pop()
            for sid, deps in self.deps.items():
                if current in deps and sid not in out:
                    out.add(sid)
                    frontier.append(sid)
        return out


def step_dependencies(recipe: Recipe, step: Step) -> tuple[str, ...]:
    """Steps `step` reads, checked: each exists and produces a kind its reference accepts."""
    source = recipe.source
    deps: list[str] = []
    for loc, role, value in step.references():
        target = step_ref(value)
        if target is None:
            continue
        full = ("steps", step.id, *loc) if not step.id.startswith("publish-") else _publish_loc(step, loc)
        if target not in recipe.steps:
            swept = next((sid for sid in recipe.sweeps if target.startswith(f"{sid}-")), None)
            if swept is not None:
                raise source.error(full, f"${{{target}}}: sweep {swept!r} has no point {target!r} "
                                         f"(its points: {', '.join(recipe.sweeps[swept])})")
            raise source.error(full, f"dangling reference ${{{target}}}: no step named {target!r}")
        if target == step.id:
            raise source.error(full, f"step {step.id!r} refers to itself")
        read = recipe.steps[target]
        if not read.definition.makes_artifact:
            raise source.error(full, f"${{{target}}} is a {read.kind} step: it makes no artifact to use")
        produced = read.output_kind()
        if produced is not None and ROLE_ACCEPTS.get(role) and produced not in ROLE_ACCEPTS[role]:
            if role == "lora" and produced == "embedding":
                raise source.error(full, f"${{{target}}} makes an embedding, which LoRA algebra cannot fold into a "
                                         "LoRA: combine LoRAs and sliders here, and give the embedding to a render step")
            wanted = {"model": "a checkpoint", "adapter": "an adapter", "lora": "a LoRA or slider"}.get(role, "an artifact")
            raise source.error(full, f"${{{target}}} makes a {produced}, but {wanted} is needed here")
        if target not in deps:
            deps.append(target)
    for i, target in enumerate(step.after):
        if target not in recipe.steps:
            raise source.error(("steps", step.id, "after", i), f"after: no step named {target!r}")
        if target not in deps:
            deps.append(target)
    for target in step.definition.runs_after(recipe, step):
        if target not in deps and target != step.id:
            deps.append(target)
    return tuple(deps)


def _publish_loc(step: Step, loc: tuple) -> tuple:
    index = int(step.id.split("-")[1]) - 1
    return ("publish", index, *loc[1:])


def build_graph(recipe: Recipe) -> Graph:
    """Dependencies and a topological order (file order among ready steps); a cycle raises RecipeError."""
    deps = {sid: step_dependencies(recipe, step) for sid, step in recipe.steps.items()}
    order: list[str] = []
    done: set[str] = set()
    remaining = list(recipe.steps)
    while remaining:
        ready = [sid for sid in remaining if all(d in done for d in deps[sid])]
        if not ready:
            cycle = _find_cycle(deps, remaining)
            raise recipe.source.error(("steps", cycle[0]), "dependency cycle: " + " -> ".join(cycle + [cycle[0]]))
        for sid in ready:
            order.append(sid)
            done.add(sid)
        remaining = [sid for sid in remaining if sid not in done]
    return Graph(order=tuple(order), deps=deps)


def _find_cycle(deps: dict[str, tuple[str, ...]], nodes: list[str]) -> list[str]:
    """One cycle among `nodes` (every node there lies on or behind a cycle)."""
    pending = set(nodes)
    node = nodes[0]
    path: list[str] = []
    while node not in path:
        path.append(node)
        node = next(d for d in deps[node] if d in pending)
    return path[path.index(node):]
