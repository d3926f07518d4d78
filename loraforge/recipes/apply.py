"""Executing a plan: run stale steps in order, reuse up-to-date outputs, record the lock.

A failing step stops only its descendants; finished steps stay registered, so the next apply
resumes where this one stopped (outputs are found again by input digest, not by the lock). The lock
is written only when every step succeeded: a failed apply leaves the previous lock as it was.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

from loraforge.errors import LoraforgeError, RecipeError, Stopped
from loraforge.plugins import STEP_KINDS
from loraforge.recipes.digest import concrete_spec
from loraforge.recipes.loader import parse_set, step_ref
from loraforge.recipes.lock import lock_path, write_lock
from loraforge.recipes.plan import STALE, Plan, PlanStep, make_plan
from loraforge.recipes.schema import Step, load_recipe
from loraforge.recipes.step_kind import StepContext
from loraforge.registry.manifest import Manifest, RecipeInfo
from loraforge.stopping import sigterm_stops, stop_requested

BUILT, REUSED, FAILED, BLOCKED, SKIPPED, WOULD_RUN = "built", "reused", "failed", "blocked", "skipped", "would run"
STOPPED, NOT_STARTED = "stopped", "not started"  # a SIGTERM: the step it interrupted, the steps after it


@dataclass
class StepResult:
    id: str
    action: str
    ref: Optional[str] = None
    seconds: float = 0.0
    message: str = ""
    error: Optional[BaseException] = field(default=None, repr=False)  # what a failed step raised

    def to_json(self) -> dict:
        return {"id": self.id, "action": self.action, "output": self.ref, "seconds": round(self.seconds, 3),
                "message": self.message}


@dataclass
class ApplyResult:
    plan: Plan
    results: list[StepResult] = field(default_factory=list)
    outputs: dict[str, Manifest] = field(default_factory=dict)
    lock: Optional[Path] = None

    @property
    def failed(self) -> list[StepResult]:
        return [r for r in self.results if r.action == FAILED]

    @property
    def ok(self) -> bool:
        return not self.failed and not self.stopped

    @property
    def stopped(self) -> bool:
        return any(r.action in (STOPPED, NOT_STARTED) for r in self.results)

    def raise_for_failure(self) -> None:
        if self.stopped:
            raise Stopped(self._stop_message())
        if self.failed:
            first = self.failed[0]
            blocked = [r.id for r in self.results if r.action == BLOCKED]
            more = f"; {len(self.failed) - 1} other step(s) failed" if len(self.failed) > 1 else ""
            after = f"; not run: {', '.join(blocked)}" if blocked else ""
            raise RecipeError(f"step {first.id!r} failed: {first.message}{more}{after}") from first.error

    def _stop_message(self) -> str:
        interrupted = [r for r in self.results if r.action == STOPPED]
        not_started = [r.id for r in self.results if r.action == NOT_STARTED]
        if interrupted:
            what = f"stopped by SIGTERM in step {interrupted[0].id!r}: {interrupted[0].message}"
        else:
            done = [r.id for r in self.results if r.action in (BUILT, REUSED)]
            what = "stopped by SIGTERM " + (f"after step {done[-1]!r} finished" if done else "before any step ran")
        rest = f"; not started: {', '.join(not_started)}" if not_started else ""
        return f"{what}{rest}; finished steps stay registered, apply again to continue"

    def to_json(self) -> dict:
        return {"recipe": str(self.plan.recipe.source.path), "digest": self.plan.digest, "ok": self.ok,
                "lock": str(self.lock) if self.lock else None, "steps": [r.to_json() for r in self.results]}


@sigterm_stops()  # a SIGTERM ends the apply at the next step boundary; a trainer stops at a checkpoint
def apply_plan(plan: Plan, registry, *, dry_run: bool = False, publish: bool = True,
               echo: Callable[[str], None] = lambda s: None) -> ApplyResult:
    recipe = plan.recipe
    result = ApplyResult(plan)
    old_lock = plan.lock or {}
    lock_steps = {sid: entry for sid, entry in (old_lock.get("steps") or {}).items() if sid in recipe.steps}
    not_done: set[str] = set()
    total = len(plan.steps)
    for index, ps in enumerate(plan.steps, 1):
        step = recipe.steps[ps.id]
        label = f"[{index}/{total}] {ps.id} ({ps.kind})"
        if dry_run:
            result.results.append(StepResult(ps.id, WOULD_RUN if ps.status == STALE else REUSED,
                                             ps.existing.ref if ps.existing else None, message=ps.reason))
            continue
        if stop_requested():  # no step starts after a SIGTERM, dependent or not
            not_done.add(ps.id)
            result.results.append(StepResult(ps.id, NOT_STARTED, message="stopped by SIGTERM"))
            echo(f"{label}: not started (stopped by SIGTERM)")
            continue
        blocked_by = [d for d in ps.depends_on if d in not_done]
        if blocked_by:
            not_done.add(ps.id)
            result.results.append(StepResult(ps.id, BLOCKED, message=f"{blocked_by[0]} did not finish"))
            echo(f"{label}: not run, {blocked_by[0]} did not finish")
            continue
        if ps.status != STALE:
            if ps.existing is not None:
                result.outputs[ps.id] = ps.existing
            result.results.append(StepResult(ps.id, REUSED, ps.existing.ref if ps.existing else None,
                                             message=ps.reason))
            lock_steps[ps.id] = _lock_entry(ps, ps.existing, lock_steps.get(ps.id))
            echo(f"{label}: up to date ({ps.reason})")
            continue
        if ps.kind == "publish" and not publish:
            not_done.add(ps.id)
            result.results.append(StepResult(ps.id, SKIPPED, message="publish skipped: --no-publish"))
            echo(f"{label}: publish skipped (--no-publish)")
            continue
        echo(f"{label}: running ({ps.reason})")
        started = time.perf_counter()
        try:
            manifest = _run_step(plan, ps, step, registry, result.outputs, echo)
        except Stopped as exc:
            not_done.add(ps.id)
            message = " ".join(str(exc).split())
            result.results.append(StepResult(ps.id, STOPPED, seconds=time.perf_counter() - started, message=message))
            echo(f"{label}: STOPPED: {message}")
            continue
        except LoraforgeError as exc:
            _record_failure(result, not_done, ps, started, exc, " ".join(str(exc).split()), label, echo)
            continue
        except Exception as exc:  # an unexpected failure in one step must not lose the others' work
            _record_failure(result, not_done, ps, started, exc, f"{type(exc).__name__}: {exc}".splitlines()[0],
                            label, echo)
            continue
        seconds = time.perf_counter() - started
        entry = _lock_entry(ps, manifest, None)
        if not step.definition.makes_artifact:
            entry["published_digest"] = ps.input_digest
        else:
            result.outputs[ps.id] = manifest
        lock_steps[ps.id] = entry
        result.results.append(StepResult(ps.id, BUILT, manifest.ref if manifest else None, seconds))
        echo(f"{label}: built {manifest.ref if manifest else ''} in {seconds:.1f}s".replace("built  in", "done in"))
    # A lock records a build that happened; after a failure it would pin references of a half build.
    if not dry_run and result.ok:
        result.lock = _write(plan, lock_steps)
    return result


def _record_failure(result, not_done, ps, started, error, message, label, echo) -> None:
    not_done.add(ps.id)
    result.results.append(StepResult(ps.id, FAILED, seconds=time.perf_counter() - started, message=message,
                                     error=error))
    echo(f"{label}: FAILED: {message}")


def _run_step(plan: Plan, ps: PlanStep, step: Step, registry, outputs: dict[str, Manifest], echo) -> Optional[Manifest]:
    concrete = dict(ps.inputs.concrete)
    for loc, _role, value in step.references():
        target = step_ref(value)
        if target is not None:
            concrete[loc] = outputs[target].ref
    spec = concrete_spec(step, concrete)
    recipe = plan.recipe
    info = RecipeInfo(name=recipe.name, path=str(recipe.source.path), digest=plan.digest, step=ps.id,
                      input_digest=ps.input_digest)
    ctx = StepContext(registry=registry, recipe=recipe, step=step, spec=spec, output=ps.output,
                      recipe_info=info, input_digest=ps.input_digest, echo=echo)
    return runner(ps.kind)(ctx)


def runner(kind: str) -> Callable[[StepContext], Optional[Manifest]]:
    """The `run` of the registered step kind `kind`."""
    return STEP_KINDS.get(kind)().run


def _lock_entry(ps: PlanStep, manifest: Optional[Manifest], old: Optional[dict]) -> dict:
    from loraforge import __version__

    entry = {"kind": ps.kind, "input_digest": ps.input_digest, "config_digest": ps.inputs.config_digest,
             "inputs": dict(ps.inputs.inputs), "versions": dict(ps.inputs.versions),
             "loraforge_version": __version__}
    if manifest is not None:
        entry["output"] = manifest.ref
        entry["output_digest"] = manifest.digest
    if old and old.get("published_digest"):
        entry["published_digest"] = old["published_digest"]
    return entry


def _write(plan: Plan, lock_steps: dict) -> Path:
    references = {ref: r.to_lock() for ref, r in sorted(plan.resolver.cache.items())}
    ordered = {sid: lock_steps[sid] for sid in plan.graph.order if sid in lock_steps}
    return write_lock(plan.recipe.source.path, {"recipe": plan.recipe.name, "recipe_digest": plan.digest,
                                                "references": references, "steps": ordered}, previous=plan.lock)


def apply_recipe(path, registry, *, overrides: dict | None = None, force: Iterable[str] = (),
                 dry_run: bool = False, locked: bool = False,
                 echo: Callable[[str], None] = lambda s: None) -> ApplyResult:
    """Load, plan and apply the recipe at `path`; returns what each step did (failures included)."""
    recipe = load_recipe(path, overrides)
    plan = make_plan(recipe, registry, force=force, locked=locked)
    return apply_plan(plan, registry, dry_run=dry_run, echo=echo)


def apply_recipe_cli(recipe: Path, out: Path, home: str | None = None, sets: Iterable[str] = ()) -> ApplyResult:
    """`make run`: apply a recipe, print progress, copy image outputs to `out` and say where things are."""
    from loraforge.registry import Registry

    registry = Registry(home)
    started = time.perf_counter()
    result = apply_recipe(recipe, registry, overrides=parse_set(sets), echo=print)
    result.raise_for_failure()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"applied {recipe} in {time.perf_counter() - started:.1f}s; lock: {lock_path(Path(recipe).resolve())}")
    for sid, manifest in result.outputs.items():
        line = f"  {sid:<12} {manifest.ref:<28} {manifest.kind}"
        if manifest.kind == "image":
            src = registry.primary_file(manifest)
            dest = out / f"{manifest.name}.png"
            dest.write_bytes(src.read_bytes())
            line += f"  -> {dest.resolve()}"
        print(line)
    print(f"registry home: {registry.home} (see `loraforge registry ls`, `loraforge registry lineage REF`)")
    return result
