"""Slow, obvious references of every sdrpn op, written from SPEC.md, one sample at a time.

They trade speed for readability: plain Python loops over the grid, no vectorisation
tricks. Thresholds use the same math type as the ops (float32 for float16/bfloat16
inputs, the input type otherwise), so ties at a threshold resolve the same way.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def math_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def pseudo_labels_one(
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
    """SPEC Stage 1 steps 1-6 for one (N,) sample; returns (N,) int64 on the CPU."""
    dt = math_dtype(grounding.dtype)
    g = grounding.detach().cpu().to(dt).tolist()
    s = sink.detach().cpu().to(dt).tolist()
    n = grid_h * grid_w
    labels = [ignore_index] * n
    if not all(math.isfinite(v) for v in g + s):
        return torch.tensor(labels, dtype=torch.long)

    def in_math_type(x: float) -> float:
        return torch.tensor(x, dtype=dt).item()

    tau = in_math_type(sink_threshold)
    # 1. zero the sink tokens
    gs = [0.0 if s[i] >= tau else g[i] for i in range(n)]
    # 2. foreground: value > alpha * max (the product rounded like the op's math type)
    m = max(gs)
    fg_thr = in_math_type(in_math_type(fg_ratio) * m)
    bg_thr = in_math_type(in_math_type(bg_ratio) * m)
    fg = {i for i in range(n) if gs[i] > fg_thr}
    # 3. tight box of the foreground, the whole grid when empty
    if fg:
        rows = [i // grid_w for i in fg]
        cols = [i % grid_w for i in fg]
        r0, r1, c0, c1 = min(rows), max(rows), min(cols), max(cols)
    else:
        r0, r1, c0, c1 = 0, grid_h - 1, 0, grid_w - 1
    # 5. a large box means no signal
    if (r1 - r0 + 1) * (c1 - c0 + 1) >= max_box_fraction * n:
        return torch.tensor(labels, dtype=torch.long)
    # 4. and 6.
    for i in range(n):
        r, c = divmod(i, grid_w)
        inside = r0 <= r <= r1 and c0 <= c <= c1
        if i in fg:
            labels[i] = 1
        elif not inside and gs[i] < bg_thr:
            labels[i] = 0
    return torch.tensor(labels, dtype=torch.long)


def pseudo_labels(grounding: Tensor, sink: Tensor, grid_h: int, grid_w: int, **kwargs) -> Tensor:
    """The per-sample loop over a (B, N) batch."""
    out = [pseudo_labels_one(grounding[b], sink[b], grid_h, grid_w, **kwargs)
           for b in range(grounding.shape[0])]
    if not out:
        return torch.empty(0, grid_h * grid_w, dtype=torch.long)
    return torch.stack(out)


def massive_activation_sinks(hidden: Tensor, dims, tau: float = 20.0, eps: float = 1e-6) -> Tensor:
    """RMS-normalise each (D,) hidden state, flag max over dims of |h_d| > tau; (B, L) bool."""
    h = hidden.detach().cpu().to(torch.float64)
    out = torch.zeros(h.shape[:2], dtype=torch.bool)
    for b in range(h.shape[0]):
        for t in range(h.shape[1]):
            x = h[b, t]
            normed = x / torch.sqrt((x * x).mean() + eps)
            out[b, t] = bool(normed[list(dims)].abs().max() > tau)
    return out


def attention_rows(query: Tensor, key: Tensor, query_positions: Tensor, key_start: Tensor,
                   key_length: int, key_padding_mask: Tensor | None = None,
                   scale: float | None = None) -> Tensor:
    """softmax(q k^T * scale + mask) in float64, one sample and head at a time, then the
    window of columns; (B, H, Q, key_length) float32 on the CPU."""
    q_all = query.detach().cpu().double()
    k_all = key.detach().cpu().double()
    b_size, heads, rows, d = q_all.shape
    group = heads // k_all.shape[1]
    seq_len = k_all.shape[2]
    scale = d ** -0.5 if scale is None else scale
    out = torch.zeros(b_size, heads, rows, key_length, dtype=torch.float64)
    for b in range(b_size):
        real = (torch.ones(seq_len, dtype=torch.bool) if key_padding_mask is None
                else key_padding_mask[b].cpu())
        start = int(key_start[b])
        for h in range(heads):
            scores = q_all[b, h] @ k_all[b, h // group].T * scale  # (Q, L)
            for i in range(rows):
                visible = (torch.arange(seq_len) <= int(query_positions[b, i])) & real
                if not visible.any():
                    continue
                row = torch.softmax(scores[i].masked_fill(~visible, float("-inf")), dim=0)
                out[b, h, i] = row[start:start + key_length]
    return out.float()


def rpn_scores(query_states: Tensor, visual_states: Tensor, q_weight: Tensor, k_weight: Tensor,
               num_heads: int, q_bias: Tensor | None = None, k_bias: Tensor | None = None,
               visual_mask: Tensor | None = None) -> Tensor:
    """The naive head: project every visual token to keys, per-head dot, mean over heads."""
    b, n, _ = visual_states.shape
    d = q_weight.shape[0] // num_heads
    kv_heads = k_weight.shape[0] // d
    q = torch.nn.functional.linear(query_states, q_weight, q_bias).view(b, num_heads, d)
    k = torch.nn.functional.linear(visual_states, k_weight, k_bias).view(b, n, kv_heads, d)
    k = k.repeat_interleave(num_heads // kv_heads, dim=2)
    scores = torch.einsum("bhd,bnhd->bnh", q, k).mean(-1) / math.sqrt(d)
    if visual_mask is not None:
        scores = scores.masked_fill(~visual_mask, float("-inf"))
    return scores
