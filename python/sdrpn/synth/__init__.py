"""A synthetic fine-detail task: high-resolution images whose answer hides in a small tag."""

from .metrics import accuracy, box_iou, hit
from .model import TinyLlavaSpec, build_tiny_llava
from .task import COLOURS, SynthSample, make_sample, split_seeds, write_dataset
from .tokenizer import make_char_tokenizer

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
