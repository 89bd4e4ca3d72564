"""Hooks into Hugging Face LLaVA-1.5 (transformers' LlavaForConditionalGeneration)."""

from .maps import AttentionMaps, TeacherForcedBatch, attention_maps, given_answer_maps
from .presets import LLAVA15_7B, LLAVA15_13B, PRESETS, HeadSelection, LlavaPreset, get_preset
from .probe import AttentionProbe, EarlyExit, probe_once

__all__ = [
    "AttentionMaps",
    "AttentionProbe",
    "EarlyExit",
    "HeadSelection",
    "LLAVA15_13B",
    "LLAVA15_7B",
    "LlavaPreset",
    "PRESETS",
    "TeacherForcedBatch",
    "attention_maps",
    "get_preset",
    "given_answer_maps",
    "probe_once",
]
