"""Resolving a base-model reference (builtin, local folder, single file, Hub id) to a digested BaseModel."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from loraforge.errors import FormatError, UnresolvedReference
from loraforge.hashing import DigestIndex
from loraforge.home import digest_index_file, home_is_writable, loraforge_home
from loraforge.models.builtin import ensure_builtin
from loraforge.reference import Reference

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
# What a diffusers pipeline repository needs (T5's SentencePiece model among them, for Flux); fp16/ema variants,
# pickles and the root's single files (FLUX.1's flux1-dev.safetensors beside its folders) are skipped.
HUB_ALLOW_PATTERNS = ["model_index.json", "*/*.json", "*/*.txt", "*/*.model", "*/*.safetensors"]
HUB_IGNORE_PATTERNS = ["*.fp16.*", "*ema*", "*.bin", "*.ckpt", "safety_checker/*", "feature_extractor/*"]


@dataclass(frozen=True)
class BaseModel:
    """A base model on disk, with the content digest that identifies it in locks and manifests."""

    ref: str
    path: Path
    digest: str | None  # None: not computed (asked for with digest=False)
    family: str  # a loraforge.families name: "sd1" | "sdxl" | "flux"
    layout: str  # "diffusers" | "single_file"
    # A single file's configs and tokenizers: a diffusers folder of its architecture (pipeline.with_config).
    config: Path | None = None


def locate_base(ref: str | Reference, home: Path, *, digest: bool = True) -> BaseModel:
    """The base model on disk for `builtin:NAME`, a local diffusers folder or checkpoint file, or a Hub model
    id `org/name[@rev]` (downloaded into the model cache). `digest=False` leaves its digest None: reading
    every byte of a large model is only worth it when something records the digest.

    Registry references and `hf://` repos are the registry's: `registry.resolve.resolve_base` takes every kind.
    """
    ref = ref if isinstance(ref, Reference) else Reference.parse(ref)
    if ref.kind == "builtin":
        return base_from_path(ensure_builtin(ref.text, home), ref.text, home=home, digest=digest)
    if ref.kind == "path":
        return base_from_path(ref.path, ref.text, home=home, digest=digest)
    if ref.kind == "hub_model":
        return base_from_path(_download_from_hub(ref.text, ref.repo, ref.revision), ref.text, home=home,
                              digest=digest)
    raise UnresolvedReference(
        f"base model {ref.text!r} is not a builtin, an existing file or folder, or a Hub id (org/name)"
    )


def base_from_path(path: Path, ref: str, home: Path | None = None, *, digest: bool = True) -> BaseModel:
    """A BaseModel for a diffusers folder or single-file checkpoint at `path`, known to the user as `ref`
    (its digest None with `digest=False`)."""
    path = Path(path)
    home = loraforge_home(home)
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise FormatError(f"{path} is a folder without model_index.json; a diffusers pipeline folder is needed")
        return BaseModel(ref=ref, path=path, digest=cached_digest(path, home) if digest else None,
                         family=family_of_folder(path), layout="diffusers")
    if path.is_file():
        return BaseModel(ref=ref, path=path, digest=cached_digest(path, home) if digest else None,
                         family=family_of_single_file(path), layout="single_file")
    raise UnresolvedReference(f"base model {ref!r}: {path} does not exist")


def family_of_folder(path: Path) -> str:
    """"sd1", "sdxl" or "flux" from a diffusers folder's model_index.json (its pipeline class)."""
    try:
        index = json.loads((Path(path) / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise FormatError(f"{path}/model_index.json is unreadable: {exc}") from None
    class_name = str(index.get("_class_name", ""))
    if class_name.startswith("Flux") and index.get("transformer", [None, None])[1] == "FluxTransformer2DModel":
        return "flux"
    if class_name.startswith("StableDiffusionXL") or (class_name.startswith("StableDiffusion") and "text_encoder_2" in index):
        return "sdxl"
    if class_name.startswith("StableDiffusion"):
        return "sd1"
    raise FormatError(f"{path} holds a {class_name or 'unknown'} pipeline; loraforge supports SD1, SDXL and Flux bases")


def checkpoint_keys(path: Path) -> list[str]:
    """Tensor names of a single-file checkpoint, reading only the header of safetensors files."""
    return sorted(checkpoint_shapes(path))


def checkpoint_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} of a single-file checkpoint, reading only the header of safetensors files."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        from loraforge.formats.safetensors_io import tensor_shapes

        return tensor_shapes(path)
    if suffix in PICKLE_SUFFIXES:
        return pickle_shapes(path)
    raise FormatError(f"{path}: unknown checkpoint type {suffix!r}; expected .safetensors or .ckpt")


# A pickle is unpickled whole to learn its shapes (an old non-zip one read in full), so one load serves a command:
# its shapes are kept by file version (path, size, mtime), and the state dict last loaded for them is parked until
# a reader of its tensors takes it (the family check, the architecture check and a fuse read share one torch.load).
_PICKLE_SHAPES: dict[tuple, dict[str, tuple[int, ...]]] = {}
_PARKED: dict[tuple, dict] = {}


def _file_version(path: Path) -> tuple:
    resolved = Path(path).resolve()
    stat = resolved.stat()
    return str(resolved), stat.st_size, stat.st_mtime_ns


def pickle_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} of a pickled checkpoint (`.ckpt`/`.pt`, optionally under "state_dict"), loaded
    weights-only once per file version; an entry that is not a tensor is refused in one line."""
    version = _file_version(path)
    if version not in _PICKLE_SHAPES:
        data = _load_checked(path)
        _PICKLE_SHAPES[version] = {k: tuple(v.shape) for k, v in data.items()}
        _PARKED.clear()  # one parked state dict at most: a command reads one base at a time
        _PARKED[version] = data
    return dict(_PICKLE_SHAPES[version])


def pickle_tensors(path: Path) -> dict:
    """{name: tensor} of a pickled checkpoint for a reader of its tensors: the state dict a shape read of this file
    version parked (taken, so it is not kept after its reader), else a fresh weights-only load."""
    version = _file_version(path)
    data = _PARKED.pop(version, None)
    if data is None:
        data = _load_checked(path)
        _PICKLE_SHAPES[version] = {k: tuple(v.shape) for k, v in data.items()}
    return data


def _load_checked(path: Path) -> dict:
    from loraforge.formats.pickles import tensor_state_dict

    return tensor_state_dict(path)


def _load_pickle_state_dict(path: Path) -> dict:
    return pickle_tensors(path)


def family_of_keys(keys: list[str], source: str = "checkpoint") -> str:
    if any(k.startswith("conditioner.embedders.1.") for k in keys):
        return "sdxl"
    if any(k.startswith("cond_stage_model.") for k in keys):
        return "sd1"
    raise FormatError(
        f"{source} has neither cond_stage_model.* (SD1) nor conditioner.embedders.1.* (SDXL) keys; "
        "it is not a full Stable Diffusion checkpoint"
    )


# diffusers' names (single_file_utils.infer_diffusers_model_type) of the single files loraforge adapts; it
# names a file it does not recognise "v1", and the tiny builtins are among those.
SUPPORTED_MODEL_TYPES = ("v1", "xl_base")
# Black Forest Labs' single files: the transformer alone (its VAE and text encoders ship apart).
FLUX_MODEL_TYPES = ("flux-dev", "flux-schnell")


def family_of_shapes(shapes: Mapping[str, tuple[int, ...]], source: str = "checkpoint") -> str:
    """"sd1", "sdxl" or "flux" for a single file's {tensor name: shape}; a checkpoint diffusers recognises as
    another architecture (SD2, an SDXL refiner, an inpainting model, SD3, Flux Fill, ...) is refused in one line
    naming it."""
    model_type = diffusers_model_type(shapes)
    if model_type in FLUX_MODEL_TYPES:
        return "flux"
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise FormatError(
            f"{source} is a {model_type!r} checkpoint (as diffusers' single-file loader names it), an architecture "
            "loraforge does not adapt; it adapts SD1.x, SDXL and Flux (dev, schnell) base checkpoints"
        )
    return family_of_keys(list(shapes), source=source)


def diffusers_model_type(shapes: Mapping[str, tuple[int, ...]]) -> str:
    """diffusers' own architecture name for a single file, judged from its tensor names and shapes (meta
    tensors: nothing is read or allocated)."""
    import torch
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    return infer_diffusers_model_type({k: torch.empty(s, device="meta") for k, s in shapes.items()})


def family_of_single_file(path: Path) -> str:
    return family_of_shapes(checkpoint_shapes(path), source=str(path))


def cached_digest(path: Path, home: Path) -> str:
    """sha256_folder / sha256_file of `path`; only files whose stat changed are read (hashing.DigestIndex)."""
    index = DigestIndex(digest_index_file(home) if home_is_writable(home) else None)
    digest = index.digest(Path(path).resolve())
    index.save()
    return digest


# ---- Hub -------------------------------------------------------------------------------------

def _download_from_hub(ref: str, repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=HUB_ALLOW_PATTERNS,
            ignore_patterns=HUB_IGNORE_PATTERNS,
        )
    except Exception as exc:  # offline, missing repo, gated repo, HTTP errors: all mean "cannot resolve"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnresolvedReference(
            f"cannot fetch base model {ref!r} from the Hugging Face Hub ({type(exc).__name__}: {reason[:160]}); "
            "connect to the network or pass a local diffusers folder"
        ) from None
    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        raise UnresolvedReference(f"Hub repository {repo_id!r} has no model_index.json; it is not a diffusers pipeline")
    return folder
