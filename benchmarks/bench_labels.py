"""Pseudo labels for a batch of 24x24 maps: the op against the per-sample reference loop
and against a batched plain-PyTorch version, measured side by side in one run.

    python benchmarks/bench_labels.py [--device cuda] [--batch 4096] [--json out.json]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import sdrpn
from baselines import pseudo_labels_per_sample, pseudo_labels_torch
from sdrpn.labels.synthetic_maps import make_synthetic_maps
from timing import emit, machine, median_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--grid", type=int, nargs=2, default=(24, 24))
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument(
        "--reference-samples",
        type=int,
        default=None,
        help="samples timed through the slow loop, scaled to --batch (default: all)",
    )
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    gh, gw = args.grid
    dtype = getattr(torch, args.dtype)
    maps = make_synthetic_maps(args.batch, gh, gw, seed=0)
    g = maps.grounding.to(args.device, dtype)
    s = maps.sink.to(args.device, dtype)

    op = lambda: sdrpn.ops.pseudo_labels(g, s, gh, gw)  # noqa: E731
    batched = lambda: pseudo_labels_torch(g, s, gh, gw)  # noqa: E731
    k = min(args.reference_samples or args.batch, args.batch)
    loop = lambda: pseudo_labels_per_sample(g[:k], s[:k], gh, gw)  # noqa: E731

    labels = op()
    assert torch.equal(labels, batched()), "op and batched torch disagree"
    assert torch.equal(labels[:k], torch.stack(loop())), "op and per-sample loop disagree"

    op_ms = median_ms(op, args.device, repeats=20, warmup=3)
    batched_ms = median_ms(batched, args.device, repeats=10, warmup=2)
    loop_ms = median_ms(loop, args.device, repeats=1, warmup=0) * args.batch / k
    emit(
        {
            "benchmark": "pseudo_labels",
            "machine": machine(args.device),
            "batch": args.batch,
            "grid": [gh, gw],
            "dtype": args.dtype,
            "op_ms": round(op_ms, 4),
            "torch_batched_ms": round(batched_ms, 4),
            "reference_loop_ms": round(loop_ms, 2),
            "reference_loop_samples_timed": k,
            "speedup_vs_reference_loop": round(loop_ms / op_ms, 1),
            "speedup_vs_torch_batched": round(batched_ms / op_ms, 2),
        },
        args.json,
    )


if __name__ == "__main__":
    main()
