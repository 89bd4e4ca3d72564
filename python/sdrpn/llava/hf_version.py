"""What differs between the transformers 5 releases sdrpn runs on.

transformers 5.25 renamed the forwards' ``past_key_values`` argument to ``cache``; the old
name still works there with a FutureWarning and goes in 5.40, and the releases before 5.25
(the pinned 5.17 among them) know only the old one. Every forward sdrpn calls with a KV
cache passes it through ``cache_kwarg``."""

from __future__ import annotations

import inspect

from transformers.models.llama.modeling_llama import LlamaModel

# The decorator that warns about the old name keeps the signature of the forward it wraps.
CACHE_NAME = "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"


def cache_kwarg(cache) -> dict:
    """``{name: cache}`` for the forward's keyword arguments, under this release's name."""
    return {CACHE_NAME: cache}
