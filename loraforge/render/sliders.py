"""Using a slider within what its manifest recorded: a scale outside `slider.scale_range` is rendered (the user
asked for it) and said, in one line, through the caller's `warn` (the CLI: a `Warning:` line on stderr)."""

from __future__ import annotations

import warnings
from typing import Optional


def slider_range_problem(manifest, ref: str, scale: float) -> Optional[str]:
    """Why `scale` is outside the slider's recorded `scale_range` (None inside it, or for other kinds)."""
    slider = getattr(manifest, "slider", None) if manifest is not None else None
    if manifest is None or manifest.kind != "slider" or slider is None:
        return None
    low, high = slider.scale_range
    if low <= scale <= high:
        return None
    return (f"slider {ref} at scale {scale:g} is outside its recorded scale range {low:g} .. {high:g}; "
            "images may fall apart there")


def default_warn(message: str) -> None:
    """For library callers that pass no `warn`: a UserWarning."""
    warnings.warn(message, UserWarning, stacklevel=3)
