"""Exporting a registry artifact to a new file or folder: adapters in any adapter format,
checkpoints and datasets as stored.

An export never overwrites: the output is written into a scratch folder beside it and renamed
into place, so a failed export leaves nothing behind and an existing file or folder is refused.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from loraforge.errors import ConfigError, IntegrityError
from loraforge.registry.manifest import Manifest
from loraforge.registry.registry import Registry

# The file name diffusers' save_lora_weights writes and load_lora_weights looks for in a folder.
DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
SUFFIX = ".safetensors"


def export_artifact(registry: Registry, ref: str, fmt: str | None, out: Path,
                    consumer: str | None = None, kohya_names: str | None = None, config: str | Path | None = None) -> list[Path]:
    """Write an artifact to `out` and return the files written.

    `consumer` names the program that will load the file (`consumers.CONSUMERS`) and picks `fmt`
    when it is None; the two must agree. Adapters default to diffusers. `kohya_names` (`sgm` |
    `diffusers`) picks the UNet naming of a kohya file (default: the naming the adapter came in).
    diffusers: `out` ending in .safetensors is the file, anything else a folder holding
    pytorch_lora_weights.safetensors; kohya / loraforge: .safetensors is added when missing;
    peft: a folder. Checkpoints and datasets are copied as stored; a checkpoint asked for in its other
    layout (`single-file` | `diffusers`) is converted (`_convert_checkpoint`), `config` naming the
    diffusers folder a single-file checkpoint's configs and tokenizers come from.
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
    if manifest.kind in ("lora", "slider"):
        return _export_adapter(registry, manifest, fmt, out, kohya_names)
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


def _export_adapter(registry: Registry, manifest: Manifest, fmt: str, out: Path,
                    kohya_names: str | None = None) -> list[Path]:
    from loraforge.formats import read_adapter, write_adapter

    state, _fmt, _meta = read_adapter(registry.primary_file(manifest))
    if kohya_names is not None:
        state.hints = _kohya_hints(registry, manifest, state.hints, kohya_names)
    metadata = {"loraforge_manifest": manifest.to_json(), "format": "pt"}
    if fmt == "peft":
        return _write_new(out, is_folder=True, write=lambda dest: write_adapter(state, dest, fmt, metadata))
    if fmt == "diffusers" and out.suffix.lower() != SUFFIX:
        return _write_new(out, is_folder=True,
                          write=lambda dest: write_adapter(state, dest / DIFFUSERS_WEIGHT_NAME, fmt, metadata))
    if out.is_dir():
        raise ConfigError(f"{out} is an existing folder; --format {fmt} writes one file: "
                          f"pass a file path such as {out / (manifest.name + SUFFIX)}")
    if out.suffix.lower() != SUFFIX:
        out = out.with_name(out.name + SUFFIX)
    return _write_new(out, is_folder=False, write=lambda dest: write_adapter(state, dest, fmt, metadata))


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
