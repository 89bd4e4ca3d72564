"""Capture post-RoPE queries and keys of chosen decoder layers without changing outputs.

The probe registers one attention function with transformers' AttentionInterface (and
the SDPA mask builder under the same name with AttentionMaskInterface), selects it for
the text decoder only, and delegates the real attention to SDPA: the model computes
exactly what it computes with SDPA, and the probe keeps q and k of the probed layers.

Hooks set here act on the forwards of the thread that set them alone: a thread sharing the
model runs its own forwards meanwhile unread and unstopped (``turns``).
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .attention_kernels import without_cudnn_attention
from .turns import model_turn

PROBE_ATTENTION = "sdrpn_probe"
_CAPTURE_ATTR = "_sdrpn_capture"

# A probe selects its attention in the model's config, which every thread reads. Another
# thread's forward meanwhile runs the implementation the probe replaced, for its mask and
# its attention alike: a forward that builds its mask on one side of the probe's entry or
# exit and attends on the other stays consistent (eager attention given SDPA's mask, which
# may be None for "causal", would attend to every position). id(text config) -> (the
# probing thread, the implementation replaced).
_REPLACED: dict[int, tuple[int, str]] = {}


def _replaced_elsewhere(config) -> str | None:
    """The implementation this thread runs on ``config`` while a probe is active there, or
    None for the probe's own (SDPA): the probing thread's, and any thread's where the probe
    replaced SDPA itself."""
    entry = _REPLACED.get(id(config))
    if entry is None or entry[0] == threading.get_ident() or entry[1] == "sdpa":
        return None
    return entry[1]


def _probe_attention(
    module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None, **kwargs
):
    replaced = _replaced_elsewhere(module.config)
    if replaced is not None:
        eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        attend = ALL_ATTENTION_FUNCTIONS.get_interface(replaced, eager)
        return attend(module, query, key, value, attention_mask, **kwargs)
    capture = getattr(module, _CAPTURE_ATTR, None)
    if capture is not None:
        capture(query, key)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _probe_mask(*args, config=None, **kwargs):
    replaced = _replaced_elsewhere(config)
    build = sdpa_mask if replaced is None else ALL_MASK_ATTENTION_FUNCTIONS[replaced]
    return build(*args, config=config, **kwargs)


AttentionInterface.register(PROBE_ATTENTION, _probe_attention)
AttentionMaskInterface.register(PROBE_ATTENTION, _probe_mask)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a LLaVA-style model (transformers 5.x layout)."""
    return model.get_decoder().layers


class ProbeDone(Exception):
    """Raised inside a forward by a probe or capture made with ``stop=True`` once it holds
    what it reads (the deepest probed layer's query and key, the layer's output): the rest
    of that forward would compute nothing it reads."""


