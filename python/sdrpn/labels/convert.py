"""Importing the pickle files published with the reference implementation.

Those files are lists of dicts (question_id, image, prompt, text, sink_attn,
grounding_attn_o2i). A pickle can run arbitrary code when loaded, so they are read with
an unpickler that admits only what such a file needs (numpy arrays and scalars, plus
the builtin containers) and refuses anything else with an error naming it.
"""

from __future__ import annotations

import io
import math
import pickle

import numpy as np
import torch

from .. import ops
from ..ops import SINK_THRESHOLD
from .folder import LabelFolder, LabelFolderConfig, shard_name
from .options import LabelOptions

_ALLOWED = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
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


def load_reference_pickle(path: str) -> list[dict]:
    with open(path, "rb") as f:
        data = RestrictedUnpickler(io.BytesIO(f.read())).load()
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise ValueError(f"{path} must hold a list of dicts, got {type(data).__name__}")
    return data


def _map(record: dict, key: str) -> np.ndarray:
    if key not in record:
        raise ValueError(f"record {record.get('question_id', '?')} has no {key!r}")
    return np.asarray(record[key], dtype=np.float32).reshape(-1)


def convert_reference_pickle(
    path: str, out: str, grid: tuple[int, int] | None = None, sink_threshold: float = SINK_THRESHOLD
) -> dict:
    """Write the records as one shard of a label folder, labelled with SPEC's defaults."""
    records = load_reference_pickle(path)
    if not records:
        raise ValueError(f"{path} holds no records")
    grounding = torch.from_numpy(np.stack([_map(r, "grounding_attn_o2i") for r in records]))
    sink = torch.from_numpy(np.stack([_map(r, "sink_attn") for r in records]))
    n = grounding.shape[1]
    if grid is None:
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"maps have {n} cells, not a square grid: pass grid=(h, w)")
        grid = (side, side)
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
            "image": r.get("image"),
            "question": r.get("prompt"),
            "answer": r.get("text"),
            "answer_source": "reference",
            "image_size": None,
            "preprocessing": None,
            "fg": stats[i][0],
            "bg": stats[i][1],
            "ignore": stats[i][2],
        }
        for i, r in enumerate(records)
    ]
    tensors = {
        "grounding": grounding,
        "sink": sink,
        "labels": labels.to(torch.int8),
        "grid": torch.tensor([list(grid)] * len(records)),
    }
    folder = LabelFolder(out)
    folder.write_config(LabelFolderConfig(options=options, grid=list(grid)))
    folder.write_shard(shard_name(0, 0), rows, tensors, [], 0, len(records) - 1, 0)
    return folder.write_summary()
