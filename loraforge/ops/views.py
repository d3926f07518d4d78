"""What every view of a checkpoint in another layout shares: it names, digests and places the checkpoint it reads."""

from __future__ import annotations

from typing import Optional


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
