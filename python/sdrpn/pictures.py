"""Picture primitives shared by every stage: colour maps for attention and labels, and
atomic picture writes."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from .io_utils import write_atomic

LABEL_COLOURS = {1: (230, 60, 40), 0: (40, 90, 200)}  # foreground red, background blue
IGNORE_COLOUR = (150, 150, 150)


def heat_rgb(values: np.ndarray) -> np.ndarray:
    """(H, W) float -> (H, W, 3) uint8, dark blue (low) through yellow (high)."""
    v = values.astype(np.float64)
    span = v.max() - v.min()
    t = (v - v.min()) / span if span > 0 else np.zeros_like(v)
    rgb = np.stack([t**0.5, t, 0.35 * (1 - t) + 0.1], axis=-1)
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


def tile(rgb: np.ndarray, cell: int) -> Image.Image:
    return Image.fromarray(rgb).resize((rgb.shape[1] * cell, rgb.shape[0] * cell), Image.NEAREST)


def save_atomic(image: Image.Image, path: str) -> None:
    """Write through a temporary file in the same folder, then rename: never a half picture.
    The format is the one the file name's extension names (PNG for a name without one
    that Pillow knows)."""
    extension = os.path.splitext(path)[1].lower()
    picture_format = Image.registered_extensions().get(extension, "PNG")
    write_atomic(path, lambda tmp: image.save(tmp, format=picture_format))
