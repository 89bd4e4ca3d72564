"""Typed, validated option sets that travel whole from the command line to the ops.

Every option class is a dataclass whose fields carry their documentation in
``metadata["help"]``; the command line builds its flags from those fields (so every field
is reachable and its default shown), and artefacts record them with ``to_dict`` and read
them back with ``from_dict``, which refuses unknown names instead of dropping them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T", bound="Options")

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # what the ops' int64_t arguments and torch take


def option(default: Any, help: str, **kwargs) -> Any:
    """A dataclass field with its documentation (shown by --help); ``path=True`` marks a file
    or folder, whose leading ``~`` the command line takes as the home folder."""
    return field(default=default, metadata={"help": help, **kwargs})


def is_int(value) -> bool:
    """An int of Python or numpy, not a bool (which Python counts as one)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _as_declared(base: str, value):
    """``value`` as the scalar type ``base`` names (int, float, bool or str), numpy's scalars
    taken as Python's (an int counts as a float; a bool as nothing but a bool); None if it
    is not one."""
    if base == "bool":
        return bool(value) if isinstance(value, (bool, np.bool_)) else None
    if isinstance(value, (bool, np.bool_)):
        return None
    if base == "int" and isinstance(value, numbers.Integral):
        return int(value)
    if base == "float" and isinstance(value, numbers.Real):
        return float(value)
    if base == "str" and isinstance(value, str):
        return value
    return None


def check_field_types(settings) -> None:
    """Refuse a field of the dataclass ``settings`` declared as a scalar (int, float, bool,
    str), a list of one (``list[int]``) or a ``dict``, or one of them or None, that holds a
    value of another type, naming it: values also come from JSON files and dicts, where
    "0.1" or 4.5 would otherwise fail later inside an op, or compare wrongly. Numbers are
    stored as the declared Python type (numpy's would not record as JSON). Floats must be
    finite and ints fit in 64 bits, as the ops, torch and JSON take them: no setting means
    anything at NaN or infinity."""
    for f in dataclasses.fields(settings):
        declared = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
        base = declared.removesuffix(" | None")
        value = getattr(settings, f.name)
        if value is None and base != declared:
            continue
        if base == "dict":
            if not isinstance(value, dict):
                raise ValueError(f"{f.name} must be of type {declared}, got {value!r}")
            continue
        if base.startswith("list[") and base[5:-1] in _SCALARS:
            if not isinstance(value, list):
                raise ValueError(f"{f.name} must be of type {declared}, got {value!r}")
            typed = [_checked_scalar(f"{f.name}[{i}]", base[5:-1], base[5:-1], v) for i, v in enumerate(value)]
        elif base in _SCALARS:
            typed = _checked_scalar(f.name, declared, base, value)
        else:
            continue
        object.__setattr__(settings, f.name, typed)  # (frozen option classes too)


_SCALARS = ("int", "float", "bool", "str")


def _checked_scalar(name: str, declared: str, base: str, value):
    typed = _as_declared(base, value)
    if typed is None:
        raise ValueError(f"{name} must be of type {declared}, got {value!r}")
    if base == "float" and not math.isfinite(typed):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if base == "int" and not INT64_MIN <= typed <= INT64_MAX:
        raise ValueError(f"{name} must fit in 64 bits ([{INT64_MIN}, {INT64_MAX}]), got {value!r}")
    return typed


class Options:
    """Mixin for option dataclasses: dict round trip, overrides and type checks."""

    def check_types(self) -> None:
        """See ``check_field_types``."""
        check_field_types(self)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls: type[T], values: dict | None) -> T:
        if values is not None and not isinstance(values, dict):
            raise ValueError(f"{cls.__name__} must be a JSON object, got {type(values).__name__}: {values!r}")
        values = dict(values or {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"{cls.__name__} has unknown fields {unknown}; known: {sorted(names)}")
        return cls(**values)

    def updated(self: T, **overrides) -> T:
        """A copy with the overrides that are not None applied (and validated)."""
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})


def require_at_least(minimum: int, settings, *names: str, optional: bool = False) -> None:
    """Refuse a named integer setting of ``settings`` below ``minimum``, not an int, or None
    unless ``optional`` (not set), naming it."""
    for name in names:
        value = getattr(settings, name)
        if value is None and optional:
            continue
        if not is_int(value):
            raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
        if value < minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {value!r}")


def setting_changes(recorded: dict, now: dict, notes: dict[str, str] | None = None) -> list[str]:
    """What differs between an artefact's recorded settings and a run's, one item per
    setting as "name: recorded -> now" (nested settings by dotted name), for the message
    that refuses to resume: the user sees which values to restore, not only which names.
    ``notes`` adds "(note)" to a top-level setting's change, to say what it means."""
    changes = []
    for key in sorted(recorded.keys() | now.keys()):
        old, new = recorded.get(key, _ABSENT), now.get(key, _ABSENT)
        if isinstance(old, dict) and isinstance(new, dict):
            changes += [f"{key}.{change}" for change in setting_changes(old, new)]
        elif old != new:
            note = f" ({notes[key]})" if notes and key in notes else ""
            changes.append(f"{key}: {_shown(old)} -> {_shown(new)}{note}")
    return changes


