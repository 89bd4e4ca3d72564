"""SDPA at LLaVA-1.5-7B's attention shapes through cuDNN's attention (torch 2.11's first
choice on Hopper) against the kernels sdrpn runs (sdrpn.llava.attention_kernels: every
backend but cuDNN's), side by side in one run: the first call at a new shape (where cuDNN
builds an execution plan), the warm time, and the training backward's non-finite query
gradients on a left-padded batch whose length is 64 mod 128.

    python benchmarks/bench_attention_backends.py --device cuda [--json out.json]
    python benchmarks/bench_attention_backends.py --heads 2 --head-dim 16   # CPU: sdrpn's side only
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from sdrpn.llava.attention_kernels import without_cudnn_attention
from timing import emit, machine, median_ms, save, sync

# (batch, queries, keys, mask): pass 1 at batch 1 (35 system + 576 image + 16 question
# tokens), a padded batch of 8 (label job, pass 1), pass 2 (one crop and the question on
# the prompt's cache), a decode step of the static decoder (an additive mask over its slots).
CASES = {
    "prefill_causal_b1": (1, 627, 627, None),
    "prefill_padded_b8": (8, 640, 640, "bool"),
    "pass2_b1": (1, 592, 1219, "bool"),
    "decode_step_b8": (8, 1, 704, "additive"),
}


def backends(device: str) -> dict:
    out = {"sdrpn": without_cudnn_attention}
    if device.startswith("cuda"):
        out = {"cudnn": lambda: sdpa_kernel([SDPBackend.CUDNN_ATTENTION]), **out}
    return out


def inputs(batch, queries, keys, mask, heads, dim, device, dtype, grad=False):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, heads, n, dim, generator=gen) for n in (queries, keys, keys))
    q, k, v = (t.to(device, dtype).requires_grad_(grad) for t in (q, k, v))
    if mask is None:
        return q, k, v, {"is_causal": True}
    # Left padding: sample b starts 8 * b keys in; queries see the keys up to their own.
    cols = torch.arange(keys)
    rows = torch.arange(keys - queries, keys)
    allowed = (cols[None, :] <= rows[:, None])[None] & (cols[None, None, :] >= 8 * torch.arange(batch)[:, None, None])
    allowed = allowed[:, None].to(device)
    if mask == "additive":
        additive = torch.zeros(allowed.shape, dtype=dtype, device=device)
        return q, k, v, {"attn_mask": additive.masked_fill_(~allowed, torch.finfo(dtype).min)}
    return q, k, v, {"attn_mask": allowed}


def timed_once(fn, device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return (time.perf_counter() - start) * 1e3


def forward_case(shape, backend, args, dtype, fresh: int) -> dict:
    """First call at a shape no backend has seen (``fresh`` extra keys), then warm."""
    batch, queries, keys, mask = shape
    # The static decoder's caches grow in steps of 64 slots: its decode steps see no other key count.
    keys += 64 * fresh if mask == "additive" else fresh
    queries = keys if mask is None else queries  # a prefill: every key is a query too
    q, k, v, kw = inputs(batch, queries, keys, mask, args.heads, args.head_dim, args.device, dtype)
    with backend():
        run = lambda: F.scaled_dot_product_attention(q, k, v, **kw)  # noqa: E731
        first = timed_once(run, args.device)
        warm = median_ms(run, args.device, repeats=args.repeats, warmup=1)
    return {"first_ms": round(first, 3), "warm_ms": round(warm, 4)}


def backward_case(backend, args, fresh: int) -> dict:
    """Training's forward and backward in bfloat16 on a left-padded batch of 704 keys (64
    mod 128; 832 and so on for the later backends, each a shape of its own), whose padding
    rows see no key (as Hugging Face's masks leave them): the non-finite entries of the
    query gradient, and the time."""
    keys = 704 + 128 * fresh  # still 64 mod 128
    q, k, v, kw = inputs(4, keys, keys, "bool", args.heads, args.head_dim, args.device, torch.bfloat16, grad=True)
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(q)

    def run():
        q.grad = None
        with backend():
            F.scaled_dot_product_attention(q, k, v, **kw).backward(grad)

    first = timed_once(run, args.device)
    warm = median_ms(run, args.device, repeats=args.repeats, warmup=1)
    return {
        "first_ms": round(first, 3),
        "warm_ms": round(warm, 4),
        "nonfinite_grad_q": int((~torch.isfinite(q.grad.float())).sum()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
    report = {"benchmark": "attention_backends", "machine": machine(args.device), "dtype": str(dtype)[6:], "cases": {}}
    kinds = backends(args.device)
    for label, backend in kinds.items():  # each library's one-time set-up, before any first call is timed
        try:
            forward_case((1, 128, 128, "bool"), backend, args, dtype, 0)
        except RuntimeError as error:  # its cases below say so, one by one
            report[f"warm_up_error_{label}"] = str(error).splitlines()[0][:200]
    for i, (name, shape) in enumerate([*CASES.items(), ("train_backward_bf16", None)]):
        row = {}
        for j, (label, backend) in enumerate(kinds.items()):
            fresh = 1 + i * len(kinds) + j  # a shape of its own: no plan built for it yet
            try:
                row[label] = (
                    forward_case(shape, backend, args, dtype, fresh) if shape else backward_case(backend, args, j)
                )
            except RuntimeError as error:  # a backend that cannot run this case
                row[label] = {"error": str(error).splitlines()[0][:200]}
        if "warm_ms" in row.get("cudnn", {}) and "warm_ms" in row["sdrpn"]:
            row["sdrpn_warm_vs_cudnn"] = round(row["cudnn"]["warm_ms"] / row["sdrpn"]["warm_ms"], 3)
            row["sdrpn_first_vs_cudnn"] = round(row["cudnn"]["first_ms"] / row["sdrpn"]["first_ms"], 3)
        report["cases"][name] = row
        save(report, args.json)
    emit(report, args.json)


if __name__ == "__main__":
    main()
