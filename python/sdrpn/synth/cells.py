"""The encoder's token grid laid over the task's images and over crops of them: which cells
a box covers, as a mask (what the auxiliary losses read) or as a pixel box (the crop SD-RPN
takes when its RoI is exactly those cells)."""

from __future__ import annotations

import math
import random

import torch
from torch import Tensor


def cell_span(box, grid: int, width: float, height: float | None = None) -> tuple[int, int, int, int]:
    """The cells [c0, r0, c1, r1) of the encoder's grid over a width x height image (square
    when height is None) that the box [x0, y0, x1, y1) overlaps, clipped to the grid."""
    cw, ch = width / grid, (height or width) / grid
    x0, y0, x1, y1 = box
    return (
        max(0, int(x0 // cw)),
        max(0, int(y0 // ch)),
        min(grid, math.ceil(x1 / cw)),
        min(grid, math.ceil(y1 / ch)),
    )


def tag_cells(box, width: int, grid: int, height: int | None = None) -> Tensor:
    """(grid*grid,) 1.0 on the cells of a width x height image (square when height is None),
    seen through the encoder's grid, that the box overlaps. A non-square image is stretched to
    the encoder's square, so its cells are non-square too."""
    c0, r0, c1, r1 = cell_span(box, grid, width, height)
    out = torch.zeros(grid, grid)
    out[r0:r1, c0:c1] = 1.0
    return out.flatten()


def _pixels(span, size: int, grid: int) -> tuple[int, int, int, int]:
    cell = size / grid
    return tuple(round(v * cell) for v in span)


def cell_box(box, size: int, grid: int) -> tuple[int, int, int, int]:
    """The cells of the encoder's grid over a size x size image that the box overlaps, in
    source pixels: the crop an RPN that found the target exactly would take."""
    return _pixels(cell_span(box, grid, size), size, grid)


def grown_cell_box(box, size: int, grid: int, rng: random.Random, grow: float = 0.25) -> tuple[int, int, int, int]:
    """cell_box with each side moved out by one cell (inside the image) with probability
    grow: the crops an RPN takes around a target, exact or a cell too wide."""
    x0, y0, x1, y1 = cell_span(box, grid, size)
    x0, y0 = max(0, x0 - (rng.random() < grow)), max(0, y0 - (rng.random() < grow))
    x1, y1 = min(grid, x1 + (rng.random() < grow)), min(grid, y1 + (rng.random() < grow))
    return _pixels((x0, y0, x1, y1), size, grid)


def view_coordinates(box, view) -> tuple[float, float, float, float]:
    """box [x0, y0, x1, y1) in the pixels of view (a crop [vx0, vy0, vx1, vy1) of the same image)."""
    return box[0] - view[0], box[1] - view[1], box[2] - view[0], box[3] - view[1]


__all__ = ["cell_box", "cell_span", "grown_cell_box", "tag_cells", "view_coordinates"]
