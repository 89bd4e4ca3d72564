"""Massive-activation sink detection on LLaMA-7B shapes: the fused op against the
plain-PyTorch expression (normalise, gather, compare), side by side in one run.

    python benchmarks/bench_sinks.py [--device cuda] [--batch 8] [--json out.json]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import sdrpn
from baselines import massive_activation_sinks_torch
from timing import emit, machine, median_ms

DIMS = (2533, 1415)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=640)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--dtype", default="float16", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(args.batch, args.seq_len, args.hidden, generator=gen)
    h[:, ::50, DIMS[0]] = 2000.0  # a sink every 50 tokens
    h = h.to(args.device, getattr(torch, args.dtype))

    op = lambda: sdrpn.ops.massive_activation_sinks(h, DIMS)  # noqa: E731
    baseline = lambda: massive_activation_sinks_torch(h, DIMS)  # noqa: E731
    assert torch.equal(op(), baseline()), "op and torch expression disagree"
    op_ms = median_ms(op, args.device, repeats=20, warmup=3)
    torch_ms = median_ms(baseline, args.device, repeats=20, warmup=3)
    bytes_read = h.numel() * h.element_size()
    emit(
        {
            "benchmark": "massive_activation_sinks",
            "machine": machine(args.device),
            "shape": list(h.shape),
            "dtype": args.dtype,
            "op_ms": round(op_ms, 4),
            "torch_ms": round(torch_ms, 4),
            "op_GBps": round(bytes_read / op_ms / 1e6, 1),
            "speedup_vs_torch": round(torch_ms / op_ms, 2),
        },
        args.json,
    )


if __name__ == "__main__":
    main()
