"""Grounding and sink maps from one teacher-forced pass (SPEC Stage 1, "Attention rows").

Feed [prompt, answer] once; for every probed layer take the post-RoPE queries of the
answer queries (answer tokens a_0 .. a_{n-2}, or the last prompt token when the answer
has a single token) and all keys, and let ``sdrpn.ops.attention_rows`` return their
softmax rows on the image columns. Averaging over queries and selected heads gives G and
S. Only the layers up to the deepest probed one run, and that one only up to its q and k;
each probed layer's rows are summed as the layer runs, so the pass holds the sums, not q
and k (at 7B, 10 MB a sample and probed layer).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .. import ops
from .decode import DecoderPool, greedy_decode, prefill
from .hf_version import cache_kwarg
from .inputs import left_pad, position_ids_from_mask, right_pad
from .model_facts import model_device
from .presets import HeadSelection, LlavaPreset
from .probe import probe_once
from .turns import model_turn


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

    def __post_init__(self):
        # Shapes and dtypes only: the values are checked where answer_queries reads them anyway.
        if self.input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (B, L), got shape {list(self.input_ids.shape)}")
        batch = self.input_ids.shape[0]
        for name in ("attention_mask", "pixel_values", "answer_start", "answer_length"):
            value = getattr(self, name)
            want = {"attention_mask": 2, "pixel_values": 4}.get(name, 1)
            if value.dim() != want or value.shape[0] != batch:
                raise ValueError(
                    f"{name} must be {want}-D with the batch's {batch} rows, got shape {list(value.shape)}"
                )
        if self.attention_mask.shape != self.input_ids.shape:
            raise ValueError(
                f"attention_mask must match input_ids' shape {list(self.input_ids.shape)}, "
                f"got {list(self.attention_mask.shape)}"
            )
        for name in ("input_ids", "attention_mask", "answer_start", "answer_length"):
            value = getattr(self, name)
            integers = not (value.is_floating_point() or value.is_complex())
            if not integers or (value.dtype == torch.bool and name != "attention_mask"):
                raise ValueError(f"{name} must hold integers, got {value.dtype}")


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


def answer_queries(
    answer_start: Tensor, answer_length: Tensor, problems: tuple[Tensor, Callable[[int, int], str]] | None = None
) -> tuple[Tensor, Tensor]:
    """Query positions (B, Q) and their validity (B, Q): a_0 .. a_{n-2}, or the last prompt
    token where n <= 1. Padding repeats a valid position and is masked out. ``problems``,
    (B,) codes (0 where a sample is sound) and what a code of sample i means, are read in the
    same host read that sizes Q: the first sample with a nonzero code raises its ValueError."""
    n_queries = (answer_length - 1).clamp(min=1)
    if not n_queries.numel():
        return answer_start.new_zeros(0, 1), torch.zeros(0, 1, dtype=torch.bool, device=answer_start.device)
    if problems is None:
        width = int(n_queries.max())
    else:
        codes, describe = problems
        first = (codes != 0).int().argmax()
        width, first, code = torch.stack([n_queries.max(), first, codes[first]]).tolist()
        if code:
            raise ValueError(describe(first, code))
    steps = torch.arange(width, device=answer_start.device)
    valid = steps[None, :] < n_queries[:, None]
    first = torch.where(answer_length >= 2, answer_start, answer_start - 1)
    positions = first[:, None] + torch.minimum(steps[None, :], n_queries[:, None] - 1)
    return positions, valid


def _batch_problems(batch: TeacherForcedBatch, image_end: Tensor, vocab: int) -> tuple[Tensor, Callable]:
    """What answer_queries checks of a teacher-forced batch: token ids inside the vocabulary,
    a mask of 0s and 1s, and each answer inside the sequence with its tokens and its first
    query (the token before a one-token answer) real tokens after the image."""
    ids, mask = batch.input_ids, batch.attention_mask
    start, length = batch.answer_start, batch.answer_length
    seq_len = ids.shape[1]
    first_query = torch.where(length >= 2, start, start - 1)
    end = start + length
    inside = (length >= 1) & (start >= 1) & (end <= seq_len)
    # Real tokens in [first_query, end) from the mask's running count (clamped for the
    # samples already refused by `inside`).
    counts = torch.nn.functional.pad(mask.long().cumsum(1), (1, 0))
    real = counts.gather(1, end.clamp(0, seq_len)[:, None]) - counts.gather(1, first_query.clamp(0, seq_len)[:, None])
    all_real = real[:, 0] == end - first_query
    codes = torch.zeros_like(start)
    for code, ok in (
        (4, all_real & (first_query >= image_end)),
        (3, inside),
        (2, ((mask == 0) | (mask == 1)).all(1)),
        (1, ((ids >= 0) & (ids < vocab)).all(1)),
    ):  # the last one applied wins: the most basic problem is named
        codes = torch.where(ok, codes, code)

    def describe(i: int, code: int) -> str:
        at = f"answer_start[{i}] = {int(start[i])} and answer_length[{i}] = {int(length[i])}"
        return {
            1: f"input_ids[{i}] holds token ids outside [0, {vocab})",
            2: f"attention_mask[{i}] must hold only 0s and 1s",
            3: f"{at} must place a non-empty answer after the first token, inside the sequence's {seq_len} tokens",
            4: f"{at}: the answer's tokens and its first query (the token before a one-token answer) must be "
            f"real tokens (attention_mask 1) after the image tokens, which end at position {int(image_end[i])}",
        }[code]

    return codes, describe


class AnswerRows(NamedTuple):
    """Where the answer queries' attention rows are read from the captured q and k."""

    num_heads: int
    positions: Tensor  # (B, Q) the queries' key positions
    valid: Tensor  # (B, Q) the real ones
    image_start: Tensor  # (B,) each sample's first image token
    num_cells: int
    mask: Tensor  # (B, L) bool, the real keys
    query_offset: int = 0  # the captured queries start at this key


