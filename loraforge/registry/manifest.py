"""The provenance manifest of a registry artifact: a versioned pydantic model."""

from __future__ import annotations

import getpass
import platform
import socket
import warnings
from datetime import datetime, timezone
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from loraforge import __version__

SCHEMA_VERSION = 1

ArtifactKind = Literal["lora", "slider", "embedding", "checkpoint", "dataset", "image", "report"]
ARTIFACT_KINDS: tuple[str, ...] = ("lora", "slider", "embedding", "checkpoint", "dataset", "image", "report")


class Schema(BaseModel):
    """Base of every manifest part: unknown keys (from a newer loraforge) load with a warning."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    @model_validator(mode="before")
    @classmethod
    def _warn_unknown_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            known = set(cls.model_fields) | {f.alias for f in cls.model_fields.values() if f.alias}
            unknown = sorted(k for k in data if k not in known)
            if unknown:
                warnings.warn(
                    f"{cls.__name__}: ignoring unknown keys {unknown} (written by a newer loraforge?)",
                    UserWarning,
                    stacklevel=2,
                )
        return data


class FileEntry(Schema):
    model_config = ConfigDict(frozen=True)

    path: str = Field(description="Path of the file inside the artifact, '/'-separated.")
    sha256: str = Field(description="sha256 of the file's bytes; also its blob address.")
    size: int = Field(description="Size in bytes.")


class BaseInfo(Schema):
    ref: str = Field(description="The base model reference as the user wrote it.")
    digest: Optional[str] = Field(None, description="Content digest of the base model.")
    family: Optional[Literal["sd1", "sdxl", "flux"]] = Field(None, description="Architecture family.")


class AdapterInfo(Schema):
    format: str = Field(description="Format the adapter was imported from or made in.")
    rank: Optional[int] = Field(None, description="Largest rank over the adapter's modules.")
    alpha: Optional[float] = Field(None, description="alpha when uniform over modules.")
    target_modules: list[str] = Field(default_factory=list, description="Module names targeted (last segment).")
    components: list[str] = Field(default_factory=list, description="unet / text_encoder / text_encoder_2.")
    num_modules: int = 0
    num_parameters: int = 0
    dtype: Optional[str] = None
    variants: dict[str, int] = Field(default_factory=dict, description=(
        "Modules of each kind: lora, locon_tucker, loha, lokr, dora, full, norm (LyCORIS variants keep their own "
        "tensors; empty for adapters written before variants were recorded)."))
    lowrank_error: Optional[float] = Field(None, description=(
        "Largest relative error ‖ΔW − B·A‖/‖ΔW‖ of turning variant modules (LoHa, LoKr, ...) into LoRA pairs "
        "for this adapter; 0 when exact, None when no module was converted."))


class SliderInfo(Schema):
    concept: Optional[str] = Field(None, description="What the slider moves, e.g. 'age'.")
    method: Literal["text", "image_pair", "imported"] = "imported"
    positive: Optional[str] = Field(None, description="Prompt of the + direction.")
    negative: Optional[str] = Field(None, description="Prompt of the − direction.")
    neutral: Optional[str] = Field(None, description="Anchor prompt.")
    target: Optional[str] = None
    scale_range: tuple[float, float] = Field((-3.0, 3.0), description="Recommended scale range.")


class EmbeddingInfo(Schema):
    """A textual-inversion embedding: the placeholder token people put in prompts and what it adds."""

    token: str = Field(description="The placeholder token to write in prompts, e.g. '<sks>'.")
    tokens: list[str] = Field(default_factory=list, description=(
        "Tokenizer entries it adds: the token, then token_1 ... for a multi-vector embedding (diffusers' spelling)."))
    num_vectors: int = Field(1, ge=1, description="Learned vectors per text encoder.")
    components: list[str] = Field(default_factory=list, description="text_encoder (SD1); SDXL also text_encoder_2.")
    dims: dict[str, int] = Field(default_factory=dict, description="Width of each encoder's vectors.")
    initializer: Optional[str] = Field(None, description="The word whose embedding training started from.")
    format: Optional[str] = Field(None, description="File format it was imported from or made in.")


class DatasetInfo(Schema):
    num_images: int = 0
    captions: dict[str, str] = Field(default_factory=dict, description="Image path → caption.")
    instance_prompt: Optional[str] = None


class Parent(Schema):
    ref: str = Field(description="name:version, a base reference or a source.")
    digest: Optional[str] = None
    role: str = Field("input", description="input / base / dataset / model / adapter / source.")
    weight: Optional[float] = None


class RecipeInfo(Schema):
    name: Optional[str] = None
    path: Optional[str] = None
    digest: str
    step: str
    input_digest: str


def software_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"loraforge": __version__, "python": platform.python_version()}
    for pkg in ("torch", "diffusers", "transformers", "peft", "safetensors", "huggingface_hub"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _host() -> str:
    try:
        return f"{getpass.getuser()}@{socket.gethostname()}"
    except Exception:  # pragma: no cover - unusual environments
        return socket.gethostname()


class Provenance(Schema):
    source: Optional[str] = Field(None, description="Where the bytes came from: a file, hf://repo@sha, a step.")
    method: Optional[str] = Field(None, description="The operation that made it: import, merge:ties, train:lora …")
    params: dict[str, Any] = Field(default_factory=dict, description="All parameters of that operation.")
    parents: list[Parent] = Field(default_factory=list)
    recipe: Optional[RecipeInfo] = None
    training: Optional[dict[str, Any]] = None
    dataset_digest: Optional[str] = None
    run_id: Optional[str] = None
    software: dict[str, str] = Field(default_factory=software_versions)
    created_at: str = Field(default_factory=_now)
    host: str = Field(default_factory=_host)


class Manifest(Schema):
    name: str
    version: int = 0
    kind: ArtifactKind
    digest: str = Field(description="Digest of the artifact's file list (paths and sha256s).")
    files: list[FileEntry]
    base: Optional[BaseInfo] = None
    adapter: Optional[AdapterInfo] = None
    slider: Optional[SliderInfo] = None
    embedding: Optional[EmbeddingInfo] = None
    dataset: Optional[DatasetInfo] = None
    layout: Optional[str] = Field(None, description="For checkpoints: single_file or diffusers.")
    provenance: Provenance = Field(default_factory=Provenance)
    metrics: dict[str, Any] = Field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    loraforge_version: str = __version__

    @model_validator(mode="after")
    def _check_kind_facts(self) -> "Manifest":
        if self.kind == "slider" and self.slider is None:
            self.slider = SliderInfo()
        if self.kind in ("lora", "slider") and self.adapter is None:
            raise ValueError(f"a {self.kind} manifest needs adapter facts")
        if self.kind == "embedding" and self.embedding is None:
            raise ValueError("an embedding manifest needs embedding facts (its token)")
        if self.schema_version > SCHEMA_VERSION:
            warnings.warn(
                f"manifest {self.name}:{self.version} has schema_version {self.schema_version}, "
                f"newer than this loraforge's {SCHEMA_VERSION}; some fields may be ignored",
                UserWarning,
                stacklevel=2,
            )
        return self

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)

    def to_json(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_json(cls, text: str) -> "Manifest":
        return cls.model_validate_json(text)
