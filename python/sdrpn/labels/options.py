"""The labelling settings (SPEC Stage 1), recorded whole in every label folder."""

from __future__ import annotations

from dataclasses import dataclass

from ..llava.inputs import PREPROCESSING_MODES, check_template
from ..options import Options, option

ANSWER_SOURCES = ("self", "given")


@dataclass(frozen=True)
class LabelOptions(Options):
    """How pseudo labels are made from a model's attention.

    ``sink_threshold`` and ``prompt_template`` left at None take the preset's; a label
    folder records the values actually used.
    """

    answers: str = option(
        "self",
        "'self': the model's own greedy answers (self-distillation); 'given': the data's answers",
        choices=ANSWER_SOURCES,
    )
    max_new_tokens: int = option(128, "longest self answer, in tokens")
    fg_ratio: float = option(0.2, "foreground: cells above fg_ratio * max (alpha)")
    bg_ratio: float = option(0.1, "background: cells outside the box below bg_ratio * max (beta)")
    max_box_fraction: float = option(
        0.5, "a foreground box covering this fraction of the grid makes the sample all-ignore (rho)"
    )
    sink_threshold: float | None = option(None, "sink-probe value from which a token is a sink (default: the preset's)")
    prompt_template: str | None = option(
        None, "prompt around the question, with <image> and {question} (default: the preset's)"
    )
    preprocessing: str = option(
        "pad", "image preprocessing: 'pad' (LLaVA-1.5) or 'crop' (HF's CLIP default)", choices=PREPROCESSING_MODES
    )

    def __post_init__(self):
        self.check_types()
        if self.answers not in ANSWER_SOURCES:
            raise ValueError(f"answers must be one of {ANSWER_SOURCES}, got {self.answers!r}")
        if self.preprocessing not in PREPROCESSING_MODES:
            raise ValueError(f"preprocessing must be one of {PREPROCESSING_MODES}, got {self.preprocessing!r}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        # Values that make every sample all-ignore, silently (SPEC Stage 1: attention maps
        # are >= 0). A sink threshold <= 0 makes every cell a sink; foreground is strictly
        # above fg_ratio * max, so fg_ratio >= 1 leaves none.
        if self.sink_threshold is not None and not self.sink_threshold > 0:
            raise ValueError(f"sink_threshold must be > 0, got {self.sink_threshold}")
        if not 0 < self.fg_ratio < 1:
            raise ValueError(f"fg_ratio must be in (0, 1), got {self.fg_ratio}")
        if not self.bg_ratio >= 0:  # background lies outside the box: any ratio has a meaning
            raise ValueError(f"bg_ratio must be >= 0, got {self.bg_ratio}")
        if not self.max_box_fraction > 0:  # above 1: no box is too large (an ablation)
            raise ValueError(f"max_box_fraction must be > 0, got {self.max_box_fraction}")
        if self.prompt_template is not None:
            check_template(self.prompt_template)

    def resolved(self, preset) -> LabelOptions:
        """These options with the preset's values where they were left to it."""
        return self.updated(
            sink_threshold=self.sink_threshold if self.sink_threshold is not None else preset.sink_threshold,
            prompt_template=self.prompt_template or preset.prompt_template,
        )
