"""Importing files and folders into the registry, with format detection and checks."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from loraforge.errors import ConfigError, FormatError
from loraforge.hashing import iter_folder_files, sha256_file
from loraforge.registry.dataset import IMAGE_SUFFIXES, dataset_files, scan_dataset
from loraforge.registry.manifest import (
    AdapterInfo, BaseInfo, DatasetInfo, EmbeddingInfo, Manifest, Parent, Provenance, SliderInfo,
)
from loraforge.registry.registry import Registry

CHECKPOINT_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner.")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")  # torch.save's files, read weights-only (formats.pickles)
# An imported adapter file's own safetensors header (its JSON bytes as written, padding included), kept
# beside the canonical file so that exporting the import to its own format gives the file back byte for
# byte (`exporter.reproduce_import`). The manifest's provenance records the file's sha256 and size. A file
# of its own rather than an entry in the canonical file's header: the canonical file stays what its
# tensors and hints make it (hub push rebuilds it from a published kohya or diffusers file), and the
# artifacts derived from an import, which write their own canonical file, cannot inherit it.
SOURCE_HEADER = "source-header.json"


def _is_checkpoint_file(path: Path) -> bool:
    from loraforge.formats import read_header

    try:
        keys = read_header(path)[0].keys()
    except (FormatError, OSError):
        return False
    return any(k.startswith(CHECKPOINT_PREFIXES) for k in keys)


def _pickled_checkpoint(path: Path, data: object = None) -> Optional[object]:
    """What a pickled single-file checkpoint (`.ckpt`, `.pt` …: torch.save of its state dict, perhaps under
    "state_dict") unpickles to, loaded with weights_only=True and memory-mapped where torch can; None for a
    pickle whose keys are not a checkpoint's (an adapter). A pickle torch cannot load safely is refused here,
    in the one line every pickle reader gives (formats.pickles)."""
    from loraforge.formats.pickles import load_weights_only

    data = load_weights_only(path, mmap=True) if data is None else data
    inner = data.get("state_dict") if isinstance(data, dict) and isinstance(data.get("state_dict"), dict) else data
    if isinstance(inner, dict) and any(isinstance(k, str) and k.startswith(CHECKPOINT_PREFIXES) for k in inner):
        return data
    return None


def detect_kind(path: Path) -> str:
    """lora, checkpoint or dataset, judged from what the path holds (a pickle's keys are not read here:
    `import_artifact` reads them once, with `_pickled_checkpoint`)."""
    path = Path(path)
    if path.is_dir():
        if (path / "model_index.json").is_file():
            return "checkpoint"
        if (path / "adapter_config.json").is_file() or any(path.glob("*/adapter_config.json")):
            return "lora"
        if any(p.suffix.lower() in IMAGE_SUFFIXES for p in iter_folder_files(path)):
            return "dataset"
        if any(path.glob("*.safetensors")):
            return "lora"
        raise FormatError(f"cannot tell what {path} holds: not a diffusers model, PEFT adapter or image folder")
    if not path.exists():
        raise FormatError(f"{path} does not exist")
    if path.suffix == ".safetensors" and _is_checkpoint_file(path):
        return "checkpoint"
    return "lora"


def adapter_info(state, fmt: str, lowrank_error: Optional[float] = None) -> AdapterInfo:
    alphas = set(state.alphas.values())
    ranks = state.ranks.values()
    return AdapterInfo(
        format=fmt,
        rank=max(ranks) if ranks else None,
        alpha=alphas.pop() if len(alphas) == 1 else None,
        target_modules=list(state.target_modules),
        components=list(state.components),
        num_modules=len(state.ranks),
        num_parameters=state.num_parameters,
        dtype=str(state.dtype).replace("torch.", ""),
        variants=state.variants,
        lowrank_error=lowrank_error,
    )


def import_artifact(
    registry: Registry,
    path: Path,
    name: str,
    kind: Optional[str] = None,
    base: Optional[str] = None,
    slider: Optional[SliderInfo] = None,
    instance_prompt: Optional[str] = None,
    input_digest: Optional[str] = None,
    stamp: Optional[Callable[[Manifest], Manifest]] = None,
    token: Optional[str] = None,
) -> Manifest:
    """Import `path` as the next version of `name`. Nothing is registered when a check fails.

    An embedding file (diffusers, A1111 or SDXL clip_l/clip_g; see formats.embeddings) is recognised by its
    keys; its token is the file's own where it names one (A1111's `name`), else `token`, else the file stem.

    `stamp` adds provenance to the manifest before it is registered (a recipe step's facts), and
    `input_digest` is stored with the version: a version is never patched once committed.
    """
    stamp = stamp or (lambda manifest: manifest)
    path = Path(path).expanduser()
    if not path.exists():
        raise ConfigError(f"{path} does not exist")
    from loraforge.formats.embeddings import is_embedding_file, is_embedding_pickle

    pickled = None
    if token is not None and kind not in (None, "embedding"):
        raise ConfigError(f"--token names the token of an embedding; {path} is imported as a {kind}: drop --token")
    if kind in (None, "embedding") and is_embedding_file(path):
        return _import_embedding(registry, path, name, None, token, base, input_digest, stamp)
    if kind in (None, "checkpoint", "embedding") and path.is_file() and path.suffix.lower() in PICKLE_SUFFIXES:
        from loraforge.formats.pickles import load_weights_only

        data = load_weights_only(path, mmap=True)
        if kind != "checkpoint" and is_embedding_pickle(data):
            return _import_embedding(registry, path, name, data, token, base, input_digest, stamp)
        pickled = _pickled_checkpoint(path, data) if kind != "embedding" else None
    if kind == "embedding":
        raise FormatError(f"{path} is not an embedding file: expected a .safetensors or .pt/.bin holding "
                          "{token: tensor}, string_to_param (A1111), emb_params or clip_l/clip_g")
    detected = "checkpoint" if pickled is not None else detect_kind(path)
    kind = kind or detected
    if kind in ("lora", "slider"):
        return _import_adapter(registry, path, name, kind, base, slider, input_digest, stamp)
    if kind == "checkpoint":
        if detected != "checkpoint":
            raise FormatError(f"{path} is not a checkpoint: neither a diffusers folder nor a single file (.safetensors, "
                              f".ckpt or .pt) with {', '.join(p + '*' for p in CHECKPOINT_PREFIXES)} keys")
        if pickled is not None:
            return _import_pickled_checkpoint(registry, path, pickled, name, input_digest, stamp)
        return _import_checkpoint(registry, path, name, input_digest, stamp)
    if kind == "dataset":
        return import_dataset(registry, path, name, instance_prompt=instance_prompt, input_digest=input_digest,
                              stamp=stamp)
    raise ConfigError(f"cannot import {path} as kind {kind!r}")


def _import_embedding(registry: Registry, path: Path, name: str, data: object, token: Optional[str],
                      base_ref: Optional[str], input_digest: Optional[str],
                      stamp: Callable[[Manifest], Manifest]) -> Manifest:
    """Register an embedding file as its canonical learned_embeds.safetensors; with `base_ref`, refused in one line
    when the base's text encoders differ in width or its tokenizers already hold the token."""
    from loraforge.formats.embeddings import embedding_from_state_dict, read_embedding
    from loraforge.registry.resolve import resolve_base

    if data is None:
        emb, fmt = read_embedding(path, token)
    else:
        emb, fmt = embedding_from_state_dict(data, path, token)
    base = resolve_base(registry, base_ref) if base_ref else None
    if base is not None:
        from loraforge.models.text_encoders import base_text_encoders, check_embedding_fits

        check_embedding_fits(emb, base_text_encoders(base, registry.home), base.ref)
    params: dict = {"format": fmt, "token": emb.token, "source_sha256": sha256_file(path),
                    "source_size": path.stat().st_size}
    manifest = Manifest(
        name=name, kind="embedding", digest="", files=[], embedding=embedding_info(emb, fmt),
        base=BaseInfo(ref=base.ref, digest=base.digest, family=base.family) if base else None,
        provenance=Provenance(source=str(path.resolve()), method="import", params=params),
    )
    return register_embedding(registry, emb, stamp(manifest), input_digest)


def embedding_info(emb, fmt: str) -> EmbeddingInfo:
    return EmbeddingInfo(token=emb.token, tokens=emb.tokens, num_vectors=emb.num_vectors, components=emb.components,
                         dims=emb.dims, initializer=emb.initializer, format=fmt)


def register_embedding(registry: Registry, emb, manifest: Manifest, input_digest: str | None = None,
                       extra_files: list[tuple[Path, str]] | None = None) -> Manifest:
    """Register `emb` (a formats.embeddings.Embedding) under `manifest` as the diffusers learned_embeds.safetensors
    (SDXL: clip_l/clip_g) with its token in the header; `extra_files` as for `register_adapter`."""
    from loraforge.formats.embeddings import CANONICAL_NAME, write_embedding

    manifest = manifest.model_copy(update={"embedding": manifest.embedding or embedding_info(emb, "loraforge")})
    out = registry.blobs.staging_path(CANONICAL_NAME)
    try:
        write_embedding(emb, out, "diffusers")
        return registry.register(manifest, [(out, CANONICAL_NAME), *(extra_files or [])], input_digest=input_digest)
    finally:
        out.unlink(missing_ok=True)


def _import_adapter(registry: Registry, path: Path, name: str, kind: str, base_ref: Optional[str],
                    slider: Optional[SliderInfo], input_digest: Optional[str],
                    stamp: Callable[[Manifest], Manifest]) -> Manifest:
    from loraforge.formats import scan_adapter, write_adapter
    from loraforge.formats.slider_pt import imported_format
    from loraforge.registry.resolve import base_targets, resolve_base

    base = resolve_base(registry, base_ref) if base_ref else None
    targets = base_targets(base, registry.home) if base is not None else None
    # module → weight shape per component: readers match names against it (a PEFT text-encoder folder
    # naming no component is placed by its shapes)
    names = {c: dict(s) for c, s in targets.items()} if targets else None
    # Checking and storing need the file's bytes, not torch: the factors stay RawTensors and the
    # canonical file is their bytes under canonical names (the same bytes a torch round trip writes).
    state, read_as, meta = scan_adapter(path, module_names=names)
    fmt, container = imported_format(read_as, meta)
    state.check_finite()
    try:
        state.check_ranks()
    except FormatError as e:
        raise FormatError(f"{path}: {e}") from None
    if targets is not None:
        state.check_against(targets)
    if fmt == "slider_pt" and kind == "lora":
        kind = "slider"
    if kind == "slider" and slider is None:
        slider = SliderInfo(method="imported")
    params: dict = {"format": fmt}
    if container is not None:
        params["container"] = container
    header = _source_header(path)
    if header is not None:
        params.update(source_sha256=sha256_file(path), source_size=path.stat().st_size)
    manifest = Manifest(
        name=name, kind=kind, digest="", files=[],
        adapter=adapter_info(state, fmt),
        slider=slider if kind == "slider" else None,
        base=BaseInfo(ref=base.ref, digest=base.digest, family=base.family) if base else None,
        provenance=Provenance(source=str(path.resolve()), method="import", params=params),
    )
    if header is None:
        return _register_canonical(registry, state, stamp(manifest), input_digest)
    staged = registry.blobs.staging_path(SOURCE_HEADER)
    try:
        staged.write_bytes(header)
        return _register_canonical(registry, state, stamp(manifest), input_digest, [(staged, SOURCE_HEADER)])
    finally:
        staged.unlink(missing_ok=True)


def _source_header(path: Path) -> Optional[bytes]:
    """The header bytes of a safetensors adapter file (after its 8-byte length), None for a folder or
    a pickle; the scan before has checked the header against the file."""
    if not path.is_file():
        return None
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8 or f.read(1) != b"{":
            return None
        f.seek(8)
        return f.read(int.from_bytes(head, "little"))


def register_adapter(registry: Registry, state, manifest: Manifest, input_digest: str | None = None,
                     extra_files: list[tuple[Path, str]] | None = None) -> Manifest:
    """Register an adapter made in memory (merge, train …) under `manifest`'s name and kind.

    `extra_files` are (source, path inside the artifact) pairs stored alongside, e.g. a validation grid.
    """
    state.check_finite()
    manifest = manifest.model_copy(update={"adapter": manifest.adapter or adapter_info(state, "loraforge")})
    return _register_canonical(registry, state, manifest, input_digest, extra_files)


def _register_canonical(registry: Registry, state, manifest: Manifest, input_digest: str | None,
                        extra_files: list[tuple[Path, str]] | None = None) -> Manifest:
    """Register `manifest` with `state` as its canonical adapter.safetensors, written once: straight
    into the blob store's staging area, from where it is moved into the store, not copied."""
    from loraforge.formats import write_adapter

    out = registry.blobs.staging_path("adapter.safetensors")
    try:
        write_adapter(state, out, "loraforge")
        files = [(out, "adapter.safetensors"), *(extra_files or [])]
        return registry.register(manifest, files, input_digest=input_digest)
    finally:
        out.unlink(missing_ok=True)  # a refused registration leaves no staged file behind


def _import_checkpoint(registry: Registry, path: Path, name: str, input_digest: Optional[str],
                       stamp: Callable[[Manifest], Manifest]) -> Manifest:
    from loraforge.formats import read_header
    from loraforge.models.base import base_from_path

    base = base_from_path(path, str(path))
    if path.is_dir():
        files = [(p, p.relative_to(path).as_posix()) for p in iter_folder_files(path)]
        layout = "diffusers"
    else:
        read_header(path)  # refuses truncated files and headers whose offsets run past the end
        files = [(path, "model.safetensors")]
        layout = "single_file"
    manifest = Manifest(
        name=name, kind="checkpoint", digest="", files=[], layout=layout,
        base=BaseInfo(ref=str(path.resolve()), digest=base.digest, family=base.family),
        provenance=Provenance(source=str(path.resolve()), method="import"),
    )
    return registry.register(stamp(manifest), files, input_digest=input_digest)


def _import_pickled_checkpoint(registry: Registry, path: Path, data: object, name: str, input_digest: Optional[str],
                               stamp: Callable[[Manifest], Manifest]) -> Manifest:
    """Register the pickled checkpoint at `path` (unpickled weights-only as `data`) as the single file it holds:
    a model.safetensors with the same tensor names, order, dtypes and bytes, written one tensor at a time, so
    nothing that reads the artifact unpickles again. The provenance records that it came from a pickle and the
    pickle's sha256."""
    from loraforge.formats.pickles import checked_state_dict
    from loraforge.formats.safetensors_io import SafetensorsWriter
    from loraforge.models.base import family_of_shapes

    state = checked_state_dict(data, path)  # refuses, in one line, the first entry that is not a tensor
    odd = next((k for k in state if not isinstance(k, str)), None)
    if odd is not None:
        raise FormatError(f"{path}: entry {odd!r} is named by a {type(odd).__name__}, not a string; "
                          "a checkpoint's tensors have names")
    family = family_of_shapes({k: tuple(t.shape) for k, t in state.items()}, source=str(path))
    source_sha256 = sha256_file(path)
    params = {"source_format": "pickle", "source_sha256": source_sha256, "source_size": path.stat().st_size}
    manifest = Manifest(
        name=name, kind="checkpoint", digest="", files=[], layout="single_file",
        base=BaseInfo(ref=str(path.resolve()), digest=source_sha256, family=family),
        provenance=Provenance(source=str(path.resolve()), method="import", params=params),
    )
    staged = registry.blobs.staging_path("model.safetensors")
    try:
        with SafetensorsWriter(staged, [(k, tuple(t.shape), t.dtype) for k, t in state.items()], fsync=False) as out:
            for key, tensor in state.items():
                out.write(key, tensor)
        return registry.register(stamp(manifest), [(staged, "model.safetensors")], input_digest=input_digest)
    finally:
        staged.unlink(missing_ok=True)  # a refused registration leaves no staged file behind


def import_dataset(registry: Registry, folder: Path, name: str, instance_prompt: Optional[str] = None,
                   input_digest: str | None = None,
                   stamp: Optional[Callable[[Manifest], Manifest]] = None) -> Manifest:
    images, captions = scan_dataset(folder)
    rel_captions = {p.relative_to(folder).as_posix(): captions.get(p.relative_to(folder).as_posix(), "")
                    for p in images}
    manifest = Manifest(
        name=name, kind="dataset", digest="", files=[],
        dataset=DatasetInfo(num_images=len(images), captions=rel_captions, instance_prompt=instance_prompt),
        provenance=Provenance(source=str(Path(folder).resolve()), method="snapshot"),
    )
    if stamp is not None:
        manifest = stamp(manifest)
    return registry.register(manifest, dataset_files(folder), input_digest=input_digest)


def parent_of(manifest: Manifest, role: str = "input", weight: float | None = None) -> Parent:
    return Parent(ref=manifest.ref, digest=manifest.digest, role=role, weight=weight)
