"""Hooks into Hugging Face LLaVA-1.5 (transformers' LlavaForConditionalGeneration)."""

from ..lazy_exports import lazy_exports

_HOMES = {
    "AttentionMaps": ".maps",
    "TeacherForcedBatch": ".maps",
    "attention_maps": ".maps",
    "given_answer_maps": ".maps",
    "LLAVA15_7B": ".presets",
    "LLAVA15_13B": ".presets",
    "PRESETS": ".presets",
    "HeadSelection": ".presets",
    "LlavaPreset": ".presets",
    "get_preset": ".presets",
    "AttentionProbe": ".probe",
    "EarlyExit": ".probe",
    "probe_once": ".probe",
}
__getattr__, __dir__ = lazy_exports(__name__, _HOMES)
del lazy_exports  # not a name of the package
__all__ = sorted(_HOMES)
