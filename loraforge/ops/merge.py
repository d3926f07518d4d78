"""Checkpoint merges: plan (open inputs, check them, fix every output tensor's α and dtype), then
execute tensor by tensor into an output that mirrors the first model's files.

Inputs may mix layouts (diffusers folders, single files, pickled `.ckpt`): each is read in the first
model's layout through diffusers' own single-file converters (`ops.checkpoints.in_layout_of`), so the
output has the first model's layout and the numbers of the same merge of folders."""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

from loraforge.errors import ConfigError
from loraforge.faults import fault_point
from loraforge.formats.safetensors_io import SafetensorsWriter, dtype_from_name, partial_path
from loraforge.ops.blocks import BASE, block_map, resolve_block_weights
from loraforge.ops.checkpoints import Checkpoint, check_compatible, check_same_family, denoiser_key, in_layout_of
from loraforge.ops.merge_methods import TensorContext
from loraforge.ops.specs import CheckpointMergeSpec
from loraforge.registry.blobs import fsync_dir

# Elementwise methods see big tensors in row chunks of about this many elements: small enough that a
# chunk's fp16 bytes and fp32 copies (2.5 MB) stay in cache between the convert, multiply-add and
# convert-back passes, large enough that per-chunk overhead is negligible. A method may set its own
# `chunk_elements` (DARE does, to match its mask blocks; its result does not depend on the chunking).
CHUNK_ELEMENTS = 1 << 18


@dataclass(frozen=True)
class TensorTask:
    """One output tensor: copy it from the first model, or merge it with its own α."""

    ckey: str
    key: str  # name inside the output file
    shape: tuple[int, ...]
    dtype: torch.dtype
    merge: bool
    alpha: float


@dataclass(frozen=True)
class FileTask:
    rel: str
    tensors: tuple[TensorTask, ...]


@dataclass
class MergePlan:
    method: Any
    method_name: str
    params: dict[str, Any]
    weights: list[Optional[float]]
    alpha: float
    inputs: list[Checkpoint]
    files: list[FileTask]
    components: tuple[str, ...]
    block_alphas: Optional[dict[str, float]]

    def close(self) -> None:
        for ckpt in self.inputs:
            ckpt.close()


def merged_components(spec: CheckpointMergeSpec, family_name: str) -> tuple[str, ...]:
    """The components a merge of `family_name` checkpoints merges: `spec.include` when given, else the family's
    (`Family.merge_components`: SD's UNet, text encoders and VAE, Flux's transformer alone) less `spec.exclude`
    (the VAE by default). A component the family's pipelines lack (a UNet for Flux) is refused in one line."""
    from loraforge.families import family

    fam = family(family_name)
    known = (fam.denoiser, "text_encoder", "vae")
    for name in [*(spec.include or ()), *spec.exclude]:
        if name not in known:
            raise ConfigError(f"{fam.label} checkpoints have no {name} component; name {', '.join(known)}")
    if spec.include:
        if "exclude" in spec.model_fields_set and spec.exclude:
            raise ConfigError(f"give the components to merge (include {', '.join(spec.include)}) or the ones to leave "
                              f"out of the default set (exclude {', '.join(spec.exclude)}), not both")
        return tuple(dict.fromkeys(spec.include))
    return tuple(c for c in fam.merge_components if c not in spec.exclude)


