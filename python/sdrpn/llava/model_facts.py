"""The facts every stage asks of a loaded model: its device, dtype, padding id and context,
and its identity (what artefacts record of their base model, and whether two such records
name one model). Plain torch: the option classes and label folders that use them need no
transformers."""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os

import numpy as np
import torch
from torch import nn

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}") from None


def pad_token_id(tokenizer) -> int:
    """The tokenizer's padding id, or its end-of-sequence id when it has none (LLaMA's)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:  # batches are padded, and answers end, with it
        raise ValueError(f"the tokenizer ({type(tokenizer).__name__}) has neither a pad nor an end-of-sequence token")
    return pad


def context_length(model: nn.Module) -> int | None:
    """The positions the text model was trained for (None where its config names none): a
    longer sequence would be read from positions it never saw."""
    return getattr(model.config.get_text_config(), "max_position_embeddings", None)


def checked_max_new_tokens(max_new_tokens, context: int | None) -> int:
    """``max_new_tokens`` as an int from 1 to the model's ``context`` (numpy's ints too), or
    ValueError naming it: a static decoding cache is sized by it."""
    if isinstance(max_new_tokens, numbers.Integral) and not isinstance(max_new_tokens, (bool, np.bool_)):
        if 1 <= max_new_tokens <= (context or max_new_tokens):
            return int(max_new_tokens)
    most = f"the model's context of {context} positions" if context else "any number"
    raise ValueError(f"max_new_tokens must be an int from 1 to {most}, got {max_new_tokens!r}")


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


def weights_fingerprint(model: nn.Module, layer: int = 0) -> list[float]:
    """Thirty-two weights of the text model, rounded: eight each of the embedding, decoder
    layer ``layer``'s MLP output and the last layer's query and value projections (what a
    fine-tune that leaves the embeddings and MLPs alone, such as LoRA on the attention,
    changes). Two models of one architecture tell apart by them. Compare them with
    fingerprints_match, whose tolerance lets a dtype change still match."""
    decoder = model.get_decoder()
    last = decoder.layers[-1].self_attn
    probes = [
        decoder.embed_tokens.weight,
        decoder.layers[layer].mlp.down_proj.weight,
        last.q_proj.weight,
        last.v_proj.weight,
    ]
    return [round(float(v), 4) for p in probes for v in p.detach().flatten()[:8].float().cpu()]


# Records written before the last layer's probes were added hold the first two probes only;
# they are compared on those.
_FIRST_PROBES = 16


def fingerprints_match(a: list[float], b: list[float]) -> bool:
    n = min(len(a), len(b))
    if n < _FIRST_PROBES or (len(a) != len(b) and n != _FIRST_PROBES):
        return False
    return all(math.isclose(x, y, rel_tol=2e-2, abs_tol=2e-3) for x, y in zip(a[:n], b[:n]))


def model_identity(model: nn.Module) -> dict:
    """What artefacts record of their base model: its name or Hub id as it was given to
    ``load_llava`` (or ``from_pretrained``), the architecture fingerprint and a weights
    fingerprint."""
    return {
        "name": getattr(model.config, "_name_or_path", None) or None,
        "config_fingerprint": config_fingerprint(model.config),
        "weights_fingerprint": weights_fingerprint(model),
    }


def check_model_identity(record: dict, name: str) -> None:
    """Refuse a model_identity record (read back from a file) whose fields are not of their
    kind, naming ``name``'s field: a name, an architecture fingerprint, 32 weight values."""
    kinds = {"name": str, "config_fingerprint": str, "weights_fingerprint": list}
    for key, kind in kinds.items():
        value = record.get(key)
        if value is not None and not isinstance(value, kind):
            raise ValueError(f"{name}.{key} must be a {kind.__name__} or null, got {value!r}")
    weights = record.get("weights_fingerprint") or []
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in weights):
        raise ValueError(f"{name}.weights_fingerprint must hold finite numbers, got {weights[:4]!r}...")


def is_local_folder(name: str) -> bool:
    return os.path.isdir(os.path.expanduser(name))


def model_folder_path(name: str) -> str:
    """A local model folder's real path however it is named (from another directory, with a
    trailing slash, by `~` or through a link); any other name, a Hub id, as written."""
    return os.path.realpath(os.path.expanduser(name)) if is_local_folder(name) else name


def same_model_name(a: str | None, b: str | None) -> bool:
    """Two names of one model: equal, or local folders that resolve to the same path (a
    resumed job may name it otherwise than the one that began)."""
    # A real path is absolute and names a folder that exists, so it never equals a Hub id or
    # a name of no folder: only two local folders can meet here.
    return a == b or (bool(a and b) and model_folder_path(a) == model_folder_path(b))


def same_model(recorded: dict | None, now: dict | None) -> bool:
    """Whether two model_identity records name one model: one architecture, the same
    weights (where both record them), one name."""
    if not isinstance(recorded, dict) or not isinstance(now, dict):
        return False
    if recorded.get("config_fingerprint") != now.get("config_fingerprint"):
        return False
    try:
        check_model_identity(recorded, "model")  # a settings file edited by hand: not the same
    except ValueError:
        return False
    weights = recorded.get("weights_fingerprint"), now.get("weights_fingerprint")
    if None not in weights and not fingerprints_match(*weights):
        return False
    return same_model_name(recorded.get("name"), now.get("name"))
