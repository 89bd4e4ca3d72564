"""Hooks into Hugging Face LLaVA-1.5 (transformers' LlavaForConditionalGeneration)."""

from typing import TYPE_CHECKING

from ..lazy_exports import lazy_exports

if TYPE_CHECKING:  # the package's names, imported on first use (sdrpn.lazy_exports)
    from .maps import AttentionMaps as AttentionMaps
    from .maps import TeacherForcedBatch as TeacherForcedBatch
    from .maps import attention_maps as attention_maps
    from .maps import given_answer_maps as given_answer_maps
    from .presets import LLAVA15_7B as LLAVA15_7B
    from .presets import LLAVA15_13B as LLAVA15_13B
    from .presets import PRESETS as PRESETS
    from .presets import HeadSelection as HeadSelection
    from .presets import LlavaPreset as LlavaPreset
    from .presets import get_preset as get_preset
    from .probe import AttentionProbe as AttentionProbe
    from .probe import EarlyExit as EarlyExit
    from .probe import probe_once as probe_once
    from .turns import model_turn as model_turn
else:  # hidden from type checkers, which would take any name through __getattr__
    __getattr__, __dir__, __all__ = lazy_exports(__name__, __file__)
del lazy_exports, TYPE_CHECKING  # not names of the package
