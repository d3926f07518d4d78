"""The builtin models' tokenizer: a small CLIP BPE vocabulary in which common prompt words are one token."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

# Words that get a whole-word token, so usual prompts tokenize into words rather than letters.
_WORDS = """
a an the of in on at to with and or for by from into over under near behind is are was be
photo picture image painting drawing sketch portrait render illustration art artwork style
cat dog sks ohwx girl boy man woman person people child baby face eyes hair hand hands body
eating drinking holding sitting standing running walking wearing smiling looking playing
apple banana orange cake pizza food coffee tea cup bowl
red green blue yellow black white pink purple brown gray grey golden silver dark light bright
big small tiny large old young new happy sad cute beautiful ugly
house tree forest mountain river lake sea ocean beach sky cloud clouds sun moon star stars
city street road car bike boat train plane garden flower flowers grass field snow rain night day
room table chair bed window door wall floor
high quality best masterpiece detailed realistic anime cartoon oil watercolor digital
lowres blurry bad worst jpeg artifacts text watermark signature cropped
girl boy solo long short smile open closed mouth dress shirt hat
very more less no not background simple top view close up front side
asuka sunset sunrise fantasy science fiction robot castle dragon horse bird fish
""".split()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Apply BPE merges to one word the way the tokenizer does: lowest-ranked pair first."""
    while len(symbols) > 1:
        pairs = [(ranks.get(pair, len(ranks)), i) for i, pair in enumerate(zip(symbols, symbols[1:]))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        symbols = symbols[:i] + [symbols[i] + symbols[i + 1]] + symbols[i + 2:]
    return symbols


def tiny_clip_vocab(extra_words: Sequence[str] = ()) -> tuple[dict[str, int], list[str]]:
    """A small CLIP BPE vocabulary: every byte (bare and word-final), merges that make each of
    `_WORDS` (then each of `extra_words`) one token, and the two special tokens.

    A merge is only ever appended after the merges a word already uses, so adding a word never
    changes how an earlier word is split.
    """
    byte_chars = list(_bytes_to_unicode().values())
    tokens: list[str] = byte_chars + [c + "</w>" for c in byte_chars]
    seen_tokens = set(tokens)
    ranks: dict[tuple[str, str], int] = {}
    for word in dict.fromkeys([*_WORDS, *extra_words]):
        while len(parts := _bpe(list(word[:-1]) + [word[-1] + "</w>"], ranks)) > 1:
            ranks[(parts[0], parts[1])] = len(ranks)
            merged = parts[0] + parts[1]
            if merged not in seen_tokens:
                seen_tokens.add(merged)
                tokens.append(merged)
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    merges = [f"{a} {b}" for (a, b), _ in sorted(ranks.items(), key=lambda item: item[1])]
    return {t: i for i, t in enumerate(tokens)}, merges


def tiny_clip_tokenizer(extra_words: Sequence[str] = ()):
    from transformers import CLIPTokenizer

    vocab, merges = tiny_clip_vocab(extra_words)
    pairs = [tuple(m.split(" ")) for m in merges]
    return CLIPTokenizer(vocab=vocab, merges=pairs, model_max_length=77)


def write_vocab_files(folder: Path, extra_words: Sequence[str] = ()) -> None:
    """Add the classic vocab.json + merges.txt next to tokenizer.json, for tools that read only those."""
    vocab, merges = tiny_clip_vocab(extra_words)
    for sub in ("tokenizer", "tokenizer_2"):
        config = folder / sub / "tokenizer_config.json"
        if config.is_file() and "CLIPTokenizer" in json.loads(config.read_text(encoding="utf-8")).get("tokenizer_class", ""):
            (folder / sub / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
            (folder / sub / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
