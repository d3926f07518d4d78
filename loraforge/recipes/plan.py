"""Planning a recipe: each step's input digest, whether it is stale or up to date, and why.

Machine interface (used by the daemon, stable): `loraforge recipe plan FILE --json` prints exactly
one JSON object on stdout and exits 0:

    {"recipe": "<absolute path>", "name": "<recipe name>", "digest": "<recipe digest>", "valid": true,
     "steps": [{"id", "kind", "status": "stale" | "up-to-date", "reason", "input_digest",
                "output": "<registry name or null>", "depends_on": [step ids],
                "sweep": {KEY: value} (only for the points of a swept step),
                "processes": N (only for a step that trains on N > 1 processes: the GPUs a daemon job asks for)}, ...],
     "watch": ["<absolute path of every local file or folder the recipe reads>", ...],
     "recomputed": {"<absolute path of a file or folder whose digest was computed>": <files hashed>},
     "artifacts": [{"ref": "<name:version>", "digest": "<content digest>"}, ...]}

`artifacts` lists every registry version the plan read: what the steps' references resolved to and the
outputs of up-to-date steps (a remote job imports them so its plan and digests are the head's).

Digests of local files are kept by stat in the home's cache (hashing.DigestIndex), so `recomputed` is empty
when nothing the recipe reads changed since the last plan.

An invalid recipe prints `{"valid": false, "error": "<one line>"}` and exits 1. Steps are listed in
execution order. `loraforge recipe apply FILE` exits 0 when every step finished (or was up to date)
and 1 with `Error: <one line>` on stderr otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional

from loraforge.errors import RecipeError
from loraforge.hashing import sha256_json
from loraforge.recipes.digest import Resolver, StepInputs, compute_inputs, version_changes
from loraforge.recipes.graph import Graph, build_graph
from loraforge.recipes.lock import read_lock, require_lock
from loraforge.recipes.schema import Recipe
from loraforge.registry.manifest import Manifest

STALE, UP_TO_DATE = "stale", "up-to-date"


@dataclass
class PlanStep:
    id: str
    kind: str
    status: str
    reason: str
    inputs: StepInputs
    output: Optional[str]
    depends_on: tuple[str, ...]
    existing: Optional[Manifest] = None
    sweep: dict = field(default_factory=dict)  # a sweep point's values (empty for other steps)
    processes: int = 1  # `processes:` of a train step: the daemon gives the job that many GPUs on one machine

    @property
    def input_digest(self) -> str:
        return self.inputs.input_digest

    def to_json(self) -> dict:
        out = {"id": self.id, "kind": self.kind, "status": self.status, "reason": self.reason,
               "input_digest": self.input_digest, "output": self.output,
               "existing": self.existing.ref if self.existing else None, "depends_on": list(self.depends_on)}
        if self.sweep:
            out["sweep"] = dict(self.sweep)
        if self.processes > 1:
            out["processes"] = self.processes
        return out


@dataclass
class Plan:
    recipe: Recipe
    graph: Graph
    digest: str
    steps: list[PlanStep]
    resolver: Resolver
    lock: Optional[dict] = None
    watch: list[str] = field(default_factory=list)
    recomputed: dict[str, int] = field(default_factory=dict)  # path → files hashed for its digest

    def step(self, step_id: str) -> PlanStep:
        return next(s for s in self.steps if s.id == step_id)

    @property
    def stale(self) -> list[PlanStep]:
        return [s for s in self.steps if s.status == STALE]

    def to_json(self) -> dict:
        return {"recipe": str(self.recipe.source.path), "name": self.recipe.name, "digest": self.digest,
                "valid": True, "steps": [s.to_json() for s in self.steps], "watch": self.watch,
                "recomputed": self.recomputed, "artifacts": self.artifacts()}

    def artifacts(self) -> list[dict]:
        """The registry versions this plan read (references and reused outputs), as {"ref", "digest"}."""
        found = {r.pinned: r.digest for r in self.resolver.cache.values() if r.kind == "artifact" and r.pinned}
        found.update({s.existing.ref: s.existing.digest for s in self.steps if s.existing is not None})
        return [{"ref": ref, "digest": digest} for ref, digest in sorted(found.items())]


def recipe_digest(recipe: Recipe) -> str:
    """Digest of the recipe's content after variables are substituted."""
    return sha256_json(recipe.source.data)


