"""Importing the pickle files published with the reference implementation.

Those files are lists of dicts (question_id, image, prompt, text, sink_attn,
grounding_attn_o2i). A pickle can run arbitrary code when loaded, so they are read with
an unpickler that admits only what such a file needs (numpy arrays and scalars, plus
the builtin containers) and refuses anything else with an error naming it. A small
pickle can also describe a huge structure through shared references, so what it holds
is counted (elements and nesting depth, against the file's size) before anything is
converted. A record that cannot be used is skipped and counted, as in every job.
"""

from __future__ import annotations

import math
import os
import pickle
from collections import Counter

import numpy as np
import torch

from .. import ops
from ..io_utils import exclusive_lock
from ..llava.data import SkipSample, check_image_folder, resolve_image
from ..llava.inputs import is_text, question_text
from ..ops import SINK_THRESHOLD
from ..subsets import SUBSET_SEED, seeded_subset
from .folder import LabelFolder, LabelFolderConfig, shard_name
from .options import LabelOptions

# Records are a list of dicts of arrays: a few levels. Anything far deeper is not a label file.
MAX_DEPTH = 16
# Elements a file may expand to beyond one per byte it holds (numpy data is at least a byte
# an element; the rest is the records' structure and text).
ELEMENT_SLACK = 1_000_000

_ALLOWED = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),  # protocol 5 arrays
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "float32"),
    ("numpy", "float64"),
    ("numpy", "float16"),
    ("numpy", "int64"),
    ("numpy", "int32"),
    ("numpy", "bool_"),
    ("builtins", "list"),
    ("builtins", "dict"),
    ("builtins", "tuple"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("_codecs", "encode"),
}


class RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: only numpy arrays, numbers, strings, lists "
                f"and dicts are allowed in a label pickle"
            )
        return super().find_class(module, name)


def load_reference_pickle(path: str, max_elements: int | None = None) -> list[dict]:
    """The records of a reference label pickle (protocols 2 to 5), after checking that
    they are a list of dicts no deeper than MAX_DEPTH and expand to at most max_elements
    elements (default: the file's size in bytes plus ELEMENT_SLACK)."""
    limit = max_elements if max_elements is not None else os.path.getsize(path) + ELEMENT_SLACK
    with open(path, "rb") as f:
        try:
            data = RestrictedUnpickler(f).load()
        except Exception as err:  # noqa: BLE001  what a damaged or hostile file raises varies
            raise ValueError(f"{path} cannot be read as a label pickle ({type(err).__name__}: {err})") from None
    _check_expansion(data, limit, path)
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise ValueError(f"{path} must hold a list of dicts, got {type(data).__name__}")
    return data


def _check_expansion(data, limit: int, path: str) -> None:
    """Walk the structure as converting it would, counting every element each time it is
    reached (shared references included); stop at the first sign of a bomb."""
    total, stack = 0, [(data, 0)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ValueError(f"{path} nests deeper than {MAX_DEPTH} levels: not a label pickle")
        if isinstance(value, np.ndarray):
            total += value.size
            if value.dtype == object:
                stack.extend((v, depth + 1) for v in value.flat)
        elif isinstance(value, dict):
            total += len(value)
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, (list, tuple, set, frozenset)):
            total += len(value)
            stack.extend((v, depth + 1) for v in value)
        else:
            total += 1
        if total > limit:
            raise ValueError(
                f"{path} expands to more than {limit} elements ({os.path.getsize(path)} bytes on disk): "
                "refusing it (a pickle of shared references?)"
            )


class _Skip(Exception):
    """One record that cannot be used; the message is the reason counted."""


def _map(record: dict, key: str) -> np.ndarray:
    if key not in record:
        raise _Skip(f"no {key}")
    value = np.asarray(record[key])
    if value.dtype.kind not in "fiub":  # complex, text or objects: nothing to cast silently
        raise _Skip(f"{key} not real numbers")
    return value.astype(np.float32).reshape(-1)


def normalise_image_path(image, image_folder: str | None, strip_prefix: str | None) -> str:
    """The record's image path relative to image_folder. The released files' paths are
    relative to the reference's data root: a given prefix is stripped, and where the path
    is not found under image_folder, its longest tail that is found there is taken
    (``coco/train2017/x.jpg`` for ``/data/llava/coco/train2017/x.jpg``)."""
    if not isinstance(image, str) or not image:
        raise _Skip("no image path")
    path = image.replace("\\", "/")
    if strip_prefix and path.startswith(strip_prefix):
        path = path[len(strip_prefix) :]
    path = path.lstrip("/")
    if image_folder is None:
        return path
    parts = [p for p in path.split("/") if p]
    for start in range(len(parts)):
        tail = "/".join(parts[start:])
        try:
            resolve_image(image_folder, tail)
            return tail
        except SkipSample:
            continue
    raise _Skip("image not found under --image-folder")