def plan_merge(spec: CheckpointMergeSpec, inputs: list[Checkpoint]) -> MergePlan:
    """Check the inputs against each other and decide every output tensor."""
    from loraforge.plugins import MERGE_METHODS

    method = MERGE_METHODS.get(spec.method)
    method = method() if isinstance(method, type) else method
    params = method.check(len(inputs), dict(spec.params))
    first = inputs[0]
    for other in inputs[1:]:
        check_same_family(first, other)
    components = merged_components(spec, first.family)
    if not components:
        raise ConfigError("every component is excluded: nothing would be merged (check --include/--exclude)")
    out_dtype = dtype_from_name(spec.dtype)
    inputs = [first] + [in_layout_of(first, other) for other in inputs[1:]]
    for other in inputs[1:]:
        check_compatible(first, other, set(components))
    untranslated = set().union(*(getattr(other, "untranslated", ()) for other in inputs[1:]))
    weights = [m.weight for m in spec.models]
    alpha = spec.alpha if spec.alpha is not None else (
        weights[1] if method.max_models == 2 and weights[1] is not None else method.default_alpha)

    block_alphas, blocks = None, None
    if spec.block_weights is not None:
        from loraforge.families import family

        denoiser = family(first.family).denoiser
        if denoiser not in components:
            raise ConfigError(f"block weights apply to the {denoiser}, which is excluded from this merge")
        dkeys = [k for c in first.index if (k := denoiser_key(c, first.layout, first.family)) is not None]
        blocks = block_map(first.family, dkeys, first.layout)
        block_alphas = resolve_block_weights(spec.block_weights, blocks, alpha)

    files = []
    for rel, keys in first.file_layout():
        tasks = []
        for ckey, key in keys:
            info = first.info(ckey)
            # a tensor diffusers' converters drop (position ids) has no counterpart in a converted input
            merge = first.component(ckey) in components and info.is_float and ckey not in untranslated
            a = alpha
            if merge and blocks is not None:
                dkey = denoiser_key(ckey, first.layout, first.family)
                if dkey is not None:
                    a = block_alphas[blocks.block_of(dkey) or BASE]
                else:
                    a = block_alphas[BASE]
            tasks.append(TensorTask(ckey, key, info.shape, out_dtype if merge else info.torch_dtype, merge, a))
        files.append(FileTask(rel, tuple(tasks)))
    return MergePlan(method, spec.method, params, weights, alpha, inputs, files, components, block_alphas)


class ScratchBuffers:
    """Flat scratch tensors reused from tensor to tensor (grown when a bigger one comes): the raw bytes read
    from an input (then the output in its dtype) and each input's float32 copy. Streaming through fixed
    buffers keeps the resident set at a few chunks and avoids faulting in fresh pages for every temporary."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, int], torch.Tensor] = {}

    def get(self, role: str, index: int, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A flat `dtype` tensor of `numel` elements, sharing memory with earlier calls for (role, index)."""
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        buf = self._buffers.get((role, index))
        if buf is None or buf.numel() < nbytes:
            self._buffers.pop((role, index), None)
            buf = self._buffers[(role, index)] = torch.empty(max(nbytes, 1), dtype=torch.uint8)
        return buf[:nbytes].view(dtype)


