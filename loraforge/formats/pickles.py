"""Loading torch pickles (`.pt`, `.ckpt`, `.bin`) without running any code they carry.

`torch.load(weights_only=True)` refuses everything but tensors and plain containers. Its refusal
then advises retrying with weights_only turned off or allow-listing the refused class — the one
thing not to do with a file of unknown origin — so only the line naming what was refused is kept.
"""

from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path

from loraforge.errors import FormatError, UnsafePickleError

# Lines of torch's refusal that explain torch rather than the file.
_BOILERPLATE = ("Weights only load failed", "Please file an issue", "Check the documentation", "(1)", "(2)")
_REASON_MARK = "WeightsUnpickler error:"
# How torch.save's files begin: a zip archive (since torch 1.6), or the pickled magic number of its older format
# (protocol 2, a 10-byte LONG1). Anything else is a pickle of another program, which torch cannot load safely.
_ZIP_MAGIC = b"PK\x03\x04"
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a"


def load_weights_only(path: Path, *, mmap: bool = False) -> object:
    """The unpickled object of a torch file, loaded with weights_only=True (memory-mapped with `mmap`).

    Raises UnsafePickleError (naming what was refused) for anything else, FormatError for a file
    torch cannot read. The file is opened here, so torch never picks a loader by the file's name.
    """
    import torch

    path = Path(path)
    try:
        with open(path, "rb") as f, warnings.catch_warnings():
            # torch's notes on pickle protocols would be a second line under a one-line refusal
            warnings.simplefilter("ignore")
            start = f.read(4)
            if start != _ZIP_MAGIC and start != _LEGACY_MAGIC:
                if start[:1] == b"\x80":  # a pickle, but not torch.save's: nothing in it is a torch tensor
                    raise UnsafePickleError(f"refusing to unpickle {path}: it contains objects other than tensors "
                                            "(a pickle not written by torch.save); use a .safetensors copy of it")
                raise FormatError(f"{path} is not a torch checkpoint: neither torch.save's zip archive nor its older "
                                  "pickle format; use a .safetensors copy of it")
            # torch maps only zip archives (torch.save since 1.6), and only files it opens itself;
            # older bare pickles are read in full.
            if mmap and start == _ZIP_MAGIC:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            f.seek(0)
            return torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafePickleError(
            f"refusing to unpickle {path}: it contains objects other than tensors ({refusal_reason(e)}); "
            "use a .safetensors copy of it"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FormatError(f"{path} is not a readable torch file: {first}") from None


def refusal_reason(error: Exception) -> str:
    """The first sentence of torch's weights_only refusal that says what was refused."""
    for line in str(error).splitlines():
        line = line.split(_REASON_MARK, 1)[-1].strip()
        line = re.sub(r"\x1b\[[0-9;]*m", "", line)
        if not line or line.startswith(_BOILERPLATE) or "weights_only" in line:
            continue
        sentence = re.split(r"\.\s", line, maxsplit=1)[0].rstrip(".")
        if "weights_only" not in sentence and "safe_globals" not in sentence:
            return sentence
    return "torch's weights-only loader refused it"


def tensor_state_dict(path: Path) -> dict:
    """{name: tensor} of a pickled checkpoint (`torch.save` of a state dict, optionally under "state_dict"),
    loaded with weights_only=True and memory-mapped when it is a zip archive. Refused in one line naming the
    first entry that is not a tensor (an optimizer state, a step counter, a config object)."""
    return checked_state_dict(load_weights_only(path, mmap=True), path)


def checked_state_dict(data: object, path: Path) -> dict:
    """`tensor_state_dict` of an object already loaded from `path` by `load_weights_only`."""
    import torch

    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise FormatError(f"{path} holds a {type(data).__name__}, not a state dict of tensors")
    for key, value in data.items():
        if not isinstance(value, torch.Tensor):
            raise FormatError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor; a checkpoint must "
                              "hold only tensors (save its state_dict, or a .safetensors copy)")
    return data
