"""Exporting a registry artifact to a new file or folder: adapters in any adapter format,
checkpoints and datasets as stored.

An imported adapter file exported to the format it came in is that file again, byte for byte: the
import keeps the file's own safetensors header (`importer.SOURCE_HEADER`: its metadata such as
sd-scripts' `ss_*` entries, its key order and padding) and its sha256, and the export lays the tensors
it writes out under that header. Such a file carries no `loraforge_manifest` entry (the original had
none); `with_manifest` writes loraforge's own header instead. Only the import itself is reproduced:
merges, resizes, trainings and other derived artifacts have their own manifest and no source header.

SDXL kohya files for ComfyUI, A1111 and sd-scripts (`--for comfyui|a1111|kohya`) use the Stability
(SGM) UNet block names those programs name SDXL modules by (`input_blocks_4_1_…`); so does a plain
`--format kohya` of an SDXL adapter that did not come in as a kohya file. A kohya import keeps the
naming it came in under `--format kohya`, and `kohya_names` overrides both.

An export never overwrites: the output is written into a scratch folder beside it and renamed
into place, so a failed export leaves nothing behind and an existing file or folder is refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

from loraforge.errors import ConfigError, IntegrityError
from loraforge.registry.manifest import Manifest
from loraforge.registry.registry import Registry

# The file name diffusers' save_lora_weights writes and load_lora_weights looks for in a folder.
DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
SUFFIX = ".safetensors"
# The programs that name SDXL UNet modules by their SGM paths (`input_blocks_…`) and read kohya files so.
SGM_KOHYA_CONSUMERS = ("comfyui", "a1111", "kohya")


def export_artifact(registry: Registry, ref: str, fmt: str | None, out: Path,
                    consumer: str | None = None, kohya_names: str | None = None, config: str | Path | None = None, with_manifest: bool = False,
                    report: Callable[[str], None] | None = None) -> list[Path]:
    """Write an artifact to `out` and return the files written.

    `consumer` names the program that will load the file (`consumers.CONSUMERS`) and picks `fmt`
    when it is None; the two must agree. Adapters default to diffusers. `kohya_names` (`sgm` |
    `diffusers`) picks the UNet naming of a kohya file (default: see the module docstring).
    diffusers: `out` ending in .safetensors is the file, anything else a folder holding
    pytorch_lora_weights.safetensors; kohya / loraforge: .safetensors is added when missing;
    peft: a folder. Checkpoints and datasets are copied as stored; a checkpoint asked for in its other
    layout (`single-file` | `diffusers`) is converted (`_convert_checkpoint`), `config` naming the
    diffusers folder a single-file checkpoint's configs and tokenizers come from. `report` is told, in one line,
    whether an imported file was written back byte for byte; `with_manifest` writes loraforge's header
    (with the manifest) instead of the imported file's.
    """
    from loraforge.registry.consumers import export_format
    from loraforge.registry.resolve import resolve_artifact

    manifest = resolve_artifact(registry, ref)
    fmt = export_format(manifest.kind, fmt, consumer)
    out = Path(out).expanduser()
    _check_blobs(registry, manifest)
    if kohya_names is not None and (manifest.kind not in ("lora", "slider") or fmt != "kohya"):
        raise ConfigError(f"--kohya-names applies to adapters written as kohya files (--format kohya, "
                          f"--for comfyui|a1111|kohya); {manifest.ref} is exported as {fmt or 'native'}")
    if config is not None and not (manifest.kind == "checkpoint" and manifest.layout == "single_file"
                                   and (fmt or "").replace("-", "_") == "diffusers"):
        raise ConfigError(f"--config names the configs a single-file checkpoint is converted with (--format "
                          f"diffusers); {manifest.ref} is not exported that way: drop --config")
    if manifest.kind == "embedding":
        if with_manifest:
            raise ConfigError(f"--with-manifest writes an adapter file's loraforge header; {manifest.ref} is an embedding, "
                              "written in the layout its loaders read (its token in the header): drop --with-manifest")
        return _export_embedding(registry, manifest, fmt, out)
    if manifest.kind in ("lora", "slider"):
        return _export_adapter(registry, manifest, fmt, out, kohya_names or _default_kohya_names(manifest, fmt, consumer),
                               with_manifest, report or (lambda line: None))
    fmt = "native" if fmt is None else fmt.replace("-", "_")
    if fmt not in ("native", "diffusers", "single_file"):
        raise ConfigError(f"a {manifest.kind} exports as-is: use --format native (got {fmt!r})")
    if manifest.kind == "checkpoint" and fmt != "native" and fmt != manifest.layout:
        return _convert_checkpoint(registry, manifest, fmt, out, config)
    folder = registry.checkout(manifest)
    if len(manifest.files) == 1 and manifest.kind == "checkpoint" and manifest.layout == "single_file":
        source = folder / manifest.files[0].path
        return _write_new(out, is_folder=False, write=lambda dest: [Path(shutil.copyfile(source, dest))])

    def copy_files(dest: Path) -> list[Path]:
        written = []
        for entry in manifest.files:
            target = dest / entry.path
            target.parent.mkdir(parents=True, exist_ok=True)
            written.append(Path(shutil.copyfile(folder / entry.path, target)))
        return written

    return _write_new(out, is_folder=True, write=copy_files)


def _export_embedding(registry: Registry, manifest: Manifest, fmt: str, out: Path) -> list[Path]:
    """An embedding as diffusers (`out` ending .safetensors/.bin is the file, anything else a folder holding
    learned_embeds.safetensors, what load_textual_inversion looks for) or a1111 (`.pt` is the pickle A1111 writes,
    else emb_params safetensors, .safetensors added when missing); SDXL files hold clip_l/clip_g either way."""
    from loraforge.formats.embeddings import CANONICAL_NAME, EXPORT_FORMATS, write_embedding
    from loraforge.registry.resolve import load_embedding

    fmt = "diffusers" if fmt == "native" else fmt
    if fmt not in EXPORT_FORMATS:
        raise ConfigError(f"{manifest.ref} is an embedding: export it with --format diffusers or a1111 "
                          f"(or --for diffusers|a1111|comfyui), not {fmt}")
    emb = load_embedding(registry, manifest)
    suffix = out.suffix.lower()
    if fmt == "diffusers" and suffix not in (SUFFIX, ".bin"):
        def write_folder(dest: Path) -> list[Path]:
            Path(dest).mkdir(parents=True, exist_ok=True)
            return [write_embedding(emb, Path(dest) / CANONICAL_NAME)]

        return _write_new(out, is_folder=True, write=write_folder)
    if suffix not in (SUFFIX, ".pt", ".bin"):
        out = out.with_name(out.name + SUFFIX)
    return _write_new(out, is_folder=False, write=lambda dest: [write_embedding(emb, dest, fmt)])


def _default_kohya_names(manifest: Manifest, fmt: str | None, consumer: str | None) -> str | None:
    """`sgm` where an SDXL adapter's kohya file should use SGM names by default (module docstring);
    None keeps the naming the adapter's hints say."""
    if fmt != "kohya" or manifest.kind not in ("lora", "slider") or manifest.base is None \
            or manifest.base.family != "sdxl":
        return None
    if consumer in SGM_KOHYA_CONSUMERS:
        return "sgm"
    came_as_kohya = manifest.adapter is not None and manifest.adapter.format == "kohya"
    return None if came_as_kohya else "sgm"


