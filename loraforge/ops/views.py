"""What every view of a checkpoint in another layout shares: it names, digests and places the checkpoint it reads,
and gives its tensors' infos and sizes."""

from __future__ import annotations

from typing import Optional

import torch


class CheckpointView:
    """A checkpoint seen in another layout (`self.source` is the Checkpoint read): its reference, path, family and
    digest are the source's (setting the digest sets the source's)."""

    source = None

    ref = property(lambda self: self.source.ref)
    path = property(lambda self: self.source.path)
    family = property(lambda self: self.source.family)

    @property
    def digest(self) -> Optional[str]:
        return self.source.digest

    @digest.setter
    def digest(self, value: Optional[str]) -> None:
        self.source.digest = value

    def info(self, ckey: str):
        """The TensorInfo of a tensor as the view shows it (`self._infos`: key → TensorInfo)."""
        return self._infos[ckey]

    def span(self, ckey: str, rows: Optional[tuple[int, int]] = None) -> tuple[int, int, list[int]]:
        """(offset, bytes, shape) of a tensor as the view shows it, or of its rows `rows`: a view has no file
        offsets, so 0."""
        info = self._infos[ckey]
        shape = list(info.shape)
        if rows is not None and shape:
            shape[0] = rows[1] - rows[0]
        numel = 1
        for size in shape:
            numel *= size
        return 0, numel * torch.empty((), dtype=info.torch_dtype).element_size(), shape
