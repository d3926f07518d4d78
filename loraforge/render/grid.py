"""Labelled image grids: one row per label, one column per label, an optional title (renders and validation)."""

from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont

from loraforge.errors import ConfigError

MIN_GRID_CELL = 128
GRID_GAP = 4  # white pixels between cells, so neighbouring images read as separate


def image_grid(
    images: list[list[Image.Image]],
    row_labels: list[str],
    col_labels: list[str],
    title: str | None = None,
) -> Image.Image:
    """A labelled grid: one row per `row_labels`, one column per `col_labels`, optional title on top.

    A column label may have several lines ("age=+1.5\nsmile=-0.5"); each is shortened to the cell's width.
    Small images are scaled up (nearest neighbour) to cells of at least 128 px so the labels stay readable.
    """
    if len(images) != len(row_labels):
        raise ConfigError(f"image_grid: {len(images)} rows of images but {len(row_labels)} row labels")
    for i, row in enumerate(images):
        if len(row) != len(col_labels):
            raise ConfigError(f"image_grid: row {i} has {len(row)} images but there are {len(col_labels)} column labels")
    cell_w = max((im.width for row in images for im in row), default=MIN_GRID_CELL)
    cell_h = max((im.height for row in images for im in row), default=MIN_GRID_CELL)
    scale = max(1, -(-MIN_GRID_CELL // min(cell_w, cell_h)))  # ceil division
    cell_w, cell_h = cell_w * scale, cell_h * scale

    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def text_size(text: str) -> tuple[int, int]:
        left, top, right, bottom = probe.textbbox((0, 0), text, font=font)
        return right - left, bottom - top

    pad = 6
    line_h = max(text_size("Ag")[1], 10) + 2 * pad
    label_w = max([text_size(t)[0] for t in row_labels] + [0]) + 2 * pad
    title_h = line_h if title else 0
    text_h = line_h - 2 * pad
    header_lines = max([len(label.split("\n")) for label in col_labels] + [1])
    header_h = line_h + (header_lines - 1) * text_h
    width = label_w + (cell_w + GRID_GAP) * len(col_labels) - GRID_GAP
    height = title_h + header_h + (cell_h + GRID_GAP) * len(row_labels) - GRID_GAP

    grid = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(grid)
    if title:
        draw.text((pad, pad), title, fill="black", font=font)
    for j, label in enumerate(col_labels):
        for k, line in enumerate(label.split("\n")):
            draw.text((label_w + j * (cell_w + GRID_GAP) + pad, title_h + pad + k * text_h),
                      _fit(line, cell_w - 2 * pad, text_size), fill="black", font=font)
    for i, (label, row) in enumerate(zip(row_labels, images)):
        top = title_h + header_h + i * (cell_h + GRID_GAP)
        draw.text((pad, top + cell_h // 2 - line_h // 2 + pad), label, fill="black", font=font)
        for j, im in enumerate(row):
            cell = im.convert("RGB").resize((im.width * scale, im.height * scale), Image.NEAREST)
            grid.paste(cell, (label_w + j * (cell_w + GRID_GAP), top))
    return grid


def _fit(text: str, max_width: int, text_size) -> str:
    """`text`, shortened with an ellipsis until it fits `max_width` pixels."""
    if text_size(text)[0] <= max_width:
        return text
    while text and text_size(text + "...")[0] > max_width:
        text = text[:-1]
    return text + "..."