def _export_adapter(registry: Registry, manifest: Manifest, fmt: str, out: Path, kohya_names: str | None,
                    with_manifest: bool, report: Callable[[str], None]) -> list[Path]:
    from loraforge.formats import read_adapter, write_adapter
    from loraforge.formats.kohya_names import DIFFUSERS, HINT_UNET_NAMES

    state, _fmt, _meta = read_adapter(registry.primary_file(manifest))
    came_in = state.hints.get(HINT_UNET_NAMES, DIFFUSERS)
    if kohya_names is not None:
        state.hints = _kohya_hints(registry, manifest, state.hints, kohya_names)
    state = _as_exact_pairs(registry, manifest, state, fmt, report)
    metadata = {"loraforge_manifest": manifest.to_json(), "format": "pt"}
    source = None if with_manifest or fmt == "peft" else _imported_file(registry, manifest, fmt)
    if source is not None and kohya_names is not None and kohya_names != came_in:
        source = None  # another naming is another file
        report(f"wrote the UNet keys in {kohya_names} names, not the {came_in} names of the imported file "
               f"(--kohya-names {came_in} writes that file back byte for byte)")

    def write_file(dest: Path) -> list[Path]:
        if source is None:
            return write_adapter(state, dest, fmt, metadata)
        # A format that bakes alpha/rank into `up` (diffusers) writes the file's own factors when every
        # scale is 1; the imported header then says the alphas, as it did in the imported file.
        why_not = None
        for candidate in (state, _unscaled(state)):
            written = write_adapter(candidate, dest, fmt, metadata)
            reason = reproduce_import(dest, *source)
            if reason is None:
                report(f"wrote the imported file back byte for byte (sha256 {source[1][:12]}, no "
                       "loraforge_manifest entry; --with-manifest adds it)")
                return written
            why_not = why_not or reason
            if reason != VALUES_DIFFER:
                break
        report(f"could not write the imported file back byte for byte: {why_not}; wrote loraforge's header")
        return write_adapter(state, dest, fmt, metadata)

    if fmt == "peft":
        return _write_new(out, is_folder=True, write=lambda dest: write_adapter(state, dest, fmt, metadata))
    if fmt == "diffusers" and out.suffix.lower() != SUFFIX:
        return _write_new(out, is_folder=True, write=lambda dest: write_file(dest / DIFFUSERS_WEIGHT_NAME))
    if out.is_dir():
        raise ConfigError(f"{out} is an existing folder; --format {fmt} writes one file: "
                          f"pass a file path such as {out / (manifest.name + SUFFIX)}")
    if out.suffix.lower() != SUFFIX:
        out = out.with_name(out.name + SUFFIX)
    return _write_new(out, is_folder=False, write=write_file)


