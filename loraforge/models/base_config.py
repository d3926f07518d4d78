"""The diffusers configs and tokenizers a single-file base is read with — a `--config` folder, the builtin's
when the file has exactly its architecture, or the standard ones diffusers names for it from the Hub — and
the check that a folder's configs fit a file, tensor by tensor, through diffusers' own single-file conversion."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from loraforge.errors import ConfigError, UnresolvedReference
from loraforge.home import loraforge_home
from loraforge.models.base import BaseModel, checkpoint_shapes, family_of_folder
from loraforge.models.builtin import ensure_builtin

_BUILTINS_OF_FAMILY = {"sd1": ("tiny-sd", "shapes"), "sdxl": ("tiny-sdxl",)}
TEXT_MODEL = "text_model."
# Tensors diffusers' conversion leaves out on purpose: CLIP's position ids (rebuilt), open-clip's logit scale.
DROPPED_KEYS = ("position_ids", "logit_scale")


def with_config(base: BaseModel, config: str | Path | None) -> BaseModel:
    """`base` read with the configs and tokenizers of diffusers folder `config` (None: unchanged).

    Refused in one line when `base` is not a single file (a folder has its own configs), when `config` is not
    a diffusers folder, or when it is of another family or architecture than the file (every tensor is
    compared by shape after diffusers' own single-file conversion; architecture_problem).
    """
    if config is None:
        return base
    folder = Path(config).expanduser()
    if base.layout != "single_file":
        raise ConfigError(f"--config {config} is for single-file bases; {base.ref} is a diffusers folder with its "
                          "own configs: drop --config")
    if not (folder / "model_index.json").is_file():
        raise ConfigError(f"--config {config} is not a diffusers pipeline folder (no model_index.json); "
                          "name a local diffusers folder of the same architecture as the base")
    family = family_of_folder(folder)
    if family != base.family:
        raise ConfigError(f"--config {config} holds an {family} pipeline but base {base.ref} is an {base.family} "
                          f"checkpoint; name an {base.family} diffusers folder")
    problem = architecture_problem(base.path, folder)
    if problem:
        raise ConfigError(f"--config {config} is not the architecture of {base.path.name}: {problem}")
    return dataclasses.replace(base, config=folder)


def single_file_configs(base: BaseModel, home: Path | None = None) -> Path:
    """The diffusers folder whose configs and tokenizers single file `base` loads with: its --config; else the
    builtin of its family whose architecture the file has exactly (tiny-sd or shapes for sd1); else the configs
    (no weights) of the standard pipeline diffusers names for the file's model type, from the Hub or its local
    cache, checked against the file like a --config. Refused in one line when none fits."""
    if base.config is not None:
        return base.config
    if base.family == "flux":
        raise ConfigError(f"{base.path.name} is a Black Forest Labs Flux single file, the transformer alone: its VAE, "
                          "text encoders and tokenizers come from a diffusers Flux folder; pass --config DIR "
                          "(e.g. the folder of builtin:tiny-flux or black-forest-labs/FLUX.1-dev)")
    for name in _BUILTINS_OF_FAMILY[base.family]:
        builtin = ensure_builtin(name, loraforge_home(home))
        if architecture_problem(base.path, builtin) is None:
            return builtin
    return _hub_configs(base)


# What a pipeline's configs and tokenizers are, without its weights.
HUB_CONFIG_PATTERNS = ["model_index.json", "*/config.json", "*/scheduler_config.json", "*/tokenizer_config.json",
                       "*/special_tokens_map.json", "*/vocab.json", "*/merges.txt",
                       "*/tokenizer.json", "*/spiece.model"]  # T5's (Flux's tokenizer_2)


def _hub_configs(base: BaseModel) -> Path:
    from diffusers.loaders.single_file_utils import fetch_diffusers_config
    from huggingface_hub import snapshot_download

    shapes = {k: torch.empty(s, device="meta") for k, s in file_shapes(base.path).items()}
    repo = fetch_diffusers_config(shapes)["pretrained_model_name_or_path"]
    try:
        folder = Path(snapshot_download(repo, allow_patterns=HUB_CONFIG_PATTERNS))
    except Exception as exc:  # offline without a cached copy, HTTP errors: the configs are not here
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnresolvedReference(
            f"cannot load single-file checkpoint {base.path.name}: its {base.family} configs and tokenizer "
            f"({repo} on the Hub) are not here ({reason[:100]}); pass --config DIR, a local diffusers folder of "
            "the same architecture, or connect to the network"
        ) from None
    family = family_of_folder(folder)
    problem = (f"it is {base.family} and they are {family}" if family != base.family
               else architecture_problem(base.path, folder))
    if problem:
        raise ConfigError(f"single-file checkpoint {base.path.name} does not fit {repo}, the standard configs "
                          f"diffusers names for it: {problem}; pass --config DIR of its architecture")
    return folder


def architecture_problem(single_file: Path, folder: Path) -> str | None:
    """None when `single_file` has exactly the tensors of diffusers folder `folder`'s UNet, VAE and text
    encoders as its configs build them (config_shapes), by name and shape, after diffusers' own single-file
    conversion (models.single_file, run on shape-only tensors: nothing but the header is read), and no tensor of
    those parts the conversion leaves unused; else the first difference, in words."""
    from loraforge.errors import FormatError
    from loraforge.models import single_file as sf

    family = family_of_folder(folder)
    if family == "flux":
        from loraforge.models.flux_single_file import architecture_problem as flux_problem

        return flux_problem(single_file, folder)
    shapes = file_shapes(single_file)
    try:
        keymap = sf.KeyMap.build(shapes, family, sf.configs_from_folder(folder, family))
    except FormatError as exc:
        return str(exc)
    have = {(p.component, strip_text_model(p.key)): p.shape for ps in keymap.pieces.values() for p in ps
            if not p.key.endswith(DROPPED_KEYS)}
    want = {(c, strip_text_model(k)): s for c, ks in config_shapes(folder, family).items() for k, s in ks.items()
            if not k.endswith(DROPPED_KEYS)}
    for component, key in sorted(want):
        if (component, key) not in have:
            return f"the folder's {component}.{key} is missing from the file"
        if have[component, key] != want[component, key]:
            return (f"{component}.{key} is {'x'.join(map(str, have[component, key]))} in the file but "
                    f"{'x'.join(map(str, want[component, key]))} in the folder")
    extra = sorted(set(have) - set(want))
    if extra:
        return f"the file has {extra[0][0]}.{extra[0][1]}, which the folder lacks"
    parts = tuple(sf.prefixes(family).values())
    unused = [k for k in shapes if k.startswith(parts) and not keymap.pieces.get(k) and not k.endswith(DROPPED_KEYS)]
    if unused:
        return f"the file's {unused[0]} has no place in the folder's configs"
    return None


def config_shapes(folder: Path, family: str) -> dict[str, dict[str, tuple[int, ...]]]:
    """component → parameter → shape of the UNet, VAE and text encoders the folder's configs build (on the meta
    device, so nothing is allocated and the folder needs no weights), with the classes its model_index names."""
    import importlib
    import json

    from loraforge.models import single_file as sf

    index = json.loads((Path(folder) / "model_index.json").read_text(encoding="utf-8"))
    out = {}
    for component in sf.COMPONENTS[family]:
        library, class_name = (index.get(component) or [None, None])[:2]
        if not library or not class_name:
            continue  # a pipeline without it (the file's tensors of it, if any, then have no place)
        cls = getattr(importlib.import_module(library), class_name)
        where = Path(folder) / component
        with torch.device("meta"):
            if library == "transformers":
                module = cls(cls.config_class.from_pretrained(where))
            else:
                module = cls.from_config(cls.load_config(where))
        out[component] = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    return out


def strip_text_model(key: str) -> str:
    return key[len(TEXT_MODEL):] if key.startswith(TEXT_MODEL) else key


def single_file_targets(base: BaseModel, home: Path | None = None) -> dict[str, dict[str, tuple[int, ...]]]:
    """{component: {module: weight shape}} of single-file base `base`, in the diffusers paths its configs
    (single_file_configs) give its tensors through diffusers' own converters: what an adapter is checked against,
    the same targets its diffusers folder gives (models.targets.module_shapes with norms). A Flux file in Black
    Forest Labs' layout is the transformer alone, named through models.flux_single_file (its header suffices)."""
    from loraforge.models import single_file as sf

    if base.family == "flux":
        from loraforge.models.flux_single_file import diffusers_plans

        plans, _ = diffusers_plans(file_shapes(base.path))
        return {"transformer": {k[: -len(".weight")]: p.shape for k, p in plans.items()
                                if k.endswith(".weight") and len(p.shape) in (1, 2)}}
    configs = sf.configs_from_folder(single_file_configs(base, home), base.family)
    return keymap_targets(sf.KeyMap.build(file_shapes(base.path), base.family, configs))


