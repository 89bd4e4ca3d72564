"""Records held as their JSON text in one byte buffer: a dataset's rows that forked
DataLoader workers read without copying them."""

from __future__ import annotations

import json
import operator
from collections.abc import Iterable, Sequence

import numpy as np


class PackedRows(Sequence[dict]):
    """JSON-able dicts stored as their JSON text in one numpy byte buffer, with offsets; a
    row is decoded when it is read.

    DataLoader workers are forked from the training process and read a row per sample. A
    list of dicts would be copied into each worker page by page as the rows' reference
    counts change (about 2.8 KB a label row: 1.6 GB per worker at 600K rows), where the
    pages of a numpy buffer are only read, so the workers keep sharing them."""

    def __init__(self, rows: Iterable[dict]):
        encoded = [json.dumps(row, separators=(",", ":")).encode() for row in rows]
        self._ends = np.cumsum([len(text) for text in encoded], dtype=np.int64)
        self._data = np.frombuffer(b"".join(encoded), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, i):  # type: ignore[override]  # an int gives a dict, a slice a list
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i, n = operator.index(i), len(self)
        if not -n <= i < n:
            raise IndexError(f"row {i} out of range for {n} rows")
        i %= n
        start = int(self._ends[i - 1]) if i else 0
        return json.loads(self._data[start : int(self._ends[i])].tobytes())