def _as_exact_pairs(registry: Registry, manifest: Manifest, state, fmt: str, report: Callable[[str], None]):
    """`state` with the LoHa, LoKr and Tucker LoCon modules `fmt` cannot spell (diffusers, PEFT) as the LoRA
    pairs of the same ΔW at their exact rank bound (`formats.variants.pairs`), said in one line; conv kernels
    those variants store flattened take their shape from the recorded base."""
    from loraforge.formats.adapter_format import FORMATS
    from loraforge.formats.variants.pairs import STRUCTURED, always_linear, exact_pairs

    spelled = FORMATS[fmt].writes_variants if fmt in FORMATS else True
    if spelled is True or not (set(state.variants) & (STRUCTURED - set(spelled or ()))):
        return state
    shapes = None
    if manifest.base is not None and any(state[n].variant in STRUCTURED and not state[n].records_kernel
                                         and not always_linear(n) for n in state):
        from loraforge.registry.resolve import base_targets, resolve_base

        targets = base_targets(resolve_base(registry, manifest.base.ref, digest=False)) or {}
        shapes = {f"{c}.{p}": tuple(shape) for c, paths in targets.items() for p, shape in paths.items()}
    pairs, converted, ranks = exact_pairs(state, frozenset(spelled or ()), shapes)
    kinds = ", ".join(f"{n} {v}" for v, n in sorted(converted.items()))
    rank = str(ranks[0]) if min(ranks) == max(ranks) else f"{min(ranks)} to {max(ranks)}"
    report(f"wrote the {kinds} modules, which the {fmt} format cannot spell, as LoRA pairs of the same ΔW at their "
           f"exact rank bound (rank {rank}; no approximation); --format kohya keeps the LyCORIS tensors")
    return pairs


def _imported_file(registry: Registry, manifest: Manifest, fmt: str) -> tuple[bytes, str, int] | None:
    """(header bytes, sha256, size) of the file `manifest` was imported from, when it is that import
    and `fmt` is the file's format; None otherwise."""
    from loraforge.registry.importer import SOURCE_HEADER

    p = manifest.provenance
    entry = next((e for e in manifest.files if e.path == SOURCE_HEADER), None)
    if (p.method != "import" or entry is None or manifest.adapter is None or manifest.adapter.format != fmt
            or not isinstance(p.params.get("source_sha256"), str) or not isinstance(p.params.get("source_size"), int)):
        return None
    return registry.blob_path(entry).read_bytes(), p.params["source_sha256"], p.params["source_size"]


VALUES_DIFFER = "the tensor values written differ from the imported file's"


def _unscaled(state):
    """`state` with every LoRA pair at alpha = rank (scale 1), its factors unchanged."""
    from loraforge.formats import LoraState

    return LoraState({n: dataclasses.replace(m, alpha=float(m.rank)) if m.variant == "lora" else m
                      for n, m in state.items()}, hints=state.hints)


def reproduce_import(path: Path, header: bytes, sha256: str, size: int) -> str | None:
    """Rewrite the safetensors file at `path` as the imported file whose header bytes, sha256 and size
    are given: its tensors laid out where that header places them. Returns None when the result is that
    file (same sha256), else why it cannot be, leaving `path` as written.

    A text-encoder key the imported file spells without CLIP's `text_model.` wrapper (diffusers under
    transformers 5) is the written key with it: the same module in the other CLIP layout."""
    from loraforge.formats.safetensors_io import read_header, read_raw_safetensors

    entries = json.loads(header)
    entries.pop("__metadata__", None)
    written, _ = read_header(path)
    spelled = {key: _as_written(key, written) for key in entries}
    unmatched = sorted([k for k, w in spelled.items() if w is None]
                       + sorted(set(written) - set(spelled.values())))
    if unmatched or len(set(spelled.values())) != len(spelled):
        key = unmatched[0] if unmatched else min(k for k, w in spelled.items()
                                                 if list(spelled.values()).count(w) > 1)
        side = "the imported file" if key in entries else "the export"
        return f"only {side} has tensor {key}"
    for key, entry in entries.items():
        got = written[spelled[key]]
        if (got["dtype"], list(got["shape"])) != (entry["dtype"], list(entry["shape"])):
            return (f"tensor {key} is {got['dtype']}{got['shape']} in the export, "
                    f"{entry['dtype']}{entry['shape']} in the imported file")
    tensors, _ = read_raw_safetensors(path)
    chunks, offset = [len(header).to_bytes(8, "little"), header], 0
    for begin, end, key in sorted((*map(int, e["data_offsets"]), k) for k, e in entries.items()):
        if begin != offset:
            return f"the imported file has {begin - offset} bytes before tensor {key} that belong to no tensor"
        chunks.append(tensors[spelled[key]].data)
        offset = end
    data = b"".join(chunks)
    if len(data) != size:
        return f"the imported file has {size - len(data)} bytes after its last tensor"
    if hashlib.sha256(data).hexdigest() != sha256:
        return VALUES_DIFFER
    path.write_bytes(data)
    return None


