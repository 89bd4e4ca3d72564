"""What a user would write without our kernels: plain-PyTorch versions of the ops."""

from __future__ import annotations

import torch
from torch import Tensor


def pseudo_labels_torch(
    grounding: Tensor,
    sink: Tensor,
    grid_h: int,
    grid_w: int,
    sink_threshold: float = 1e-3,
    fg_ratio: float = 0.2,
    bg_ratio: float = 0.1,
    max_box_fraction: float = 0.5,
    ignore_index: int = -100,
) -> Tensor:
    """Batched, vectorised pseudo labels with torch ops (same rules as sdrpn.ops.pseudo_labels)."""
    dt = torch.float64 if grounding.dtype == torch.float64 else torch.float32
    g, s = grounding.to(dt), sink.to(dt)
    b, n = g.shape
    finite = torch.isfinite(g).all(1) & torch.isfinite(s).all(1)
    gs = torch.where(s >= torch.tensor(sink_threshold, dtype=dt), torch.zeros((), dtype=dt), g)
    m = gs.amax(1, keepdim=True)
    fg = gs > torch.tensor(fg_ratio, dtype=dt) * m
    grid = fg.view(b, grid_h, grid_w)
    rows, cols = grid.any(2), grid.any(1)
    r = torch.arange(grid_h, device=g.device)
    c = torch.arange(grid_w, device=g.device)
    empty = ~rows.any(1)
    r0 = torch.where(empty, 0, torch.where(rows, r, grid_h).amin(1))
    r1 = torch.where(empty, grid_h - 1, torch.where(rows, r, -1).amax(1))
    c0 = torch.where(empty, 0, torch.where(cols, c, grid_w).amin(1))
    c1 = torch.where(empty, grid_w - 1, torch.where(cols, c, -1).amax(1))
    too_large = (r1 - r0 + 1) * (c1 - c0 + 1) >= max_box_fraction * n
    inside = (
        (r[None, :, None] >= r0[:, None, None])
        & (r[None, :, None] <= r1[:, None, None])
        & (c[None, None, :] >= c0[:, None, None])
        & (c[None, None, :] <= c1[:, None, None])
    )
    bg = ~inside.view(b, n) & (gs < torch.tensor(bg_ratio, dtype=dt) * m)
    labels = torch.full((b, n), ignore_index, dtype=torch.long, device=g.device)
    labels[bg] = 0
    labels[fg] = 1
    labels[~finite | too_large] = ignore_index
    return labels


def massive_activation_sinks_torch(hidden: Tensor, dims, tau: float = 20.0, eps: float = 1e-6) -> Tensor:
    """RMS-normalise in float32, then compare the probed dims: three passes and a full copy."""
    h = hidden.float()
    normed = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return normed[..., list(dims)].abs().amax(-1) > tau


def pseudo_labels_per_sample(grounding: Tensor, sink: Tensor, grid_h: int, grid_w: int) -> list[Tensor]:
    """The reference's way: one sample at a time, as its label script walks its records."""
    return [
        pseudo_labels_torch(grounding[i : i + 1], sink[i : i + 1], grid_h, grid_w)[0] for i in range(grounding.shape[0])
    ]


def rpn_scores_naive(
    query_states: Tensor, visual_states: Tensor, q_weight: Tensor, k_weight: Tensor, num_heads: int
) -> Tensor:
    """The reference's RPN head: project every visual token to keys (an N x D x D product),
    split into heads, scaled dot product with the query, mean over heads."""
    batch, cells, _ = visual_states.shape
    head_dim = q_weight.shape[0] // num_heads
    q = (query_states @ q_weight.T).reshape(batch, 1, num_heads, head_dim)
    k = (visual_states @ k_weight.T).reshape(batch, cells, -1, head_dim)
    k = k.repeat_interleave(num_heads // k.shape[2], dim=2)
    return ((q * k).sum(-1) / head_dim**0.5).mean(-1)
