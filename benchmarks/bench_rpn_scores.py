"""The RPN head: sdrpn.ops.rpn_scores (u = Wk^T q, one N x D product) against the naive
head (project all N visual tokens to keys, per-head dot, mean), forward and
forward+backward, measured side by side in one run.

    python benchmarks/bench_rpn_scores.py [--device cuda] [--batches 1 8 32] [--json out.json]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import sdrpn
from baselines import rpn_scores_naive
from timing import emit, machine, median_ms


def inputs(batch, cells, hidden, heads, dtype, device, grad):
    gen = torch.Generator().manual_seed(batch)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device, dtype).requires_grad_(grad)

    return (
        rand(batch, hidden),
        rand(batch, cells, hidden),
        rand(hidden, hidden, scale=hidden**-0.5),
        rand(hidden, hidden, scale=hidden**-0.5),
        heads,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batches", type=int, nargs="+", default=None)
    parser.add_argument("--cells", type=int, default=576)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    batches = args.batches or ([1, 8, 32] if cuda else [1, 8])
    rows = []
    for b in batches:
        row = {"batch": b}
        for mode, grad in (("forward", False), ("forward_backward", True)):
            x = inputs(b, args.cells, args.hidden, args.heads, dtype, args.device, grad)

            def run(fn):
                def go():
                    out = fn(*x)
                    if grad:
                        out.float().square().sum().backward()

                return go

            op_ms = median_ms(run(sdrpn.ops.rpn_scores), args.device, repeats=10 if cuda else 3)
            naive_ms = median_ms(run(rpn_scores_naive), args.device, repeats=10 if cuda else 3)
            row[mode] = {
                "op_ms": round(op_ms, 3),
                "naive_ms": round(naive_ms, 3),
                "speedup": round(naive_ms / op_ms, 1),
            }
        with torch.no_grad():
            x = inputs(b, args.cells, args.hidden, args.heads, dtype, args.device, False)
            diff = (sdrpn.ops.rpn_scores(*x).float() - rpn_scores_naive(*x).float()).abs().max()
        row["max_abs_diff_vs_naive"] = float(diff)
        rows.append(row)
    emit(
        {
            "benchmark": "rpn_scores",
            "machine": machine(args.device),
            "dtype": str(dtype).replace("torch.", ""),
            "cells": args.cells,
            "hidden": args.hidden,
            "heads": args.heads,
            "results": rows,
        },
        args.json,
    )


if __name__ == "__main__":
    main()
