"""A synthetic fine-detail task: high-resolution images whose answer hides in a small tag."""

from typing import TYPE_CHECKING

from ..lazy_exports import lazy_exports
from .metrics import accuracy, box_iou, hit
from .task import COLOURS, SynthSample, make_sample, split_seeds, write_dataset

# The model and its tokenizer need transformers and tokenizers: imported when first asked for
# (sdrpn.lazy_exports), so that the task's data and metrics (and `sdrpn-synth`'s one-line
# error without them) do not.
if TYPE_CHECKING:
    from .model import TinyLlavaSpec, build_tiny_llava
    from .tokenizer import make_char_tokenizer
else:  # hidden from type checkers, which would take any name through __getattr__
    __getattr__, __dir__, _ = lazy_exports(__name__, __file__)
    del _
del lazy_exports, TYPE_CHECKING  # not names of the package

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
