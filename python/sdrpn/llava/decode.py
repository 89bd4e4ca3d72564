"""Greedy decoding on top of a KV cache that the Hugging Face model has filled.

Through the model's own forward every decoded token costs about a thousand kernel
launches and as much Python; at 7B on one GPU the host, not the GPU, sets the pace (the
profile in benchmarks/README.md). Three decoders share one loop:

- ``hf``: the model's forward per token over its DynamicCache;
- ``static``: the same layers' own modules (norms, projections, MLP, rotary embedding)
  over a preallocated cache, written so that a step never waits on the device: the step
  updates its own inputs (the chosen token, the positions, the cache slot);
- ``graph``: the static step captured once as a CUDA graph and replayed, one launch per
  token. Graphs are kept per (batch, cache length rounded up to 64 slots) on shared
  buffers, so calls of the same shapes reuse them.

``auto`` is ``graph`` on CUDA and ``hf`` elsewhere. The static decoders know the Llama
decoder (LLaVA-1.5's); for any other text model ``auto`` keeps ``hf``. They give the tokens
the ``hf`` decoder gives, up to rounding: the attention always runs with a mask here, and
on a GPU SDPA may pick another kernel than for an unpadded batch, so in float16 the two can
part at a near tie. They skip hooks on the decoder layers themselves; in graph mode hooks
on their submodules run only while a graph is captured, never on replays. With grouped
query attention the keys and values are repeated per head, as the model's own masked SDPA
attention does (LLaVA-1.5 has none), so that both run the same kernel.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import LlamaModel, apply_rotary_pos_emb, repeat_kv

from ..options import DECODERS
from .attention_kernels import without_cudnn_attention
from .hf_version import cache_kwarg
from .inputs import position_ids_from_mask
from .model_facts import model_device

SLOT_ROUNDING = 64  # cache slots per graph shape step: calls a few tokens apart share a graph


def resolve_decoder(decoder: str, model: nn.Module) -> str:
    """The decoder ``decoder`` names for this model: ``auto`` picks ``graph`` on CUDA for a
    Llama text model and ``hf`` otherwise; ``static``/``graph`` where they do not apply
    (another text model, a RoPE that reads positions on the host, ``graph`` off CUDA) is
    refused."""
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
    unfit = _static_unfit(model)
    cuda = model_device(model).type == "cuda"
    if decoder == "auto":
        return "graph" if cuda and not unfit else "hf"
    if decoder in ("static", "graph") and unfit:
        raise ValueError(f"decoder {decoder!r} needs {unfit}")
    if decoder == "graph" and not cuda:
        raise ValueError("decoder 'graph' needs the model on a CUDA device; use 'static' or 'hf'")
    return decoder


def _static_unfit(model: nn.Module) -> str | None:
    """Why the static step cannot stand in for this model's forward (None: it can)."""
    text = model.get_decoder()
    if not isinstance(text, LlamaModel):
        return f"a Llama text model, got {type(text).__name__}"
    rope = str(text.rotary_emb.rope_type)
    if "dynamic" in rope or rope == "longrope":  # these recompute frequencies from max(position)
        return f"a RoPE without host-side updates, got {rope!r}"
    return None


def capture_graph(fn: Callable[[], Tensor], stream: torch.cuda.Stream, pool=None) -> Callable[[], Tensor]:
    """Records ``fn`` as a CUDA graph on ``stream`` without running it (in memory ``pool``,
    shareable by graphs that never run at once); the returned function replays it and
    returns the output buffer it wrote."""
    graph = torch.cuda.CUDAGraph()
    # thread_local: a capture here must not fail CUDA calls of the caller's other threads
    with torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode="thread_local"):
        out = fn()

    def replay() -> Tensor:
        graph.replay()
        return out

    return replay


