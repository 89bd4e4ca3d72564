"""Sample inputs for attention_rows: one generator feeds every attention-rows test."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class AttentionInputs:
    query: Tensor
    key: Tensor
    query_positions: Tensor
    key_start: Tensor
    key_length: int
    key_padding_mask: Tensor | None

    def args(self):
        return (self.query, self.key, self.query_positions, self.key_start, self.key_length)


def make_attention_inputs(
    batch=3,
    heads=4,
    kv_heads=2,
    rows=5,
    seq_len=23,
    head_dim=8,
    key_length=9,
    *,
    padding: str = "none",
    dtype=torch.float32,
    device="cpu",
    seed: int = 0,
    strided: bool = False,
) -> AttentionInputs:
    """Random q/k with a window of image columns per sample. padding: "none", "left"
    (real tokens at the end, window shifted right) or "right" (real tokens first).
    Positions cover rows before the window, inside it and after it, and one query
    with position -1 that sees nothing."""
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, heads, rows, head_dim, generator=gen) * 2
    key = torch.randn(batch, kv_heads, seq_len, head_dim, generator=gen) * 2
    pad = torch.randint(0, max(1, seq_len - key_length - 2), (batch,), generator=gen)
    if padding == "none":
        pad.zero_()
    mask = torch.ones(batch, seq_len, dtype=torch.bool)
    start = torch.randint(0, seq_len - key_length + 1, (batch,), generator=gen)
    for b in range(batch):
        p = int(pad[b])
        if padding == "left":
            mask[b, :p] = False
            start[b] = torch.randint(p, seq_len - key_length + 1, (1,), generator=gen)
        elif padding == "right" and p:
            mask[b, seq_len - p :] = False
            start[b] = torch.randint(0, seq_len - p - key_length + 1, (1,), generator=gen)
    positions = torch.randint(0, seq_len, (batch, rows), generator=gen)
    if positions.numel():
        positions[0, 0] = -1
    if strided:
        query = query.transpose(2, 3).contiguous().transpose(2, 3)
        key = key[:, :, :, :].transpose(1, 2).contiguous().transpose(1, 2)
    to = dict(device=device)
    return AttentionInputs(
        query.to(dtype=dtype, **to),
        key.to(dtype=dtype, **to),
        positions.to(**to),
        start.to(**to),
        key_length,
        None if padding == "none" else mask.to(**to),
    )
