"""A synthetic fine-detail task: high-resolution images whose answer hides in a small tag."""

from .task import COLOURS, SynthSample, make_sample, split_seeds, write_dataset
from .tokenizer import make_char_tokenizer

__all__ = ["COLOURS", "SynthSample", "make_char_tokenizer", "make_sample", "split_seeds", "write_dataset"]
