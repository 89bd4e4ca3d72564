"""What SD-RPN reads of each base model: heads, sink threshold, branch point, prompt
template and recommended RoI options (SPEC Stages 1-3), one preset per model."""

from __future__ import annotations

import json
import math
import numbers
import os
from dataclasses import dataclass

from ..ops import SINK_THRESHOLD
from ..options import RoiOptions, is_int
from .inputs import PROMPT_TEMPLATE, check_template


@dataclass(frozen=True)
class HeadSelection:
    """(layer, head) pairs whose attention is averaged; head None means all heads."""

    pairs: tuple[tuple[int, int | None], ...]

    def __post_init__(self):
        if not isinstance(self.pairs, (tuple, list)) or not self.pairs:
            raise ValueError(f"a head selection needs at least one (layer, head) pair, got {self.pairs!r}")
        object.__setattr__(self, "pairs", tuple(tuple(p) if isinstance(p, list) else p for p in self.pairs))
        for pair in self.pairs:
            # Whole numbers only: a head of 1.5 must not be read as head 1.
            if (
                not isinstance(pair, tuple)
                or len(pair) != 2
                or not is_int(pair[0])
                or not (pair[1] is None or is_int(pair[1]))
            ):
                raise ValueError(f"a head selection's pairs must be (int layer, int head or None), got {pair!r}")
            layer, head = pair
            if layer < 0 or (head is not None and head < 0):
                raise ValueError(f"layer and head must be >= 0, got ({layer}, {head})")
        # Python's ints from here (numpy's are taken): a preset is recorded as JSON.
        pairs = tuple((int(layer), None if head is None else int(head)) for layer, head in self.pairs)
        object.__setattr__(self, "pairs", pairs)

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
        for name in ("grounding", "sink"):
            if not isinstance(getattr(self, name), HeadSelection):
                raise TypeError(f"{name} must be a HeadSelection, got {type(getattr(self, name)).__name__}")
        if not isinstance(self.roi, RoiOptions):
            raise TypeError(f"roi must be a RoiOptions (from_dict takes a dict), got {type(self.roi).__name__}")
        if not isinstance(self.name, str):
            raise TypeError(f"name must be a string, got {self.name!r}")
        for name in ("branch_layer", "depth"):
            if not is_int(getattr(self, name)):
                raise TypeError(f"{name} must be an int, got {getattr(self, name)!r}")
        if isinstance(self.sink_threshold, bool) or not isinstance(self.sink_threshold, numbers.Real):
            raise TypeError(f"sink_threshold must be a number, got {self.sink_threshold!r}")
        for name, kind in (("branch_layer", int), ("depth", int), ("sink_threshold", float)):
            object.__setattr__(self, name, kind(getattr(self, name)))  # numpy's numbers as Python's
        if self.branch_layer < 1 or self.depth < 1:
            raise ValueError(f"branch_layer and depth must be >= 1, got {self.branch_layer} and {self.depth}")
        if not (math.isfinite(self.sink_threshold) and self.sink_threshold > 0):
            raise ValueError(f"sink_threshold must be a finite number > 0, got {self.sink_threshold!r}")
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
                try:
                    selection.heads_of(layer, heads)  # raises for a head the model lacks
                except ValueError as err:
                    raise ValueError(f"preset {self.name!r}: {err}") from None

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


def _whole(value, what: str) -> int:
    """A JSON number that is a whole number, as an int; "1", 1.5 and true are refused (int()
    would take them silently)."""
    whole = isinstance(value, numbers.Integral) or (isinstance(value, float) and value.is_integer())
    if isinstance(value, bool) or not whole:
        raise ValueError(f"{what} must be a whole number, got {value!r}")
    return int(value)


def _pairs(spec, what: str) -> HeadSelection:
    if not isinstance(spec, (list, tuple)) or not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in spec):
        raise ValueError(f"{what} must be a list of [layer, head] pairs, got {spec!r}")
    return HeadSelection(
        tuple(
            (_whole(layer, f"{what} layer"), None if head is None else _whole(head, f"{what} head"))
            for layer, head in spec
        )
    )


