"""Pass 2's prefill (SPEC Stage 3 step 5): each sample's new tokens, [crop tokens, question],
on top of the shared prefix's KV cache.

Samples of one batch feed very different numbers of new tokens: the question alone without
a box, 576 crop tokens with one box, 1,152 with two, the kept tokens of a mask-mode crop.
One padded forward computes every sample at the longest width. So the samples run in
groups of similar width, one forward per group on its rows of the prefix cache, and the
groups' caches are joined into the layout the one padded forward would have left (new
tokens right-aligned after the prefix, the padding between them masked): decoding reads
the same cache either way, so the answers are the same up to rounding (the group forwards
multiply matrices of other shapes; in float16 a near tie can part them).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers import DynamicCache

from ..llava.attention_kernels import without_cudnn_attention
from ..llava.hf_version import cache_kwarg
from ..llava.inputs import position_ids_from_mask

# What one more forward costs, in padded tokens it must save to pay for itself. A forward
# through LLaVA-1.5-7B's 32 layers launches about a thousand kernels and runs as much
# Python, some 10 ms of host time (the last H200 profile); an H100 prefills about 600 tokens
# of 7B in 30 ms, so 10 ms is some 200-300 tokens' work.
GROUP_COST_TOKENS = 256


def width_groups(widths: list[int], group_cost: int) -> list[list[int]]:
    """Sample indices split into groups that minimise the padded tokens computed,
    sum(len(group) * its longest width), plus ``group_cost`` per group. An optimal split
    groups the widths in sorted order, so this is a small dynamic programme over them."""
    if not widths:
        return []
    order = sorted(range(len(widths)), key=lambda i: -widths[i])
    n = len(order)
    best = [0.0] + [float("inf")] * n  # best[j]: cost of the j widest samples
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):  # the last group: order[i:j], whose widest is order[i]
            cost = best[i] + (j - i) * widths[order[i]] + group_cost
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], n
    while j > 0:
        groups.append(sorted(order[cut[j] : j]))
        j = cut[j]
    return groups[::-1]


def _device_ints(values: list[int], device: torch.device) -> Tensor:
    """Host ints on ``device`` without waiting for the work queued there (the crops'
    encoding, the previous group): on CUDA a non-blocking copy from pinned memory, where a
    blocking copy would wait for that work."""
    host = torch.tensor(values)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def _rows(cache: DynamicCache, rows: Tensor, config) -> DynamicCache:
    """A new cache holding only the given samples of ``cache`` (built a layer at a time)."""
    data = ((layer.keys.index_select(0, rows), layer.values.index_select(0, rows)) for layer in cache.layers)
    return DynamicCache(ddp_cache_data=data, config=config)


def _join(held: list[list], rows: list[Tensor], prefix_len: int, width: int, config) -> DynamicCache:
    """One cache over the whole batch from the groups' layers ``held[g][layer]`` = (keys,
    values) of the samples ``rows[g]``, each holding their prefix and new tokens: per sample
    the prefix, then its new tokens right-aligned in ``width`` slots (masked slots before
    them). A group's layer is released once copied, so that the groups and the result
    together hold about one whole cache."""
    batch = sum(len(r) for r in rows)

    def layers():
        for layer in range(len(held[0])):
            joined = []
            for kv in (0, 1):
                first = held[0][layer][kv]
                whole = first.new_zeros(batch, first.shape[1], prefix_len + width, first.shape[3])
                for r, group in zip(rows, held):
                    t = group[layer][kv]
                    whole[r, :, :prefix_len] = t[:, :, :prefix_len]
                    whole[r, :, prefix_len + width - (t.shape[2] - prefix_len) :] = t[:, :, prefix_len:]
                joined.append(whole)
            for group in held:
                group[layer] = None
            yield tuple(joined)

    return DynamicCache(ddp_cache_data=layers(), config=config)


@torch.no_grad()
@without_cudnn_attention()
def prefill_new_tokens(
    model: nn.Module, cache: DynamicCache, prefix_mask: Tensor, parts: list[Tensor], group_cost: int = GROUP_COST_TOKENS
) -> tuple[DynamicCache, Tensor, Tensor, Tensor]:
    """Feed each sample's new token embeddings ``parts[b]`` (n_b >= 1, D) on top of ``cache``
    (the prefix of every sample, ``prefix_mask`` (B, Lp)). Returns (the cache, the last
    position's logits (B, V), the attention mask (B, Lp + W) and the next positions (B, 1)),
    with W the longest n_b and each sample's tokens right-aligned in it. ``cache`` is
    extended in place when the batch runs as one group, and left as it was otherwise."""
    widths = [p.shape[0] for p in parts]
    if not widths or min(widths) < 1:
        raise ValueError(f"parts: every sample needs at least one new token, got widths {widths}")
    device = prefix_mask.device
    width, hidden = max(widths), parts[0].shape[1]
    new = parts[0].new_zeros(len(parts), width, hidden)
    new_mask = torch.zeros(len(parts), width, dtype=torch.long, device=device)
    for b, p in enumerate(parts):  # right-aligned: padding sits between prefix and new tokens
        new[b, width - p.shape[0] :] = p
        new_mask[b, width - p.shape[0] :] = 1
    mask = torch.cat([prefix_mask, new_mask], 1)
    pos = prefix_mask.sum(1, keepdim=True) + position_ids_from_mask(new_mask)
    groups = width_groups(widths, group_cost)

    def forward(rows: slice | Tensor, group_cache: DynamicCache, cut: int) -> Tensor:
        out = model(
            inputs_embeds=new[rows, cut:],
            attention_mask=torch.cat([prefix_mask[rows], new_mask[rows, cut:]], 1),
            position_ids=pos[rows, cut:],
            **cache_kwarg(group_cache),
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1]

    if len(groups) == 1:
        return cache, forward(slice(None), cache, 0), mask, pos[:, -1:] + 1
    config = model.config.get_text_config()
    rows = [_device_ints(g, device) for g in groups]
    logits, held = [], []
    for g, r in zip(groups, rows):
        group_cache = _rows(cache, r, config)
        logits.append(forward(r, group_cache, width - max(widths[i] for i in g)))
        held.append([(layer.keys, layer.values) for layer in group_cache.layers])
    del group_cache  # its layers live on in `held` alone, for _join to release one by one
    prefix_len = prefix_mask.shape[1]
    order = torch.cat(rows).argsort()  # batch row -> its row in the groups' concatenation
    return _join(held, rows, prefix_len, width, config), torch.cat(logits).index_select(0, order), mask, pos[:, -1:] + 1