def changes_and_moves(recorded: dict, now: dict, paths, digests: dict | None = None) -> tuple[list[str], list[str]]:
    """setting_changes with the settings named in ``paths`` set apart: where a file or folder
    lies is not what it holds (its content is compared otherwise), so a job moved to another
    disk or machine resumes. ``digests`` maps a path setting to the setting holding its
    content's digest: the path is set apart where that digest is recorded, and its change is
    named as the file's; a record from before the digest compares the path instead. Returns
    (the changes that refuse a resume, the paths that moved)."""
    paths, notes = set(paths), {}
    for path, digest in (digests or {}).items():
        if recorded.get(digest) is None:  # recorded before its content was: its path stands for it
            recorded = {**recorded, digest: now.get(digest)}
        else:
            paths.add(path)
            notes[digest] = f"{path} holds other content"
    kept = {k: v for k, v in recorded.items() if k not in paths}, {k: v for k, v in now.items() if k not in paths}
    changes = setting_changes(*kept, notes)
    both = [k for k in paths if k in recorded and k in now]
    return changes, setting_changes({k: recorded[k] for k in both}, {k: now[k] for k in both})


_ABSENT = object()  # a setting one side does not have


def _shown(value) -> str:
    """The value as JSON; a long one cut in the middle."""
    return "(absent)" if value is _ABSENT else shortened(json.dumps(value))


def shortened(text: str, limit: int = 80) -> str:
    """``text`` cut in the middle to at most ``limit`` characters: paths differ at their ends."""
    if len(text) <= limit:
        return text
    if limit <= 3:
        return text[:limit]
    head = (limit - 3) // 2
    return f"{text[:head]}...{text[len(text) - (limit - 3 - head) :]}"


CROP_MODES = ("mask", "bbox")

# How greedy answers are decoded after the prompt (sdrpn.llava.decode): "auto" is "graph"
# (CUDA graphs over a static cache) on CUDA for a Llama text model, "hf" otherwise.
DECODERS = ("auto", "hf", "static", "graph")

# The RoI threshold the reference evaluates each benchmark with (SPEC Stage 3 step 2b).
TASK_THRESHOLDS = {
    "textvqa": 0.15,
    "infovqa": 0.15,
    "chartqa": 0.15,
    "pope": 0.15,
    "docvqa": 0.10,
    "vstar": 0.10,
    "hrbench": 0.10,
    "ocrbench": 0.05,
}


@dataclass(frozen=True)
class RoiOptions(Options):
    """How the RPN's probabilities become crops (SPEC Stage 3, steps 2 and 4).

    The defaults are SPEC's, made for LLaVA-1.5's 24x24 grid; an RPN folder records the
    options recommended for its model, and inference takes them from there.
    """

    threshold: float = option(
        0.15, "blurred-probability threshold theta; negative: relative to the map's maximum (> max * |theta|)"
    )
    sigma: float = option(1.0, "sigma of the 3x3 Gaussian blur (> 0)")
    min_area: int = option(4, "components under this many cells are grown to 3x3 around their centre")
    max_area: int = option(225, "components over this many cells are dropped")
    max_boxes: int = option(2, "a sample left with more boxes than this gets no crop")
    drop_singletons: bool = option(True, "drop one-cell components (noise or sinks)")
    reference_clamp: bool = option(True, "clamp a grown box's exclusive end to size - 1, as the reference does")
    token_ratio: float = option(-1.0, "bbox mode: resample each crop's tokens to (box_h*r, box_w*r); <= 0 keeps all")
    crop_mode: str = option(
        "mask",
        "'mask' (the published numbers): 2 or more boxes give ONE crop of every cell above the threshold, "
        "keeping the tokens its mask covers; 'bbox': up to max_boxes crops of a whole image's tokens each "
        "(576 at LLaVA-1.5's 24x24 grid)",
        choices=CROP_MODES,
    )

    def __post_init__(self):
        self.check_types()
        checks = {
            "sigma": (self.sigma > 0, "> 0"),
            "min_area": (self.min_area >= 0, ">= 0"),
            "max_area": (self.max_area >= 1, ">= 1"),
            "max_boxes": (self.max_boxes >= 1, ">= 1"),
        }
        for name, (ok, rule) in checks.items():
            if not ok:
                raise ValueError(f"{name} must be {rule}, got {getattr(self, name)!r}")
        if self.crop_mode not in CROP_MODES:
            raise ValueError(f"crop_mode must be one of {CROP_MODES}, got {self.crop_mode!r}")
        if not -1.0 <= self.threshold <= 1.0:  # probabilities: anything outside selects all or nothing
            raise ValueError(f"threshold must lie in [-1, 1], got {self.threshold!r}")

    def check_crop_mode(self) -> RoiOptions:
        """These options, refused where token_ratio is set in mask mode: SPEC Stage 3 step 4
        resamples whole bbox-mode crops only, and a mask-mode crop feeds the tokens its mask
        keeps (its one-box case too, as the reference does). Checked where options are put
        to use, once overrides apply, so that a stored set is mended by the flags."""
        if self.token_ratio > 0 and self.crop_mode == "mask":
            raise ValueError(
                f"token_ratio resamples bbox-mode crops only, got token_ratio={self.token_ratio!r} with "
                "crop_mode='mask': set crop_mode 'bbox' (--crop-mode bbox) or token_ratio -1 (--token-ratio -1)"
            )
        return self

    def box_rules(self) -> dict:
        """The keyword arguments of ``sdrpn.ops.roi_boxes``."""
        return {
            k: getattr(self, k)
            for k in ("threshold", "sigma", "min_area", "max_area", "max_boxes", "drop_singletons", "reference_clamp")
        }
