"""Synthetic attention maps with a known region of interest, for demos and benchmarks.

Each map mimics what LLaVA's middle layers produce: diffuse background mass, a peak
of attention over the region the answer depends on, and a few attention-sink tokens
that draw large attention whatever the question (flagged by the sink-probe map).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class SyntheticMaps:
    grounding: Tensor  # (B, N) float32
    sink: Tensor  # (B, N) float32
    regions: Tensor  # (B, 4) int64 [row0, col0, row1, col1) planted region, grid cells
    grid_h: int
    grid_w: int


def make_synthetic_maps(
    batch: int, grid_h: int = 24, grid_w: int = 24, *, num_sinks: int = 3, seed: int = 0
) -> SyntheticMaps:
    """A batch of normalised attention maps; one region per map, sized 1/16 to 1/4 of the grid."""
    if batch < 0 or grid_h < 1 or grid_w < 1:
        raise ValueError(f"batch must be >= 0 and the grid >= 1x1, got batch={batch}, grid={grid_h}x{grid_w}")
    gen = torch.Generator().manual_seed(seed)
    n = grid_h * grid_w
    rows = torch.arange(grid_h, dtype=torch.float32)[:, None]
    cols = torch.arange(grid_w, dtype=torch.float32)[None, :]
    grounding = torch.empty(batch, n)
    sink = torch.zeros(batch, n)
    regions = torch.empty(batch, 4, dtype=torch.long)
    for b in range(batch):
        h = int(torch.randint(max(1, grid_h // 8), max(2, grid_h // 2), (1,), generator=gen))
        w = int(torch.randint(max(1, grid_w // 8), max(2, grid_w // 2), (1,), generator=gen))
        r0 = int(torch.randint(0, grid_h - h + 1, (1,), generator=gen))
        c0 = int(torch.randint(0, grid_w - w + 1, (1,), generator=gen))
        regions[b] = torch.tensor([r0, c0, r0 + h, c0 + w])
        # A smooth bump centred on the region, plus low diffuse noise.
        cy, cx = r0 + (h - 1) / 2, c0 + (w - 1) / 2
        bump = torch.exp(-(((rows - cy) / (h / 2)) ** 2 + ((cols - cx) / (w / 2)) ** 2) * 1.5)
        noise = torch.rand(grid_h, grid_w, generator=gen) * 0.08
        weights = bump + noise
        sink_cells = torch.randperm(n, generator=gen)[:num_sinks]  # all cells of a grid that small
        weights.view(-1)[sink_cells] += 5.0  # sinks dominate the raw map
        sink[b, sink_cells] = 0.01 + 0.02 * torch.rand(len(sink_cells), generator=gen)
        grounding[b] = (weights / weights.sum()).view(-1)
    return SyntheticMaps(grounding, sink, regions, grid_h, grid_w)
