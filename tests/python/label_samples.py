"""Sample inputs for the pseudo-label op: one generator feeds every pseudo-label test."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# Quantised values (multiples of 1/8) make exact ties with fg_ratio=0.25, bg_ratio=0.125
# in every dtype; the sink levels straddle the threshold 1e-3 and hit it exactly.
VALUE_LEVELS = torch.tensor([0.0, 0.125, 0.25, 0.375, 0.5, 1.0])
SINK_LEVELS = torch.tensor([0.0, 5e-4, 1e-3, 2e-3])


@dataclass
class LabelInputs:
    grounding: Tensor
    sink: Tensor
    grid_h: int
    grid_w: int


def _strided(x: Tensor) -> Tensor:
    """The same values, every other element of a wider buffer (non-contiguous)."""
    out = x.new_zeros(x.shape[0], 2 * x.shape[1])[:, ::2]
    return out.copy_(x)


def make_label_inputs(
    batch: int, grid_h: int, grid_w: int, *, dtype=torch.float32, device="cpu", seed: int = 0, strided: bool = False
) -> LabelInputs:
    """A batch mixing the cases that matter: random quantised maps with ties, blobs of
    attention in a box, all-zero maps, all-sink maps, and continuous random maps."""
    gen = torch.Generator().manual_seed(seed)
    n = grid_h * grid_w
    kind = torch.randint(0, 5, (batch,), generator=gen)
    quantised = VALUE_LEVELS[torch.randint(0, len(VALUE_LEVELS), (batch, n), generator=gen)]
    continuous = torch.rand(batch, n, generator=gen) ** 4
    grounding = torch.where((kind == 4)[:, None], continuous, quantised)
    sink = SINK_LEVELS[torch.randint(0, len(SINK_LEVELS), (batch, n), generator=gen)]
    sink = torch.where(torch.rand(batch, n, generator=gen) < 0.8, torch.zeros(()), sink)
    for b in torch.nonzero(kind == 1).flatten().tolist():  # a blob of attention in a random box
        h = int(torch.randint(1, grid_h + 1, (1,), generator=gen))
        w = int(torch.randint(1, grid_w + 1, (1,), generator=gen))
        r = int(torch.randint(0, grid_h - h + 1, (1,), generator=gen))
        c = int(torch.randint(0, grid_w - w + 1, (1,), generator=gen))
        grid = grounding[b].view(grid_h, grid_w)
        grid.mul_(0.05)
        grid[r : r + h, c : c + w] += 1.0
    grounding[kind == 2] = 0.0
    sink[kind == 3] = 1.0
    grounding = grounding.to(dtype=dtype, device=device)
    sink = sink.to(dtype=dtype, device=device)
    if strided:
        grounding, sink = _strided(grounding), _strided(sink)
    return LabelInputs(grounding, sink, grid_h, grid_w)
