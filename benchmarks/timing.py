"""Shared timing helpers: warm up, synchronise, take the median of repeats."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_ms(fn: Callable[[], object], device: str, *, repeats: int = 5, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


class _OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def count_ops(fn: Callable[[], object]) -> int:
    """ATen ops that one call dispatches (views and copies included): what the host issues,
    about one kernel launch each on a GPU (a replayed CUDA graph counts as none)."""
    with _OpCounter() as counter:
        fn()
    return counter.count


def machine(device: str) -> dict:
    info = {
        "host": platform.node(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": device,
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def save(result: dict, path: str | None) -> None:
    """Write what is measured so far, so that a run cut short still reports."""
    if path:
        with open(path + ".tmp", "w") as f:
            f.write(json.dumps(result, indent=2) + "\n")
        os.replace(path + ".tmp", path)


def emit(result: dict, path: str | None) -> None:
    print(json.dumps(result, indent=2))
    save(result, path)
