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
    out = [pseudo_labels_one(grounding[b], sink[b], grid_h, grid_w, **kwargs) for b in range(grounding.shape[0])]
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


def attention_rows(
    query: Tensor,
    key: Tensor,
    query_positions: Tensor,
    key_start: Tensor,
    key_length: int,
    key_padding_mask: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """softmax(q k^T * scale + mask) in float64, one sample and head at a time, then the
    window of columns; (B, H, Q, key_length) float32 on the CPU."""
    q_all = query.detach().cpu().double()
    k_all = key.detach().cpu().double()
    b_size, heads, rows, d = q_all.shape
    group = heads // k_all.shape[1]
    seq_len = k_all.shape[2]
    if scale is None:
        scale = d**-0.5 if d else 1.0  # with d = 0 every score is 0 whatever the scale
    out = torch.zeros(b_size, heads, rows, key_length, dtype=torch.float64)
    for b in range(b_size):
        real = torch.ones(seq_len, dtype=torch.bool) if key_padding_mask is None else key_padding_mask[b].cpu()
        start = int(key_start[b])
        for h in range(heads):
            scores = q_all[b, h] @ k_all[b, h // group].T * scale  # (Q, L)
            for i in range(rows):
                visible = (torch.arange(seq_len) <= int(query_positions[b, i])) & real
                if not visible.any():
                    continue
                row = torch.softmax(scores[i].masked_fill(~visible, float("-inf")), dim=0)
                out[b, h, i] = row[start : start + key_length]
    return out.float()


def rpn_scores(
    query_states: Tensor,
    visual_states: Tensor,
    q_weight: Tensor,
    k_weight: Tensor,
    num_heads: int,
    q_bias: Tensor | None = None,
    k_bias: Tensor | None = None,
    visual_mask: Tensor | None = None,
) -> Tensor:
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


def roi_boxes(
    prob: Tensor,
    threshold: float = 0.15,
    sigma: float = 1.0,
    min_area: int = 4,
    max_area: int = 225,
    max_boxes: int = 2,
    drop_singletons: bool = True,
    reference_clamp: bool = True,
):
    """Blur, threshold, BFS over the grid from each unvisited cell in row-major order, and
    the reference's box rules, one sample at a time."""
    p = prob.detach().cpu().float()
    b_size, h, w = p.shape
    side = math.exp(-1.0 / (2 * sigma * sigma))
    c = torch.tensor(1.0 / (1.0 + 2.0 * side), dtype=torch.float32)
    s = (1.0 - c) / 2.0

    def refl(i, n):
        return 0 if n == 1 else (-i if i < 0 else (2 * (n - 1) - i if i >= n else i))

    blurred = torch.empty(b_size, h, w)
    boxes, index = [], []
    for b in range(b_size):
        rows = torch.empty(h, w)
        for y in range(h):
            for x in range(w):
                rows[y, x] = c * p[b, y, x] + s * (p[b, y, refl(x - 1, w)] + p[b, y, refl(x + 1, w)])
        for y in range(h):
            for x in range(w):
                blurred[b, y, x] = c * rows[y, x] + s * (rows[refl(y - 1, h), x] + rows[refl(y + 1, h), x])
        thr = threshold if threshold >= 0 else float(blurred[b].max()) * -threshold
        on = blurred[b] > thr
        seen = torch.zeros(h, w, dtype=torch.bool)
        kept = []
        for y0 in range(h):
            for x0 in range(w):
                if seen[y0, x0] or not on[y0, x0]:
                    continue
                queue, cells = [(y0, x0)], []
                seen[y0, x0] = True
                while queue:
                    y, x = queue.pop(0)
                    cells.append((y, x))
                    for dy in (-1, 0, 1):
                        for dx in (-1, 0, 1):
                            ny, nx = y + dy, x + dx
                            if 0 <= ny < h and 0 <= nx < w and on[ny, nx] and not seen[ny, nx]:
                                seen[ny, nx] = True
                                queue.append((ny, nx))
                area = len(cells)
                bx0 = min(x for _, x in cells)
                bx1 = max(x for _, x in cells) + 1
                by0 = min(y for y, _ in cells)
                by1 = max(y for y, _ in cells) + 1
                if drop_singletons and area == 1:
                    continue
                if area > max_area:
                    continue
                if area < min_area:
                    cx, cy = (bx0 + bx1) / 2, (by0 + by1) / 2
                    bw, bh = max(3, bx1 - bx0 + 1), max(3, by1 - by0 + 1)
                    end_x, end_y = (w - 1, h - 1) if reference_clamp else (w, h)
                    bx0, bx1 = max(0, int(cx - bw / 2)), min(end_x, int(cx + bw / 2))
                    by0, by1 = max(0, int(cy - bh / 2)), min(end_y, int(cy + bh / 2))
                kept.append([bx0, by0, bx1, by1])
        if 1 <= len(kept) <= max_boxes:
            boxes += kept
            index += [b] * len(kept)
    return (torch.tensor(boxes, dtype=torch.long).view(-1, 4), torch.tensor(index, dtype=torch.long), blurred)


def roi_crops(
    prob: Tensor,
    threshold: float = 0.15,
    mode: str = "mask",
    sigma: float = 1.0,
    min_area: int = 4,
    max_area: int = 225,
    max_boxes: int = 2,
    drop_singletons: bool = True,
    reference_clamp: bool = True,
):
    """roi_boxes' components, then SPEC Stage 3 step 2b one sample at a time: the mask's
    tight box and F.interpolate(bilinear, align_corners=False) > 0.5 of the cut mask."""
    _, h, w = prob.shape
    rules = dict(
        threshold=threshold,
        sigma=sigma,
        min_area=min_area,
        max_area=max_area,
        drop_singletons=drop_singletons,
        reference_clamp=reference_clamp,
    )
    if mode == "bbox":
        boxes, index, _ = roi_boxes(prob, max_boxes=max_boxes, **rules)
        return boxes, index, torch.ones(len(boxes), h, w, dtype=torch.bool)
    # No cap: every kept box of every sample.
    all_boxes, all_index, blurred = roi_boxes(prob, max_boxes=h * w + 1, **rules)
    boxes, index, keeps = [], [], []
    for b in range(prob.shape[0]):
        mine = all_boxes[all_index == b]
        if len(mine) == 0:
            continue
        if len(mine) == 1:
            boxes.append(mine[0].tolist())
            index.append(b)
            keeps.append(torch.ones(h, w, dtype=torch.bool))
            continue
        thr = threshold if threshold >= 0 else float(blurred[b].max()) * -threshold
        mask = blurred[b] > thr
        if not mask.any():
            continue
        ys, xs = torch.nonzero(mask, as_tuple=True)
        x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
        cut = mask[y0:y1, x0:x1].float()[None, None]
        resized = torch.nn.functional.interpolate(cut, size=(h, w), mode="bilinear", align_corners=False)
        boxes.append([x0, y0, x1, y1])
        index.append(b)
        keeps.append(resized[0, 0] > 0.5)
    keep = torch.stack(keeps) if keeps else torch.empty(0, h, w, dtype=torch.bool)
    return torch.tensor(boxes, dtype=torch.long).view(-1, 4), torch.tensor(index, dtype=torch.long), keep
