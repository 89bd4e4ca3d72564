"""Hooks into Hugging Face LLaVA-1.5 (transformers' LlavaForConditionalGeneration)."""

from typing import TYPE_CHECKING

from ..lazy_exports import lazy_exports

if TYPE_CHECKING:  # the package's names, imported on first use (sdrpn.lazy_exports)
    from .maps import AttentionMaps, TeacherForcedBatch, attention_maps, given_answer_maps  # noqa: F401
    from .presets import LLAVA15_7B, LLAVA15_13B, PRESETS, HeadSelection, LlavaPreset, get_preset  # noqa: F401
    from .probe import AttentionProbe, EarlyExit, probe_once  # noqa: F401

__getattr__, __dir__, __all__ = lazy_exports(__name__, __file__)
del lazy_exports, TYPE_CHECKING  # not names of the package
