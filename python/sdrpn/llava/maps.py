"""Grounding and sink maps from one teacher-forced pass (SPEC Stage 1, "Attention rows").

Feed [prompt, answer] once; for every probed layer take the post-RoPE queries of the
answer queries (answer tokens a_0 .. a_{n-2}, or the last prompt token when the answer
has a single token) and all keys, and let ``sdrpn.ops.attention_rows`` return their
softmax rows on the image columns. Averaging over queries and selected heads gives G and
S. Only the layers up to the deepest probed one run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .. import ops
from .inputs import position_ids_from_mask
from .presets import HeadSelection, LlavaPreset
from .probe import probe_once


@dataclass
class TeacherForcedBatch:
    """Token ids of [prompt, answer] per sample, padded on either side.

    input_ids, attention_mask: (B, L); pixel_values: (B, 3, S, S);
    answer_start: (B,) position of the first answer token; answer_length: (B,) answer
    tokens (the end-of-sequence token included when there is one).
    """

    input_ids: Tensor
    attention_mask: Tensor
    pixel_values: Tensor
    answer_start: Tensor
    answer_length: Tensor


@dataclass
class AttentionMaps:
    grounding: Tensor  # (B, N) float32
    sink: Tensor  # (B, N) float32
    image_start: Tensor  # (B,) int64 position of the first image token


def image_columns(input_ids: Tensor, image_token_id: int, num_cells: int) -> Tensor:
    """First image-token position of each sample; checks each has num_cells contiguous ones."""
    is_image = input_ids == image_token_id
    counts = is_image.sum(1)
    if not bool((counts == num_cells).all()):
        raise ValueError(
            f"every sample must hold grid_h * grid_w = {num_cells} image tokens "
            f"(id {image_token_id}), got counts {counts.tolist()}"
        )
    start = is_image.int().argmax(1)
    offsets = torch.arange(num_cells, device=input_ids.device)
    if not bool(is_image.gather(1, start[:, None] + offsets).all()):
        raise ValueError("the image tokens of a sample must be contiguous")
    return start


def answer_queries(answer_start: Tensor, answer_length: Tensor) -> tuple[Tensor, Tensor]:
    """Query positions (B, Q) and their validity (B, Q): a_0 .. a_{n-2}, or the last prompt
    token where n <= 1. Padding repeats a valid position and is masked out."""
    n_queries = (answer_length - 1).clamp(min=1)
    width = int(n_queries.max()) if n_queries.numel() else 1
    steps = torch.arange(width, device=answer_start.device)
    valid = steps[None, :] < n_queries[:, None]
    first = torch.where(answer_length >= 2, answer_start, answer_start - 1)
    positions = first[:, None] + torch.minimum(steps[None, :], n_queries[:, None] - 1)
    return positions, valid


def _selection_map(
    captured: dict,
    selection: HeadSelection,
    num_heads: int,
    positions: Tensor,
    valid: Tensor,
    image_start: Tensor,
    num_cells: int,
    mask: Tensor,
) -> Tensor:
    total = None
    for layer in selection.layers:
        query, key = captured[layer]
        heads = selection.heads_of(layer, num_heads)
        group = query.shape[1] // key.shape[1]
        idx = positions[:, None, :, None].expand(-1, len(heads), -1, query.shape[-1])
        q = query[:, heads].gather(2, idx)  # (B, Hs, Q, d)
        k = key[:, [h // group for h in heads]]  # (B, Hs, L, d)
        rows = ops.attention_rows(q, k, positions, image_start, num_cells, key_padding_mask=mask)
        per_query = rows.sum(1)  # (B, Q, N): summed over heads
        summed = (per_query * valid[..., None]).sum(1)  # (B, N)
        total = summed if total is None else total + summed
    return total / (valid.sum(1, keepdim=True) * selection.count(num_heads))


@torch.no_grad()
def attention_maps(model: nn.Module, batch: TeacherForcedBatch, preset: LlavaPreset, num_cells: int) -> AttentionMaps:
    """G and S for a teacher-forced batch (SPEC Stage 1) with the preset's head selections."""
    config = model.config
    num_heads = config.text_config.num_attention_heads
    image_start = image_columns(batch.input_ids, config.image_token_id, num_cells)
    positions, valid = answer_queries(batch.answer_start, batch.answer_length)
    mask = batch.attention_mask.bool()
    captured = probe_once(
        model,
        preset.probed_layers,
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        pixel_values=batch.pixel_values,
        position_ids=position_ids_from_mask(batch.attention_mask),
    )
    args = (num_heads, positions, valid, image_start, num_cells, mask)
    return AttentionMaps(
        grounding=_selection_map(captured, preset.grounding, *args),
        sink=_selection_map(captured, preset.sink, *args),
        image_start=image_start,
    )


@torch.no_grad()
def head_maps(model: nn.Module, batch: TeacherForcedBatch, num_cells: int) -> Tensor:
    """(B, layers, heads, N) float32: every head's map of the answer queries, from one pass
    through every layer; what a head selection is chosen from (a selection's G is the mean
    of its heads' maps)."""
    config = model.config
    num_heads = config.text_config.num_attention_heads
    layers = range(config.text_config.num_hidden_layers)
    image_start = image_columns(batch.input_ids, config.image_token_id, num_cells)
    positions, valid = answer_queries(batch.answer_start, batch.answer_length)
    mask = batch.attention_mask.bool()
    captured = probe_once(
        model,
        layers,
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        pixel_values=batch.pixel_values,
        position_ids=position_ids_from_mask(batch.attention_mask),
    )
    args = (num_heads, positions, valid, image_start, num_cells, mask)
    return torch.stack(
        [
            torch.stack([_selection_map(captured, HeadSelection(((layer, h),)), *args) for h in range(num_heads)], 1)
            for layer in layers
        ],
        1,
    ).float()