class AttentionProbe:
    """Context manager: while active, ``captured[layer]`` holds (query, key) of the last
    forward through each probed layer, shapes (B, H, L, d) and (B, Hk, L, d), or with
    ``reduce`` what ``reduce(layer, query, key)`` made of them, so that a forward need not
    hold every probed layer's q and k until it ends. With ``stop=True`` the forward ends
    there, raising ProbeDone (the caller catches it): the deepest layer's attention and
    MLP, and every layer after it, never run. Only the forwards of the thread that entered it
    are read (and stopped), and it holds the model's turn (``turns.model_turn``) while active:
    it selects its attention function in the model's config, which every thread reads, and
    delegates to SDPA for its thread, while another thread's forward runs the model's own
    implementation. One probe on a model at a time: a second, in the same thread too, is
    refused (it would take the first's captures away when it left).

    Example::

        with AttentionProbe(model, layers=[2, 14]) as probe:
            model(**inputs)
        q14, k14 = probe.captured[14]
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Iterable[int],
        stop: bool = False,
        reduce: Callable[[int, Tensor, Tensor], Any] | None = None,
    ):
        self.model = model
        self.layers = sorted(set(layers))
        self.stop = stop
        self.reduce = reduce
        self.captured: dict[int, Any] = {}
        n = len(decoder_layers(model))
        bad = [layer for layer in self.layers if not 0 <= layer < n]
        if bad:
            raise ValueError(f"layers must lie in [0, {n}) for this model, got {bad}")
        self._saved_impl: str | None = None

    def _attention_module(self, layer: int) -> nn.Module:
        return decoder_layers(self.model)[layer].self_attn

    def __enter__(self) -> AttentionProbe:
        self._turn = model_turn(self.model)
        self._turn.acquire()
        config = self.model.get_decoder().config
        if config._attn_implementation == PROBE_ATTENTION:
            self._turn.release()
            raise RuntimeError("an AttentionProbe is active on this model already: one probe at a time")
        self._saved_impl = config._attn_implementation
        try:  # whatever stops it here (a KeyboardInterrupt too) leaves the model and the turn as found
            owner = threading.get_ident()
            _REPLACED[id(config)] = (owner, self._saved_impl or "eager")
            config._attn_implementation = PROBE_ATTENTION
            for layer in self.layers:
                setattr(self._attention_module(layer), _CAPTURE_ATTR, self._capturer(layer, owner))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            for layer in self.layers:
                module = self._attention_module(layer)
                if hasattr(module, _CAPTURE_ATTR):
                    delattr(module, _CAPTURE_ATTR)
        finally:
            config = self.model.get_decoder().config
            config._attn_implementation = self._saved_impl
            _REPLACED.pop(id(config), None)
            self._turn.release()

    def _capturer(self, layer: int, owner: int):
        last = self.stop and layer == self.layers[-1]

        def capture(query: Tensor, key: Tensor) -> None:
            if threading.get_ident() != owner:
                return
            query, key = query.detach(), key.detach()
            self.captured[layer] = (query, key) if self.reduce is None else self.reduce(layer, query, key)
            if last:
                raise ProbeDone

        return capture


@contextlib.contextmanager
def capture_outputs(module: nn.Module, stop: bool = False):
    """Context manager yielding a list that receives the module's output tensor (the hidden
    states, for a decoder layer) at each forward of this thread while the context lasts.
    With ``stop=True`` the forward ends there, raising ProbeDone (the caller catches it)."""
    captured: list[Tensor] = []
    owner = threading.get_ident()

    def keep(_module, _inputs, out) -> None:
        if threading.get_ident() != owner:
            return
        captured.append(out[0] if isinstance(out, tuple) else out)
        if stop:
            raise ProbeDone

    hook = module.register_forward_hook(keep)
    try:
        yield captured
    finally:
        hook.remove()


class EarlyExit:
    """Context manager: run only decoder layers [0, num_layers) (later layers are skipped;
    the decoder's final norm still runs on the last computed hidden state). It lowers the
    layer count in the model's config, which every thread reads: it holds the model's turn
    (``turns.model_turn``), and a forward of the model in another thread meanwhile runs as
    few layers. sdrpn's own calls stop a forward by a hook of their thread instead
    (``capture_outputs(..., stop=True)``)."""

    def __init__(self, model: nn.Module, num_layers: int):
        self.model = model
        self.config = model.get_decoder().config
        total = len(decoder_layers(model))
        if not 1 <= num_layers <= total:
            raise ValueError(f"num_layers must lie in [1, {total}], got {num_layers}")
        self.num_layers = num_layers
        self._saved: int | None = None

    def __enter__(self) -> EarlyExit:
        self._turn = model_turn(self.model)
        self._turn.acquire()
        self._saved = self.config.num_hidden_layers
        self.config.num_hidden_layers = self.num_layers
        return self

    def __exit__(self, *exc) -> None:
        self.config.num_hidden_layers = self._saved
        self._turn.release()


@torch.no_grad()
@without_cudnn_attention()
def probe_once(
    model: nn.Module, layers: Iterable[int], reduce: Callable[[int, Tensor, Tensor], Any] | None = None, **inputs
) -> dict[int, Any]:
    """One forward of the LLaVA backbone (no LM head), up to the deepest probed layer's
    query and key: each probed layer's (query, key), or ``reduce(layer, query, key)`` (see
    AttentionProbe). A cache passed in ``inputs`` receives the new keys and values of every
    layer up to that one, as the forward would have left them."""
    with AttentionProbe(model, layers, stop=True, reduce=reduce) as probe:  # no layer past the deepest runs
        try:
            model.model(**inputs, use_cache=False)
        except ProbeDone:
            pass
    return probe.captured
