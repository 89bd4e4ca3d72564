"""Samples per second and peak memory of pseudo labelling: our pipeline (one teacher-forced
SDPA pass through the probed layers, batched) against the reference way (generate with
output_attentions=True on eager attention at batch 1, reading each step's attention),
same prompts and answer lengths, measured side by side in one run.

    python benchmarks/bench_label_pipeline.py --size 7b --device cuda --answer-tokens 8 32 \
        --profile build/label_profile
    python benchmarks/bench_label_pipeline.py --size tiny            # a quick CPU smoke run
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import sdrpn
from sdrpn.llava import LLAVA15_7B, HeadSelection, LlavaPreset
from sdrpn.llava.decode import DecoderPool, resolve_decoder
from sdrpn.llava.inputs import left_pad
from sdrpn.llava.maps import given_answer_maps, self_answer_maps
from sdrpn.options import DECODERS
from timing import emit, machine, profile_call, save, sync

IMAGE_TOKEN = 32000
TINY_PRESET = LlavaPreset(
    "tiny", grounding=HeadSelection(((2, 1), (2, 3))), sink=HeadSelection(((1, None),)), branch_layer=1, depth=2
)


SIZES = ("7b", "7b-narrow", "tiny")


def build_model(size: str, device: str, dtype: torch.dtype, text_layers: int | None = None):
    """LLaVA-1.5-7B's shapes with random weights; "tiny" narrows and shortens them for smoke
    runs; "7b-narrow" keeps 7B's depth (layers, tokens, launches) at tiny widths, so that
    its time is the host's work per forward with next to no arithmetic: a CPU stand-in for
    a GPU run bound by the host's launching of kernels. ``text_layers``: another depth of
    the text model (the preset may then name layers it lacks)."""
    deep = size in ("7b", "7b-narrow")
    wide = size == "7b"
    vision = CLIPVisionConfig(
        hidden_size=1024 if wide else 32,
        intermediate_size=4096 if wide else 64,
        num_hidden_layers=24 if deep else 2,
        num_attention_heads=16 if wide else 2,
        image_size=336,
        patch_size=14,
    )
    # 7B's 32 heads at any depth of 7B, so that its preset's heads exist (4 dims each when narrow).
    heads = 32 if deep else 4
    text = LlamaConfig(
        vocab_size=32064,
        hidden_size={"7b": 4096, "7b-narrow": 128}.get(size, 64),
        intermediate_size={"7b": 11008, "7b-narrow": 256}.get(size, 128),
        num_hidden_layers=text_layers or (32 if deep else 4),
        num_attention_heads=heads,
        num_key_value_heads=heads if deep else 2,
        max_position_embeddings=4096,
    )
    preset = LLAVA15_7B if deep else TINY_PRESET
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN)
    config._attn_implementation = "sdpa"
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlavaForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval().requires_grad_(False), preset


def make_prompts(n: int, question_tokens: int, gen: torch.Generator) -> list[list[int]]:
    system = torch.randint(100, 30000, (35,), generator=gen).tolist()
    return [
        [1] + system + [IMAGE_TOKEN] * 576 + torch.randint(100, 30000, (question_tokens,), generator=gen).tolist()
        for _ in range(n)
    ]


@torch.no_grad()
def ours(model, preset, prompts, pixels, answer_tokens, batch_size, decoder, gen, pool=None):
    """The label job's way: given answers and one teacher-forced pass over [prompt, answer],
    or (``decoder`` set) self answers through it and their maps from the prompts' cache;
    then the labels."""
    device = pixels.device
    for i in range(0, len(prompts), batch_size):
        chunk, px = prompts[i : i + batch_size], pixels[i : i + batch_size]
        if decoder:
            ids, mask = left_pad(chunk, 0, device)
            options = {"max_new_tokens": answer_tokens, "eos_id": -1, "pad_id": 0, "decoder": decoder, "pool": pool}
            _, maps = self_answer_maps(model, ids, mask, px, preset, 576, **options)
        else:
            answers = [torch.randint(100, 30000, (answer_tokens,), generator=gen).tolist() for _ in chunk]
            maps = given_answer_maps(model, chunk, answers, px, preset, 576, pad_id=0)
        sdrpn.ops.pseudo_labels(maps.grounding, maps.sink, 24, 24)


@torch.no_grad()
def reference_way(model, preset, prompts, pixels, answer_tokens):
    model.set_attn_implementation("eager")
    try:
        for i, prompt in enumerate(prompts):
            ids = torch.tensor([prompt], device=pixels.device)
            out = model.generate(
                input_ids=ids,
                pixel_values=pixels[i : i + 1],
                max_new_tokens=answer_tokens,
                min_new_tokens=answer_tokens,
                do_sample=False,
                pad_token_id=0,
                output_attentions=True,
                return_dict_in_generate=True,
            )
            s = prompt.index(IMAGE_TOKEN)
            steps = out.attentions[1:] or out.attentions[:1]
            g = torch.stack(
                [
                    torch.stack([step[layer][0, head, -1, s : s + 576] for step in steps]).mean(0)
                    for layer, head in preset.grounding.pairs
                ]
            ).mean(0)
            sink_layer = preset.sink.layers[0]
            sk = torch.stack([step[sink_layer][0, :, -1, s : s + 576].mean(0) for step in steps]).mean(0)
            sdrpn.ops.pseudo_labels(g[None].float(), sk[None].float(), 24, 24)
    finally:
        model.set_attn_implementation("sdpa")


def measure(fn, device, n_samples):
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
    return {
        "samples_per_s": round(n_samples / seconds, 2),
        "seconds": round(seconds, 3),
        "peak_GiB": None if peak is None else round(peak, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", choices=SIZES, default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default=None)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--reference-samples", type=int, default=4)
    parser.add_argument("--answer-tokens", type=int, nargs="+", default=[8])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--question-tokens", type=int, default=20)
    parser.add_argument("--decoder", choices=DECODERS, default="auto", help="self answers' decoder (default: auto)")
    parser.add_argument("--json", default=None)
    parser.add_argument(
        "--profile", default=None, help="folder for torch.profiler traces and tables of one batch of each way"
    )
    args = parser.parse_args()
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[
        args.dtype or ("fp16" if args.device.startswith("cuda") else "fp32")
    ]
    gen = torch.Generator().manual_seed(0)
    model, preset = build_model(args.size, args.device, dtype)
    prompts = make_prompts(args.samples, args.question_tokens, gen)
    pixels = torch.randn(args.samples, 3, 336, 336, generator=gen).to(args.device, dtype)
    report = {
        "benchmark": "label_pipeline",
        "machine": machine(args.device),
        "size": args.size,
        "dtype": str(dtype).replace("torch.", ""),
        "prompt_tokens": len(prompts[0]),
        "results": [],
    }
    # Self answers through the label job's decoder and, where that is not HF's, through
    # the model's own forward per token too: what the decoder contributes.
    decoder = resolve_decoder(args.decoder, model)
    modes = {"given": None, "self": decoder} | ({"self_hf_decoder": "hf"} if decoder != "hf" else {})
    report["decoder"] = decoder
    pool = DecoderPool()
    for tokens in args.answer_tokens:
        ours(model, preset, prompts[:2], pixels[:2], tokens, 2, decoder, gen, pool)  # warm-up
        # A kept decoder's cache is live memory (GiBs at 7B): each peak counts only its own.
        pool.clear()
        ref = measure(
            lambda: reference_way(
                model, preset, prompts[: args.reference_samples], pixels[: args.reference_samples], tokens
            ),
            args.device,
            args.reference_samples,
        )
        row = {"answer_tokens": tokens, "reference_batch1": ref}
        report["results"].append(row)  # filled in below, saved after each mode
        for mode, mode_decoder in modes.items():
            per_batch = {}
            for bs in args.batch_sizes:
                pool.clear()
                # One batch of this size first: new shapes pay for kernel and plan selection.
                ours(model, preset, prompts[:bs], pixels[:bs], tokens, bs, mode_decoder, gen, pool)
                per_batch[bs] = measure(
                    lambda: ours(model, preset, prompts, pixels, tokens, bs, mode_decoder, gen, pool),
                    args.device,
                    args.samples,
                )
            best = max(per_batch, key=lambda b: per_batch[b]["samples_per_s"])
            row[mode] = {
                "by_batch_size": per_batch,
                "best_batch_size": best,
                "speedup_best_vs_reference": round(per_batch[best]["samples_per_s"] / ref["samples_per_s"], 1),
                "speedup_batch1_vs_reference": round(
                    per_batch[args.batch_sizes[0]]["samples_per_s"] / ref["samples_per_s"], 1
                ),
            }
            report["graphs"] = pool.graph_counts()  # a failed capture decodes without graphs
            save(report, args.json)
    if args.profile:  # after the figures: one batch of the largest size each way, one reference sample
        n, tokens = min(max(args.batch_sizes), args.samples), args.answer_tokens[0]
        report["profile"] = {"batch_size": n, "answer_tokens": tokens}
        for mode, mode_decoder in modes.items():
            run = lambda: ours(model, preset, prompts[:n], pixels[:n], tokens, n, mode_decoder, gen, pool)  # noqa: E731
            report["profile"] |= profile_call(run, mode, args.profile, args.device)
            save(report, args.json)
        run = lambda: reference_way(model, preset, prompts[:1], pixels[:1], tokens)  # noqa: E731
        report["profile"] |= profile_call(run, "reference_batch1", args.profile, args.device)
    emit(report, args.json)


if __name__ == "__main__":
    main()
