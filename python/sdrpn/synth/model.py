"""The tiny LLaVA that stands in for a pretrained MLLM on the synthetic task."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from .tokenizer import make_char_tokenizer


@dataclass
class TinyLlavaSpec:
    """Sizes of the stand-in model (about 2.5M parameters with the defaults)."""

    image_size: int = 112  # the encoder's input: a quarter of the 448 px source
    patch_size: int = 14  # -> an 8x8 token grid
    vision_hidden: int = 128
    vision_layers: int = 4
    vision_heads: int = 4
    text_hidden: int = 128
    text_layers: int = 6
    text_heads: int = 4
    text_kv_heads: int = 2
    max_positions: int = 512


def build_tiny_llava(spec: TinyLlavaSpec | None = None, seed: int = 0):
    """A randomly initialised LlavaForConditionalGeneration for the task, and its tokenizer."""
    spec = spec or TinyLlavaSpec()
    if spec.image_size % spec.patch_size:
        raise ValueError(f"image_size must be a multiple of patch_size, got {spec.image_size} and {spec.patch_size}")
    tokenizer = make_char_tokenizer()
    grid = spec.image_size // spec.patch_size
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=spec.vision_hidden,
            intermediate_size=4 * spec.vision_hidden,
            num_hidden_layers=spec.vision_layers,
            num_attention_heads=spec.vision_heads,
            image_size=spec.image_size,
            patch_size=spec.patch_size,
        ),
        text_config=LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=spec.text_hidden,
            intermediate_size=4 * spec.text_hidden,
            num_hidden_layers=spec.text_layers,
            num_attention_heads=spec.text_heads,
            num_key_value_heads=spec.text_kv_heads,
            max_position_embeddings=spec.max_positions,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        ),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=grid * grid,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.config.sdrpn_spec = asdict(spec)
    return model, tokenizer
