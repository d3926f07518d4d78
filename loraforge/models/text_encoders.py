"""A base's text encoders as textual inversion sees them: each tokenizer and the width of its input embeddings.

Where an embedding is imported against a base, trained on it or loaded into its pipeline, the same two checks
run here: the embedding's vectors are as wide as the encoder's, and its tokens are new to the tokenizer (a
token the tokenizer already has would shadow a word, and diffusers' loader refuses it mid-load).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from loraforge.errors import ConfigError, IncompatibleBaseError

# The pipeline's (tokenizer, text encoder) attribute pairs, in encoder order.
ENCODERS = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))


@dataclass
class TextEncoder:
    component: str  # text_encoder | text_encoder_2
    tokenizer: object  # a transformers tokenizer
    dim: int  # width of the input embedding rows


def pipeline_text_encoders(pipe) -> dict[str, TextEncoder]:
    """The text encoders of a loaded pipeline (SD1: one, SDXL: two)."""
    out = {}
    for component, tok in ENCODERS:
        encoder, tokenizer = getattr(pipe, component, None), getattr(pipe, tok, None)
        if encoder is not None and tokenizer is not None:
            out[component] = TextEncoder(component, tokenizer, int(encoder.get_input_embeddings().weight.shape[-1]))
    return out


def base_text_encoders(base, home: Path | None = None) -> dict[str, TextEncoder]:
    """The text encoders of a base (models.base.BaseModel): read from a diffusers folder's tokenizer and config
    files; a single file's come from loading its pipeline (the configs it is read with decide them)."""
    from transformers import AutoTokenizer

    if base.layout != "diffusers":
        from loraforge.models.pipeline import load_pipeline

        return pipeline_text_encoders(load_pipeline(base, "cpu", home=home))
    folder = Path(base.path)
    out = {}
    for component, tok in ENCODERS:
        config = folder / component / "config.json"
        if not config.is_file() or not (folder / tok).is_dir():
            continue
        dim = int(json.loads(config.read_text(encoding="utf-8"))["hidden_size"])
        out[component] = TextEncoder(component, AutoTokenizer.from_pretrained(folder / tok), dim)
    return out


def token_taken(tokenizer, token: str) -> bool:
    """Whether `tokenizer` already has `token`: as an entry of its vocabulary (added tokens included), or as
    a word it reads as one token of its own (CLIP's `dog` is `dog</w>`)."""
    if token in tokenizer.get_vocab():
        return True
    pieces = tokenizer.tokenize(token)
    return len(pieces) == 1 and pieces[0] in (token, f"{token}</w>")


def check_new_token(tokens: list[str], encoders: dict[str, TextEncoder], base_ref: str) -> None:
    """Refuse, in one line, tokens one of the tokenizers already has."""
    for encoder in encoders.values():
        for token in tokens:
            if token_taken(encoder.tokenizer, token):
                raise ConfigError(f"token '{token}' is already in the tokenizer of {base_ref}: choose another")


def check_embedding_fits(embedding, encoders: dict[str, TextEncoder], base_ref: str) -> None:
    """Refuse an embedding (formats.embeddings.Embedding) whose encoders or widths are not the base's, or
    whose tokens the base's tokenizers already hold."""
    if set(embedding.components) != set(encoders):
        want = "sdxl (clip_l and clip_g vectors)" if "text_encoder_2" in encoders else "sd1 (one text encoder)"
        raise IncompatibleBaseError(f"embedding '{embedding.token}' is a {embedding.family} embedding "
                                    f"({', '.join(embedding.components)}) but {base_ref} is {want}: "
                                    "use it with a base of its family")
    for component, dim in embedding.dims.items():
        if encoders[component].dim != dim:
            raise IncompatibleBaseError(f"embedding '{embedding.token}' has {dim}-wide {component} vectors but "
                                        f"{base_ref}'s {component} takes {encoders[component].dim}: it was made "
                                        "for another base")
    check_new_token(embedding.tokens, encoders, base_ref)
