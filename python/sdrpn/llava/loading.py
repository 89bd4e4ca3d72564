"""Loading a LLaVA checkpoint (weights, config, tokenizer), and the facts every stage asks
of a loaded model: its device, dtype, padding id and identity."""

from __future__ import annotations

import hashlib
import json

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


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def model_dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


# Architecture fields that decide whether an RPN or a label folder fits a model; names,
# paths, dtypes and attention back-ends are left out, so a copy of the model matches.
_TEXT_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "vocab_size",
)
_VISION_FIELDS = ("image_size", "patch_size", "hidden_size", "num_hidden_layers")


def config_fingerprint(config) -> str:
    """A short hash of the model's architecture (see _TEXT_FIELDS and _VISION_FIELDS)."""
    text, vision = config.get_text_config(), config.vision_config
    facts = {
        "text": {k: getattr(text, k, None) for k in _TEXT_FIELDS},
        "vision": {k: getattr(vision, k, None) for k in _VISION_FIELDS},
        "image_token_id": getattr(config, "image_token_id", None),
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]


def model_identity(model: nn.Module) -> dict:
    """What artefacts record of their base model: its name or Hub id as it was given to
    ``load_llava`` (or ``from_pretrained``) and the architecture fingerprint."""
    return {
        "name": getattr(model.config, "_name_or_path", None) or None,
        "config_fingerprint": config_fingerprint(model.config),
    }


def load_llava(model_dir: str, dtype: str = "bf16", device: str = "cpu") -> tuple[nn.Module, object]:
    """A frozen LlavaForConditionalGeneration in eval mode on SDPA attention, and its tokenizer.
    Local folders only: nothing is downloaded."""
    model = LlavaForConditionalGeneration.from_pretrained(
        model_dir, dtype=parse_dtype(dtype), attn_implementation="sdpa", local_files_only=True
    )
    model.to(device).eval().requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    return model, tokenizer