class WeightsWatch:
    """Tells whether ``module``'s weights were remade since the watch began: buffers and
    CUDA graphs made for a module hold its weights' addresses and dtype, and ``.to()``,
    ``.half()`` or an assigning load puts the weights in new tensors (in-place updates, as
    training's, keep them). It watches the module's smallest parameter and holds that
    parameter's tensor as it was, so the address cannot be handed to a new tensor."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.name, self.param = min(module.named_parameters(), key=lambda item: item[1].numel())
        self.held = self.param.detach()

    def changed(self) -> bool:
        param = self.module.get_parameter(self.name)
        return param is not self.param or param.data_ptr() != self.held.data_ptr() or param.dtype != self.held.dtype


def capture_error(error: BaseException) -> str:
    """What broke a capture: the error an op raised inside it, which the capture's end
    replaces with "operation failed due to a previous error during capture"."""
    causes = []
    while error is not None and len(causes) < 4:
        text = str(error).strip()
        causes.append(text.splitlines()[0] if text else type(error).__name__)
        error = error.__cause__ or error.__context__
    return " <- ".join(causes)


_CAPTURE_STREAMS: dict[tuple[int, int], torch.cuda.Stream] = {}
_CAPTURE_STREAMS_LOCK = threading.Lock()


def capture_stream(device: torch.device | str) -> torch.cuda.Stream:
    """The side stream that every warm-up and capture on ``device`` runs on, one per device
    and thread: graphs share a memory pool only when captured on one stream, and cuBLAS
    keeps a workspace per stream it runs on (a fresh stream per capture would take one from
    torch's pool of 32). Per thread, so that one thread's work never lands on a stream
    another thread is capturing."""
    device = torch.device(device)
    key = (device.index if device.index is not None else torch.cuda.current_device(), threading.get_ident())
    with _CAPTURE_STREAMS_LOCK:
        if key not in _CAPTURE_STREAMS:
            _CAPTURE_STREAMS[key] = torch.cuda.Stream(key[0])
        return _CAPTURE_STREAMS[key]


def warm_up_and_capture(
    fn: Callable[[], Tensor], device: torch.device, fallback: str, pool=None
) -> tuple[Tensor, Callable[[], Tensor] | None]:
    """Runs ``fn`` for real on a side stream (which also warms up the libraries' handles),
    then records it there as a graph without running it: (the run's output, the replay),
    or (the output, None) with a warning "CUDA graph capture failed, ``fallback``: why".
    Graphs replay the work as captured: under torch.autocast its cast cache would be
    captured too, so callers run without autocast (nothing in sdrpn enables it)."""
    stream = capture_stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        out = fn()
    caller = torch.cuda.current_stream(device)
    caller.wait_stream(stream)
    if isinstance(out, Tensor) and out.is_cuda:
        # Allocated on the side stream, read on the caller's: freed, it must wait for them.
        out.record_stream(caller)
    try:
        # The outer stream context restores the caller's stream even when a failed
        # capture leaves torch.cuda.graph's own context unexited.
        with torch.cuda.stream(stream):
            return out, capture_graph(fn, stream, pool)
    except RuntimeError as error:
        message = f"CUDA graph capture failed, {fallback}: {capture_error(error)}"
        warnings.warn(message, stacklevel=_first_frame_outside(_LIBRARY_PATHS))
        return out, None


# sdrpn's, torch's and contextlib's frames (no_grad's and without_cudnn_attention's
# wrappers among them) sit between a user's call and a capture at a depth that depends on
# the path; a warning names the user's line.
_LIBRARY_PATHS = (
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep,  # sdrpn
    os.path.dirname(os.path.abspath(torch.__file__)) + os.sep,
    os.path.abspath(contextlib.__file__),
)


def _first_frame_outside(paths: tuple[str, ...]) -> int:
    """The ``stacklevel`` of the nearest frame above the caller whose file starts with none
    of ``paths`` (folders and files; the caller itself is level 1)."""
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and os.path.abspath(frame.f_code.co_filename).startswith(paths):
        frame, level = frame.f_back, level + 1
    return level


def slot_bucket(slots: int) -> int:
    """Cache slots rounded up to SLOT_ROUNDING: the lengths graphs are captured for."""
    return -(-slots // SLOT_ROUNDING) * SLOT_ROUNDING


class StaticDecoder:
    """Greedy steps of a Llama text model for ``batch`` samples over a preallocated cache
    of ``capacity`` slots (a multiple of SLOT_ROUNDING).

    ``load`` copies a DynamicCache (T slots per sample, ``mask`` marking the real ones)
    into slots [0, T); each ``step`` feeds the token at its positions into the next slot
    and leaves the argmax token, the next positions and the next slot in its own inputs,
    so that steps chain with no host work between them. A step attends over the first
    ``slot_bucket(T + room)`` slots; in graph mode one graph per such length, all on the
    same buffers.
    """

    def __init__(self, model: nn.Module, batch: int, capacity: int, graph: bool):
        if capacity % SLOT_ROUNDING:
            raise ValueError(f"capacity must be a multiple of {SLOT_ROUNDING}, got {capacity}")
        self.text = model.get_decoder()
        self.head = model.get_output_embeddings()
        self.weights = WeightsWatch(self.text)  # the weights its buffers and graphs are made for
        weight = self.head.weight
        attn = self.text.layers[0].self_attn
        kv_heads = self.text.config.num_key_value_heads
        shape = (batch, kv_heads, capacity, attn.head_dim)
        self.keys = [torch.zeros(shape, device=weight.device, dtype=weight.dtype) for _ in self.text.layers]
        self.values = [torch.zeros_like(k) for k in self.keys]
        self.valid = torch.zeros(batch, capacity, dtype=torch.bool, device=weight.device)
        self.token = torch.zeros(batch, dtype=torch.long, device=weight.device)
        self.positions = torch.zeros(batch, 1, dtype=torch.long, device=weight.device)
        self.slot = torch.zeros(1, dtype=torch.long, device=weight.device)
        self.groups = self.text.config.num_attention_heads // kv_heads  # query heads per key head
        self.batch, self.capacity, self.length = batch, capacity, capacity
        self.use_graph = graph
        self._graphs: dict[int, Callable[[], Tensor]] = {}  # cache length -> replay

    def load(self, cache, mask: Tensor, positions: Tensor, token: Tensor, room: int) -> None:
        """Cache slots from ``cache`` (its T = mask.shape[1] slots), the first token to feed
        and its positions (B, 1); ``room`` more slots must fit."""
        width = mask.shape[1]
        if width + room > self.capacity:
            raise ValueError(f"{width} cached + {room} new slots exceed the decoder's {self.capacity}")
        if mask.shape[0] != self.batch:
            raise ValueError(f"the decoder holds {self.batch} samples, the mask {mask.shape[0]}")
        for layer, (k, v) in enumerate(zip(self.keys, self.values)):
            cached = cache.layers[layer]
            if cached.keys.shape[-2] != width:
                raise ValueError(f"cache layer {layer} holds {cached.keys.shape[-2]} slots, the mask {width}")
            k[:, :, :width].copy_(cached.keys)
            v[:, :, :width].copy_(cached.values)
        self.valid.zero_()
        self.valid[:, :width].copy_(mask.bool())
        self.token.copy_(token)
        self.positions.copy_(positions)
        self.slot.fill_(width)
        self.length = slot_bucket(width + room)

    @torch.no_grad()
    def step(self) -> Tensor:
        """Decodes one token per sample; returns (B,) token ids (a buffer the next step
        overwrites in graph mode)."""
        if not self.use_graph:
            return self._step()
        replay = self._graphs.get(self.length)
        if replay is None:
            return self._capture()
        return replay()

    def _capture(self) -> Tensor:
        """This step for real, and the next one recorded as a graph; a capture that fails
        leaves this decoder eager."""
        out, replay = warm_up_and_capture(self._step, self.token.device, "decoding without graphs")
        if replay is None:
            self.use_graph = False
        else:
            self._graphs[self.length] = replay
        return out

    @without_cudnn_attention()
    def _step(self) -> Tensor:
        text, batch, length = self.text, self.batch, self.length
        valid = self.valid[:, :length]
        valid.index_fill_(1, self.slot, True)
        hidden = text.embed_tokens(self.token[:, None])
        # One additive mask for every layer (SDPA would convert a boolean one per layer).
        mask = torch.zeros(valid.shape, dtype=hidden.dtype, device=hidden.device)
        mask = mask.masked_fill_(~valid, torch.finfo(hidden.dtype).min)[:, None, None, :]
        cos, sin = text.rotary_emb(hidden, self.positions)
        for layer, keys, values in zip(text.layers, self.keys, self.values):
            attn = layer.self_attn
            x = layer.input_layernorm(hidden)
            q = attn.q_proj(x).view(batch, 1, -1, attn.head_dim).transpose(1, 2)
            k = attn.k_proj(x).view(batch, 1, -1, attn.head_dim).transpose(1, 2)
            v = attn.v_proj(x).view(batch, 1, -1, attn.head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            keys, values = keys[:, :, :length], values[:, :, :length]
            keys.index_copy_(2, self.slot, k)
            values.index_copy_(2, self.slot, v)
            keys, values = repeat_kv(keys, self.groups), repeat_kv(values, self.groups)
            o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=attn.scaling)
            hidden = hidden + attn.o_proj(o.transpose(1, 2).reshape(batch, 1, -1))
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        nxt = self.head(text.norm(hidden))[:, -1].argmax(-1)
        self.token.copy_(nxt)
        self.positions.add_(1)
        self.slot.add_(1)
        return nxt


class DecoderPool:
    """Static decoders kept between calls, so that their buffers and CUDA graphs serve the
    next call of the same batch size: one per batch size for the last ``sizes`` sizes (a
    run's full batches and its last, partial one), each grown to the longest cache asked
    for (a 7B cache at batch 8 and 1,800 slots is 7 GiB)."""

    def __init__(self, sizes: int = 2):
        self.sizes = sizes
        self._decoders: dict[tuple, StaticDecoder] = {}
        self._failed = 0  # decoders dropped after a failed capture

    def clear(self) -> None:
        """Frees every kept decoder (its cache buffers and graphs)."""
        for key in list(self._decoders):
            self._drop(key)

    def _drop(self, key: tuple) -> None:
        self._count_failure(key, self._decoders.pop(key))

    def _count_failure(self, key: tuple, decoder: StaticDecoder) -> None:
        self._failed += key[2] and not decoder.use_graph

    def graph_counts(self) -> dict[str, int]:
        """The kept decoders' CUDA graphs, and the decoders (kept or since dropped) asked
        for graphs that decoded without, after a failed capture: what a timing rests on."""
        asked = [d for (_, _, graph), d in self._decoders.items() if graph]
        failed = self._failed + sum(not d.use_graph for d in asked)
        return {"graphs": sum(len(d._graphs) for d in asked), "failed_captures": failed}

    def get(self, model: nn.Module, batch: int, slots: int, graph: bool) -> StaticDecoder:
        # The text model, which a kept decoder holds: its id cannot be reused while kept.
        for stale in [key for key, kept in self._decoders.items() if kept.weights.changed()]:
            self._drop(stale)  # made for weights its model no longer holds
        key = (id(model.get_decoder()), batch, graph)
        decoder = self._decoders.pop(key, None)
        if decoder is None or decoder.capacity < slots:
            if decoder is not None:
                self._count_failure(key, decoder)
            decoder = None  # free the smaller buffers first
            while len(self._decoders) >= self.sizes:
                self._drop(next(iter(self._decoders)))
            decoder = StaticDecoder(model, batch, slot_bucket(slots), graph)
        self._decoders[key] = decoder  # the most recently used last
        return decoder


@torch.no_grad()
@without_cudnn_attention()
def prefill(model: nn.Module, ids: Tensor, mask: Tensor, pixels: Tensor | None):
    """Left-padded prompts (B, L) with their images through the model into a new
    DynamicCache: (cache, the last position's logits (B, V), mask, next positions (B, 1)),
    what greedy_decode continues from."""
    pos = position_ids_from_mask(mask)
    cache = DynamicCache(config=model.config.get_text_config())
    out = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=pos,
        pixel_values=pixels,
        **cache_kwarg(cache),
        use_cache=True,
        logits_to_keep=1,
    )
    return cache, out.logits[:, -1], mask, pos[:, -1:] + 1


def answer_limits(lengths: list[int], max_new_tokens: int, context: int | None) -> list[int]:
    """The most tokens each sample's answer may hold after a sequence of ``lengths[b]``
    tokens: ``max_new_tokens``, or fewer where the model would otherwise read a token at a
    position past its ``context`` (the last answer token is never read, so a sequence that
    fills the context still gets one). At least 1 for a sequence inside the context."""
    if context is None:
        return [max_new_tokens] * len(lengths)
    return [max(0, min(max_new_tokens, context - length + 1)) for length in lengths]


@torch.no_grad()
def greedy_answers(
    model: nn.Module,
    ids: Tensor,
    mask: Tensor,
    pixels: Tensor,
    max_new_tokens: int,
    eos_id: int,
    decoder: str = "hf",
    pool: DecoderPool | None = None,
) -> list[list[int]]:
    """Greedy answers to left-padded prompts (B, L) with their images, each up to and with
    its end token: what ``generate(do_sample=False)`` returns, through ``decoder``."""
    cache, logits, mask, positions = prefill(model, ids, mask, pixels)
    return greedy_decode(model, cache, logits, mask, positions, max_new_tokens, eos_id, decoder, pool, keep_layers=0)


@torch.no_grad()
@without_cudnn_attention()
def greedy_decode(
    model: nn.Module,
    cache,
    logits: Tensor,
    mask: Tensor,
    positions: Tensor,
    max_new_tokens: int,
    eos_id: int,
    decoder: str = "hf",
    pool: DecoderPool | None = None,
    *,
    keep_layers: int | None = None,
    limits: list[int] | None = None,
) -> list[list[int]]:
    """Greedy tokens after a forward that filled ``cache`` and returned ``logits`` (B, V) of
    its last position; ``mask`` (B, T) marks the cache's real slots and ``positions``
    (B, 1) is each sample's next position. A sample stops at its end-of-sequence token
    (kept in its output), after ``max_new_tokens`` tokens, or after ``limits[b]`` tokens
    (answer_limits: where its context ends). ``decoder`` is resolved already (see resolve_decoder).
    ``keep_layers``: the caller reads only the cache's first ``keep_layers`` layers after
    this call (0: none of it), so the static decoders drop the others once copied (at 7B and
    batch 8 it can hold 7 GiB, else held twice while decoding); None keeps them all. The
    ``hf`` decoder decodes on the cache itself, which keeps every layer."""
    if decoder not in ("hf", "static", "graph"):
        raise ValueError(f"decoder must be resolved to 'hf', 'static' or 'graph', got {decoder!r}")
    batch = logits.shape[0]
    if limits is None:
        limits = [max_new_tokens] * batch
    if len(limits) != batch or min(limits, default=1) < 1:
        raise ValueError(f"limits must hold a count >= 1 per sample of the batch's {batch}, got {limits}")
    max_new_tokens = min(max_new_tokens, max(limits, default=1))
    nxt = logits.argmax(-1)
    step: Callable[[Tensor], Tensor]
    if decoder == "hf" or max_new_tokens == 1:
        step = _hf_steps(model, cache, mask, positions)
    else:
        pool = pool or DecoderPool()
        static = pool.get(model, batch, mask.shape[1] + max_new_tokens - 1, graph=decoder == "graph")
        static.load(cache, mask, positions, nxt, max_new_tokens - 1)
        if keep_layers is not None:
            del cache.layers[keep_layers:]

        def step(_token: Tensor) -> Tensor:
            return static.step()

    done = [False] * batch  # on the host: one device sync per step (the tokens' copy)
    tokens: list[list[int]] = [[] for _ in range(batch)]
    for i in range(max_new_tokens):
        for b, tok in enumerate(nxt.tolist()):
            if not done[b]:
                tokens[b].append(tok)
                done[b] = tok == eos_id or len(tokens[b]) == limits[b]
        if all(done) or i == max_new_tokens - 1:
            break  # no forward for a token that would never be read
        nxt = step(nxt)
    return tokens


def _hf_steps(model: nn.Module, cache, mask: Tensor, positions: Tensor) -> Callable[[Tensor], Tensor]:
    """The model's own forward per token over its DynamicCache."""
    ones = torch.ones(mask.shape[0], 1, dtype=mask.dtype, device=mask.device)

    def step(token: Tensor) -> Tensor:
        nonlocal mask, positions
        mask = torch.cat([mask, ones], 1)
        out = model(
            input_ids=token[:, None],
            attention_mask=mask,
            position_ids=positions,
            **cache_kwarg(cache),
            use_cache=True,
            logits_to_keep=1,
        )
        positions = positions + 1
        return out.logits[:, -1].argmax(-1)

    return step
