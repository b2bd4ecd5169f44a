"""Qualitative overlays: panoptic predictions drawn over the image with a legend
(unseen classes marked with ``*``)."""

from __future__ import annotations

import colorsys

import numpy as np
from PIL import Image, ImageDraw

from pading.classes import ClassTable

LEGEND_ROW_HEIGHT = 12
OVERLAY_ALPHA = 0.55


def class_colour(index: int) -> tuple[int, int, int]:
    """A stable, well-spread colour for class ``index`` (golden-ratio hues)."""
    hue = (index * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.75, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def overlay_panoptic(image: np.ndarray, segment_ids: np.ndarray, segments: list[dict], table: ClassTable,
                     scale: int = 4) -> Image.Image:
    """(H, W, 3) image + (H, W) segment ids -> the blended picture, upscaled ``scale``×
    for small images, with a legend of the classes present below it."""
    base = image.astype(np.float32)
    colours = np.zeros_like(base)
    covered = np.zeros(segment_ids.shape, dtype=bool)
    present: dict[int, tuple[int, int, int]] = {}
    for segment in segments:
        index = int(segment["class_index"]) if "class_index" in segment else table.index_of_id(segment["category_id"])
        colour = class_colour(index)
        mask = segment_ids == segment["id"]
        colours[mask] = colour
        covered |= mask
        present[index] = colour
    blended = base.copy()
    blended[covered] = (1 - OVERLAY_ALPHA) * base[covered] + OVERLAY_ALPHA * colours[covered]
    picture = Image.fromarray(blended.clip(0, 255).astype(np.uint8))
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    legend_height = LEGEND_ROW_HEIGHT * max(1, len(present)) + 4
    canvas = Image.new("RGB", (max(picture.width, 160), picture.height + legend_height), "white")
    canvas.paste(picture, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for row, (index, colour) in enumerate(sorted(present.items())):
        y = picture.height + 2 + row * LEGEND_ROW_HEIGHT
        draw.rectangle([2, y, 12, y + 9], fill=colour)
        info = table[index]
        draw.text((16, y - 1), f"{info.text}{' *' if info.unseen else ''}", fill="black")
    return canvas
