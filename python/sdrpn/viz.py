"""Pictures of maps and labels: small PNG grids for people to look at."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw
from torch import Tensor

from .io_utils import write_atomic

LABEL_COLOURS = {1: (230, 60, 40), 0: (40, 90, 200)}  # foreground red, background blue
IGNORE_COLOUR = (150, 150, 150)


def heat_rgb(values: np.ndarray) -> np.ndarray:
    """(H, W) float -> (H, W, 3) uint8, dark blue (low) through yellow (high)."""
    v = values.astype(np.float64)
    span = v.max() - v.min()
    t = (v - v.min()) / span if span > 0 else np.zeros_like(v)
    rgb = np.stack([t ** 0.5, t, 0.35 * (1 - t) + 0.1], axis=-1)
    return (rgb * 255).clip(0, 255).astype(np.uint8)


def label_rgb(labels: np.ndarray) -> np.ndarray:
    """(H, W) int labels -> (H, W, 3) uint8."""
    out = np.empty((*labels.shape, 3), dtype=np.uint8)
    out[:] = IGNORE_COLOUR
    for value, colour in LABEL_COLOURS.items():
        out[labels == value] = colour
    return out


def sink_rgb(is_sink: np.ndarray) -> np.ndarray:
    out = np.full((*is_sink.shape, 3), 20, dtype=np.uint8)
    out[is_sink] = (255, 255, 255)
    return out


def _tile(rgb: np.ndarray, cell: int) -> Image.Image:
    return Image.fromarray(rgb).resize((rgb.shape[1] * cell, rgb.shape[0] * cell), Image.NEAREST)


def save_atomic(image: Image.Image, path: str) -> None:
    """Write through a temporary file in the same folder, then rename: never a half PNG."""
    write_atomic(path, lambda tmp: image.save(tmp, format="PNG"))


def label_grid(grounding: Tensor, is_sink: Tensor, labels: Tensor, grid_h: int, grid_w: int,
               regions: Sequence[Sequence[int]] | None = None, cell: int = 6) -> Image.Image:
    """One row per sample: attention map, sink tokens, labels (planted region outlined)."""
    batch = grounding.shape[0]
    pad = 4
    tile_w, tile_h = grid_w * cell, grid_h * cell
    sheet = Image.new("RGB", (3 * tile_w + 4 * pad, batch * (tile_h + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for b in range(batch):
        g = grounding[b].float().cpu().numpy().reshape(grid_h, grid_w)
        s = is_sink[b].cpu().numpy().reshape(grid_h, grid_w)
        lab = labels[b].cpu().numpy().reshape(grid_h, grid_w)
        y = pad + b * (tile_h + pad)
        for col, rgb in enumerate((heat_rgb(g), sink_rgb(s), label_rgb(lab))):
            x = pad + col * (tile_w + pad)
            sheet.paste(_tile(rgb, cell), (x, y))
            if regions is not None:
                r0, c0, r1, c1 = (int(v) for v in regions[b])
                draw.rectangle([x + c0 * cell, y + r0 * cell, x + c1 * cell - 1, y + r1 * cell - 1],
                               outline=(0, 220, 0))
    return sheet


def overlay_panel(image: Image.Image, grounding: np.ndarray, labels: np.ndarray,
                  is_sink: np.ndarray, size: int = 336) -> Image.Image:
    """The (already padded-to-square) image with the grounding heat map blended in, sink
    cells crossed and the label of every cell as a coloured outline."""
    base = image.convert("RGB").resize((size, size), Image.BICUBIC)
    heat = Image.fromarray(heat_rgb(grounding)).resize((size, size), Image.BILINEAR)
    panel = Image.blend(base, heat, 0.45)
    draw = ImageDraw.Draw(panel)
    grid_h, grid_w = grounding.shape
    ch, cw = size / grid_h, size / grid_w
    for r in range(grid_h):
        for c in range(grid_w):
            box = [c * cw + 1, r * ch + 1, (c + 1) * cw - 2, (r + 1) * ch - 2]
            if labels[r, c] == 1:
                draw.rectangle(box, outline=LABEL_COLOURS[1], width=2)
            if is_sink[r, c]:
                draw.line([box[0], box[1], box[2], box[3]], fill=(255, 255, 255), width=2)
                draw.line([box[0], box[3], box[2], box[1]], fill=(255, 255, 255), width=2)
    return panel


def roi_overlay(image: Image.Image, prob: np.ndarray, boxes, mode: str = "pad", size: int = 336,
                max_side: int = 768) -> Image.Image:
    """The source image with the RPN's probability of every grid cell blended in and the
    RoI boxes (source pixels) drawn in red."""
    from .boxes import grid_box_to_pixels

    image = image.convert("RGB")
    scale = min(1.0, max_side / max(image.size))
    shown = image.resize((max(1, int(image.width * scale)), max(1, int(image.height * scale))))
    heat = Image.new("RGBA", shown.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(heat)
    grid_h, grid_w = prob.shape
    for r in range(grid_h):
        for c in range(grid_w):
            x0, y0, x1, y1 = grid_box_to_pixels((c, r, c + 1, r + 1), grid_h, grid_w, image.width,
                                                image.height, size, mode)
            if x1 > x0 and y1 > y0:
                alpha = int(170 * float(np.clip(prob[r, c], 0.0, 1.0)))
                draw.rectangle([x0 * scale, y0 * scale, x1 * scale, y1 * scale], fill=(255, 200, 0, alpha))
    out = Image.alpha_composite(shown.convert("RGBA"), heat).convert("RGB")
    draw = ImageDraw.Draw(out)
    for x0, y0, x1, y1 in boxes:
        draw.rectangle([x0 * scale, y0 * scale, x1 * scale - 1, y1 * scale - 1], outline=(230, 30, 30), width=3)
    return out
