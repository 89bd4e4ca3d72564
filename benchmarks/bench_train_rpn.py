"""RPN training throughput and peak memory on LLaVA-1.5 shapes with random weights: one
optimizer step = early-exit backbone (layers < K, no grad) + RPN forward/backward +
AdamW, with and without gradient checkpointing, against the same step on a full-backbone
forward (every layer run, layer K's input read from the hidden states), in one run. Also
extrapolates the time of one epoch of 10K samples.

    python benchmarks/bench_train_rpn.py --size 7b --device cuda --batch 8
    python benchmarks/bench_train_rpn.py --size tiny                       # CPU smoke run
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from bench_label_pipeline import IMAGE_TOKEN, SIZES, build_model, make_prompts
from sdrpn.llava.backbone import branch_hidden_states
from sdrpn.llava.inputs import left_pad, position_ids_from_mask
from sdrpn.rpn.model import RegionProposalNetwork, rpn_loss
from timing import emit, machine, save, sync


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", choices=SIZES, default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    model, preset = build_model(args.size, args.device, dtype)
    branch, depth = preset.branch_layer, preset.depth
    gen = torch.Generator().manual_seed(0)
    ids, mask = left_pad(make_prompts(args.batch, 20, gen), 0, args.device)
    pixels = torch.randn(args.batch, 3, 336, 336, generator=gen).to(args.device, dtype)
    labels = torch.randint(-1, 2, (args.batch, 576), generator=gen).to(args.device)
    labels[labels == -1] = -100
    early_exit = lambda: branch_hidden_states(model, ids, mask, pixels, branch)  # noqa: E731
    results = {}
    report = {
        "benchmark": "train_rpn",
        "machine": machine(args.device),
        "size": args.size,
        "batch": args.batch,
        "branch_layer": branch,
        "depth": depth,
        "results": results,  # filled in below, saved after each way
    }

    @torch.no_grad()
    def full_backbone():
        pos = position_ids_from_mask(mask)
        out = model.model(
            input_ids=ids,
            attention_mask=mask,
            pixel_values=pixels,
            position_ids=pos,
            use_cache=False,
            output_hidden_states=True,
        )
        return out.hidden_states[branch], pos

    for name, backbone, ckpt in (
        ("plain", early_exit, False),
        ("checkpointing", early_exit, True),
        ("full_backbone", full_backbone, False),
    ):
        rpn = RegionProposalNetwork.from_llava(model, branch, depth).to(args.device, torch.float32).train()
        if ckpt:
            rpn.gradient_checkpointing_enable()
        opt = torch.optim.AdamW(rpn.parameters(), lr=5e-5, betas=(0.9, 0.98))

        def step(rpn, opt):
            hidden, pos = backbone()
            with torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16, enabled=cuda):
                logits = rpn(hidden, mask, pos, ids == IMAGE_TOKEN)
            rpn_loss(logits.float(), labels).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        step(rpn, opt)  # warm-up
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        sync(args.device)
        start = time.perf_counter()
        for _ in range(args.steps):
            step(rpn, opt)
        sync(args.device)
        seconds = (time.perf_counter() - start) / args.steps
        per_s = args.batch / seconds
        results[name] = {
            "step_s": round(seconds, 4),
            "samples_per_s": round(per_s, 2),
            "peak_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
            "epoch_10k_minutes": round(10_000 / per_s / 60, 2),
        }
        save(report, args.json)
        del rpn, opt
        if cuda:
            torch.cuda.empty_cache()
    results["early_exit_speedup_vs_full_backbone"] = round(
        results["plain"]["samples_per_s"] / results["full_backbone"]["samples_per_s"], 2
    )
    emit(report, args.json)


if __name__ == "__main__":
    main()
