"""Loading a LLaVA checkpoint folder (weights, config, tokenizer) for our jobs."""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoTokenizer, LlavaForConditionalGeneration

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}") from None


def pad_token_id(tokenizer) -> int:
    """The tokenizer's padding id, or its end-of-sequence id when it has none (LLaMA's)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def load_llava(model_dir: str, dtype: str = "bf16", device: str = "cpu") -> tuple[nn.Module, object]:
    """A frozen LlavaForConditionalGeneration in eval mode on SDPA attention, and its tokenizer.
    Local folders only: nothing is downloaded."""
    model = LlavaForConditionalGeneration.from_pretrained(
        model_dir, dtype=parse_dtype(dtype), attn_implementation="sdpa", local_files_only=True)
    model.to(device).eval().requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    return model, tokenizer