def make_plan(recipe: Recipe, registry, *, force: Iterable[str] = (), locked: bool = False) -> Plan:
    """Resolve every reference, compute input digests in dependency order and judge each step."""
    graph = build_graph(recipe)
    force = [p for sid in force for p in recipe.sweeps.get(sid, (sid,))]  # a swept step: all its points
    for sid in force:
        if sid not in recipe.steps:
            raise RecipeError(f"--force {sid}: the recipe has no step {sid!r} (steps: {', '.join(recipe.steps)})")
    forced = set(force) | {d for sid in force for d in graph.descendants(sid)}
    previous = require_lock(recipe.source.path) if locked else read_lock(recipe.source.path)
    resolver = Resolver(registry, recipe, lock=previous if locked else None)
    old_steps = (previous or {}).get("steps") or {}
    digests: dict[str, str] = {}
    steps: list[PlanStep] = []
    for sid in graph.order:
        step = recipe.steps[sid]
        inputs = compute_inputs(step, resolver, digests)
        digests[sid] = inputs.input_digest
        makes_artifact = step.definition.makes_artifact
        output = recipe.output_name(step) if makes_artifact else None
        if locked:
            entry = old_steps.get(sid)
            if entry is None or entry.get("input_digest") != inputs.input_digest:
                raise RecipeError(f"step {sid!r} changed since the lock was written: "
                                  "run apply without --locked to rebuild and update the lock")
        existing = None
        if not makes_artifact:  # its lock entry says whether it ran on these inputs
            done = old_steps.get(sid, {}).get("published_digest") == inputs.input_digest
            status, reason = (UP_TO_DATE, "published") if done else (STALE, "not published yet")
        else:
            existing = registry.find_by_input_digest(inputs.input_digest, name=output)
            status, reason = _judge(sid, inputs, existing, old_steps.get(sid), output, digests, graph)
        if sid in forced:
            status = STALE
            reason = "forced (--force)" if sid in force else "an upstream step is forced"
        steps.append(PlanStep(sid, step.kind, status, reason, inputs, output, graph.deps[sid], existing,
                              sweep=dict(step.sweep_values), processes=int(getattr(step.spec, "processes", 1) or 1)))
    watch = sorted({r.path for r in resolver.cache.values() if r.path})
    resolver.digests.save()
    return Plan(recipe, graph, recipe_digest(recipe), steps, resolver, previous, watch,
                dict(sorted(resolver.digests.hashed.items())))


def _judge(sid, inputs: StepInputs, existing, old: Optional[dict], output, digests, graph) -> tuple[str, str]:
    if existing is not None:
        return UP_TO_DATE, f"{existing.ref} was built from these inputs"
    if old is None:
        return STALE, f"never built (no {output} made from these inputs)"
    if old.get("input_digest") == inputs.input_digest:
        return STALE, f"output {old.get('output') or output} is no longer in the registry"
    return STALE, change_reason(inputs, old)


def change_reason(inputs: StepInputs, old: dict) -> str:
    """Which input changed since the lock was written, in words."""
    old_inputs = old.get("inputs") or {}
    reasons = []
    for ref, identity in inputs.inputs.items():
        before = old_inputs.get(ref)
        if before is None or before == identity:
            continue
        if identity.startswith("step:"):
            reasons.append(f"input {ref} changed")
        elif identity.startswith("path:"):
            reasons.append(f"{'dataset' if ref.rstrip('/').rsplit('/', 1)[-1].find('.') < 0 else 'file'} {ref} changed")
        elif identity.startswith("artifact:"):
            reasons.append(f"artifact {ref} now resolves to different content")
        else:
            reasons.append(f"{ref} changed")
    if old.get("config_digest") != inputs.config_digest:
        reasons.insert(0, "step config changed")
    reasons += version_changes(old.get("versions") or {}, inputs.versions)
    return "; ".join(reasons) or "inputs changed"
