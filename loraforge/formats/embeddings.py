"""Textual-inversion embeddings in memory (`Embedding`) and the files people share them in.

One embedding is one placeholder token with `num_vectors` learned rows of a text encoder's input
embedding matrix per encoder (SD1: `text_encoder`; SDXL: `text_encoder` and `text_encoder_2`, the
`clip_l` and `clip_g` rows). A multi-vector token is spelled, as diffusers' `load_textual_inversion`
spells it, `<tok>`, `<tok>_1`, ..., `<tok>_{n-1}`. Files read and written here:

- diffusers `learned_embeds.safetensors` / `.bin`: {token: tensor[n, dim]} (older files: tensor[dim]);
- A1111 `.pt`: {"string_to_param": {"*": tensor[n, dim]}, "name": token, "string_to_token": {"*": id}, ...},
  unpickled weights-only;
- A1111 `.safetensors`: {"emb_params": tensor[n, dim]} (the token is the file's name);
- SDXL (A1111 and Civitai, and what diffusers' docs load per encoder): {"clip_l": [n, 768], "clip_g": [n, 1280]}.

The registry stores an embedding canonically as the diffusers layout (SDXL: clip_l/clip_g) with the
token in the safetensors metadata.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from loraforge.errors import ConfigError, FormatError

# Encoder component -> the key SDXL embedding files name its rows by.
SDXL_KEYS = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}
A1111_SAFETENSORS_KEY = "emb_params"
CANONICAL_NAME = "learned_embeds.safetensors"
TOKEN_METADATA = "loraforge_token"
PICKLE_SUFFIXES = (".pt", ".bin", ".pth", ".ckpt")
# Export targets: the program family -> what it reads (`registry export --for`).
EXPORT_FORMATS = ("diffusers", "a1111")


@dataclass
class Embedding:
    """One placeholder token's learned vectors: component ("text_encoder", "text_encoder_2") -> tensor[n, dim]."""

    token: str
    vectors: dict  # component -> torch.Tensor [num_vectors, dim]
    initializer: Optional[str] = None

    def __post_init__(self):
        counts = {c: int(t.shape[0]) for c, t in self.vectors.items()}
        if len(set(counts.values())) > 1:
            raise FormatError(f"embedding {self.token!r} has {counts} vectors per encoder; every encoder needs the "
                              "same number of vectors")

    @property
    def num_vectors(self) -> int:
        return int(next(iter(self.vectors.values())).shape[0])

    @property
    def components(self) -> list[str]:
        return sorted(self.vectors)

    @property
    def family(self) -> str:
        return "sdxl" if "text_encoder_2" in self.vectors else "sd1"

    @property
    def dims(self) -> dict[str, int]:
        return {c: int(t.shape[-1]) for c, t in sorted(self.vectors.items())}

    @property
    def tokens(self) -> list[str]:
        """The tokenizer entries the embedding adds, in diffusers' multi-vector spelling."""
        return multi_vector_tokens(self.token, self.num_vectors)

    def check_against(self, targets) -> None:
        """An embedding changes no Linear/Conv module: only its family is checked against the base's targets (the
        text encoders' widths are checked where the embedding is loaded, against the pipeline itself)."""
        from loraforge.families import check_same_family, family_of_components

        theirs = family_of_components(targets)
        if theirs is not None and theirs.is_transformer:
            check_same_family(self.family, theirs.name, f"embedding '{self.token}'", "the base")

    def state_dict(self, layout: str = "diffusers") -> dict:
        """{key: tensor} in `layout`: diffusers ({token: [n, dim]}; SDXL clip_l/clip_g) or a1111 (emb_params;
        SDXL clip_l/clip_g, the layout both programs read)."""
        if self.family == "sdxl":
            return {SDXL_KEYS[c]: t.contiguous() for c, t in self.vectors.items()}
        tensor = self.vectors["text_encoder"].contiguous()
        return {self.token: tensor} if layout == "diffusers" else {A1111_SAFETENSORS_KEY: tensor}


def multi_vector_tokens(token: str, num_vectors: int) -> list[str]:
    return [token] + [f"{token}_{i}" for i in range(1, num_vectors)]


def _as_rows(tensor, where: str):
    import torch

    if not isinstance(tensor, torch.Tensor):
        raise FormatError(f"{where} is a {type(tensor).__name__}, not a tensor of embedding vectors")
    if tensor.ndim == 1:
        tensor = tensor[None]
    if tensor.ndim != 2 or tensor.shape[0] < 1:
        raise FormatError(f"{where} has shape {list(tensor.shape)}; an embedding is [num_vectors, dim] or [dim]")
    if not torch.isfinite(tensor).all():
        raise FormatError(f"{where} holds NaN or infinite values")
    return tensor.detach().to("cpu").contiguous()


