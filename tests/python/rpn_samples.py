"""Sample inputs for rpn_scores: one generator feeds every rpn_scores test."""

from __future__ import annotations

import torch


def make_rpn_inputs(
    batch=3,
    cells=7,
    hidden=16,
    heads=4,
    kv_heads=2,
    head_dim=4,
    *,
    bias=True,
    mask=False,
    dtype=torch.float32,
    device="cpu",
    seed=0,
    requires_grad=False,
):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        t = (torch.randn(*shape, generator=gen) * scale).to(dtype=dtype, device=device)
        return t.requires_grad_(requires_grad)

    args = [
        rand(batch, hidden),
        rand(batch, cells, hidden),
        rand(heads * head_dim, hidden, scale=0.3),
        rand(kv_heads * head_dim, hidden, scale=0.3),
        heads,
    ]
    kwargs = {
        "q_bias": rand(heads * head_dim) if bias else None,
        "k_bias": rand(kv_heads * head_dim) if bias else None,
        "visual_mask": None,
    }
    if mask:
        m = torch.rand(batch, cells, generator=gen) > 0.3
        m[:, 0] = True
        kwargs["visual_mask"] = m.to(device)
    return args, kwargs
