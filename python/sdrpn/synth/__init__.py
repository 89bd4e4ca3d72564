"""A synthetic fine-detail task: high-resolution images whose answer hides in a small tag."""

import importlib

from .metrics import accuracy, box_iou, hit
from .task import COLOURS, SynthSample, make_sample, split_seeds, write_dataset

# The model and its tokenizer need transformers and tokenizers: imported when first asked for,
# so that the task's data and metrics (and `sdrpn-synth`'s one-line error without them) do not.
_LAZY = {"TinyLlavaSpec": ".model", "build_tiny_llava": ".model", "make_char_tokenizer": ".tokenizer"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "COLOURS",
    "SynthSample",
    "TinyLlavaSpec",
    "accuracy",
    "box_iou",
    "build_tiny_llava",
    "hit",
    "make_char_tokenizer",
    "make_sample",
    "split_seeds",
    "write_dataset",
]
