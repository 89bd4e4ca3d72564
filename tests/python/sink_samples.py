"""Sample inputs for massive_activation_sinks: hidden states with planted massive values."""

from __future__ import annotations

import torch
from torch import Tensor

HIDDEN = 1024
SINK_DIMS = (17, 400, 1000)


def make_hidden(
    batch: int,
    seq_len: int,
    *,
    hidden_size: int = HIDDEN,
    dims=SINK_DIMS,
    dtype=torch.float32,
    device="cpu",
    seed: int = 0,
    strided: bool = False,
) -> Tensor:
    """Unit-normal hidden states; about a quarter of the tokens carry a value of +-1000 in
    one of `dims` (normalised ~32, clearly a sink at tau=20) and another quarter +-10
    (normalised ~9.5, clearly not), so no token sits near the threshold."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, seq_len, hidden_size, generator=gen)
    kind = torch.randint(0, 4, (batch, seq_len), generator=gen)
    which = torch.tensor(dims)[torch.randint(0, len(dims), (batch, seq_len), generator=gen)]
    sign = torch.randint(0, 2, (batch, seq_len), generator=gen) * 2.0 - 1.0
    value = torch.where(kind == 0, 1000.0, torch.where(kind == 1, 10.0, 0.0)) * sign
    planted = kind <= 1
    h.view(-1, hidden_size)[planted.flatten().nonzero().flatten(), which[planted]] = value[planted]
    h = h.to(dtype=dtype, device=device)
    if strided:
        # (B, D, L) storage seen as (B, L, D): the hidden dimension has stride L.
        h = h.transpose(1, 2).contiguous().transpose(1, 2)
    return h
