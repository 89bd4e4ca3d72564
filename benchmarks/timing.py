"""Shared timing helpers: warm up, synchronise, take the median of repeats."""

from __future__ import annotations

import gzip
import json
import os
import platform
import shutil
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


def profile_call(fn: Callable[[], object], name: str, folder: str, device: str) -> dict:
    """One call of ``fn`` (after one unprofiled call) under torch.profiler: its tables sorted
    by device time and by host time, and its gzipped Chrome trace, in ``folder``; returns
    its seconds, what made the host wait for the device and the runtime's copies."""
    from torch.profiler import ProfilerActivity, profile

    os.makedirs(folder, exist_ok=True)
    cuda = device.startswith("cuda")
    fn()
    sync(device)
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        start = time.perf_counter()
        fn()
        sync(device)
        seconds = time.perf_counter() - start
    averages = prof.key_averages()
    tables = [averages.table(sort_by="self_cpu_time_total", row_limit=30)]
    if cuda:
        tables.insert(0, averages.table(sort_by="self_cuda_time_total", row_limit=30))
    with open(os.path.join(folder, f"{name}_tables.txt"), "w") as f:
        f.write("\n\n".join(tables))
    trace = os.path.join(folder, f"{name}_trace.json")
    prof.export_chrome_trace(trace)
    with open(trace, "rb") as src, gzip.open(trace + ".gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    os.remove(trace)
    # What makes the host wait for the device: synchronisations (a blocking copy between host
    # and device is followed by the runtime's cudaStreamSynchronize) and reads of a device
    # value; the runtime's copies are listed apart (device-to-device ones do not wait).
    waits = [e for e in averages if "synchronize" in e.key.lower() or e.key == "aten::_local_scalar_dense"]
    return {
        f"{name}_s": round(seconds, 5),
        f"{name}_host_syncs": {e.key: e.count for e in waits},
        f"{name}_memcpy_calls": {e.key: e.count for e in averages if e.key.startswith("cudaMemcpy")},
    }


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
