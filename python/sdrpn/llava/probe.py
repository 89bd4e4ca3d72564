"""Capture post-RoPE queries and keys of chosen decoder layers without changing outputs.

The probe registers one attention function with transformers' AttentionInterface (and
the SDPA mask builder under the same name with AttentionMaskInterface), selects it for
the text decoder only, and delegates the real attention to SDPA: the model computes
exactly what it computes with SDPA, and the probe keeps q and k of the probed layers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .attention_kernels import without_cudnn_attention

PROBE_ATTENTION = "sdrpn_probe"
_CAPTURE_ATTR = "_sdrpn_capture"


def _probe_attention(
    module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None, **kwargs
):
    capture = getattr(module, _CAPTURE_ATTR, None)
    if capture is not None:
        capture(query, key)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(PROBE_ATTENTION, _probe_attention)
AttentionMaskInterface.register(PROBE_ATTENTION, sdpa_mask)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a LLaVA-style model (transformers 5.x layout)."""
    return model.get_decoder().layers


class ProbeDone(Exception):
    """Raised by a probe made with ``stop=True`` once the deepest probed layer's query and
    key are kept: the rest of that forward would compute nothing the probe reads."""


class AttentionProbe:
    """Context manager: while active, ``captured[layer]`` holds (query, key) of the last
    forward through each probed layer, shapes (B, H, L, d) and (B, Hk, L, d), or with
    ``reduce`` what ``reduce(layer, query, key)`` made of them, so that a forward need not
    hold every probed layer's q and k until it ends. With ``stop=True`` the forward ends
    there, raising ProbeDone (the caller catches it): the deepest layer's attention and
    MLP, and every layer after it, never run.

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
        config = self.model.get_decoder().config
        self._saved_impl = config._attn_implementation
        config._attn_implementation = PROBE_ATTENTION
        for layer in self.layers:
            setattr(self._attention_module(layer), _CAPTURE_ATTR, self._capturer(layer))
        return self

    def __exit__(self, *exc) -> None:
        for layer in self.layers:
            module = self._attention_module(layer)
            if hasattr(module, _CAPTURE_ATTR):
                delattr(module, _CAPTURE_ATTR)
        self.model.get_decoder().config._attn_implementation = self._saved_impl

    def _capturer(self, layer: int):
        last = self.stop and layer == self.layers[-1]

        def capture(query: Tensor, key: Tensor) -> None:
            query, key = query.detach(), key.detach()
            self.captured[layer] = (query, key) if self.reduce is None else self.reduce(layer, query, key)
            if last:
                raise ProbeDone

        return capture


@contextlib.contextmanager
def capture_outputs(module: nn.Module):
    """Context manager yielding a list that receives the module's output tensor (the hidden
    states, for a decoder layer) at each forward while the context lasts."""
    captured: list[Tensor] = []
    hook = module.register_forward_hook(lambda _m, _i, out: captured.append(out[0] if isinstance(out, tuple) else out))
    try:
        yield captured
    finally:
        hook.remove()


class EarlyExit:
    """Context manager: run only decoder layers [0, num_layers) (later layers are skipped;
    the decoder's final norm still runs on the last computed hidden state)."""

    def __init__(self, model: nn.Module, num_layers: int):
        self.config = model.get_decoder().config
        total = len(decoder_layers(model))
        if not 1 <= num_layers <= total:
            raise ValueError(f"num_layers must lie in [1, {total}], got {num_layers}")
        self.num_layers = num_layers
        self._saved: int | None = None

    def __enter__(self) -> EarlyExit:
        self._saved = self.config.num_hidden_layers
        self.config.num_hidden_layers = self.num_layers
        return self

    def __exit__(self, *exc) -> None:
        self.config.num_hidden_layers = self._saved


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
