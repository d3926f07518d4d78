"""Bar charts drawn with PIL: one panel per metric, one labelled bar per artifact, its value written on it.

Metrics live on different scales (a CLIP cosine near 0.3, a judge's probability near 1), so each panel has its
own axis from min(0, lowest) to max(0, highest); bars start at zero, so a negative value hangs below the line.
"""

from __future__ import annotations

from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

from loraforge.errors import ConfigError

# Distinct colours for up to 10 bars, then repeated (the labels under the bars still say which is which).
PALETTE = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c", "#ccb974",
           "#64b5cd"]
BAR_W, BAR_GAP, PLOT_H, PAD = 44, 14, 180, 10


def bar_chart(labels: Sequence[str], metrics: Sequence[str], values: Sequence[Sequence[float]],
              title: str | None = None) -> Image.Image:
    """`values[i][j]` is artifact `labels[i]`'s value of `metrics[j]`: a panel per metric, a bar per artifact."""
    if len(values) != len(labels) or any(len(row) != len(metrics) for row in values):
        raise ConfigError(f"bar_chart: {len(values)} rows of values for {len(labels)} labels and "
                          f"{len(metrics)} metrics")
    if not labels or not metrics:
        raise ConfigError("bar_chart: nothing to draw (no artifacts or no metrics)")
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def size(text: str) -> tuple[int, int]:
        left, top, right, bottom = probe.textbbox((0, 0), text, font=font)
        return right - left, bottom - top

    line = max(size("Ag")[1], 10) + 4
    panel_w = max(len(labels) * (BAR_W + BAR_GAP) + BAR_GAP, max(size(m)[0] for m in metrics) + 2 * PAD)
    legend_w = max(size(f"{i + 1}  {label}")[0] for i, label in enumerate(labels)) + 3 * PAD + line
    title_h = line + PAD if title else 0
    width = len(metrics) * (panel_w + PAD) + PAD + legend_w
    height = title_h + PAD + line + PLOT_H + 2 * line + PAD + line
    chart = Image.new("RGB", (width, max(height, title_h + PAD + len(labels) * (line + 4) + PAD)), "white")
    draw = ImageDraw.Draw(chart)
    if title:
        draw.text((PAD, PAD), title, fill="black", font=font)
    top = title_h + PAD
    for j, metric in enumerate(metrics):
        left = PAD + j * (panel_w + PAD)
        draw.text((left + (panel_w - size(metric)[0]) // 2, top), metric, fill="black", font=font)
        column = [float(row[j]) for row in values]
        low, high = min(0.0, *column), max(0.0, *column)
        span = (high - low) or 1.0
        plot_top = top + line + line  # room for a value written above the highest bar
        plot_h = PLOT_H - line

        def y_of(v: float) -> int:
            return plot_top + round((high - v) / span * plot_h)

        zero = y_of(0.0)
        offset = (panel_w - (len(labels) * (BAR_W + BAR_GAP) + BAR_GAP)) // 2  # bars centred under the title
        draw.rectangle([left, plot_top, left + panel_w - 1, plot_top + plot_h], outline="#cccccc")
        for i, value in enumerate(column):
            x0 = left + offset + BAR_GAP + i * (BAR_W + BAR_GAP)
            y = y_of(value)
            draw.rectangle([x0, min(y, zero), x0 + BAR_W, max(y, zero)], fill=PALETTE[i % len(PALETTE)])
            text = f"{value:.3g}"
            tw, th = size(text)
            ty = y - th - 4 if value >= 0 else y + 2
            draw.text((x0 + (BAR_W - tw) // 2, ty), text, fill="black", font=font)
            number = str(i + 1)
            draw.text((x0 + (BAR_W - size(number)[0]) // 2, plot_top + plot_h + 4), number, fill="black", font=font)
        draw.line([left, zero, left + panel_w - 1, zero], fill="black")
    legend_left = PAD + len(metrics) * (panel_w + PAD) + PAD
    for i, label in enumerate(labels):
        y = top + i * (line + 4)
        draw.rectangle([legend_left, y, legend_left + line - 4, y + line - 4], fill=PALETTE[i % len(PALETTE)])
        draw.text((legend_left + line + 2, y), f"{i + 1}  {label}", fill="black", font=font)
    return chart
