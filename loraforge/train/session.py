"""One training run from start to registration: model, run folder, checkpoints, validation, manifests.

Every built-in trainer (`SessionTrainer` in train/trainer.py) builds its objective on top of a `Session`.
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import torch

from loraforge.errors import ConfigError
from loraforge.home import tmp_dir
from loraforge.registry.manifest import Manifest, RecipeInfo, SliderInfo
from loraforge.registry.registry import Registry
from loraforge.train.base import TrainConfig
from loraforge.train.checkpoint import run_key, runs_dir
from loraforge.train.model import TrainingModel, load_training_model, precision
from loraforge.train.peft_lora import check_rank, inject_lora, lora_parameters, module_shapes_of


@dataclass
class AdapterOutput:
    """One adapter a run registers."""

    name: str
    state: object  # LoraState
    adapter_name: str = "default"
    kind: str = "lora"
    slider: SliderInfo | None = None
    datasets: list[Manifest] = field(default_factory=list)
    validation_prompts: list[str] = field(default_factory=list)
    validation_scales: tuple[float, ...] = (0.0, 1.0)
    metrics: dict = field(default_factory=dict)


def check_8bit_adam() -> None:
    """8-bit AdamW runs only on CUDA with bitsandbytes: refuse the option up front rather than ignore it."""
    import importlib.util

    if not torch.cuda.is_available():
        raise ConfigError("use_8bit_adam needs a CUDA GPU (bitsandbytes' 8-bit AdamW) and this machine has none; "
                          "drop --use-8bit-adam")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("use_8bit_adam needs bitsandbytes, which is not installed; "
                          "pip install bitsandbytes or drop --use-8bit-adam")


def check_mixed_precision(mixed_precision: str) -> None:
    """fp16/bf16 autocast is a CUDA feature here: refuse it on a machine without one instead of training in fp32."""
    if mixed_precision in ("fp16", "bf16") and not torch.cuda.is_available():
        raise ConfigError(f"mixed_precision {mixed_precision} needs a CUDA GPU and this machine has none; "
                          f"use --mixed-precision auto (fp32 on CPU) or no")


class Session:
    """The base model, run folder and run id of one training run of `method` with `config`."""

    def __init__(self, method: str, config: TrainConfig, *, registry: Registry, output: str,
                 recipe: RecipeInfo | None = None, input_digest: str | None = None, resume: bool = False,
                 progress: bool | None = None, families: Sequence[str] = ("sd1",)):
        from loraforge.registry.refs import check_name

        check_name(output)  # a bad name fails now, not after the training
        if config.use_8bit_adam:
            check_8bit_adam()
        check_mixed_precision(config.mixed_precision)
        self.method, self.config, self.registry, self.output = method, config, registry, output
        self.recipe, self.input_digest, self.resume, self.progress = recipe, input_digest, resume, progress
        self.families = tuple(families)
        from loraforge.train.distributed import current_ranks

        self.ranks = current_ranks()  # one process, or this rank of a `processes` > 1 run
        # The process count is not part of the run's identity: N processes compute what one does, so a run
        # checkpointed on one process resumes on several and back.
        self.key = run_key(method, config.model_dump(mode="json", exclude={"processes"}), output, input_digest)
        self.run_dir = runs_dir(registry.home) / self.key
        self.run_id = f"{self.key}-{uuid.uuid4().hex[:8]}"
        if not resume and self.run_dir.exists() and self.ranks.main:
            shutil.rmtree(self.run_dir)  # a fresh run must not pick up an older run's checkpoints
        self.model: TrainingModel | None = None
        self._base = None
        # (adapter name, prompts, scales) rendered every `validation_every` steps; set by the trainer.
        self.periodic: list[tuple[str, list[str], tuple[float, ...]]] = []
        self._periodic_files: dict[str, list[tuple[Path, str]]] = {}
        self._scratch = tmp_dir(registry.home) / f"train-{self.run_id}"  # created only if grids are rendered
        self._forward = None

    def check_lora_targets(self, targets: dict[str, Iterable[str] | str]) -> None:
        """Refuse a rank the targeted modules cannot hold, or targets that match nothing, per component
        ({"unet": [...], "text_encoder": [...]}), before anything is registered. Shapes come from the base's
        safetensors headers; a single-file base has no per-component headers, so it is loaded first."""
        from loraforge.registry.resolve import base_targets

        shapes = base_targets(self.base())
        if shapes is None:
            pipe = self.load_model().pipe
            shapes = {component: module_shapes_of(getattr(pipe, component)) for component in targets}
        for component, component_targets in targets.items():
            check_rank(self.config.rank, shapes.get(component, {}), component_targets, component)

    def add_lora(self, module: torch.nn.Module, component: str, target_modules: Iterable[str] | str, *,
                 adapter_name: str = "default", seed: int) -> dict[str, torch.nn.Parameter]:
        """Inject a LoRA of the configured rank and alpha into `module` (the model's `component`); returns its
        trainable parameters named `<component>.<parameter>`, the names checkpoints and optimisers use."""
        inject_lora(module, rank=self.config.rank, alpha=self.config.alpha, target_modules=target_modules,
                    adapter_name=adapter_name, seed=seed)
        return {f"{component}.{n}": p for n, p in lora_parameters(module, adapter_name).items()}

    def base(self):
        """The resolved base (with its base_config), refused here when the trainer cannot train its family (or when
        flow-matching options were changed for a base that is no flow model)."""
        from loraforge.models.base_config import with_config
        from loraforge.train.flow_matching import check_flow_options
        from loraforge.registry.resolve import resolve_base
        from loraforge.train.model import check_family

        if self._base is None:
            base = with_config(resolve_base(self.registry, self.config.base), self.config.base_config)
            self._base = check_family(base, self.families, self.method)
            check_flow_options(self.config, self._base)
        return self._base

    def load_model(self, full_precision: bool = False) -> TrainingModel:
        """The frozen base, loaded once per session. On CUDA its weights are stored in the autocast dtype (half
        the memory, right for adapters); `full_precision` keeps them fp32 and only computes under autocast: a
        full fine-tune needs fp32 master weights, and the frozen parts it saves must come back unrounded."""
        from loraforge.train.flow_matching import check_flow_options

        if self.model is None:
            torch.manual_seed(self.config.seed)
            mixed = "no" if full_precision else self.config.mixed_precision
            model = load_training_model(self.registry, self.config.base, mixed,
                                        self.config.gradient_checkpointing, config=self.config.base_config,
                                        families=self.families, method=self.method)
            check_flow_options(self.config, model.base)
            if full_precision:
                model.autocast_dtype = precision(self.config.mixed_precision, model.device)
            self.model = model
        return self.model

    def forward_denoiser(self):
        """The denoiser (UNet, or Flux's transformer) to call in the loss: compiled when the config opts in."""
        if self._forward is None:
            denoiser = self.model.denoiser
            self._forward = torch.compile(denoiser) if self.config.compile else denoiser
        return self._forward

    def loop_kwargs(self) -> dict:
        c = self.config
        return dict(steps=c.steps, learning_rate=c.learning_rate, lr_scheduler=c.lr_scheduler,
                    lr_warmup_steps=c.lr_warmup_steps, gradient_accumulation=c.gradient_accumulation,
                    max_grad_norm=c.max_grad_norm, use_8bit_adam=c.use_8bit_adam, checkpoint_every=c.checkpoint_every,
                    run_dir=self.run_dir, resume=self.resume, device=self.model.device,
                    progress=self.progress if self.ranks.main else False, ranks=self.ranks,
                    on_step=self._on_step if c.validation_every and self.ranks.main else None)

    def _on_step(self, step: int) -> None:
        """Render the intermediate validation grids (they become validation/step-N.png files of the artifact)."""
        from loraforge.train.validation import save_grid, validation_grid

        c = self.config
        if step % c.validation_every or step == c.steps:
            return
        for adapter_name, prompts, scales in self.periodic:
            prompts = list(c.validation_prompts) or prompts
            if not prompts:
                continue
            grid = validation_grid(self.model.pipe, prompts, scales, adapter_name=adapter_name, seed=c.seed,
                                   steps=c.validation_steps, resolution=c.resolution, title=f"step {step}")
            rel = f"validation/step-{step:08d}.png"
            path = save_grid(grid, self._scratch / adapter_name / "validation", f"step-{step:08d}.png")
            self._periodic_files.setdefault(adapter_name, []).append((path, rel))

    def finish(self, outputs: Sequence[AdapterOutput], metrics: dict, training: dict | None = None) -> list[Manifest]:
        """Render validation grids, then register every adapter (sharing this run id); drop the run folder.
        Only rank 0 of a several-process run does this; the other ranks register nothing and return []."""
        from loraforge.registry.importer import register_adapter
        from loraforge.train.manifest import training_manifest
        from loraforge.train.validation import save_grid, validation_grid

        if not self.ranks.main:
            return []
        c = self.config
        registered = []
        with tempfile.TemporaryDirectory(dir=tmp_dir(self.registry.home)) as tmp:
            staged = []
            for i, out in enumerate(outputs):
                prompts = list(c.validation_prompts) or out.validation_prompts
                files = list(self._periodic_files.get(out.adapter_name, []))
                if prompts:
                    grid = validation_grid(self.model.pipe, prompts, out.validation_scales, adapter_name=out.adapter_name,
                                           seed=c.seed, steps=c.validation_steps, resolution=c.resolution,
                                           title=f"{out.name} ({self.method})")
                    files.append((save_grid(grid, Path(tmp) / str(i)), "validation.png"))
                manifest = training_manifest(
                    name=out.name, method=self.method, config=c, base=self.model.base, state=out.state,
                    datasets=out.datasets, run_id=self.run_id, metrics={**metrics, **out.metrics},
                    training=training, recipe=self.recipe, kind=out.kind, slider=out.slider)
                staged.append((out, manifest, files))
            for out, manifest, files in staged:
                registered.append(register_adapter(self.registry, out.state, manifest, input_digest=self.input_digest,
                                                   extra_files=files))
        shutil.rmtree(self.run_dir, ignore_errors=True)
        shutil.rmtree(self._scratch, ignore_errors=True)
        return registered

    def finish_checkpoint(self, name: str, *, datasets: Sequence[Manifest], metrics: dict,
                          validation_prompts: Sequence[str] = (), dtype: torch.dtype = torch.float32) -> Manifest:
        """Register the trained pipeline as a `checkpoint`: the whole diffusers folder written by save_pretrained
        in safetensors (in `dtype`), with the validation grid, parents base and datasets, and the run's config.
        Registration is one registry transaction: a failure before it leaves nothing registered."""
        from loraforge.models.builtin import quiet_progress_bars
        from loraforge.registry.manifest import BaseInfo, Parent, Provenance
        from loraforge.train.validation import save_grid, validation_grid

        c, model = self.config, self.model
        base = model.base
        with tempfile.TemporaryDirectory(dir=tmp_dir(self.registry.home), prefix="checkpoint-") as tmp:
            files = list(self._periodic_files.get("default", []))
            prompts = list(c.validation_prompts) or list(validation_prompts)
            if prompts:  # a checkpoint has no adapter to scale: one column, the trained model
                grid = validation_grid(model.pipe, prompts, (1.0,), seed=c.seed, steps=c.validation_steps,
                                       resolution=c.resolution, title=f"{name} ({self.method})")
                files.append((save_grid(grid, Path(tmp) / "grid"), "validation.png"))
            folder = Path(tmp) / "pipeline"
            for part in (getattr(model.pipe, n, None) for n in ("unet", "vae", "text_encoder", "text_encoder_2")):
                if part is not None and part.dtype != dtype:
                    part.to(dtype)
            with quiet_progress_bars():
                model.pipe.save_pretrained(folder, safe_serialization=True)
            _drop_load_paths(folder)
            files = [(p, p.relative_to(folder).as_posix()) for p in sorted(folder.rglob("*")) if p.is_file()] + files
            params = c.model_dump(mode="json")
            parents = [Parent(ref=base.ref, digest=base.digest, role="base")]
            parents += [Parent(ref=d.ref, digest=d.digest, role="dataset") for d in datasets]
            facts = {k: params[k] for k in ("steps", "learning_rate", "lr_scheduler", "batch_size",
                                            "gradient_accumulation", "resolution", "seed") if k in params}
            facts["dtype"] = str(dtype).replace("torch.", "")
            manifest = Manifest(
                name=name, kind="checkpoint", digest="", files=[], layout="diffusers",
                base=BaseInfo(ref=base.ref, digest=base.digest, family=base.family),
                provenance=Provenance(source=f"train:{self.method}", method=f"train:{self.method}", params=params,
                                      parents=parents, recipe=self.recipe, training=facts, run_id=self.run_id,
                                      dataset_digest=datasets[0].digest if datasets else None),
                metrics=metrics,
            )
            registered = self.registry.register(manifest, files, input_digest=self.input_digest)
        shutil.rmtree(self.run_dir, ignore_errors=True)
        shutil.rmtree(self._scratch, ignore_errors=True)
        return registered


def _drop_load_paths(folder: Path) -> None:
    """Remove the `_name_or_path` save_pretrained writes into diffusers configs: where the base was loaded from,
    a path of this machine, which would leak into the artifact and make its digest depend on where the base sits."""
    import json

    for path in folder.rglob("*.json"):
        config = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(config, dict) and "_name_or_path" in config:
            del config["_name_or_path"]
            path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
