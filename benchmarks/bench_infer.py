"""End-to-end answering with RoI against plain generate, on LLaVA-1.5 shapes with random
weights and forced RPN maps (1 or 2 boxes), measured side by side in one run: throughput
ratio, the cost of each stage, and the saving of prefix reuse over a full recompute.

    python benchmarks/bench_infer.py --size 7b --device cuda
    python benchmarks/bench_infer.py --size tiny                 # CPU smoke run
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from bench_label_pipeline import IMAGE_TOKEN, build_model
from sdrpn.infer.pipeline import SDRPNLlava
from sdrpn.llava.inputs import crop_pixels, preprocess_image
from sdrpn.rpn.model import RegionProposalNetwork
from timing import emit, machine, sync


class IdTokenizer:
    """Token ids stand for themselves: the benchmark needs lengths, not words."""

    eos_token_id = -1  # never produced: every answer runs to max_new_tokens
    pad_token_id = 0

    def __call__(self, text: str, add_special_tokens: bool = True):
        n = max(1, len(text.split()))
        ids = torch.randint(100, 30000, (n,), generator=torch.Generator().manual_seed(len(text))).tolist()
        return {"input_ids": ([1] if add_special_tokens else []) + ids}

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


SYSTEM = " ".join(["w"] * 34)  # 35 system tokens with the begin-of-sequence token
TEMPLATE = SYSTEM + " <image>\n{question} ASSISTANT:"


def forced_logits(n_boxes: int, batch: int) -> torch.Tensor:
    grid = torch.full((batch, 24, 24), -10.0)
    grid[:, 3:9, 3:9] = 10.0
    if n_boxes == 2:
        grid[:, 15:21, 14:22] = 10.0
    return grid.view(batch, -1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", choices=["7b", "tiny"], default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--answer-tokens", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    dtype = torch.float16 if cuda else torch.float32
    model, _ = build_model(args.size, args.device, dtype)
    model.config.image_token_id = IMAGE_TOKEN
    gen = torch.Generator().manual_seed(0)
    tok = IdTokenizer()
    branch, depth = (15, 3) if args.size == "7b" else (1, 2)
    rpn = RegionProposalNetwork.from_llava(model, branch, depth).to(args.device, dtype)
    pipe = SDRPNLlava(model, tok, rpn, prompt_template=TEMPLATE)
    question = "what is written on the small red tag in the corner of the picture ?"
    results = []
    for batch in args.batch_sizes:
        imgs = [Image.fromarray((torch.rand(480, 640, 3, generator=gen) * 255).byte().numpy()) for _ in range(batch)]
        questions = [question] * batch
        prompts = [sum(pipe._split_prompt(q), []) for q in questions]
        ids = torch.tensor(prompts, device=args.device)
        pixels = torch.stack([preprocess_image(im, 336)[0] for im in imgs]).to(args.device, dtype)
        for tokens in args.answer_tokens:

            def baseline():
                model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    pixel_values=pixels,
                    max_new_tokens=tokens,
                    min_new_tokens=tokens,
                    do_sample=False,
                    pad_token_id=0,
                )

            row = {"batch": batch, "answer_tokens": tokens, "baseline_s": timed(baseline, args)}
            for n_boxes in (1, 2):
                rpn_forced = forced_logits(n_boxes, batch).to(args.device)
                pipe.rpn.forward = lambda *a, _f=rpn_forced: _f  # forced maps: 1 or 2 boxes
                answers = []
                seconds = timed(lambda: answers.append(pipe.generate(imgs, questions, tokens)), args)
                stages = {k: round(v, 5) for k, v in answers[-1][0].timings.items()}
                recompute = timed(lambda: full_recompute(pipe, imgs, prompts, answers[-1], tokens, args), args)
                row[f"{n_boxes}_box"] = {
                    "sdrpn_s": seconds,
                    "throughput_vs_baseline": round(row["baseline_s"] / seconds, 3),
                    "stages_s": stages,
                    "full_recompute_s": recompute,
                    "prefix_reuse_saving": round(1 - seconds / recompute, 3),
                }
            results.append(row)
            del pipe.rpn.forward
    emit(
        {
            "benchmark": "infer",
            "machine": machine(args.device),
            "size": args.size,
            "dtype": str(dtype).replace("torch.", ""),
            "results": results,
        },
        args.json,
    )


def full_recompute(pipe, imgs, prompts, answers, tokens, args):
    """Pass 2 without the prefix cache: [prefix, crop tokens, question] from scratch."""
    for b, (im, ans) in enumerate(zip(imgs, answers)):
        crops = [crop_pixels(im.convert("RGB"), box, pipe.size) for box in ans.rois.boxes]
        prefix_len = prompts[b].index(IMAGE_TOKEN) + pipe.num_cells
        ids = prompts[b][:prefix_len] + [IMAGE_TOKEN] * (pipe.num_cells * len(crops)) + prompts[b][prefix_len:]
        ids = torch.tensor([ids], device=args.device)
        pixels = torch.stack([preprocess_image(im, pipe.size)[0]] + crops).to(args.device, pipe.dtype)
        pipe.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            pixel_values=pixels,
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            do_sample=False,
            pad_token_id=0,
        )


def timed(fn, args) -> float:
    fn()  # warm-up
    sync(args.device)
    start = time.perf_counter()
    for _ in range(args.repeats):
        fn()
    sync(args.device)
    return round((time.perf_counter() - start) / args.repeats, 5)


if __name__ == "__main__":
    main()
