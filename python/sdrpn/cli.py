"""The ``sdrpn`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from .label_demo import LabelDemoConfig, run_label_demo, summary_line
from .preprocess import PROMPT_TEMPLATE


def _grid(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--grid must look like 24x24, got {text!r}") from None
    if h < 1 or w < 1:
        raise argparse.ArgumentTypeError(f"--grid must be at least 1x1, got {text!r}")
    return h, w


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdrpn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("label-demo", help="label synthetic attention maps and draw them")
    demo.add_argument("--out", default="outputs/demo", help="output folder")
    demo.add_argument("--batch", type=_positive, default=12, help="number of maps")
    demo.add_argument("--grid", type=_grid, default=(24, 24), help="grid as HxW")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--device", default="cpu")

    label = sub.add_parser("label", help="pseudo labels from a LLaVA model's own attention")
    label.add_argument("--model", required=True, help="LLaVA checkpoint folder (HF format)")
    label.add_argument("--data", required=True, help="LLaVA-format JSON list of samples")
    label.add_argument("--image-folder", required=True)
    label.add_argument("--out", required=True, help="output folder (resumable)")
    label.add_argument("--answers", choices=["self", "given"], default="self")
    label.add_argument("--preset", default="llava15-7b")
    label.add_argument("--batch-size", type=_positive, default=8)
    label.add_argument("--max-new-tokens", type=_positive, default=128)
    label.add_argument("--limit", type=_positive, default=None)
    label.add_argument("--shard-size", type=_positive, default=1000)
    label.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    label.add_argument("--prompt-template", default=PROMPT_TEMPLATE,
                       help="prompt around the question; must hold <image> and {question}")
    label.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK if available, else cpu")

    train = sub.add_parser("train", help="train the RPN on a label folder")
    train.add_argument("--model", required=True, help="LLaVA checkpoint folder (HF format)")
    train.add_argument("--labels", required=True, help="label folder of sdrpn label / convert-labels")
    train.add_argument("--out", required=True)
    train.add_argument("--image-folder", default=None, help="default: the one the labels record")
    train.add_argument("--epochs", type=_positive, default=1)
    train.add_argument("--lr", type=float, default=5e-5)
    train.add_argument("--batch-size", type=_positive, default=8)
    train.add_argument("--grad-accum", type=_positive, default=1)
    train.add_argument("--max-samples", type=_positive, default=None)
    train.add_argument("--bf16", action="store_true", help="backbone in bf16, RPN under bf16 autocast")
    train.add_argument("--gradient-checkpointing", action="store_true")
    train.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    train.add_argument("--branch-layer", type=_positive, default=15)
    train.add_argument("--depth", type=_positive, default=3)
    train.add_argument("--warmup-ratio", type=float, default=0.03)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--held-out-fraction", type=float, default=0.05)
    train.add_argument("--save-every", type=_positive, default=200, help="optimizer steps")
    train.add_argument("--stop-after-steps", type=_positive, default=None)
    train.add_argument("--num-workers", type=int, default=0)
    train.add_argument("--device", default=None)

    infer = sub.add_parser("infer", help="answer with RoI crops (one image, or a whole file)")
    infer.add_argument("--model", required=True, help="LLaVA checkpoint folder (HF format)")
    infer.add_argument("--rpn", required=True, help="folder of a trained RPN (sdrpn train --out)")
    infer.add_argument("--image", default=None)
    infer.add_argument("--question", default=None)
    infer.add_argument("--data", default=None, help="LLaVA-format JSON to answer as a whole")
    infer.add_argument("--image-folder", default=None)
    infer.add_argument("--out", default=None, help="JSONL answers for --data (resumable)")
    infer.add_argument("--viz", default=None, help="PNG with the RoI heat map and boxes")
    infer.add_argument("--json", action="store_true", help="print one JSON object")
    infer.add_argument("--threshold", type=float, default=0.15)
    infer.add_argument("--max-boxes", type=_positive, default=2)
    infer.add_argument("--token-ratio", type=float, default=-1)
    infer.add_argument("--preprocessing", choices=["pad", "crop"], default="pad")
    infer.add_argument("--max-new-tokens", type=_positive, default=128)
    infer.add_argument("--batch-size", type=_positive, default=8)
    infer.add_argument("--limit", type=_positive, default=None)
    infer.add_argument("--prompt-template", default=PROMPT_TEMPLATE)
    infer.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="fp16")
    infer.add_argument("--device", default=None)

    convert = sub.add_parser("convert-labels", help="import a reference-implementation label pickle")
    convert.add_argument("pickle", help="IN.pkl")
    convert.add_argument("out", help="OUT_DIR")
    convert.add_argument("--grid", type=_grid, default=None, help="HxW when the maps are not square")

    viz = sub.add_parser("viz-labels", help="draw the first samples of a label folder")
    viz.add_argument("labels", help="label folder")
    viz.add_argument("--out", required=True, help="PNG folder")
    viz.add_argument("--num", type=_positive, default=16)
    viz.add_argument("--image-folder", default=None)
    return parser


def _distributed(device_arg: str | None, backend: str | None = None) -> tuple[int, int, str]:
    """Rank, world size and device under torchrun (rank 0 of 1 otherwise)."""
    import torch
    import torch.distributed as dist

    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = device_arg or (f"cuda:{local % torch.cuda.device_count()}"
                            if torch.cuda.is_available() else "cpu")
    if world > 1 and not dist.is_initialized():
        if backend is None:  # NCCL needs a GPU of its own for every rank
            backend = "nccl" if device.startswith("cuda") and torch.cuda.device_count() >= world else "gloo"
        dist.init_process_group(backend)
    return rank, world, device


def _run_train(args) -> dict:
    import torch.distributed as dist

    from .llava.loading import load_llava
    from .train import RPNTrainer, TrainConfig

    rank, world, device = _distributed(args.device)
    model, tokenizer = load_llava(args.model, "bf16" if args.bf16 else "fp32", device)
    cfg = TrainConfig(labels=args.labels, out=args.out, image_folder=args.image_folder,
                      epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                      grad_accum=args.grad_accum, max_samples=args.max_samples, bf16=args.bf16,
                      gradient_checkpointing=args.gradient_checkpointing, resume=args.resume,
                      branch_layer=args.branch_layer, depth=args.depth,
                      warmup_ratio=args.warmup_ratio, seed=args.seed,
                      held_out_fraction=args.held_out_fraction, save_every=args.save_every,
                      stop_after_steps=args.stop_after_steps, num_workers=args.num_workers)
    result = RPNTrainer(cfg, model, tokenizer, rank=rank, world_size=world, device=device).run()
    if world > 1:
        dist.destroy_process_group()
    return result if rank == 0 else {}


def _run_infer(args) -> None:
    import torch

    from .infer import SDRPNLlava
    from .infer_job import InferFileConfig, answer_file, answer_record
    from .llava.loading import load_llava
    from .preprocess import load_rgb
    from .rpn import RegionProposalNetwork
    from .viz import roi_overlay, save_atomic

    single = args.image is not None or args.question is not None
    if single == (args.data is not None):
        raise SystemExit("sdrpn infer: give either --image and --question, or --data (with --image-folder and --out)")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_llava(args.model, args.dtype, device)
    rpn = RegionProposalNetwork.load(args.rpn, model)
    pipe = SDRPNLlava(model, tokenizer, rpn, threshold=args.threshold, max_boxes=args.max_boxes,
                      token_ratio=args.token_ratio, preprocessing=args.preprocessing,
                      prompt_template=args.prompt_template)
    if not single:
        if not args.image_folder or not args.out:
            raise SystemExit("sdrpn infer --data needs --image-folder and --out")
        cfg = InferFileConfig(args.data, args.image_folder, args.out, args.batch_size,
                              args.max_new_tokens, args.limit)
        print(json.dumps(answer_file(pipe, cfg)))
        return
    if args.image is None or args.question is None:
        raise SystemExit("sdrpn infer: --image and --question go together")
    image = load_rgb(args.image)
    answer = pipe.generate([image], [args.question], args.max_new_tokens)[0]
    record = answer_record(answer)
    if args.viz:
        save_atomic(roi_overlay(image, answer.rois.prob.numpy(), answer.rois.boxes, args.preprocessing), args.viz)
        record["viz"] = args.viz
    if args.json:
        print(json.dumps(record))
    else:
        print(f"answer: {record['answer']}")
        print(f"boxes (pixels): {record['boxes'] or 'none (answered as the base model)'}")
        print("timing: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in record["timings_s"].items()))


def _run_label(args) -> dict:
    import torch.distributed as dist

    from .labels import LabelJob, LabelJobConfig, merge_summaries
    from .llava.loading import load_llava
    from .llava.presets import get_preset

    # Each rank labels every world_size-th sample into its own shards; ranks only meet at a
    # barrier before the summary, which gloo serves on any device.
    rank, world, device = _distributed(args.device, backend="gloo")
    preset = get_preset(args.preset)
    model, tokenizer = load_llava(args.model, args.dtype, device)
    cfg = LabelJobConfig(data=args.data, image_folder=args.image_folder, out=args.out,
                         answers=args.answers, batch_size=args.batch_size,
                         max_new_tokens=args.max_new_tokens, limit=args.limit,
                         shard_size=args.shard_size, rank=rank, world_size=world,
                         prompt_template=args.prompt_template)
    LabelJob(cfg, model, tokenizer, preset).run()
    if world > 1:
        dist.barrier()
    summary = merge_summaries(args.out) if rank == 0 else {}
    if world > 1:
        dist.destroy_process_group()
    return summary


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    if args.command == "label-demo":
        cfg = LabelDemoConfig(out=args.out, batch=args.batch, grid_h=args.grid[0],
                              grid_w=args.grid[1], seed=args.seed, device=args.device)
        print(summary_line(run_label_demo(cfg)))
    elif args.command == "label":
        summary = _run_label(args)
        if summary:
            print(json.dumps(summary))
    elif args.command == "train":
        result = _run_train(args)
        if result:
            print(json.dumps(result))
    elif args.command == "infer":
        _run_infer(args)
    elif args.command == "convert-labels":
        from .convert import convert_reference_pickle

        print(json.dumps(convert_reference_pickle(args.pickle, args.out, args.grid)))
    elif args.command == "viz-labels":
        from .viz_labels import visualise_labels

        paths = visualise_labels(args.labels, args.out, args.num, args.image_folder)
        print(f"wrote {len(paths)} pictures to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
