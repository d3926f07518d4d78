"""Rasterising the shapes in integer arithmetic, so an image is bit-identical on every machine.

Geometry is in sub-pixel units (`UNITS` per pixel) and every test is an integer comparison; each pixel
is covered by `SUPERSAMPLE`² samples and blended with integer rounding. No floating point and no libm
(whose sin/cos may differ in the last bit between platforms) touches a pixel: polygon vertices come from
fixed unit vectors given in thousandths.
"""

from __future__ import annotations

import numpy as np

SUPERSAMPLE = 4
UNITS = 2 * SUPERSAMPLE  # sample centres sit at odd multiples of 1 / (2 * SUPERSAMPLE) pixel

_TRIANGLE = ((0, -1000), (866, 500), (-866, 500))
# A five-pointed star: outer points at radius 1, inner ones at radius 0.42, alternating.
_STAR = ((0, -1000), (247, -340), (951, -309), (400, 130), (588, 809), (0, 420), (-588, 809),
         (-400, 130), (-951, -309), (-247, -340))


# Every shape lies within this many radii (in hundredths) of its centre, in x and in y.
_REACH = 125


def sample_grid(resolution: int, box: tuple[int, int, int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """x and y (int64, sub-pixel units) of every sample of a `resolution`² image, or of the pixels
    `box` = (x0, y0, x1, y1) (end exclusive) of it."""
    x0, y0, x1, y1 = box or (0, 0, resolution, resolution)
    xs = np.arange(x0 * SUPERSAMPLE, x1 * SUPERSAMPLE, dtype=np.int64) * 2 + 1
    ys = np.arange(y0 * SUPERSAMPLE, y1 * SUPERSAMPLE, dtype=np.int64) * 2 + 1
    return np.meshgrid(xs, ys, indexing="xy")


def _in_convex(x, y, vertices) -> np.ndarray:
    """Samples inside (or on) the convex polygon `vertices` (absolute units, either winding)."""
    signs = []
    for (ax, ay), (bx, by) in zip(vertices, vertices[1:] + vertices[:1]):
        signs.append((bx - ax) * (y - ay) - (by - ay) * (x - ax))
    return np.logical_or(np.all([s >= 0 for s in signs], axis=0), np.all([s <= 0 for s in signs], axis=0))


def _scaled(cx: int, cy: int, r: int, unit_vertices) -> list[tuple[int, int]]:
    return [(cx + (r * ux) // 1000, cy + (r * uy) // 1000) for ux, uy in unit_vertices]


def shape_mask(shape: str, x, y, cx: int, cy: int, r: int) -> np.ndarray:
    """Boolean mask of the samples `shape` centred at (cx, cy) with radius `r` (all in units) covers."""
    dx, dy = x - cx, y - cy
    d2 = dx * dx + dy * dy
    if shape == "circle":
        return d2 <= r * r
    if shape == "ring":
        inner = r * 58 // 100
        return (d2 <= r * r) & (d2 >= inner * inner)
    if shape == "square":
        half = r * 80 // 100
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    if shape == "cross":
        arm = r * 32 // 100
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= r)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= r))
    if shape == "triangle":
        return _in_convex(x, y, _scaled(cx, cy + r * 12 // 100, r * 112 // 100, _TRIANGLE))
    if shape == "star":
        points = _scaled(cx, cy + r * 8 // 100, r * 110 // 100, _STAR)
        mask = np.zeros(x.shape, dtype=bool)
        for k in range(len(points)):
            mask |= _in_convex(x, y, [(cx, cy + r * 8 // 100), points[k], points[(k + 1) % len(points)]])
        return mask
    if shape == "heart":
        lobe = r * 52 // 100
        left = (dx + r * 48 // 100) ** 2 + (dy + r * 30 // 100) ** 2 <= lobe * lobe
        right = (dx - r * 48 // 100) ** 2 + (dy + r * 30 // 100) ** 2 <= lobe * lobe
        point = _in_convex(x, y, [(cx - r * 97 // 100, cy - r * 14 // 100), (cx + r * 97 // 100, cy - r * 14 // 100),
                                  (cx, cy + r * 95 // 100)])
        return left | right | point
    raise ValueError(f"unknown shape {shape!r}")


def coverage(mask: np.ndarray, height: int, width: int | None = None) -> np.ndarray:
    """Samples covered per pixel (0 … SUPERSAMPLE²) of a mask over height x width pixels."""
    s = SUPERSAMPLE
    return mask.reshape(height, s, width or height, s).sum(axis=(1, 3), dtype=np.int64)


def shape_coverage(shape: str, cx: int, cy: int, r: int, resolution: int) -> np.ndarray:
    """Samples covered per pixel of a `resolution`² image by `shape` (centre and radius in units).

    Only the pixels within the shape's reach are tested; the others are exactly uncovered, so the
    result equals testing every sample of the image (which `tests/test_world.py` checks)."""
    reach = r * _REACH // 100
    x0, y0 = max(0, (cx - reach) // UNITS - 1), max(0, (cy - reach) // UNITS - 1)
    x1, y1 = min(resolution, (cx + reach) // UNITS + 2), min(resolution, (cy + reach) // UNITS + 2)
    cover = np.zeros((resolution, resolution), dtype=np.int64)
    if x1 > x0 and y1 > y0:
        x, y = sample_grid(resolution, (x0, y0, x1, y1))
        cover[y0:y1, x0:x1] = coverage(shape_mask(shape, x, y, cx, cy, r), y1 - y0, x1 - x0)
    return cover


def blend(background: np.ndarray, colour: tuple[int, int, int], cover: np.ndarray) -> np.ndarray:
    """`colour` laid over the uint8 RGB `background` in proportion to `cover`, with integer rounding."""
    full = SUPERSAMPLE * SUPERSAMPLE
    fg = np.asarray(colour, dtype=np.int64)
    out = (background.astype(np.int64) * (full - cover[..., None]) + fg * cover[..., None] + full // 2) // full
    return out.astype(np.uint8)
