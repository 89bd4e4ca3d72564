"""End-to-end answering with RoI against plain generate, on LLaVA-1.5 shapes with random
weights and forced RPN maps, measured side by side in one run: throughput against
`generate` without RoI (bbox mode with 1 and 2 boxes, mask mode with 2 regions, i.e. one
partial crop), the cost of each stage, and at the largest batch SD-RPN against the
reference's way (batch 1, pass 1 then a full `generate` over [prefix, crop, question]).

    python benchmarks/bench_infer.py --size 7b --device cuda --profile build/infer_profile
    python benchmarks/bench_infer.py --size tiny                 # CPU smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

import torch
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from bench_label_pipeline import IMAGE_TOKEN, SIZES, build_model
from sdrpn.infer.pass2 import width_groups
from sdrpn.infer.pipeline import SDRPNLlava
from sdrpn.llava.decode import DecoderPool, greedy_answers
from sdrpn.llava.inputs import crop_pixels, preprocess_image
from sdrpn.options import DECODERS
from sdrpn.rpn.model import RegionProposalNetwork
from timing import count_ops, emit, machine, profile_call, save, sync


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
# (crop mode, regions on the forced map, decoder): one box, two boxes, mask mode's one crop
# that keeps only the two regions' tokens (mask mode with one region is the bbox path), no
# box (the pipeline's cost without a crop), at batch > 1 a mix (2, 1, 0, 1 boxes per sample
# in turn), all through the pipeline's decoder; the mix again as one padded pass-2 forward
# (what running pass 2 in groups of similar width gains), and one box through the model's
# own forward per token (what the decoder contributes). Two boxes come first: the decoder
# sized for the longest cache is made in the warm-up round, and the other lengths' graphs
# are captured on it there; sized for one box first, it was replaced by the two-box one and
# one box captured again inside a timed round.
MIXED = (2, 1, 0, 1)
SETTINGS = (
    ("bbox", 2, "pipeline"),
    ("bbox", 1, "pipeline"),
    ("mask", 2, "pipeline"),
    ("bbox", 0, "pipeline"),
    ("bbox", "mixed", "pipeline"),
    ("bbox", "mixed", "one_forward"),
    ("bbox", 1, "hf"),
)


def setting_name(setting) -> str:
    mode, regions, decoder = setting
    name = "no_box" if regions == 0 else f"{mode}_{regions}"
    return name + {"pipeline": "", "hf": "_hf_decoder", "one_forward": "_one_pass2_forward"}[decoder]


def forced_logits(regions: int | str, batch: int) -> torch.Tensor:
    grid = torch.full((batch, 24, 24), -10.0)
    for b in range(batch):
        count = MIXED[b % len(MIXED)] if regions == "mixed" else regions
        if count >= 1:
            grid[b, 3:9, 3:9] = 10.0
        if count == 2:
            grid[b, 15:21, 14:22] = 10.0
    return grid.view(batch, -1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", choices=SIZES, default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--answer-tokens", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per setting (median)")
    parser.add_argument("--decoder", choices=DECODERS, default="auto", help="the pipeline's decoder (default: auto)")
    parser.add_argument("--profile", default=None, help="folder for a torch.profiler trace and tables (batch 1)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    dtype = torch.float16 if cuda else torch.float32
    model, preset = build_model(args.size, args.device, dtype)
    model.config.image_token_id = IMAGE_TOKEN
    gen = torch.Generator().manual_seed(0)
    branch, depth = preset.branch_layer, preset.depth
    rpn = RegionProposalNetwork.from_llava(model, branch, depth).to(args.device, dtype)
    pipes = {
        "pipeline": SDRPNLlava(model, IdTokenizer(), rpn, prompt_template=TEMPLATE, decoder=args.decoder),
        "hf": SDRPNLlava(model, IdTokenizer(), rpn, prompt_template=TEMPLATE, decoder="hf"),
        "one_forward": SDRPNLlava(
            model, IdTokenizer(), rpn, prompt_template=TEMPLATE, decoder=args.decoder, pass2_group_cost=10**9
        ),
    }
    pipe = pipes["pipeline"]
    pool = DecoderPool()
    question = "what is written on the small red tag in the corner of the picture ?"
    report = {
        "benchmark": "infer",
        "machine": machine(args.device),
        "size": args.size,
        "dtype": str(dtype).replace("torch.", ""),
        "decoder": pipe.decoder,
        "results": [],
    }
    question_tokens = len(pipe._split_prompt(question)[1])  # pass 2 feeds them after the crops
    inputs = {}
    for batch in args.batch_sizes:
        imgs = [Image.fromarray((torch.rand(480, 640, 3, generator=gen) * 255).byte().numpy()) for _ in range(batch)]
        ids = torch.tensor([sum(pipe._split_prompt(question), [])] * batch, device=args.device)
        pixels = torch.stack([preprocess_image(im, 336)[0] for im in imgs]).to(args.device, dtype)
        inputs[batch] = imgs, [question] * batch, ids, pixels
    # Every batch size at the shortest answers first: the rows with targets come before a
    # time budget can cut the run short.
    for tokens in args.answer_tokens:
        for batch in args.batch_sizes:
            imgs, questions, ids, pixels = inputs[batch]
            answers = {}

            def run(setting, tokens=tokens, answers=answers, batch=batch):
                imgs, questions, ids, pixels = inputs[batch]
                if setting == "baseline":
                    return plain_generate(model, ids, pixels, tokens)
                if setting == "baseline_same_decoder":
                    mask = torch.ones_like(ids)
                    return greedy_answers(model, ids, mask, pixels, tokens, -1, pipe.decoder, pool)
                mode, regions, decoder = setting
                force(pipes[decoder], mode, regions, batch, args.device)
                answers[setting] = pipes[decoder].generate(imgs, questions, tokens)

            settings = [s for s in SETTINGS if batch > 1 or s[1] != "mixed"]
            seconds = interleaved(run, ["baseline", "baseline_same_decoder", *settings], args.repeats, args.device)
            row = {
                "batch": batch,
                "answer_tokens": tokens,
                "baseline_s": seconds["baseline"],
                "baseline_same_decoder_s": seconds["baseline_same_decoder"],
            }
            if batch == args.batch_sizes[0] and tokens == args.answer_tokens[0]:
                # After the timed rounds: the host's work per call, device-independent.
                ops = {setting_name(s) if isinstance(s, tuple) else s: count_ops(lambda s=s: run(s)) for s in seconds}
                row["aten_ops"] = ops
                row["aten_ops_vs_baseline"] = {k: round(v / ops["baseline"], 3) for k, v in ops.items()}
            for setting in settings:
                row[setting_name(setting)] = {
                    "sdrpn_s": seconds[setting],
                    "throughput_vs_baseline": round(row["baseline_s"] / seconds[setting], 3),
                    "throughput_vs_baseline_same_decoder": round(row["baseline_same_decoder_s"] / seconds[setting], 3),
                    "crop_tokens": crop_token_counts(answers[setting]),
                    "stages_s": {k: round(v, 5) for k, v in answers[setting][0].timings.items()},
                    "pass2_tokens": pass2_tokens(answers[setting], question_tokens, pipes[setting[2]].pass2_group_cost),
                }
            # Random weights in float16: the decoders may part at a near tie, rarely.
            one_box = (answers[("bbox", 1, d)] for d in ("pipeline", "hf"))
            same = [a.tokens == b.tokens for a, b in zip(*one_box)]
            row["bbox_1_decoders_agree"] = sum(same) / len(same)
            if batch > 1:  # pass 2 in groups or as one padded forward: the same answers
                grouped, padded = (answers[("bbox", "mixed", d)] for d in ("pipeline", "one_forward"))
                same = [a.tokens == b.tokens for a, b in zip(grouped, padded)]
                row["bbox_mixed_groups_agree"] = sum(same) / len(same)
            if batch == max(args.batch_sizes) and batch > 1:
                force(pipe, "bbox", 1, 1, args.device)
                # One timed round: its batch-1 loop is long and even, and the run's time is short.
                way = lambda _: reference_way(pipe, imgs, questions, tokens)  # noqa: E731
                ref = interleaved(way, ["ref"], 1, args.device)["ref"]
                ours = row["bbox_1"]["sdrpn_s"]
                row["reference_way_bbox_1"] = {
                    "seconds": ref,
                    "sdrpn_speedup_samples_per_s": round(ref / ours, 2),
                }
            report["results"].append(row)
            # What the times rest on: a failed capture decodes without graphs, and warns once.
            report["graphs"] = {
                **{f"{name}_decoders": p.decoders.graph_counts() for name, p in pipes.items()},
                **{f"{name}_image_encoder": p.encoder.graph_counts() for name, p in pipes.items()},
                "baseline_same_decoder": pool.graph_counts(),
            }
            save(report, args.json)
            print(row, file=sys.stderr, flush=True)
            if args.profile and "profile" not in report:  # batch 1's, before the long rows
                report["profile"] = profile(pipe, model, args)
                save(report, args.json)
    del rpn.forward
    emit(report, args.json)


def force(pipe: SDRPNLlava, mode: str, regions: int | str, batch: int, device: str) -> None:
    """Crop mode and a forced RPN map: the benchmark times the pipeline, not the RPN's luck.
    The RPN still runs (its layers and head are part of every answer's cost); its logits
    are then replaced."""
    pipe.roi = dataclasses.replace(pipe.roi, crop_mode=mode)
    logits = forced_logits(regions, batch).to(device)
    rpn = type(pipe.rpn)

    def forward(*args, _forced=logits, **kwargs):
        real = rpn.forward(pipe.rpn, *args, **kwargs)
        return _forced[: real.shape[0]].to(real.dtype)

    pipe.rpn.forward = forward


def crop_token_counts(answers) -> list[int]:
    return [sum(int(k.sum()) for k in a.rois.keep) for a in answers]


def pass2_tokens(answers, question_tokens: int, group_cost: int) -> dict:
    """Token positions pass 2 computes: in its groups of similar width, and as one padded
    forward would (crops fed whole or by their kept tokens, as the benchmark runs them: no
    token ratio)."""
    widths = [n + question_tokens for n in crop_token_counts(answers)]
    groups = width_groups(widths, group_cost)
    return {
        "in_groups": sum(len(g) * max(widths[i] for i in g) for g in groups),
        "one_forward": len(widths) * max(widths),
        "groups": len(groups),
    }


def plain_generate(model, ids, pixels, tokens):
    model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        pixel_values=pixels,
        max_new_tokens=tokens,
        min_new_tokens=tokens,
        do_sample=False,
        pad_token_id=0,
    )


def reference_way(pipe, imgs, questions, tokens):
    """Batch 1; pass 1 for the box, then [prefix, crop tokens, question] from scratch."""
    for im, q in zip(imgs, questions):
        rois = pipe.predict_rois([im], [q])[0]
        prefix, suffix = pipe._split_prompt(q)
        crops = [crop_pixels(im.convert("RGB"), box, pipe.size) for box in rois.boxes]
        ids = prefix + [IMAGE_TOKEN] * (pipe.num_cells * len(crops)) + suffix
        pixels = torch.stack([preprocess_image(im, pipe.size)[0]] + crops)
        plain_generate(pipe.model, torch.tensor([ids], device=pipe.device), pixels.to(pipe.device, pipe.dtype), tokens)


def profile(pipe, model, args) -> dict:
    """One batch-1 answer of each kind under torch.profiler (timing.profile_call), in args.profile."""
    img = [Image.fromarray((torch.rand(480, 640, 3) * 255).byte().numpy())]
    q = ["what is written on the small red tag in the corner of the picture ?"]
    ids = torch.tensor([sum(pipe._split_prompt(q[0]), [])], device=args.device)
    pixels = preprocess_image(img[0], 336)[0][None].to(args.device, pipe.dtype)
    tokens = args.answer_tokens[0]
    force(pipe, "bbox", 1, 1, args.device)
    return {
        **profile_call(lambda: pipe.generate(img, q, tokens), "sdrpn", args.profile, args.device),
        **profile_call(lambda: plain_generate(model, ids, pixels, tokens), "baseline", args.profile, args.device),
    }


def interleaved(run, settings, repeats: int, device: str) -> dict:
    """Median seconds of each setting, run in turns (one of each per round, after one
    warm-up round), so that a drift in the machine's speed touches every setting alike."""
    times = {s: [] for s in settings}
    for round_ in range(repeats + 1):
        for setting in settings:
            sync(device)
            start = time.perf_counter()
            run(setting)
            sync(device)
            if round_:
                times[setting].append(time.perf_counter() - start)
    return {s: round(statistics.median(t), 5) for s, t in times.items()}


if __name__ == "__main__":
    main()