def _spans(plan: MergePlan, task: TensorTask) -> list[Optional[tuple[int, int]]]:
    numel = math.prod(task.shape)
    chunk = getattr(plan.method, "chunk_elements", None) or CHUNK_ELEMENTS
    if plan.method.elementwise and task.shape and numel > chunk:
        rows_per = max(1, chunk * task.shape[0] // numel)
        return [(r, min(r + rows_per, task.shape[0])) for r in range(0, task.shape[0], rows_per)]
    return [None]


def _merge_tensor(plan: MergePlan, task: TensorTask, scratch: ScratchBuffers) -> Iterator[torch.Tensor]:
    """The output tensor (as row chunks for elementwise methods on big tensors). Each chunk is a view of a
    scratch buffer, valid until the next one is asked for: the writer writes it out before that."""
    for span in _spans(plan, task):
        tensors = []
        for i, ckpt in enumerate(plan.inputs):
            info = ckpt.info(task.ckey)
            _, nbytes, shape = ckpt.span(task.ckey, span)
            numel = math.prod(shape)
            work = scratch.get("work", i, numel, torch.float32)
            if info.torch_dtype == torch.float32:  # read straight into the float32 buffer
                tensors.append(ckpt.read_into(task.ckey, work, span))
            else:
                # one raw buffer serves every input: each is converted to float32 before the next is read
                raw = ckpt.read_into(task.ckey, scratch.get("raw", 0, nbytes, torch.uint8), span)
                tensors.append(work.view(shape).copy_(raw))
        ctx = TensorContext(task.ckey, span[0] if span else 0, task.shape, span[1] if span else None)
        out = plan.method.merge(tensors, task.alpha, plan.weights, plan.params, ctx)
        del tensors
        if out.dtype != task.dtype:
            out = scratch.get("raw", 0, out.numel(), task.dtype).view(out.shape).copy_(out)  # raw is free again
        yield out


def _copy_tensor(ckpt: Checkpoint, ckey: str, scratch: ScratchBuffers) -> torch.Tensor:
    """A tensor copied unchanged, read into the first raw buffer (valid until the next read)."""
    _, nbytes, _ = ckpt.span(ckey)
    return ckpt.read_into(ckey, scratch.get("raw", 0, nbytes, torch.uint8))


def execute_merge(plan: MergePlan, out_path: Path, progress: Callable[..., None] | None = None, *,
                  fsync: bool = True) -> Path:
    """Write the merged checkpoint to `out_path` (a file for single files, a folder for diffusers).

    Every file is written beside its name and renamed onto it when complete; with `fsync` each is forced to
    disk first, and so are the folders made (`fsync=False` for a result the blob store copies and syncs)."""
    first = plan.inputs[0]
    out_path = Path(out_path)
    scratch = ScratchBuffers()
    if first.layout == "diffusers":
        copy_folder_extras(first.path, out_path, {f.rel for f in plan.files}, fsync=fsync)
    metadata = {"format": "pt", "loraforge.method": plan.method_name}
    for ftask in plan.files:
        target = out_path / ftask.rel if first.layout == "diffusers" else out_path
        if not any(t.merge for t in ftask.tensors):
            # an excluded component's file (e.g. the VAE) is copied as is, byte for byte
            copy_file(first.files[ftask.rel].path, target, fsync=fsync)
            if progress:
                progress(len(ftask.tensors))
            continue
        entries = [(t.key, t.shape, t.dtype) for t in ftask.tensors]
        with SafetensorsWriter(target, entries, metadata, fsync=fsync) as writer:
            for t in ftask.tensors:
                if t.merge:
                    writer.write_chunks(t.key, _merge_tensor(plan, t, scratch))
                else:
                    writer.write(t.key, _copy_tensor(first, t.ckey, scratch))
                fault_point("merge-output-partial")
                if progress:
                    progress()
    if fsync and first.layout == "diffusers":
        for folder in sorted({p for p in out_path.rglob("*") if p.is_dir()} | {out_path}, reverse=True):
            fsync_dir(folder)
    return out_path


def copy_file(src: Path, dst: Path, *, fsync: bool = True) -> None:
    """Copy `src` to `dst` through a partial file beside it, forced to disk first with `fsync`."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(dst)
    try:
        shutil.copyfile(src, tmp)
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def copy_folder_extras(src: Path, dst: Path, skip: set[str], *, fsync: bool = True) -> None:
    """Copy a diffusers folder's configs, tokenizers and schedulers (everything but the weights we write)."""
    for path in sorted(Path(src).rglob("*")):
        rel = path.relative_to(src).as_posix()
        if path.is_dir() or rel in skip or path.suffix in (".safetensors", ".bin", ".ckpt", ".pt"):
            continue
        copy_file(path, dst / rel, fsync=fsync)


def write_output(plan: MergePlan, output: Path, progress: Callable[..., None] | None = None) -> Path:
    """Write the merge to `output` once: staged beside it under a `.partial` name (the same file system),
    forced to disk, renamed onto it, and the rename itself synced. A failed merge leaves no `output` and
    removes its partial file; one killed leaves only the `.partial` name."""
    output = Path(output)
    check_output(output, plan.inputs[0].layout)
    output.parent.mkdir(parents=True, exist_ok=True)
    if plan.inputs[0].layout != "diffusers":
        execute_merge(plan, output, progress)  # the safetensors writer stages beside `output` itself
    else:
        staging = partial_path(output)
        try:
            execute_merge(plan, staging, progress)
            os.replace(staging, output)  # onto a missing name or an empty folder
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    fsync_dir(output.parent)
    return output


def check_output(output: Path, layout: str) -> None:
    """Refuse an output path the merge cannot replace (before any work is done)."""
    if output.is_dir():
        if layout != "diffusers":
            raise ConfigError(f"output {output} is a folder; give a file name for a single-file checkpoint, "
                              "e.g. merged.safetensors")
        if any(output.iterdir()):
            raise ConfigError(f"output {output} is a folder that is not empty; choose a new path")
    elif output.exists() and layout == "diffusers":
        raise ConfigError(f"output {output} is a file but the merge is a diffusers folder; choose a new path")


def open_inputs(registry, refs: list[str]) -> list[Checkpoint]:
    """The checkpoints opened for reading; a digest is known only for registry artifacts (see `digest_of_input`)."""
    from loraforge.registry.resolve import resolve_base

    opened = []
    try:
        for ref in refs:
            opened.append(Checkpoint.open(resolve_base(registry, ref, digest=False)))
    except Exception:
        for c in opened:
            c.close()
        raise
    return opened


def digest_of_input(registry, ckpt: Checkpoint) -> str:
    """The content digest of an input: a registry artifact's own, else its files' (through the digest index,
    which reads only files changed since they were last hashed). Only a registered result needs it."""
    from loraforge.models.base import cached_digest

    if ckpt.digest is None:
        ckpt.digest = cached_digest(ckpt.path, registry.home)
    return ckpt.digest


def merge_checkpoints(registry, spec: CheckpointMergeSpec, *, name: str | None = None, output: str | Path | None = None,
                      recipe=None, input_digest: str | None = None, progress: Callable[..., None] | None = None):
    """Merge `spec.models`; register the result as checkpoint `name` and/or write it to `output`.

    The result is written once: to `output` (see `write_output`), or, when only registered, to the home's
    scratch folder, from which the blob store moves it into place (`BlobStore.staging_path`). With both,
    `output` is written and the blob store copies it (a copy, not a hard link: editing OUT in place must
    not change a stored blob). Returns the Manifest when registered, else the output path. Nothing is registered on failure.
    """
    from loraforge.home import tmp_dir
    from loraforge.registry.refs import check_name

    if name is None and output is None:
        raise ConfigError("give a name to register the merge, or an output path")
    if name is not None:
        check_name(name)
    output = Path(output).expanduser() if output is not None else None
    inputs = open_inputs(registry, [m.ref for m in spec.models])
    try:
        plan = plan_merge(spec, inputs)
        if output is not None:
            check_output(output, inputs[0].layout)
            if name is None:
                return write_output(plan, output, progress)
        layout = inputs[0].layout
        if output is not None:
            write_output(plan, output, progress)
            return _register(registry, plan, spec, name, _artifact_files(output, layout), recipe, input_digest)
        suffix = "" if layout == "diffusers" else ".safetensors"
        with tempfile.TemporaryDirectory(dir=tmp_dir(registry.home), prefix="merge-") as tmp:
            # unsynced: the blob store hashes each file, forces it to disk and renames it into place
            staged = execute_merge(plan, Path(tmp) / f"merged{suffix}", progress, fsync=False)
            files = []
            try:
                for path, rel in _artifact_files(staged, layout):
                    files.append((registry.blobs.staging_path(path.name), rel))
                    os.replace(path, files[-1][0])  # the same folder's file system: a rename, not a copy
                return _register(registry, plan, spec, name, files, recipe, input_digest)
            finally:
                for path, _ in files:
                    path.unlink(missing_ok=True)  # what the store did not take
    finally:
        for c in inputs:
            c.close()


def _register(registry, plan: MergePlan, spec: CheckpointMergeSpec, name: str, files: list[tuple[Path, str]],
              recipe, input_digest: str | None):
    from loraforge.registry.manifest import Manifest, Parent, Provenance

    inputs = plan.inputs
    weights = plan.method.weights(plan.alpha, plan.weights)
    # Methods over task vectors (any number of models) treat the first model as the base.
    roles = ["base" if i == 0 and plan.method.max_models is None else "model" for i in range(len(inputs))]
    parents = [Parent(ref=c.ref, digest=digest_of_input(registry, c), role=role, weight=w)
               for c, w, role in zip(inputs, weights, roles)]
    params = {"alpha": plan.alpha, "weights": plan.weights, "dtype": spec.dtype,
              "components": list(plan.components), "block_weights": plan.block_alphas, **plan.params}
    manifest = Manifest(
        name=name, kind="checkpoint", digest="", files=[], layout=inputs[0].layout,
        provenance=Provenance(method=f"merge:{spec.method}", params=params, parents=parents,
                              recipe=recipe, source=f"merge:{spec.method}"),
    )
    return registry.register(manifest, files, input_digest=input_digest)


def _artifact_files(written: Path, layout: str) -> list[tuple[Path, str]]:
    if layout == "diffusers":
        return [(p, p.relative_to(written).as_posix()) for p in sorted(written.rglob("*")) if p.is_file()]
    return [(written, "model.safetensors")]


def _place_output(staged: Path, output: Path) -> Path:
    """Copy a result staged elsewhere to `output` (what `fuse` does; a merge writes its output in place)."""
    if output.exists():
        if output.is_dir() and any(output.iterdir()):
            raise ConfigError(f"output {output} is a folder that is not empty; choose a new path")
    output.parent.mkdir(parents=True, exist_ok=True)
    if staged.is_dir():
        if output.exists():
            output.rmdir()
        shutil.copytree(staged, output)
    else:
        shutil.copyfile(staged, output)
    return output