def _rows_on_image(query: Tensor, key: Tensor, heads: list[int], rows: AnswerRows) -> Tensor:
    """(B, len(heads), Q, N) float32: the answer queries' softmax rows of ``heads`` on the
    image columns. Only the queries' rows of q are gathered, and k is copied only for a
    subset of heads (the op maps every query head to its key head itself): the reductions
    run inside the forward, where a copy of a layer's k is 5 MB a sample at 7B."""
    idx = (rows.positions - rows.query_offset)[:, None, :, None].expand(-1, query.shape[1], -1, query.shape[-1])
    q = query.gather(2, idx)  # (B, H, Q, d)
    if heads == list(range(query.shape[1])):
        return ops.attention_rows(q, key, rows.positions, rows.image_start, rows.num_cells, key_padding_mask=rows.mask)
    group = query.shape[1] // key.shape[1]
    kv_heads = [h // group for h in heads]
    if kv_heads != list(range(key.shape[1])):
        key = key.index_select(1, _head_index(tuple(kv_heads), key.device))
    q = q.index_select(1, _head_index(tuple(heads), q.device))
    return ops.attention_rows(q, key, rows.positions, rows.image_start, rows.num_cells, key_padding_mask=rows.mask)


@functools.lru_cache(maxsize=64)
def _head_index(heads: tuple[int, ...], device: torch.device) -> Tensor:
    """``heads`` as an index tensor on ``device``, made once: indexing a CUDA tensor with a
    Python list copies the list to the device each time, a copy that waits for the work
    queued there, inside the forward."""
    return torch.tensor(heads, dtype=torch.long, device=device)


def _selection_sums(selections: dict[str, HeadSelection], rows: AnswerRows) -> Callable:
    """A probe's reduction (AttentionProbe's ``reduce``): a layer's q and k -> {name: (B, N)}
    for each selection reading that layer, its heads' rows summed over heads and real
    queries. The pass keeps these rather than q and k, which at 7B are 10 MB a sample and
    layer, held while the deeper layers run."""

    def reduce(layer: int, query: Tensor, key: Tensor) -> dict[str, Tensor]:
        sums = {}
        for name, selection in selections.items():
            if layer in selection.layers:
                attn = _rows_on_image(query, key, selection.heads_of(layer, rows.num_heads), rows)
                sums[name] = (attn.sum(1) * rows.valid[..., None]).sum(1)
        return sums

    return reduce


def _selection_means(captured: dict, selections: dict[str, HeadSelection], rows: AnswerRows) -> dict[str, Tensor]:
    """Each selection's map (B, N): the sums _selection_sums kept, over its layers, averaged
    over its heads and the real queries."""
    queries = rows.valid.sum(1, keepdim=True)
    return {
        name: sum(captured[layer][name] for layer in selection.layers) / (queries * selection.count(rows.num_heads))
        for name, selection in selections.items()
    }


# Tokens ([prompt, answer] x samples, padding included) that one teacher-forced forward runs
# at most; a larger batch runs in slices of whole samples. A forward's working set grows with
# its tokens (at 7B about 80 KB a token in float16: a layer's q, k, v and rotary temporaries,
# or the MLP's intermediates), while 8,192 tokens already fill a GPU's matrix units: slices
# bound the pass's peak, whatever the batch size, at no cost in speed.
PASS_TOKENS = 8192


def _probe_batch(
    model: nn.Module, batch: TeacherForcedBatch, layers, num_cells: int, reducer: Callable[[AnswerRows], Callable]
) -> list[tuple[dict, AnswerRows]]:
    """The teacher-forced pass over ``batch`` with ``layers`` probed, in slices of at most
    PASS_TOKENS tokens (whole samples, at least one, sizes differing by one at most): per
    slice, what the probe's reduction ``reducer(rows)`` made of each probed layer's q and k,
    and ``rows``, where that slice's answer queries' rows are. The whole batch is checked before any slice runs."""
    config = model.config
    if isinstance(num_cells, bool) or not isinstance(num_cells, int) or num_cells < 1:
        raise ValueError(f"num_cells must be an int >= 1, got {num_cells!r}")
    if not batch.input_ids.shape[0]:
        raise ValueError("the teacher-forced batch must hold at least one sample, got 0")
    image_start = image_columns(batch.input_ids, config.image_token_id, num_cells)
    vocab = model.get_input_embeddings().num_embeddings
    problems = _batch_problems(batch, image_start + num_cells, vocab)
    positions, valid = answer_queries(batch.answer_start, batch.answer_length, problems)
    num_heads = config.text_config.num_attention_heads
    mask = batch.attention_mask.bool()
    position_ids = position_ids_from_mask(batch.attention_mask)
    size, width = batch.input_ids.shape
    # As few slices as fit, of sizes differing by one at most: the peak is the largest
    # slice's, and no slice is left with a sample or two for a forward that cannot fill the
    # device (at 7B, batch 16 runs as 8 + 8, not 12 + 4).
    slices = -(-size // max(1, PASS_TOKENS // max(width, 1)))
    ends = [size * (i + 1) // slices for i in range(slices)]
    passes = []
    for first, end in zip([0, *ends], ends):
        part = slice(first, end)
        part_rows = AnswerRows(num_heads, positions[part], valid[part], image_start[part], num_cells, mask[part])
        captured = probe_once(
            model,
            layers,
            reduce=reducer(part_rows),
            input_ids=batch.input_ids[part],
            attention_mask=batch.attention_mask[part],
            pixel_values=batch.pixel_values[part],
            position_ids=position_ids[part],
        )
        passes.append((captured, part_rows))
    return passes


def _preset_selections(preset: LlavaPreset) -> dict[str, HeadSelection]:
    return {"grounding": preset.grounding, "sink": preset.sink}


def _preset_maps(captured: dict, rows: AnswerRows, preset: LlavaPreset) -> AttentionMaps:
    """G and S from the sums the pass kept (_selection_sums of the preset's selections)."""
    means = _selection_means(captured, _preset_selections(preset), rows)
    return AttentionMaps(grounding=means["grounding"], sink=means["sink"], image_start=rows.image_start)


@torch.no_grad()
def attention_maps(model: nn.Module, batch: TeacherForcedBatch, preset: LlavaPreset, num_cells: int) -> AttentionMaps:
    """G and S for a teacher-forced batch (SPEC Stage 1) with the preset's head selections."""
    reducer = functools.partial(_selection_sums, _preset_selections(preset))
    parts = [
        _preset_maps(*done, preset) for done in _probe_batch(model, batch, preset.probed_layers, num_cells, reducer)
    ]
    return AttentionMaps(
        grounding=torch.cat([maps.grounding for maps in parts]),
        sink=torch.cat([maps.sink for maps in parts]),
        image_start=torch.cat([maps.image_start for maps in parts]),
    )


@torch.no_grad()
def attention_maps_on_cache(
    model: nn.Module,
    cache,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    answers: list[list[int]],
    preset: LlavaPreset,
    num_cells: int,
    pad_id: int,
) -> AttentionMaps:
    """G and S of answers to left-padded prompts (B, W) whose DynamicCache ``cache`` holds
    (at least) the prompts' W slots: what attention_maps gives on [prompt, answer], from one
    short pass. [last prompt token, answer but its last token] (right-padded) runs through
    the probed layers on top of the cache cut to the first W - 1 slots, so the answer
    queries and the last prompt token's see every key they see in the whole sequence. The cache is spent: its
    probed layers end holding the suffix (a later call cuts them back to W - 1 again)."""
    config = model.config
    batch, width = prompt_ids.shape
    if any(len(a) < 1 for a in answers) or len(answers) != batch:
        raise ValueError(f"need one non-empty answer per prompt, got lengths {[len(a) for a in answers]}")
    for i, layer in enumerate(cache.layers[: max(preset.probed_layers) + 1]):  # the layers the pass reads
        held = layer.get_seq_length()
        if held < width:
            raise ValueError(f"cache layer {i} holds {held} slots, fewer than the prompts' {width}")
        layer.crop(width - 1 - held)  # a negative count: the slots to drop
    last = prompt_ids[:, -1].tolist()  # a real token in every row: prompts are left-padded
    # An answer's last token is never a query, and no query sees its key: it is not fed (at
    # the context's end its position would lie past it).
    suffixes = [[t] + a[:-1] for t, a in zip(last, answers)]
    suffix_ids, suffix_mask = right_pad(suffixes, pad_id, prompt_ids.device)
    mask = torch.cat([prompt_mask[:, :-1], suffix_mask], 1)
    lengths = torch.tensor([len(a) for a in answers], device=prompt_ids.device)
    positions, valid = answer_queries(torch.full_like(lengths, width), lengths)
    image_start = image_columns(prompt_ids, config.image_token_id, num_cells)
    num_heads = config.text_config.num_attention_heads
    rows = AnswerRows(num_heads, positions, valid, image_start, num_cells, mask.bool(), query_offset=width - 1)
    steps = torch.arange(suffix_ids.shape[1], device=prompt_ids.device)
    captured = probe_once(
        model,
        preset.probed_layers,
        reduce=_selection_sums(_preset_selections(preset), rows),
        input_ids=suffix_ids,
        attention_mask=mask,
        position_ids=prompt_mask.sum(1, keepdim=True) - 1 + steps,
        **cache_kwarg(cache),
    )
    return _preset_maps(captured, rows, preset)


@torch.no_grad()
def given_answer_maps(
    model: nn.Module,
    prompts: list[list[int]],
    answers: list[list[int]],
    pixels: Tensor,
    preset: LlavaPreset,
    num_cells: int,
    pad_id: int,
) -> AttentionMaps:
    """G and S of given answers (token ids, the end token included where there is one)
    to their prompts: one teacher-forced pass over left-padded [prompt, answer]."""
    if not isinstance(pixels, Tensor) or pixels.dim() != 4:
        got = list(pixels.shape) if isinstance(pixels, Tensor) else type(pixels).__name__
        raise ValueError(f"pixels must be a (B, 3, S, S) tensor, got {got}")
    if not prompts or len(prompts) != len(answers) or len(prompts) != pixels.shape[0]:
        raise ValueError(
            f"prompts ({len(prompts)}), answers ({len(answers)}) and pixels ({pixels.shape[0]}) "
            "must hold one entry per sample, at least one"
        )
    if any(len(a) == 0 for a in answers):
        raise ValueError("answers: every answer needs at least one token")
    vocab = model.get_input_embeddings().num_embeddings
    if isinstance(pad_id, bool) or not isinstance(pad_id, int) or not 0 <= pad_id < vocab:
        raise ValueError(f"pad_id must be a token id in [0, {vocab}), got {pad_id!r}")
    for name, seqs in (("prompts", prompts), ("answers", answers)):
        for i, seq in enumerate(seqs):
            outside = [t for t in seq if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab]
            if outside:
                raise ValueError(f"{name}[{i}] holds token ids that are not ints in [0, {vocab}): {outside[:5]}")
    image_token_id = model.config.image_token_id
    for i, answer in enumerate(answers):
        if image_token_id in answer:
            raise ValueError(f"answers[{i}] holds the image token (id {image_token_id}): only the prompt may")
    device = model_device(model)
    ids, mask = left_pad([p + a for p, a in zip(prompts, answers)], pad_id, device)
    lengths = torch.tensor([len(a) for a in answers], device=device)
    batch = TeacherForcedBatch(ids, mask, pixels, ids.shape[1] - lengths, lengths)
    return attention_maps(model, batch, preset, num_cells)


@torch.no_grad()
def self_answer_maps(
    model: nn.Module,
    ids: Tensor,
    mask: Tensor,
    pixels: Tensor,
    preset: LlavaPreset,
    num_cells: int,
    *,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    decoder: str = "hf",
    pool: DecoderPool | None = None,
    limits: list[int] | None = None,
) -> tuple[list[list[int]], AttentionMaps]:
    """The model's greedy answers to left-padded prompts (B, W) with their images, and
    their G and S: the prompt runs once, into the cache that both decoding and the
    answers' maps (attention_maps_on_cache) read. ``limits``: each answer's most tokens
    (greedy_decode's). Holds the model's turn (``turns``): ``pool``'s decoders serve one call
    at a time."""
    with model_turn(model):
        cache, logits, mask, nxt = prefill(model, ids, mask, pixels)
        # The maps read the cache up to the deepest probed layer. A static decoder holds its own
        # copy of every layer, so the others go once copied rather than be held twice.
        probed = max(preset.probed_layers) + 1
        answers = greedy_decode(
            model, cache, logits, mask, nxt, max_new_tokens, eos_id, decoder, pool, keep_layers=probed, limits=limits
        )
        return answers, attention_maps_on_cache(model, cache, ids, mask, answers, preset, num_cells, pad_id)


@torch.no_grad()
def head_maps(model: nn.Module, batch: TeacherForcedBatch, num_cells: int) -> Tensor:
    """(B, layers, heads, N) float32: every head's map of the answer queries, from one pass
    through every layer; what a head selection is chosen from (a selection's G is the mean
    of its heads' maps)."""
    layers = range(model.config.text_config.num_hidden_layers)

    def reducer(rows: AnswerRows) -> Callable:
        every_head = list(range(rows.num_heads))
        # Per head, its rows summed over the real queries (as _selection_sums for one head)
        return lambda layer, query, key: (
            _rows_on_image(query, key, every_head, rows) * rows.valid[:, None, :, None]
        ).sum(2)

    parts = [
        torch.stack([captured[layer] for layer in layers], 1) / rows.valid.sum(1)[:, None, None, None]
        for captured, rows in _probe_batch(model, batch, layers, num_cells, reducer)
    ]
    return torch.cat(parts).float()
