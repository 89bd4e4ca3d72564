"""The encoder's token grid laid over the task's images and over crops of them: which cells
a box covers, as a mask (what the auxiliary losses read) or as a pixel box (the crop SD-RPN
takes when its RoI is exactly those cells)."""

from __future__ import annotations

import math
import random

import torch
from torch import Tensor


def tag_cells(box, width: int, grid: int, height: int | None = None) -> Tensor:
    """(grid*grid,) 1.0 on the cells of a width x height image (square when height is None),
    seen through the encoder's grid, that the box [x0, y0, x1, y1) overlaps. A non-square
    image is stretched to the encoder's square, so its cells are non-square too."""
    cw, ch = width / grid, (height or width) / grid
    out = torch.zeros(grid, grid)
    x0, y0, x1, y1 = box
    rows = slice(max(0, int(y0 // ch)), min(grid, int(math.ceil(y1 / ch))))
    cols = slice(max(0, int(x0 // cw)), min(grid, int(math.ceil(x1 / cw))))
    out[rows, cols] = 1.0
    return out.flatten()


def cell_box(box, size: int, grid: int) -> tuple[int, int, int, int]:
    """The cells of the encoder's grid over a size x size image that the box overlaps, in
    source pixels: the crop an RPN that found the target exactly would take."""
    cell = size / grid
    x0, y0 = int(box[0] // cell), int(box[1] // cell)
    x1, y1 = min(grid, math.ceil(box[2] / cell)), min(grid, math.ceil(box[3] / cell))
    return round(x0 * cell), round(y0 * cell), round(x1 * cell), round(y1 * cell)


def grown_cell_box(box, size: int, grid: int, rng: random.Random, grow: float = 0.25) -> tuple[int, int, int, int]:
    """cell_box with each side moved out by one cell (inside the image) with probability
    grow: the crops an RPN takes around a target, exact or a cell too wide."""
    cell = size / grid
    x0, y0, x1, y1 = (round(v / cell) for v in cell_box(box, size, grid))
    x0, y0 = max(0, x0 - (rng.random() < grow)), max(0, y0 - (rng.random() < grow))
    x1, y1 = min(grid, x1 + (rng.random() < grow)), min(grid, y1 + (rng.random() < grow))
    return round(x0 * cell), round(y0 * cell), round(x1 * cell), round(y1 * cell)


def view_coordinates(box, view) -> tuple[float, float, float, float]:
    """box [x0, y0, x1, y1) in the pixels of view (a crop [vx0, vy0, vx1, vy1) of the same image)."""
    return box[0] - view[0], box[1] - view[1], box[2] - view[0], box[3] - view[1]


__all__ = ["cell_box", "grown_cell_box", "tag_cells", "view_coordinates"]
