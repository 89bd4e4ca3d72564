"""The picture of an answer's RoI: the RPN's probabilities over the source image and the
boxes it cropped."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from ..llava.geometry import grid_box_to_pixels


def roi_overlay(
    image: Image.Image, prob: np.ndarray, boxes, mode: str = "pad", size: int = 336, max_side: int = 768
) -> Image.Image:
    """The source image with the RPN's probability of every grid cell blended in and the
    RoI boxes (source pixels) drawn in red."""
    image = image.convert("RGB")
    scale = min(1.0, max_side / max(image.size))
    shown = image.resize((max(1, int(image.width * scale)), max(1, int(image.height * scale))))
    heat = Image.new("RGBA", shown.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(heat)
    grid_h, grid_w = prob.shape
    for r in range(grid_h):
        for c in range(grid_w):
            x0, y0, x1, y1 = grid_box_to_pixels(
                (c, r, c + 1, r + 1), grid_h, grid_w, image.width, image.height, size, mode
            )
            if x1 > x0 and y1 > y0:
                alpha = int(170 * float(np.clip(prob[r, c], 0.0, 1.0)))
                draw.rectangle([x0 * scale, y0 * scale, x1 * scale, y1 * scale], fill=(255, 200, 0, alpha))
    out = Image.alpha_composite(shown.convert("RGBA"), heat).convert("RGB")
    draw = ImageDraw.Draw(out)
    for x0, y0, x1, y1 in boxes:
        # The last pixel inside; a box of zero size (a region wholly in the padding) as a line.
        right, bottom = max(x0 * scale, x1 * scale - 1), max(y0 * scale, y1 * scale - 1)
        draw.rectangle([x0 * scale, y0 * scale, right, bottom], outline=(230, 30, 30), width=3)
    return out
