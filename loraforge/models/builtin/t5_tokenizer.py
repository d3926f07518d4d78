"""The builtin Flux model's T5 tokenizer: a small SentencePiece-style Unigram vocabulary built in code, in which
the CLIP tokenizer's whole words are one piece each and any other text falls back to single characters."""

from __future__ import annotations

import string

from loraforge.models.builtin.tokenizer import _WORDS

# T5's special pieces, at T5's ids: padding 0, end of sequence 1, unknown 2.
SPECIALS = (("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0))
WORD_MARK = "\u2581"  # SentencePiece's word-start mark
# How long a prompt the builtin's T5 reads (real Flux: 512 with FLUX.1-dev, 256 with schnell).
MAX_LENGTH = 32


def t5_pieces(extra_words=()) -> list[tuple[str, float]]:
    """(piece, log-probability) in id order: the specials, one piece per word, the bare word mark, characters."""
    words = list(dict.fromkeys([*_WORDS, *extra_words]))
    chars = string.ascii_lowercase + string.digits + string.punctuation
    return [*SPECIALS, *((WORD_MARK + w, -1.0) for w in words), (WORD_MARK, -5.0), *((c, -8.0) for c in chars)]


def tiny_t5_tokenizer(extra_words=()):
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import Unigram
    from transformers import T5TokenizerFast

    backend = Tokenizer(Unigram(t5_pieces(extra_words), unk_id=2, byte_fallback=False))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement=WORD_MARK, prepend_scheme="always")
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                           special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                           extra_ids=0, model_max_length=MAX_LENGTH)
