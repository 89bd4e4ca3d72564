"""A synthetic fine-detail task: high-resolution images whose answer hides in a small tag."""

from ..lazy_exports import lazy_exports
from .metrics import accuracy, box_iou, hit
from .task import COLOURS, SynthSample, make_sample, split_seeds, write_dataset

# The model and its tokenizer need transformers and tokenizers: imported when first asked for,
# so that the task's data and metrics (and `sdrpn-synth`'s one-line error without them) do not.
__getattr__, __dir__ = lazy_exports(
    __name__, {"TinyLlavaSpec": ".model", "build_tiny_llava": ".model", "make_char_tokenizer": ".tokenizer"}
)
del lazy_exports  # not a name of the package

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
