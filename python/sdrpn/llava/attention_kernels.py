"""The attention kernels sdrpn runs the model on: SDPA without cuDNN's attention backend.

torch 2.11 tries cuDNN's attention first on Hopper and Blackwell GPUs (fp16 and bf16), and
at LLaVA-1.5's shapes that costs twice:

- cuDNN builds an execution plan for every new shape (batch, sequence length), reported
  at about half a second a shape (modelscope/FunASR#3704). Prompts of many lengths, each
  label batch's padded length and every pass-2 width would each pay it once per process;
  the benchmarks' warm-up rounds hide it, a real dataset does not.
- Its backward returns NaN query gradients when a mask is given, the key length is 64 mod
  128 and a query row has no key to attend to (pytorch/pytorch#196678): left-padded RPN
  training batches of such lengths would train NaN weights without an error.

Flash and memory-efficient attention (torch's choice before 2.11 and the one on every
other GPU) have neither problem; at 7B, attention is a few percent of a ~600-token
prefill's work and of a decode step's. ``without_cudnn_attention`` turns the cuDNN backend
off for the code it wraps and gives the caller's setting back once no sdrpn call is
running, so the rest of a user's process keeps torch's defaults. Every function of sdrpn
that runs the model's attention is wrapped (a test checks each path); a captured CUDA graph
keeps the kernels it was captured with, and the RPN's checkpointed layers recompute under
it too.

The switch is torch's process-wide flag, so it is counted across threads: while any
thread is inside an sdrpn call, cuDNN attention is off for every thread of the process.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch


class _Switch:
    """How many sdrpn calls are inside, and the setting the first of them found."""

    def __init__(self):
        self.lock = threading.Lock()
        self.inside = 0
        self.found = True

    def enter(self) -> None:
        with self.lock:
            if self.inside == 0:
                self.found = torch.backends.cuda.cudnn_sdp_enabled()
                torch.backends.cuda.enable_cudnn_sdp(False)
            self.inside += 1

    def exit(self) -> None:
        with self.lock:
            self.inside -= 1
            if self.inside == 0:
                torch.backends.cuda.enable_cudnn_sdp(self.found)


# One per process, as the flag it guards is.
_SWITCH = _Switch()


@contextmanager
def without_cudnn_attention() -> Iterator[None]:
    """SDPA without cuDNN's attention backend inside; the setting found before the first
    of the calls inside (any thread) once the last has left. Usable as a decorator."""
    _SWITCH.enter()
    try:
        yield
    finally:
        _SWITCH.exit()
