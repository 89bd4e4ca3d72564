"""Importing the reference implementation's released RPN checkpoints (SPEC, "Released artefacts").

The reference publishes each RPN as a whole LLaVA-1.5 model in the original LLaVA layout
(bf16 safetensors shards, a ``model.safetensors.index.json``), with the RPN ("twig") beside
the backbone and its settings in ``config.json``. Its twig forward, which ours reproduces:

- ``model.twig_layers.0 .. T-2``: decoder layers run on ``hidden_states[twig_K]``;
- ``model.twig_norm``: an RMSNorm after them (``roi_super_type == "v1"``);
- ``model.twig_layers.T-1``: only its input_layernorm, q_proj and k_proj are used: the score
  of visual token i is the mean over heads of q_h . k_{h,i} / sqrt(d) (``roi_source == "qk"``,
  ``roi_multi_head``), q from the last prompt token, no RoPE.

Only the tensors our RPN needs are read: the index names the shards that hold them, and
``safe_open`` reads just those keys, so a 7B or 13B checkpoint never sits in memory whole.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import pickle
import re
import shutil
import zipfile

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from ..io_utils import fsync_dir, read_json
from ..llava.presets import LlavaPreset, resolve_preset
from .model import RegionProposalNetwork, non_finite_tensors

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_FILE = "model.safetensors"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_FILE = "pytorch_model.bin"

# The twig settings our RPN reproduces, and the value the reference assumes when a
# config.json leaves one out (its getattr defaults); None: the field must be given.
REQUIRED_SETTINGS = {
    "enable_twig": (True, None),
    "roi_source": ("qk", None),
    "roi_multi_head": (True, None),
    "roi_super_type": ("v1", "v1"),
    "roi_loss": ("bce", "bce"),
}
# Architecture fields of the reference's (flat, Llama) config that must equal the target
# model's text config: shapes alone miss the head count and the norm's epsilon.
ARCHITECTURE_FIELDS = ("hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size")

_TWIG_LAYER = re.compile(r"^model\.twig_layers\.(\d+)\.")


class ReferenceCheckpointError(ValueError):
    """The reference checkpoint does not fit the target model, or cannot be read safely."""


def read_reference_config(src: str) -> dict:
    path = os.path.join(src, CONFIG_FILE)
    if not os.path.isdir(src):
        raise ReferenceCheckpointError(f"{src} is not a folder: give the reference checkpoint's folder")
    try:
        config = read_json(path)
    except FileNotFoundError:
        raise ReferenceCheckpointError(f"{src} has no {CONFIG_FILE}: not a reference checkpoint folder") from None
    except ValueError as err:
        raise ReferenceCheckpointError(str(err)) from None
    if not isinstance(config, dict):
        raise ReferenceCheckpointError(f"{path} must hold a JSON object, got {type(config).__name__}")
    if not any(key.startswith(("twig_", "enable_twig")) for key in config):
        raise ReferenceCheckpointError(
            f"{src} is not a reference SD-RPN checkpoint: its {CONFIG_FILE} has no twig settings (the reference "
            "saves a whole LLaVA model whose config carries enable_twig, twig_K and twig_T)"
        )
    return config


def twig_shape(config: dict, num_layers: int) -> tuple[int, int]:
    """(twig_K, twig_T) from the reference config, checked against the target's depth."""
    found = {}
    for name in ("twig_K", "twig_T"):
        value = config.get(name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ReferenceCheckpointError(f"{CONFIG_FILE}: {name} must be an integer, found {value!r}")
        found[name] = value
    k, t = found["twig_K"], found["twig_T"]
    if k < 1 or t < 1 or k + t > num_layers:
        raise ReferenceCheckpointError(
            f"{CONFIG_FILE}: twig_K={k}, twig_T={t} do not fit the target model: expected twig_K >= 1, "
            f"twig_T >= 1 and twig_K + twig_T <= {num_layers} (its decoder layers)"
        )
    return k, t


def check_twig_settings(config: dict) -> None:
    """Refuses settings whose twig forward differs from our RPN's (see the module docstring)."""
    for name, (expected, default) in REQUIRED_SETTINGS.items():
        found = config.get(name, default)
        if found is None:
            raise ReferenceCheckpointError(f"{CONFIG_FILE}: {name} is missing, expected {expected!r}")
        if found != expected or type(found) is not type(expected):
            raise ReferenceCheckpointError(f"{CONFIG_FILE}: {name} must be {expected!r}, found {found!r}")


def check_architecture(config: dict, text_config) -> None:
    """The reference's base architecture must be the target's (heads, sizes, norm epsilon)."""
    for name in ARCHITECTURE_FIELDS:
        ours = getattr(text_config, name)
        default = config.get("num_attention_heads") if name == "num_key_value_heads" else None
        theirs = config.get(name, default)
        if theirs != ours:
            found = "missing" if theirs is None else f"is {theirs!r}"
            raise ReferenceCheckpointError(f"{CONFIG_FILE}: {name} {found}, but the target model has {name}={ours!r}")
    eps = config.get("rms_norm_eps")
    if eps is not None and not math.isclose(eps, text_config.rms_norm_eps, rel_tol=1e-6):
        raise ReferenceCheckpointError(
            f"{CONFIG_FILE}: rms_norm_eps is {eps!r}, but the target model has "
            f"rms_norm_eps={text_config.rms_norm_eps!r}"
        )


def reference_preprocessing(config: dict) -> str:
    """The image preprocessing the reference model was run with: LLaVA pads to a square when
    image_aspect_ratio is "pad", and otherwise leaves the CLIP processor's centre crop."""
    mode = config.get("image_aspect_ratio")
    if isinstance(mode, str) and mode.startswith("anyres"):
        raise ReferenceCheckpointError(
            f"{CONFIG_FILE}: image_aspect_ratio {mode!r} (LLaVA-NeXT tiling) is not supported, expected 'pad'"
        )
    return "pad" if mode == "pad" else "crop"


def check_preset(preset: LlavaPreset, branch_layer: int, depth: int) -> None:
    if (preset.branch_layer, preset.depth) != (branch_layer, depth):
        raise ReferenceCheckpointError(
            f"{CONFIG_FILE}: twig_K={branch_layer}, twig_T={depth}, but preset {preset.name!r} for the target "
            f"model expects branch_layer={preset.branch_layer}, depth={preset.depth}; pass a preset that "
            f"matches the checkpoint"
        )


def reference_key(ours: str, depth: int) -> str:
    """The reference checkpoint's name for a tensor of our RPN's state dict."""
    head = f"model.twig_layers.{depth - 1}."
    if ours.startswith("layers."):
        return "model.twig_layers." + ours[len("layers.") :]
    if ours.startswith("norm."):
        return "model.twig_norm." + ours[len("norm.") :]
    if ours.startswith("head_norm."):
        return head + "input_layernorm." + ours[len("head_norm.") :]
    if ours.startswith(("q_proj.", "k_proj.")):
        return head + "self_attn." + ours
    raise KeyError(f"no reference name for RPN tensor {ours!r}")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _load_pickle(path: str) -> dict[str, Tensor]:
    """A pickled state dict, only through torch.load(weights_only=True): a full unpickler
    could run any code the file carries."""
    try:
        # Memory-mapped where the file is in torch's zip format, the only one mmap takes
        # (torch.save before 1.6, or with _use_new_zipfile_serialization=False, wrote another).
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as err:
        raise ReferenceCheckpointError(
            f"refusing {path}: a pickle file that torch.load(weights_only=True) will not load ({_first_line(err)}); "
            f"convert it to safetensors with a trusted tool first"
        ) from None
    except Exception as err:  # noqa: BLE001 (a file cut short or no torch file fails anywhere in the reader)
        raise ReferenceCheckpointError(
            f"{path} cannot be read as a torch weights file: {type(err).__name__}: {_first_line(err)}"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise ReferenceCheckpointError(f"{path} must hold a dict of tensors by name, got {type(state).__name__}")
    return state


class ReferenceWeights:
    """The weight files of a reference checkpoint folder: safetensors (sharded with an index,
    or one file) first, else pickles that torch.load(weights_only=True) accepts. A file is
    opened only when it holds a tensor that is asked for (``opened`` lists them)."""

    def __init__(self, src: str):
        self.src = src
        self.opened: list[str] = []
        self._pickles: dict[str, dict[str, Tensor]] = {}
        self.weight_map = self._weight_map()

    def _weight_map(self) -> dict[str, str]:
        for index in (SAFETENSORS_INDEX, PICKLE_INDEX):
            if os.path.isfile(os.path.join(self.src, index)):
                return self._read_index(index)
        if os.path.isfile(self._path(SAFETENSORS_FILE)):
            with _safe_open(self._path(SAFETENSORS_FILE)) as f:  # the header only
                return dict.fromkeys(f.keys(), SAFETENSORS_FILE)
        if os.path.isfile(self._path(PICKLE_FILE)):
            return dict.fromkeys(self._pickle(PICKLE_FILE), PICKLE_FILE)
        raise ReferenceCheckpointError(
            f"{self.src} holds no weights: expected {SAFETENSORS_INDEX}, {SAFETENSORS_FILE}, {PICKLE_INDEX} "
            f"or {PICKLE_FILE}"
        )

    def _read_index(self, index: str) -> dict[str, str]:
        path = self._path(index)
        try:
            weight_map = read_json(path)["weight_map"]
        except ValueError as err:
            raise ReferenceCheckpointError(str(err)) from None
        except (KeyError, TypeError) as err:
            raise ReferenceCheckpointError(f"{path} is not a weight index (no weight_map): {err}") from None
        if not isinstance(weight_map, dict):
            got = type(weight_map).__name__
            raise ReferenceCheckpointError(f"{path}: weight_map must map names to files, got {got}")
        for key, name in weight_map.items():
            # A shard name is a file of this folder; anything else could read outside it.
            if not isinstance(name, str) or os.path.basename(name) != name or name in ("", ".", ".."):
                raise ReferenceCheckpointError(f"{path}: {key} maps to {name!r}, not a file name in the folder")
        return weight_map

    def _path(self, name: str) -> str:
        return os.path.join(self.src, name)

    def _pickle(self, name: str) -> dict[str, Tensor]:
        if name not in self._pickles:
            self.opened.append(name)
            self._pickles[name] = _load_pickle(self._path(name))
        return self._pickles[name]

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def read(self, shapes: dict[str, torch.Size]) -> dict[str, Tensor]:
        """The tensors named in `shapes`, each checked against its expected shape before any
        data is read (safetensors headers carry the shapes)."""
        missing = sorted(k for k in shapes if k not in self.weight_map)
        if missing:
            raise ReferenceCheckpointError(f"{self.src} lacks the RPN tensors {missing}")
        by_file: dict[str, list[str]] = {}
        for key in shapes:
            by_file.setdefault(self.weight_map[key], []).append(key)
        tensors: dict[str, Tensor] = {}
        for name, keys in sorted(by_file.items()):
            if name.endswith(".safetensors"):
                tensors.update(self._read_safetensors(name, keys, shapes))
            else:
                state = self._pickle(name)
                check_shapes({k: tuple(state[k].shape) if k in state else None for k in keys}, shapes, name)
                tensors.update({k: state[k] for k in keys})
        return tensors

    def _read_safetensors(self, name: str, keys: list[str], shapes: dict[str, torch.Size]) -> dict[str, Tensor]:
        self.opened.append(name)
        with _safe_open(self._path(name)) as f:
            present = set(f.keys())
            check_shapes({k: tuple(f.get_slice(k).get_shape()) if k in present else None for k in keys}, shapes, name)
            return {k: f.get_tensor(k) for k in keys}


@contextlib.contextmanager
def _safe_open(path: str):
    """safetensors' reader, its errors (a truncated file, a bad header) naming the file."""
    try:
        with safe_open(path, framework="pt") as f:
            yield f
    except SafetensorError as err:
        raise ReferenceCheckpointError(f"{path} cannot be read as safetensors ({err})") from None


def check_shapes(found: dict[str, tuple | None], expected: dict[str, torch.Size], file: str) -> None:
    """Every mismatch at once, each with its key, the expected shape and the one found."""
    problems = []
    for key, shape in found.items():
        want = tuple(expected[key])
        if shape is None:
            problems.append(f"{key}: expected shape {want}, not in {file} although the index places it there")
        elif tuple(shape) != want:
            problems.append(f"{key}: expected shape {want}, found {tuple(shape)}")
    if problems:
        listed = "\n  ".join(problems)
        raise ReferenceCheckpointError(f"the checkpoint's RPN tensors do not fit the target model:\n  {listed}")


def check_twig_layers(keys: list[str], depth: int) -> None:
    """The weights must hold exactly twig_T twig layers, so that config and tensors agree."""
    found = sorted({int(m.group(1)) for k in keys if (m := _TWIG_LAYER.match(k))})
    if found != list(range(depth)):
        raise ReferenceCheckpointError(
            f"{CONFIG_FILE} says twig_T={depth}, expected twig layers {list(range(depth))}, "
            f"found twig layers {found} in the weights"
        )


def check_tensors(tensors: dict[str, Tensor]) -> None:
    bad = sorted({k for k, v in tensors.items() if not v.is_floating_point()} | set(non_finite_tensors(tensors)))
    if bad:
        raise ReferenceCheckpointError(f"the RPN tensors {bad} are not floating point or hold NaN or Inf")


def load_reference_tensors(rpn: RegionProposalNetwork, tensors: dict[str, Tensor], depth: int) -> None:
    """Copy the reference's tensors into the RPN, in their own dtype so that nothing is
    rounded (the RPN folder is then saved in it; loading casts to the model's dtype)."""
    dtypes = {v.dtype for v in tensors.values()}
    rpn.to(dtype=dtypes.pop() if len(dtypes) == 1 else torch.float32)
    ours = {k: tensors[reference_key(k, depth)] for k in rpn.trainable_state_dict()}
    missing, unexpected = rpn.load_state_dict(ours, strict=False)
    missing = [k for k in missing if not k.startswith("rotary_emb.")]
    if missing or unexpected:  # reference_key covers every key, so this is a bug, not bad input
        raise RuntimeError(f"RPN state dict mismatch: missing {missing}, unexpected {unexpected}")


def save_folder_atomically(rpn: RegionProposalNetwork, out: str) -> None:
    """Write the RPN folder beside `out` and rename it into place: a crash never leaves a
    folder with the weights of one RPN and the config of another."""
    out = os.path.abspath(out)
    if os.path.lexists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise FileExistsError(f"{out} exists and is not an empty folder: choose another --out or remove it")
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        rpn.save(tmp)
        fsync_dir(tmp)
        os.replace(tmp, out)  # replaces an empty folder too
        fsync_dir(os.path.dirname(out))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def import_reference_checkpoint(src: str, model: nn.Module, out: str, preset: str | None = None) -> dict:
    """Build our RPN folder at `out` from the reference's RPN checkpoint folder `src`, for the
    Hugging Face LLaVA `model` it was trained on.

    Checks the twig settings, the architecture and every tensor's shape against `model`,
    and refuses anything that differs, naming the field or key with both values. The
    preset (a name, a JSON file, or None for the model's own) supplies the prompt template
    and recommended RoI options and must agree with the checkpoint's branch point.

    Returns a summary: the folder, branch layer, depth, preset, tensors and files read.
    """
    config = read_reference_config(src)
    check_twig_settings(config)
    text_config = model.config.get_text_config()
    branch_layer, depth = twig_shape(config, text_config.num_hidden_layers)
    check_architecture(config, text_config)
    chosen = resolve_preset(preset, model)
    check_preset(chosen, branch_layer, depth)

    weights = ReferenceWeights(src)
    check_twig_layers(weights.keys(), depth)
    rpn = RegionProposalNetwork.from_llava(
        model,
        branch_layer,
        depth,
        preset=chosen.name,
        prompt_template=chosen.prompt_template,
        preprocessing=reference_preprocessing(config),
        roi=chosen.roi,
    )
    shapes = {reference_key(k, depth): v.shape for k, v in rpn.trainable_state_dict().items()}
    tensors = weights.read(shapes)
    check_tensors(tensors)
    load_reference_tensors(rpn, tensors, depth)
    save_folder_atomically(rpn, out)
    log.info("imported %d RPN tensors from %s into %s", len(tensors), ", ".join(weights.opened), out)
    return {
        "out": out,
        "branch_layer": branch_layer,
        "depth": depth,
        "preset": chosen.name,
        "preprocessing": rpn.config.preprocessing,
        "tensors": len(tensors),
        "files_read": weights.opened,
    }