def keymap_targets(keymap) -> dict[str, dict[str, tuple[int, ...]]]:
    """{component: {module: weight shape}} of a single file's KeyMap, in diffusers names: the Linear and Conv2d
    layers of the components adapters change (the UNet and text encoders, as for a folder), and their norm
    layers by their 1-D weights."""
    from loraforge.models.targets import COMPONENTS

    out: dict = {}
    for pieces in keymap.pieces.values():
        for p in pieces:
            if p.component in COMPONENTS and p.key.endswith(".weight") and len(p.shape) in (1, 2, 4):
                out.setdefault(p.component, {})[p.key[: -len(".weight")]] = p.shape
    return out


def file_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    if Path(path).suffix.lower() == ".safetensors":
        from loraforge.formats.safetensors_io import tensor_shapes

        return dict(tensor_shapes(path))
    return checkpoint_shapes(path)


def configs_digest(folder: str | Path | None) -> str | None:
    """sha256 of a configs folder's configs and tokenizer files (json and txt, by relative path), not its
    weights: what changes when a different schedule or tokenizer is used with the same single file."""
    import hashlib

    if folder is None:
        return None
    root = Path(folder).expanduser()
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in (".json", ".txt")):
        h.update(f"\0{path.relative_to(root).as_posix()}\0".encode())
        h.update(path.read_bytes())
    return h.hexdigest()