def embedding_from_state_dict(data: dict, path: Path, token: Optional[str] = None,
                              metadata: Optional[dict] = None) -> tuple[Embedding, str]:
    """(Embedding, format name) of an embedding file's contents; the token comes from the file where it has one
    (A1111's `name`, loraforge's metadata, a diffusers file's key), else from `token`, else from the file stem."""
    metadata = metadata or {}
    keys = set(data) if isinstance(data, dict) else set()
    if not keys:
        raise FormatError(f"{path} holds no embedding: expected {{token: tensor}}, string_to_param, emb_params "
                          "or clip_l/clip_g")
    stem_token = token or metadata.get(TOKEN_METADATA) or Path(path).stem
    if keys >= set(SDXL_KEYS.values()):
        extra = sorted(keys - set(SDXL_KEYS.values()))
        if extra:
            raise FormatError(f"{path} has clip_l/clip_g and also {extra}: not an SDXL embedding file")
        vectors = {c: _as_rows(data[k], f"{path}: {k}") for c, k in SDXL_KEYS.items()}
        return Embedding(stem_token, vectors), "sdxl"
    if "string_to_param" in keys:
        params = data["string_to_param"]
        if not isinstance(params, dict) or "*" not in params:
            raise FormatError(f"{path}: string_to_param has no '*' entry; not an A1111 embedding")
        name = data.get("name") if isinstance(data.get("name"), str) and data.get("name") else None
        return Embedding(token or name or stem_token, {"text_encoder": _as_rows(params["*"], f"{path}: string_to_param['*']")}), "a1111"
    if len(keys) != 1:
        raise FormatError(f"{path} has {len(keys)} entries ({', '.join(sorted(map(str, keys))[:4])}); an embedding "
                          "file holds one token's vectors ({token: tensor}), string_to_param, emb_params or clip_l/clip_g")
    (key,) = keys
    rows = _as_rows(data[key], f"{path}: {key}")
    if key == A1111_SAFETENSORS_KEY:
        return Embedding(stem_token, {"text_encoder": rows}), "a1111"
    return Embedding(token or str(key), {"text_encoder": rows}), "diffusers"


def is_embedding_file(path: Path) -> bool:
    """Whether a .safetensors file's tensor names are an embedding's (clip_l/clip_g, emb_params, or one
    tensor whose name is not a module path); read from the header only."""
    from loraforge.formats.safetensors_io import read_header

    path = Path(path)
    if not path.is_file() or path.suffix.lower() != ".safetensors":
        return False
    try:
        header, _meta = read_header(path)
    except (FormatError, OSError):
        return False
    keys = set(header)
    if keys == set(SDXL_KEYS.values()) or keys == {A1111_SAFETENSORS_KEY}:
        return True
    if len(keys) == 1:
        (key,) = keys
        return "." not in key and len(header[key]["shape"]) in (1, 2)
    return False


def is_embedding_pickle(data: object) -> bool:
    """Whether an unpickled `.pt`/`.bin` is an embedding (A1111's string_to_param, clip_l/clip_g, or one
    tensor under a name that is not a module path)."""
    import torch

    if not isinstance(data, dict):
        return False
    if "string_to_param" in data or set(data) == set(SDXL_KEYS.values()):
        return True
    if len(data) == 1:
        (key, value), = data.items()
        return isinstance(key, str) and "." not in key and isinstance(value, torch.Tensor) and value.ndim in (1, 2)
    return False


def read_embedding(path: Path, token: Optional[str] = None) -> tuple[Embedding, str]:
    """(Embedding, format) of a diffusers, A1111 or SDXL embedding file; pickles load weights-only."""
    from loraforge.formats.pickles import load_weights_only
    from loraforge.formats.safetensors_io import read_safetensors

    path = Path(path)
    if not path.is_file():
        raise FormatError(f"{path} is not a file; an embedding is one .safetensors, .pt or .bin file")
    if path.suffix.lower() == ".safetensors":
        data, metadata = read_safetensors(path)
        return embedding_from_state_dict(data, path, token, metadata)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return embedding_from_state_dict(load_weights_only(path), path, token)
    raise FormatError(f"{path}: an embedding file ends in .safetensors, .pt or .bin")


def write_embedding(embedding: Embedding, path: Path, fmt: str = "diffusers") -> Path:
    """Write `embedding` as `fmt` (diffusers | a1111) at `path`: a `.pt`/`.bin` suffix writes torch.save's
    pickle (A1111 .pt: string_to_param, name, string_to_token), anything else safetensors."""
    import torch

    from loraforge.formats.safetensors_io import write_safetensors

    path = Path(path)
    if fmt not in EXPORT_FORMATS:
        raise ConfigError(f"unknown embedding format {fmt!r}; choose {' or '.join(EXPORT_FORMATS)}")
    pickled = path.suffix.lower() in PICKLE_SUFFIXES
    if pickled and fmt == "a1111":
        if embedding.family == "sdxl":
            raise ConfigError(f"an SDXL embedding is shared as clip_l/clip_g safetensors, not an A1111 .pt: "
                              f"write {path.with_suffix('.safetensors').name}")
        rows = embedding.vectors["text_encoder"].contiguous()
        # 265 is the id of "*" in CLIP's vocabulary, the placeholder A1111 records every embedding under.
        torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": rows}, "name": embedding.token,
                    "step": 0, "sd_checkpoint": None, "sd_checkpoint_name": None}, path)
        return path
    if pickled:
        torch.save(embedding.state_dict("diffusers"), path)
        return path
    return write_safetensors(embedding.state_dict(fmt), path, {TOKEN_METADATA: embedding.token})
