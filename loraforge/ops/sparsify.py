"""TIES and DARE: the sparsify-and-combine rules on task vectors (deltas), shared by checkpoint merges
(τᵢ = modelᵢ − base, per tensor) and LoRA merges (τᵢ = the dense ΔWᵢ of a module), so both families
compute the same numbers for the same deltas and weights.

TIES (Yadav et al. 2023; the semantics of PEFT `merge_utils.ties` and mergekit `ties`):
  trim    τ̂ᵢ = τᵢ with all but the k = ⌊density·n⌋ largest magnitudes zeroed (entries tied with the
          k-th largest magnitude are all kept, so the result does not depend on a sort order);
  weight  tᵢ = wᵢ·τ̂ᵢ;
  elect   s = +1 where Σᵢ tᵢ ≥ 0, else −1 (the sign of the summed weighted mass);
  merge   the mean of the tᵢ that are non-zero with sign s — divided by how many agree, not by the sum of
          their weights, so one model gives w·τ̂ and the weights scale the result as they do everywhere else.
  A checkpoint merge then adds α times this to the base.

DARE (Yu et al. 2023): each entry of τᵢ is kept with probability 1 − p and the kept ones are divided by
1 − p; the result is Σᵢ wᵢ·DARE(τᵢ). The keep mask is a function of (seed, tensor key, task index i,
element) alone: rows of the tensor are grouped into fixed blocks of about DARE_BLOCK_ELEMENTS elements
(the block size depends only on the tensor's shape), and block b of task i is drawn by its own generator
seeded from (seed, key, i, b). A streamed merge that reads the tensor in row chunks of any size draws
exactly the same mask. The key is the checkpoint key (`unet/<name>.weight` in a diffusers folder, the
tensor name in a single file); a LoRA module `unet.<path>` uses `unet/<path>.weight`, so the LoRA merge
and a diffusers-folder merge of the same deltas draw the same masks. i counts the task models (the
base excluded) or the adapters, from 0.
"""

from __future__ import annotations

import hashlib
import math
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:  # torch is imported by the functions: the Params models import without it
    import torch
    from torch import Tensor

from pydantic import Field

from loraforge.errors import ConfigError
from loraforge.ops.method_params import MethodParams

# Rows per DARE block: about this many elements (a whole row when rows are longer; a smaller tensor is one
# block). A streamed merge whose chunks are whole blocks draws each block once, in one call (the checkpoint
# DARE asks for such chunks); other chunkings draw the same masks, a little slower. Large blocks keep the
# per-chunk overhead of a streamed merge small; changing the size changes every mask.
DARE_BLOCK_ELEMENTS = 8 << 20


class TiesParams(MethodParams):
    """TIES parameters, one default for checkpoint and LoRA merges (the paper's top 20%)."""

    density: float = Field(0.2, ge=0, le=1, description="fraction of each task delta kept, 0 to 1")


class DareParams(MethodParams):
    """DARE parameters, one default for checkpoint and LoRA merges (the paper's p = 0.9)."""

    drop_rate: float = Field(0.9, ge=0, lt=1, description="probability of dropping each entry, in [0, 1)")
    seed: int = Field(0, description="seed of the drop masks, an integer")


def trim_to_density(tau: Tensor, density: float) -> Tensor:
    """τ with all but its k = ⌊density·n⌋ largest-magnitude entries zeroed (ties with the k-th all kept)."""
    import torch

    n = tau.numel()
    k = int(density * n)
    if k >= n:
        return tau
    if k <= 0:
        return torch.zeros_like(tau)
    magnitude = tau.abs()
    threshold = torch.kthvalue(magnitude.flatten(), n - k + 1).values
    return tau * (magnitude >= threshold)


def ties_merge(taus: list[Tensor], weights: list[float], density: float) -> Tensor:
    """TIES of the deltas `taus` with `weights`: trim, weight, elect the sign, mean of the agreeing entries."""
    import torch

    kept = torch.stack([trim_to_density(t, density) * float(w) for t, w in zip(taus, weights)])
    elected = torch.where(kept.sum(0) >= 0, 1.0, -1.0).to(kept.dtype)
    agree = (kept * elected) > 0  # non-zero and of the elected sign
    return (kept * agree).sum(0) / agree.sum(0).clamp(min=1)


def check_drop_rate(drop_rate: float) -> float:
    p = float(drop_rate)
    if not 0.0 <= p < 1.0:
        raise ConfigError(f"DARE drop_rate {drop_rate} must be in [0, 1), e.g. drop_rate=0.9")
    return p


def _block_generator(seed: int, key: str, index: int, block: int) -> torch.Generator:
    import torch

    digest = hashlib.blake2b(f"{seed}:{key}:{index}:{block}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little"))


def dare_keep(seed: int, key: str, index: int, drop_rate: float, shape: tuple[int, ...],
              rows: Optional[tuple[int, int]] = None) -> Tensor:
    """The DARE keep mask (True = kept) of task `index` on tensor `key` of full `shape`, or of its row
    range `rows` = (start, stop); the same entries whatever ranges it is asked for in."""
    import torch

    p = check_drop_rate(drop_rate)
    shape = tuple(shape)
    n_rows = shape[0] if shape else 1
    row_len = math.prod(shape[1:]) if shape else 1
    start, stop = rows if rows is not None else (0, n_rows)
    chunk_shape = ((stop - start, *shape[1:]) if shape else ())
    if stop <= start or row_len == 0:
        return torch.ones(chunk_shape, dtype=torch.bool)
    per_block = max(1, min(n_rows, DARE_BLOCK_ELEMENTS // row_len))
    parts = []
    for block in range(start // per_block, (stop - 1) // per_block + 1):
        first = block * per_block
        size = min(per_block, n_rows - first)
        u = torch.rand((size, row_len), generator=_block_generator(seed, key, index, block))
        parts.append(u[max(start, first) - first: min(stop, first + size) - first])
    u = parts[0] if len(parts) == 1 else torch.cat(parts)
    return (u >= p).reshape(chunk_shape)


def dare_merge(taus: list[Tensor], weights: list[float], drop_rate: float, keeps: list[Tensor]) -> Tensor:
    """Σᵢ wᵢ·τᵢ·keepᵢ / (1 − p)."""
    import torch

    p = check_drop_rate(drop_rate)
    out = torch.zeros_like(taus[0])
    for tau, w, keep in zip(taus, weights, keeps):
        out.add_(tau * keep, alpha=float(w))
    return out.div_(1.0 - p)


def lora_key(module: str) -> str:
    """The checkpoint key a LoRA module's DARE masks are drawn for: `unet.a.b` → `unet/a.b.weight`."""
    component, _, path = module.partition(".")
    return f"{component}/{path}.weight"
