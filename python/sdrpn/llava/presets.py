"""What SD-RPN reads of each base model: heads, sink threshold, branch point, prompt
template and recommended RoI options (SPEC Stages 1-3), one preset per model."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from ..ops import SINK_THRESHOLD
from ..options import RoiOptions
from .inputs import PROMPT_TEMPLATE, check_template


@dataclass(frozen=True)
class HeadSelection:
    """(layer, head) pairs whose attention is averaged; head None means all heads."""

    pairs: tuple[tuple[int, int | None], ...]

    def __post_init__(self):
        if not self.pairs:
            raise ValueError("a head selection needs at least one (layer, head) pair, got none")
        for layer, head in self.pairs:
            if layer < 0 or (head is not None and head < 0):
                raise ValueError(f"layer and head must be >= 0, got ({layer}, {head})")

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(sorted({layer for layer, _ in self.pairs}))

    def heads_of(self, layer: int, num_heads: int) -> list[int]:
        """The selected heads of one layer, in order, each once."""
        heads: list[int] = []
        for lay, head in self.pairs:
            if lay != layer:
                continue
            for h in range(num_heads) if head is None else (head,):
                if h >= num_heads:
                    raise ValueError(f"head {h} of layer {layer} does not exist: the model has {num_heads} heads")
                if h not in heads:
                    heads.append(h)
        return heads

    def count(self, num_heads: int) -> int:
        return sum(len(self.heads_of(layer, num_heads)) for layer in self.layers)


@dataclass(frozen=True)
class LlavaPreset:
    """Everything SD-RPN needs to know about one base model: the probed heads and the sink
    threshold (Stage 1), the RPN's branch point (Stage 2), the prompt template the model
    was trained with and the RoI options recommended for its grid (Stage 3)."""

    name: str
    grounding: HeadSelection
    sink: HeadSelection
    branch_layer: int = 15
    depth: int = 3
    sink_threshold: float = SINK_THRESHOLD
    prompt_template: str = PROMPT_TEMPLATE
    roi: RoiOptions = RoiOptions()

    def __post_init__(self):
        if self.branch_layer < 1 or self.depth < 1:
            raise ValueError(f"branch_layer and depth must be >= 1, got {self.branch_layer} and {self.depth}")
        check_template(self.prompt_template)

    @property
    def probed_layers(self) -> tuple[int, ...]:
        return tuple(sorted(set(self.grounding.layers) | set(self.sink.layers)))

    def check_fits(self, config) -> None:
        """Refuses a preset made for another model: layers, heads and branch point must exist."""
        text = config.get_text_config()
        layers, heads = text.num_hidden_layers, text.num_attention_heads
        if max(self.probed_layers) >= layers or self.branch_layer + self.depth > layers:
            raise ValueError(
                f"preset {self.name!r} reads layers {list(self.probed_layers)} and branches at "
                f"{self.branch_layer} with depth {self.depth}, but the model has {layers} layers "
                "(a custom preset that leaves out branch_layer and depth takes LLaVA-1.5's 15 and 3)"
            )
        for selection in (self.grounding, self.sink):
            for layer in selection.layers:
                selection.heads_of(layer, heads)  # raises for a head the model lacks

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "grounding": [list(p) for p in self.grounding.pairs],
            "sink": [list(p) for p in self.sink.pairs],
            "branch_layer": self.branch_layer,
            "depth": self.depth,
            "sink_threshold": self.sink_threshold,
            "prompt_template": self.prompt_template,
            "roi": self.roi.to_dict(),
        }


LLAVA15_7B = LlavaPreset(
    name="llava15-7b",
    grounding=HeadSelection(((14, 13), (14, 24), (14, 26))),
    sink=HeadSelection(((2, None),)),
    branch_layer=15,
    depth=3,
)

LLAVA15_13B = LlavaPreset(
    name="llava15-13b",
    grounding=HeadSelection(((13, 21), (13, 23), (13, 26), (15, 2), (16, 2), (16, 21), (16, 30))),
    sink=HeadSelection(((16, 17), (16, 22))),
    branch_layer=15,
    depth=3,
)

PRESETS = {p.name: p for p in (LLAVA15_7B, LLAVA15_13B)}
# A model folder may carry its own preset under this name (the shipped synthetic model does).
PRESET_FILE = "sdrpn_preset.json"
# "auto" without such a file: the preset of the LLaVA-1.5 size with that many decoder layers.
_BY_LAYERS = {32: LLAVA15_7B, 40: LLAVA15_13B}


def _pairs(spec) -> HeadSelection:
    return HeadSelection(tuple((int(layer), None if head is None else int(head)) for layer, head in spec))


def preset_from_dict(spec: dict, name: str = "custom") -> LlavaPreset:
    """A custom preset: {"grounding": [[layer, head], ...], "sink": [[layer, null], ...],
    optional "branch_layer", "depth", "sink_threshold", "prompt_template", "roi" (RoiOptions
    fields)}; a null head means all heads."""
    known = {"name", "grounding", "sink", "branch_layer", "depth", "sink_threshold", "prompt_template", "roi"}
    try:
        unknown = sorted(set(spec) - known)
        if unknown:
            raise ValueError(f"unknown fields {unknown}")
        return LlavaPreset(
            name=spec.get("name", name),
            grounding=_pairs(spec["grounding"]),
            sink=_pairs(spec["sink"]),
            branch_layer=int(spec.get("branch_layer", 15)),
            depth=int(spec.get("depth", 3)),
            sink_threshold=float(spec.get("sink_threshold", SINK_THRESHOLD)),
            prompt_template=spec.get("prompt_template", PROMPT_TEMPLATE),
            roi=RoiOptions.from_dict(spec.get("roi")),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(
            f"a custom preset needs grounding and sink lists of [layer, head] pairs, got {spec!r}: {err}"
        ) from None


def get_preset(name: str) -> LlavaPreset:
    """A named preset, or a custom one from a JSON file (see preset_from_dict)."""
    if name in PRESETS:
        return PRESETS[name]
    if os.path.isfile(name):
        with open(name) as f:
            return preset_from_dict(json.load(f), name=os.path.basename(name))
    raise ValueError(f"preset must be one of {sorted(PRESETS)}, 'auto' or a JSON file, got {name!r}")


def resolve_preset(name: str | None, model) -> LlavaPreset:
    """The preset to use with a loaded model: the named one, or for None / "auto" the
    model folder's own PRESET_FILE, else the LLaVA-1.5 preset of its depth. Checked against
    the model either way."""
    if name not in (None, "auto"):
        preset = get_preset(name)
    else:
        folder = getattr(model.config, "_name_or_path", "") or ""
        own = os.path.join(folder, PRESET_FILE)
        layers = model.config.get_text_config().num_hidden_layers
        if os.path.isfile(own):
            preset = get_preset(own)
        elif layers in _BY_LAYERS:
            preset = _BY_LAYERS[layers]
        else:
            raise ValueError(
                f"no preset for a model with {layers} decoder layers and no {PRESET_FILE} in "
                f"{folder!r}: pass --preset (a name among {sorted(PRESETS)} or a JSON file)"
            )
    preset.check_fits(model.config)
    return preset
