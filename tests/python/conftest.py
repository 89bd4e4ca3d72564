import os
import sys
import threading

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]
FLOAT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def pytest_collection_modifyitems(config, items):
    """Every test that needs a GPU carries the marker `cuda`, whatever its name, so that the
    GPU machine runs exactly those (`pytest -m cuda`): a test marked `needs_cuda`, or a case
    of one run on the cuda device."""
    for item in items:
        params = getattr(item, "callspec", None)
        on_cuda = params is not None and "cuda" in [str(v) for v in params.params.values()]
        if on_cuda or needs_cuda.mark in item.iter_markers("skipif"):
            item.add_marker(pytest.mark.cuda)


def main_thread_opens(monkeypatch, module) -> list[bool]:
    """For each image a job in ``module`` opens from now on, whether the main thread opened
    it: with --workers 0 it opens every one, with loader threads none."""
    opened = []
    open_image = module.open_image

    def recording(*args, **kwargs):
        opened.append(threading.current_thread() is threading.main_thread())
        return open_image(*args, **kwargs)

    monkeypatch.setattr(module, "open_image", recording)
    return opened
