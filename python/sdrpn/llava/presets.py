"""Which layers and heads SD-RPN reads, per model (SPEC Stage 1 and 2)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field


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
            for h in (range(num_heads) if head is None else (head,)):
                if h >= num_heads:
                    raise ValueError(f"head {h} of layer {layer} does not exist: the model has "
                                     f"{num_heads} heads")
                if h not in heads:
                    heads.append(h)
        return heads

    def count(self, num_heads: int) -> int:
        return sum(len(self.heads_of(layer, num_heads)) for layer in self.layers)


@dataclass(frozen=True)
class LlavaPreset:
    """The probed heads, the sink threshold and the RPN's branch point for one model."""

    name: str
    grounding: HeadSelection
    sink: HeadSelection
    branch_layer: int = 15
    depth: int = 3
    sink_threshold: float = 1e-3
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def probed_layers(self) -> tuple[int, ...]:
        return tuple(sorted(set(self.grounding.layers) | set(self.sink.layers)))


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


def preset_from_dict(spec: dict, name: str = "custom") -> LlavaPreset:
    """A custom preset: {"grounding": [[layer, head], ...], "sink": [[layer, null], ...],
    optional "branch_layer", "depth", "sink_threshold"}; a null head means all heads."""
    try:
        return LlavaPreset(
            name=spec.get("name", name),
            grounding=HeadSelection(tuple((int(l), None if h is None else int(h)) for l, h in spec["grounding"])),
            sink=HeadSelection(tuple((int(l), None if h is None else int(h)) for l, h in spec["sink"])),
            branch_layer=int(spec.get("branch_layer", 15)),
            depth=int(spec.get("depth", 3)),
            sink_threshold=float(spec.get("sink_threshold", 1e-3)),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"a custom preset needs grounding and sink lists of [layer, head] "
                         f"pairs, got {spec!r}: {err}") from None


def get_preset(name: str) -> LlavaPreset:
    """A named preset, or a custom one from a JSON file (see preset_from_dict)."""
    if name in PRESETS:
        return PRESETS[name]
    if os.path.isfile(name):
        with open(name) as f:
            return preset_from_dict(json.load(f), name=os.path.basename(name))
    raise ValueError(f"preset must be one of {sorted(PRESETS)} or a JSON file, got {name!r}")
