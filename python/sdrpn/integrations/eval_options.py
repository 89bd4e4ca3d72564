"""What the lmms-eval model `sdrpn_llava` is told: its model_args (validated, each error
naming the argument and its value) and a task's generation kwargs (greedy decoding, a
token budget and stop strings). Nothing here imports lmms-eval, so it is tested without it."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from ..llava.model_facts import DTYPES
from ..options import CROP_MODES, TASK_THRESHOLDS

# lmms-eval model_args spell dtypes as torch does; sdrpn's own names are accepted too.
DTYPE_ALIASES = {"float16": "fp16", "half": "fp16", "bfloat16": "bf16", "float32": "fp32", "float": "fp32"}
AUTO_PRESET = "auto"


def as_bool(name: str, value) -> bool:
    """A model_args flag: lmms-eval turns "true"/"false" into bools; other spellings of a
    yes or no are read too, and anything else is refused."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name} must be true or false, got {value!r}")


def as_positive_int(name: str, value) -> int:
    # ASCII digits only ("²".isdigit() is true), and few enough for int() and 64 bits.
    text = str(value).strip()
    plain = text.isascii() and text.isdigit() and len(text) <= 19
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not plain:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    number = int(value)
    if number < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return number


def benchmark_of(task_name: str) -> str | None:
    """The benchmark whose RoI threshold an lmms-eval task takes: the one its name starts
    with ("textvqa_val" -> "textvqa", "vstar_bench" -> "vstar", "hrbench8k" -> "hrbench")."""
    for benchmark in sorted(TASK_THRESHOLDS, key=len, reverse=True):
        if task_name.startswith(benchmark):
            return benchmark
    return None


@dataclass(frozen=True)
class EvalModelOptions:
    """The model_args of `sdrpn_llava` (key=value pairs after --model_args).

    Fields:
        pretrained: the LLaVA-1.5 model (llava-hf format): a folder or a Hub id.
        rpn: the RPN: its folder (`sdrpn train --out`, `sdrpn import-checkpoint --out`) or a
            Hub id; required unless roi is false.
        roi: false answers from the thumbnail alone (the baseline rows), with the RPN's
            prompt template and preprocessing where an rpn is given, else the model's preset's.
        crop_mode: "mask" or "bbox"; default the RPN folder's.
        threshold: the RoI threshold; default the RPN folder's (or task_preset's).
        task_preset: a benchmark whose threshold the reference evaluated with (textvqa,
            docvqa, vstar, pope, infovqa, chartqa, ocrbench, hrbench), or "auto": each lmms-eval
            task takes the threshold of the benchmark its name starts with.
        dtype: fp16 (the published numbers), bf16 or fp32 (float16, bfloat16, float32 too).
        device: default cuda (cuda:LOCAL_RANK under accelerate launch) where there is one, else cpu.
        batch_size: samples answered together (also --batch_size; model_args wins).
        max_new_tokens: the answer budget of a task that sets none.
    """

    pretrained: str = "llava-hf/llava-1.5-7b-hf"
    rpn: str | None = None
    roi: bool = True
    crop_mode: str | None = None
    threshold: float | None = None
    task_preset: str | None = None
    dtype: str = "fp16"
    device: str | None = None
    batch_size: int = 1
    max_new_tokens: int = 128

    @classmethod
    def from_model_args(cls, args: dict) -> EvalModelOptions:
        """Validated options from lmms-eval's parsed model_args (values may be str, int,
        float or bool); unknown names are refused, naming the known ones."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(args) - known)
        if unknown:
            raise ValueError(f"sdrpn_llava got unknown model_args {unknown}; known: {sorted(known)}")
        values = {k: v for k, v in args.items() if v is not None}
        for name in ("pretrained", "rpn", "crop_mode", "task_preset", "device"):
            if name in values:
                values[name] = str(values[name])
        if "roi" in values:
            values["roi"] = as_bool("roi", values["roi"])
        for name in ("batch_size", "max_new_tokens"):
            if name in values:
                values[name] = as_positive_int(name, values[name])
        if "threshold" in values:
            try:
                if isinstance(values["threshold"], bool):  # True is no threshold
                    raise TypeError
                values["threshold"] = float(values["threshold"])
            except (TypeError, ValueError):
                raise ValueError(f"threshold must be a number, got {values['threshold']!r}") from None
        if "dtype" in values:
            dtype = str(values["dtype"]).strip().lower()
            values["dtype"] = DTYPE_ALIASES.get(dtype, dtype)
        return cls(**values)

    def __post_init__(self):
        if not self.pretrained.strip():
            raise ValueError(f"pretrained must name a model folder or Hub id, got {self.pretrained!r}")
        if self.roi and not self.rpn:
            raise ValueError("rpn is required (an RPN folder or Hub id) unless roi=false (the baseline rows), got none")
        if not self.roi:
            given = [n for n in ("crop_mode", "threshold", "task_preset") if getattr(self, n) is not None]
            if given:
                raise ValueError(f"roi=false answers without crops, so {given} would have no effect; drop them")
        if self.crop_mode is not None and self.crop_mode not in CROP_MODES:
            raise ValueError(f"crop_mode must be one of {CROP_MODES}, got {self.crop_mode!r}")
        if self.threshold is not None and not -1.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must lie in [-1, 1], got {self.threshold!r}")
        if self.task_preset is not None:
            if self.threshold is not None:
                raise ValueError(
                    f"give threshold or task_preset, not both: got threshold={self.threshold!r} and "
                    f"task_preset={self.task_preset!r}"
                )
            if self.task_preset != AUTO_PRESET and self.task_preset not in TASK_THRESHOLDS:
                raise ValueError(
                    f"task_preset must be {AUTO_PRESET!r} or one of {sorted(TASK_THRESHOLDS)}, got {self.task_preset!r}"
                )
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES) + sorted(DTYPE_ALIASES)}, got {self.dtype!r}")

    def resolved_device(self, cuda_available: bool) -> str:
        if self.device:
            return self.device
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda_available else "cpu"

    def preset_for(self, task_name: str) -> str | None:
        """The benchmark whose threshold answers `task_name`: task_preset, or by the task's
        name under "auto"; None keeps the RPN folder's threshold."""
        if self.task_preset != AUTO_PRESET:
            return self.task_preset
        benchmark = benchmark_of(task_name)
        if benchmark is None:
            raise ValueError(
                f"task_preset=auto has no threshold for the lmms-eval task {task_name!r}: its name starts with none "
                f"of {sorted(TASK_THRESHOLDS)}; pass task_preset=NAME or threshold=T"
            )
        return benchmark