def _as_written(key: str, written: Mapping[str, object]) -> str | None:
    """The written key holding imported tensor `key`: the same key, or its `text_model.` spelling."""
    from loraforge.formats.lora import with_text_model

    if key in written:
        return key
    component, dot, rest = key.partition(".")
    alias = f"{component}.{with_text_model(rest)}" if dot else key
    return alias if alias in written else None


def _kohya_hints(registry: Registry, manifest: Manifest, hints: dict[str, str], naming: str) -> dict[str, str]:
    """The adapter's hints set to write kohya UNet keys in `naming`; SGM names take the base's layout."""
    from loraforge.formats.kohya_names import with_unet_names
    from loraforge.registry.resolve import base_targets, resolve_base

    def base_unet_paths():
        return (base_targets(resolve_base(registry, manifest.base.ref, digest=False)) or {}).get("unet")

    family = manifest.base.family if manifest.base else None
    return with_unet_names(hints, naming, family, base_unet_paths if manifest.base else None)


def _convert_checkpoint(registry: Registry, manifest: Manifest, fmt: str, out: Path,
                        config: str | Path | None) -> list[Path]:
    """Checkpoint `manifest` written in its other layout through diffusers' single-file converters
    (models.single_file): a diffusers folder as one single file (.safetensors added when missing), a single
    file as a diffusers folder with the configs and tokenizers of `config`, else of the builtin of its
    architecture or diffusers' standard pipeline for it (models.pipeline.single_file_configs)."""
    from loraforge.models import single_file as sf
    from loraforge.models.base import family_of_folder
    from loraforge.models.pipeline import single_file_configs, with_config
    from loraforge.registry.resolve import resolve_base

    if manifest.layout not in ("diffusers", "single_file"):
        raise ConfigError(f"{manifest.ref} is stored in an unrecorded layout and cannot be converted; "
                          "export it as stored with --format native")
    if fmt == "single_file":
        folder = registry.checkout(manifest)
        family = family_of_folder(folder)
        out = out if out.suffix.lower() == SUFFIX else out.with_name(out.name + SUFFIX)
        return _write_new(out, is_folder=False, write=lambda dest: [sf.write_single_file(folder, family, dest)])
    base = with_config(resolve_base(registry, manifest.ref, digest=False), config)
    configs = single_file_configs(base, registry.home)
    return _write_new(out, is_folder=True, write=lambda dest: sf.write_folder(base.path, base.family, configs, dest))


def _check_blobs(registry: Registry, manifest: Manifest) -> None:
    for entry in manifest.files:
        if not registry.blob_path(entry).is_file():
            raise IntegrityError(
                f"{manifest.ref}: {entry.path} (blob sha256:{entry.sha256[:12]}) is missing from the store; "
                f"run `loraforge registry verify`, then import {manifest.name} again"
            )


def _write_new(dest: Path, *, is_folder: bool, write: Callable[[Path], list[Path]]) -> list[Path]:
    """Run `write(scratch path)` and rename its result to `dest`, which must not exist yet
    (an empty folder may stand where a folder goes). Returns the written paths under `dest`."""
    if dest.is_dir() and (not is_folder or any(dest.iterdir())):
        raise ConfigError(f"{dest} is an existing folder; export to a path that does not exist yet, "
                          "or remove it first")
    if dest.exists() and not dest.is_dir():
        raise ConfigError(f"{dest} already exists; export to a path that does not exist yet, or remove it first")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.export-"))
    except OSError as e:
        raise ConfigError(f"cannot create {dest}: {e.strerror} ({e.filename or dest.parent}); "
                          "export to a folder you can write to") from None
    try:
        staged = scratch / dest.name
        written = write(staged)
        os.replace(staged, dest)  # onto an empty folder too: rename(2) replaces empty directories
    except OSError as e:
        raise ConfigError(f"cannot write {dest}: {e.strerror}; export to a folder you can write to, "
                          "with space for the files") from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return [dest / p.relative_to(staged) if p != staged else dest for p in written]