def preset_from_dict(spec: dict, name: str = "custom") -> LlavaPreset:
    """A custom preset: {"grounding": [[layer, head], ...], "sink": [[layer, null], ...],
    optional "branch_layer", "depth", "sink_threshold", "prompt_template", "roi" (RoiOptions
    fields)}; a null head means all heads."""
    known = {"name", "grounding", "sink", "branch_layer", "depth", "sink_threshold", "prompt_template", "roi"}
    if not isinstance(spec, dict):
        raise ValueError(f"a custom preset must be a JSON object, got {type(spec).__name__}")
    unknown = sorted(set(spec) - known)
    if unknown:
        raise ValueError(f"a custom preset has unknown fields {unknown}; known: {sorted(known)}")
    missing = [key for key in ("grounding", "sink") if key not in spec]
    if missing:
        raise ValueError(f"a custom preset needs grounding and sink lists of [layer, head] pairs, lacks {missing}")
    sink_threshold = spec.get("sink_threshold", SINK_THRESHOLD)
    if isinstance(sink_threshold, bool) or not isinstance(sink_threshold, numbers.Real):
        raise ValueError(f"sink_threshold must be a number, got {sink_threshold!r}")
    template = spec.get("prompt_template", PROMPT_TEMPLATE)
    if not isinstance(template, str):
        raise ValueError(f"prompt_template must be a string, got {template!r}")
    roi = spec.get("roi")
    if roi is not None and not isinstance(roi, dict):
        raise ValueError(f"roi must be an object of RoiOptions fields, got {roi!r}")
    return LlavaPreset(
        name=str(spec.get("name", name)),
        grounding=_pairs(spec["grounding"], "grounding"),
        sink=_pairs(spec["sink"], "sink"),
        branch_layer=_whole(spec.get("branch_layer", 15), "branch_layer"),
        depth=_whole(spec.get("depth", 3), "depth"),
        sink_threshold=float(sink_threshold),
        prompt_template=template,
        roi=RoiOptions.from_dict(roi),
    )


def get_preset(name: str, *, auto: bool = False) -> LlavaPreset:
    """A named preset, or a custom one from a JSON file (see preset_from_dict). ``auto``:
    the caller also takes "auto", which a refusal then lists."""
    if not isinstance(name, str):
        raise TypeError(f"preset must be a name or a JSON file's path, got {type(name).__name__}")
    if name in PRESETS:
        return PRESETS[name]
    if os.path.isfile(name):
        try:
            with open(name, encoding="utf-8") as f:
                spec = json.load(f)
            return preset_from_dict(spec, name=os.path.basename(name))
        except (OSError, ValueError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise ValueError(f"preset file {name}: {err}") from None
    if os.path.isdir(name):
        raise ValueError(f"preset file {name}: is a folder (name a preset's JSON file)")
    if name.endswith(".json") or os.sep in name:  # meant as a file: say that one is missing
        raise ValueError(f"preset file {name}: no such file")
    also = ", 'auto'" if auto else ""  # resolve_preset's: it needs the model
    raise ValueError(f"preset must be one of {sorted(PRESETS)}{also} or a JSON file, got {name!r}")


def _model_folder(model) -> str | None:
    """The local folder the model was loaded from; None for a model built in code (whose
    empty name would otherwise make PRESET_FILE a path in the working directory) or read
    from the Hub."""
    name = getattr(model.config, "_name_or_path", "") or ""
    return name if name and os.path.isdir(name) else None


def model_preset(model) -> LlavaPreset | None:
    """A loaded model's own preset ("auto"): its folder's PRESET_FILE, else the LLaVA-1.5
    preset of its depth, else None. Not checked against the model."""
    folder = _model_folder(model)
    if folder and os.path.isfile(os.path.join(folder, PRESET_FILE)):
        return get_preset(os.path.join(folder, PRESET_FILE))
    return _BY_LAYERS.get(model.config.get_text_config().num_hidden_layers)


def resolve_preset(name: str | None, model) -> LlavaPreset:
    """The preset to use with a loaded model: the named one, or for None / "auto" the
    model's own (model_preset). Checked against the model either way."""
    preset = get_preset(name, auto=True) if name not in (None, "auto") else model_preset(model)
    if preset is None:
        folder = _model_folder(model)
        where = f"in {folder!r}" if folder else "in a model folder"
        raise ValueError(
            f"no preset for a model with {model.config.get_text_config().num_hidden_layers} decoder layers and no "
            f"{PRESET_FILE} {where}: pass --preset (a name among {sorted(PRESETS)} or a JSON file)"
        )
    preset.check_fits(model.config)
    return preset