@dataclass(frozen=True)
class Decoding:
    """How one lmms-eval request is answered: greedily, at most max_new_tokens, the answer
    cut before the first of the stop strings."""

    max_new_tokens: int
    until: tuple[str, ...] = ()

    def cut(self, text: str) -> str:
        """The answer before the earliest stop string (as if decoding had stopped there)."""
        ends = [text.find(stop) for stop in self.until if stop]
        ends = [e for e in ends if e >= 0]
        return text[: min(ends)] if ends else text


# Options that shape sampling only: with sampling off they change nothing.
_SAMPLING_ONLY = ("top_p", "top_k", "min_p", "typical_p")


def decoding_of(gen_kwargs: dict, default_max_new_tokens: int) -> Decoding:
    """A task's generation kwargs as greedy decoding. temperature 0 (or none) with
    do_sample false and one beam is greedy, as SD-RPN is evaluated; top_p and the other
    sampling-only options are then irrelevant. Anything that asks for sampling, beams or
    an option this model does not know is refused, naming it and its value."""
    kwargs = dict(gen_kwargs or {})
    until = kwargs.pop("until", None)
    if until is None:
        until = []
    elif isinstance(until, str):
        until = [until]
    elif not (isinstance(until, (list, tuple)) and all(isinstance(u, str) for u in until)):
        raise ValueError(f"generation kwarg until must be a string or a list of strings, got {until!r}")
    max_new = kwargs.pop("max_new_tokens", None)
    max_new = default_max_new_tokens if max_new is None else as_positive_int("max_new_tokens", max_new)
    temperature = kwargs.pop("temperature", None)
    if temperature not in (None, 0, 0.0):
        raise ValueError(
            f"sdrpn_llava decodes greedily, as SD-RPN is evaluated; the task asks for temperature={temperature!r}"
        )
    do_sample = kwargs.pop("do_sample", False)
    if do_sample not in (None, False) and as_bool("do_sample", do_sample):
        raise ValueError(
            f"sdrpn_llava decodes greedily, as SD-RPN is evaluated; the task asks for do_sample={do_sample!r}"
        )
    num_beams = kwargs.pop("num_beams", None)
    if num_beams not in (None, 1):
        raise ValueError(f"sdrpn_llava decodes greedily (one beam); the task asks for num_beams={num_beams!r}")
    for name in _SAMPLING_ONLY:
        kwargs.pop(name, None)
    if kwargs:
        raise ValueError(f"sdrpn_llava does not know the generation kwargs {kwargs}: it decodes greedily")
    return Decoding(max_new, tuple(until))
