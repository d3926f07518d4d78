"""Builtin models on disk: built once per home into models/builtin/NAME (diffusers format), atomically."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from loraforge.home import models_dir, tmp_dir
from loraforge.models.builtin.names import TRAINED_BUILTINS, check_builtin_name
from loraforge.models.builtin.tokenizer import write_vocab_files

# A finished build is marked by this file, written last; a folder without it is not trusted.
_COMPLETE_MARKER = "model_index.json"


def save_tiny_pipeline(name: str, folder: Path) -> Path:
    """Write a builtin pipeline in diffusers format (safetensors) into `folder`: a trained one copied from
    the files the package ships (after checking them against their provenance), the others built in code."""
    folder = Path(folder)
    if check_builtin_name(name) in TRAINED_BUILTINS:
        from loraforge.models.builtin.shapes_files import copy_shapes_pipeline

        return copy_shapes_pipeline(folder)
    from loraforge.models.builtin.components import build_tiny_pipeline  # torch, diffusers: only to build

    pipe = build_tiny_pipeline(name)
    with quiet_progress_bars():
        pipe.save_pretrained(folder, safe_serialization=True)
    check_weights_saved(folder)
    restore_text_model_prefix(folder)
    write_vocab_files(folder)
    return folder


def check_weights_saved(folder: Path) -> None:
    """Refuse a build in which a model component has no weights file: inside a process group transformers writes
    a model on rank 0 only, so a builtin built in another rank would otherwise be installed without its text
    encoders."""
    import json

    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    for component, spec in sorted(index.items()):
        if not isinstance(spec, list) or spec[1] is None or spec[1].endswith(("Tokenizer", "TokenizerFast", "Scheduler")):
            continue
        if not any((folder / component).glob("*.safetensors")):
            raise RuntimeError(f"building {folder.name}: its {component} ({spec[1]}) was not saved; build builtins "
                               "outside a torch.distributed process group")


def restore_text_model_prefix(folder: Path) -> None:
    """Store CLIPTextModel weights under their classic `text_model.` names, as every SD repository does.

    transformers 5 dropped the `text_model` wrapper of CLIPTextModel and strips the prefix on load, so a
    model built in code saves bare `encoder.layers...` keys that older transformers and single-file
    converters cannot read. CLIPTextModelWithProjection kept its wrapper and needs no fix.
    """
    from loraforge.formats.safetensors_io import read_safetensors, write_safetensors

    weights = folder / "text_encoder" / "model.safetensors"
    if not weights.is_file():
        return
    state, _ = read_safetensors(weights)
    if all(k.startswith("text_model.") for k in state):
        return
    renamed = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in state.items()}
    write_safetensors(renamed, weights, {"format": "pt"})


@contextlib.contextmanager
def quiet_progress_bars():
    """Silence the tqdm bars diffusers and transformers print while loading and saving."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    restore = []
    for lib in (diffusers_logging, transformers_logging):
        if lib.is_progress_bar_enabled():
            lib.disable_progress_bar()
            restore.append(lib)
    try:
        yield
    finally:
        for lib in restore:
            lib.enable_progress_bar()


def builtin_path(name: str, home: Path) -> Path:
    return models_dir(home) / "builtin" / check_builtin_name(name)


def ensure_builtin(name: str, home: Path) -> Path:
    """The folder of builtin model `name` under `home`, built (atomically) only if missing."""
    name = check_builtin_name(name)
    target = builtin_path(name, home)
    if (target / _COMPLETE_MARKER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f"builtin-{name}-", dir=tmp_dir(home)))
    try:
        save_tiny_pipeline(name, scratch / name)
        try:
            os.replace(scratch / name, target)
        except OSError:
            # Another process finished first (the target now exists and is not empty): keep theirs.
            if not (target / _COMPLETE_MARKER).is_file():
                # A stale, incomplete folder is in the way: move it aside and try again.
                stale = scratch / "stale"
                os.replace(target, stale)
                os.replace(scratch / name, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target
