"""Importing the pickle files published with the reference implementation.

Those files are lists of dicts (question_id, image, prompt, text, sink_attn,
grounding_attn_o2i). A pickle can run arbitrary code when loaded, so they are read with
an unpickler that admits only what such a file needs (numpy arrays and scalars, plus
the builtin containers) and refuses anything else with an error naming it.
"""

from __future__ import annotations

import io
import math
import os
import pickle

import numpy as np
import torch
from safetensors.torch import save_file

from . import ops
from .io_utils import write_atomic, write_json, write_jsonl

_ALLOWED = {
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "float32"), ("numpy", "float64"), ("numpy", "float16"), ("numpy", "int64"),
    ("numpy", "int32"), ("numpy", "bool_"),
    ("builtins", "list"), ("builtins", "dict"), ("builtins", "tuple"), ("builtins", "set"),
    ("builtins", "frozenset"), ("_codecs", "encode"),
}


class RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: only numpy arrays, numbers, strings, lists "
                f"and dicts are allowed in a label pickle")
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


def convert_reference_pickle(path: str, out: str, grid: tuple[int, int] | None = None,
                             sink_threshold: float = 1e-3) -> dict:
    """Write the records as one label shard in the format of `sdrpn label`."""
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
    labels = ops.pseudo_labels(grounding, sink, grid[0], grid[1], sink_threshold=sink_threshold)
    stats = ops.pseudo_label_stats(labels).tolist()
    name = "rank000-shard00000"
    rows = [{
        "id": str(r.get("question_id", i)), "index": i, "image": r.get("image"),
        "question": r.get("prompt"), "answer": r.get("text"), "answer_source": "reference",
        "image_size": None, "preprocessing": None, "shard": name + ".safetensors", "row": i,
        "fg": stats[i][0], "bg": stats[i][1], "ignore": stats[i][2],
    } for i, r in enumerate(records)]
    tensors = {"grounding": grounding.contiguous(), "sink": sink.contiguous(),
               "labels": labels.to(torch.int8), "grid": torch.tensor([list(grid)] * len(records))}
    base = os.path.join(out, name)
    write_atomic(base + ".safetensors", lambda tmp: save_file(tensors, tmp))
    write_jsonl(base + ".jsonl", rows)
    write_jsonl(base + ".skipped.jsonl", [])
    marker = {"shard": 0, "first_index": 0, "last_index": len(records) - 1,
              "labelled": len(records),
              "all_ignore": sum(1 for s in stats if s[0] == 0 and s[1] == 0), "skipped": {}}
    write_json(base + ".done.json", marker)
    from .labels import merge_summaries

    return merge_summaries(out)