def convert_reference_pickle(
    path: str,
    out: str,
    grid: tuple[int, int] | None = None,
    sink_threshold: float = SINK_THRESHOLD,
    *,
    image_folder: str | None = None,
    strip_prefix: str | None = None,
    max_samples: int | None = None,
    seed: int = SUBSET_SEED,
) -> dict:
    """Write the records as one shard of a label folder, labelled with SPEC's defaults.

    image_folder: where the images are; each record's path is normalised against it (see
    normalise_image_path) and a record whose image is not found is skipped. max_samples
    takes a seeded random subset (the reference's rule), not the first rows. A record
    without usable maps is skipped and counted; the summary says how many and why.
    """
    # What the command reads and writes, checked before the pickle's load, which may take minutes.
    _check_new_folder(LabelFolder(out))
    if not os.path.isfile(path):
        raise ValueError(f"pickle {path!r} {'is a folder' if os.path.isdir(path) else 'does not exist'}")
    if image_folder:
        check_image_folder(image_folder)
    records = load_reference_pickle(path)
    if not records:
        raise ValueError(f"{path} holds no records")
    image_folder = os.path.realpath(image_folder) if image_folder else None
    kept, grounding, sink, skipped = [], [], [], []
    for i in seeded_subset(len(records), max_samples, seed):
        r = records[i]
        try:
            g, s = _map(r, "grounding_attn_o2i"), _map(r, "sink_attn")
            cells = grounding[0].shape[0] if grounding else g.shape[0]
            if g.shape[0] != cells or s.shape[0] != cells:
                raise _Skip("maps of another size")
            image = normalise_image_path(r.get("image"), image_folder, strip_prefix)
            prompt = r.get("prompt")
            if not isinstance(prompt, str) or not is_text(prompt) or not question_text(prompt):
                raise _Skip("no question")  # training could not rebuild its prompt
        except _Skip as skip:
            skipped.append({"index": i, "id": str(r.get("question_id", i)), "reason": str(skip)})
            continue
        kept.append((i, r, image))
        grounding.append(g)
        sink.append(s)
    if not kept:
        reasons = dict(Counter(s["reason"] for s in skipped))
        raise ValueError(f"{path}: no usable record ({reasons})")
    grounding = torch.from_numpy(np.stack(grounding))
    sink = torch.from_numpy(np.stack(sink))
    n = grounding.shape[1]
    if grid is None:
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"maps have {n} cells, not a square grid: pass grid=(h, w)")
        grid = (side, side)
    elif grid[0] * grid[1] != n:
        raise ValueError(f"grid {grid[0]}x{grid[1]} has {grid[0] * grid[1]} cells, but the maps have {n}")
    options = LabelOptions(answers="given", sink_threshold=sink_threshold)
    labels = ops.pseudo_labels(
        grounding,
        sink,
        grid[0],
        grid[1],
        sink_threshold=sink_threshold,
        fg_ratio=options.fg_ratio,
        bg_ratio=options.bg_ratio,
        max_box_fraction=options.max_box_fraction,
    )
    stats = ops.pseudo_label_stats(labels).tolist()
    rows = [
        {
            "id": str(r.get("question_id", i)),
            "index": i,
            "image": image,
            "question": r.get("prompt"),
            "answer": r.get("text"),
            "answer_source": "reference",
            "image_size": None,
            "preprocessing": None,
            "fg": stats[k][0],
            "bg": stats[k][1],
            "ignore": stats[k][2],
        }
        for k, (i, r, image) in enumerate(kept)
    ]
    tensors = {
        "grounding": grounding,
        "sink": sink,
        "labels": labels.to(torch.int8),
        "grid": torch.tensor([list(grid)] * len(rows)),
    }
    folder = LabelFolder(out)
    os.makedirs(out, exist_ok=True)
    with exclusive_lock(folder.lock_path(0)):  # the label job's rank-0 lock: one writer at a time
        _check_new_folder(folder)
        folder.write_config(LabelFolderConfig(options=options, grid=list(grid), image_folder=image_folder))
        folder.write_shard(shard_name(0, 0), rows, tensors, skipped, 0, len(records) - 1, 0)
        return folder.write_summary()


def _check_new_folder(folder: LabelFolder) -> None:
    """The conversion writes a whole label folder: into one that holds labels already, it
    would replace some shards and keep others, mixing two label sets under one config."""
    out, lock = folder.path, os.path.basename(folder.lock_path(0))
    if os.path.lexists(out) and not os.path.isdir(out):
        raise ValueError(f"OUT {out} is a file: it must be a new or empty folder")
    if os.path.isdir(out) and [e for e in os.listdir(out) if e != lock]:
        raise ValueError(f"OUT {out} holds files already: convert into a new or empty folder")
