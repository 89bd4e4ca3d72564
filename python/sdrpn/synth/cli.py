"""`sdrpn-synth`: the synthetic fine-detail task's own commands: train the stand-in base
model, score it, and `run`, SD-RPN on the task end to end (labels, RPN training and
evaluation through `sdrpn`'s own stages)."""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from ..cli import (
    Parser,
    check_output_kind,
    configure_logging,
    device_arg,
    non_negative_int,
    number_in,
    path_arg,
    positive_int,
    run_command,
)
from .task import TAG_CLEARANCE


def head_pairs(text: str) -> list[list]:
    """'2' -> [[2, None]] (every head of layer 2); '2:3,4:1' -> [[2, 3], [4, 1]]."""
    pairs = []
    for item in text.split(","):
        layer, _, head = item.strip().partition(":")
        try:
            pairs.append([int(layer), int(head) if head else None])
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected 'L' or 'L:H' items, comma-separated, got {text!r}") from None
    return pairs


def workers_arg(text: str) -> int:
    """Processes making batches: more than 4 per CPU only costs memory (each holds the task)."""
    value, limit = non_negative_int(text), 4 * (os.cpu_count() or 1)
    if value > limit:
        raise argparse.ArgumentTypeError(f"must be at most {limit} (4 per CPU), got {value}")
    return value


FRACTION = number_in(0.0, 1.0)
WEIGHT = number_in(0.0)


def add_device(parser: argparse.ArgumentParser) -> None:
    """--device for a command that runs a model: the GPU where there is one."""
    parser.add_argument(
        "--device",
        type=device_arg,
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="where the model runs (default: %(default)s)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="sdrpn-synth", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train-base", help="train the tiny LLaVA stand-in on the synthetic task")
    train.add_argument("--out", type=path_arg, required=True, help="folder for the model, checkpoint and history")
    train.add_argument("--steps", type=positive_int, default=2200, help="optimiser steps (default: %(default)s)")
    train.add_argument("--batch-size", type=positive_int, default=32, help="samples a step (default: %(default)s)")
    train.add_argument(
        "--lr", type=number_in(0.0, 1.0, low_open=True), default=1e-3, help="peak learning rate (default: %(default)s)"
    )
    train.add_argument(
        "--seed", type=non_negative_int, default=0, help="data and initialisation seed (default: %(default)s)"
    )
    add_device(train)
    train.add_argument(
        "--workers", type=workers_arg, default=min(8, os.cpu_count() or 1), help="processes making batches"
    )
    train.add_argument(
        "--save-every", type=positive_int, default=500, help="steps between checkpoints (default: %(default)s)"
    )
    train.add_argument(
        "--max-minutes",
        type=number_in(0.0, low_open=True),
        default=None,
        help="checkpoint and stop after this long; --resume goes on",
    )
    train.add_argument("--resume", action="store_true", help="go on from --out's checkpoint")
    train.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="bf16 autocast (default: on CUDA, or on a CPU with bf16 instructions)",
    )
    train.add_argument(
        "--colour-weight",
        type=WEIGHT,
        default=1.0,
        help="weight of the tag-colour auxiliary loss; the shipped model's first stage used 0, its second 1 "
        "(default: %(default)s)",
    )
    train.add_argument(
        "--encoder-steps",
        type=non_negative_int,
        default=0,
        help="first steps that train the vision side alone, before the language model (default: %(default)s)",
    )
    train.add_argument(
        "--init",
        type=path_arg,
        default=None,
        help="start from this trained base model's weights (a later stage; default: random)",
    )
    train.add_argument(
        "--zoom-fraction",
        type=FRACTION,
        default=0.4,
        help="share of batches with a zoomed second view (default: %(default)s)",
    )
    train.add_argument(
        "--zoom-on-tag",
        type=FRACTION,
        default=0.7,
        help="share of zoomed views that hold the tag (default: %(default)s)",
    )
    train.add_argument(
        "--read-share-zoomed", type=FRACTION, default=0.5, help="share of code questions in zoomed batches"
    )
    train.add_argument(
        "--cell-views",
        type=FRACTION,
        default=0.0,
        help="share of views on the tag cut as SD-RPN cuts crops, on the encoder's grid cells (default: %(default)s)",
    )
    train.add_argument(
        "--char-head",
        choices=["linear", "lm"],
        default="linear",
        help="the code-character loss through its own linear head, or through the LM's output layer "
        "(default: %(default)s)",
    )
    train.add_argument(
        "--crop-tag-weight", type=WEIGHT, default=0.0, help="weight of the tag-cell loss on crop views (default: 0)"
    )
    train.add_argument(
        "--tag-clearance",
        type=non_negative_int,
        default=TAG_CLEARANCE,
        help="background in pixels kept between the tag and clutter in training images; 0 places "
        "it anywhere, the shipped model's data (default: %(default)s)",
    )

    score = sub.add_parser("eval-base", help="accuracy by question kind: thumbnail, true crop, random crop")
    score.add_argument(
        "--model", type=path_arg, required=True, help="base model folder (train-base's or export-base's)"
    )
    score.add_argument("--count", type=positive_int, default=400, help="samples scored (default: %(default)s)")
    score.add_argument(
        "--split", default="test", choices=["val", "test"], help="where they come from (default: %(default)s)"
    )
    add_device(score)
    score.add_argument("--json", type=path_arg, default=None, help="also write the table here")
    inspect = sub.add_parser(
        "inspect", help="where a base model's answer attention lands, per layer and head, and the heads to ground on"
    )
    inspect.add_argument(
        "--model", type=path_arg, required=True, help="base model folder (train-base's or export-base's)"
    )
    inspect.add_argument("--count", type=positive_int, default=512, help="validation samples (default: %(default)s)")

    export = sub.add_parser(
        "export-base",
        help="ship a trained base model: float16 weights, tokenizer, training record and the preset SD-RPN reads",
    )
    export.add_argument("--model", type=path_arg, required=True, help="train-base output folder")
    export.add_argument("--to", type=path_arg, required=True, help="the shipped model's folder")
    export.add_argument(
        "--grounding",
        type=head_pairs,
        required=True,
        help="heads whose attention grounds the labels: 'L' (every head of layer L) or 'L:H', comma-separated",
    )
    export.add_argument(
        "--sink-layer",
        type=non_negative_int,
        default=0,
        help="layer whose attention (all heads) gives the sink map (default: %(default)s)",
    )
    export.add_argument(
        "--sink-threshold",
        type=number_in(0.0, low_open=True),
        required=True,
        help="sink-map value from which a cell is a sink (tau_sink)",
    )
    export.add_argument("--branch-layer", type=positive_int, required=True, help="K: the RPN's branch layer")
    export.add_argument("--depth", type=positive_int, default=2, help="T: the RPN's depth (default: %(default)s)")

    run = sub.add_parser("run", help="SD-RPN on the task: label, train the RPN, evaluate, write the report")
    run.add_argument(
        "--out",
        type=path_arg,
        default="outputs/synth",
        help="working folder (resumable) and report (default: %(default)s)",
    )
    run.add_argument("--model", type=path_arg, default=None, help="base model folder (default: the shipped one)")
    run.add_argument(
        "--train-count", type=positive_int, default=10_000, help="samples labelled for the RPN (default: %(default)s)"
    )
    run.add_argument("--test-count", type=positive_int, default=400, help="test images answered (default: %(default)s)")
    run.add_argument("--rpn-epochs", type=positive_int, default=2, help="RPN training epochs (default: %(default)s)")
    run.add_argument(
        "--examples", type=non_negative_int, default=8, help="test images drawn in examples.png (default: %(default)s)"
    )
    run.add_argument(
        "--title", default="SD-RPN on the synthetic fine-detail task", help="report.md's title (default: %(default)s)"
    )
    add_device(run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("train-base", "run"):
        check_output_kind(args.out, "--out", folder=True)
    if args.command == "eval-base":
        check_output_kind(args.json, "--json", folder=False)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # batch-making processes fork
    configure_logging()
    if args.command == "train-base":
        from .train_base import BaseTrainConfig, BaseTrainer

        cfg = BaseTrainConfig(
            out=args.out,
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            seed=args.seed,
            device=args.device,
            workers=args.workers,
            save_every=args.save_every,
            bf16=args.bf16,
            encoder_steps=args.encoder_steps,
            colour_weight=args.colour_weight,
            init=args.init,
            zoom_fraction=args.zoom_fraction,
            zoom_on_tag=args.zoom_on_tag,
            read_share_zoomed=args.read_share_zoomed,
            cell_views=args.cell_views,
            char_head=args.char_head,
            crop_tag_weight=args.crop_tag_weight,
            tag_clearance=args.tag_clearance,
        )
        trainer = BaseTrainer(cfg)
        history = trainer.run(
            resume=args.resume, max_seconds=None if args.max_minutes is None else args.max_minutes * 60
        )
        print(
            json.dumps({"steps_done": trainer.done_steps, "steps": cfg.steps, "last": history[-1] if history else None})
        )
        return 0
    if args.command == "eval-base":
        from ..io_utils import write_json
        from ..llava.loading import load_llava
        from .evaluate import accuracy_table

        model, tok = load_llava(args.model, "fp32", args.device)
        start = time.monotonic()
        table = accuracy_table(model, tok, count=args.count, split=args.split)
        table["seconds"] = round(time.monotonic() - start, 1)
        print(json.dumps(table))
        if args.json:
            write_json(args.json, table)
        return 0
    if args.command == "inspect":
        from ..llava.loading import load_llava
        from .attention_check import attention_quantiles, collect_head_maps, layer_localisation, select_heads
        from .task import make_sample, split_seeds

        model, tok = load_llava(args.model, "fp32")
        samples = [make_sample(seed) for seed in split_seeds("val", args.count)]
        heads = collect_head_maps(model, tok, samples)
        for row in layer_localisation(heads):
            print(json.dumps(row))
        print(json.dumps({"selected_grounding": select_heads(heads)}))
        for layer in range(model.config.text_config.num_hidden_layers):
            print(json.dumps(attention_quantiles(model, tok, samples, layer)))
        return 0
    if args.command == "export-base":
        from .export import GRID8_ROI, export_base
        from .train_base import TEMPLATE

        preset = {
            "name": "synth-tiny",
            "grounding": args.grounding,
            "sink": [[args.sink_layer, None]],
            "sink_threshold": args.sink_threshold,
            "branch_layer": args.branch_layer,
            "depth": args.depth,
            "prompt_template": TEMPLATE,
            "roi": GRID8_ROI,
        }
        print(json.dumps(export_base(args.model, args.to, preset)))
        return 0
    if args.command == "run":
        from .pipeline import BASE_MODEL, PipelineConfig, run_pipeline
        from .report import write_report

        for name in ("train_count", "test_count", "rpn_epochs"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
        cfg = PipelineConfig(
            out=args.out,
            model=args.model or BASE_MODEL,
            train_count=args.train_count,
            test_count=args.test_count,
            rpn_epochs=args.rpn_epochs,
            device=args.device,
        )
        start = time.monotonic()

        def report(result: dict) -> dict:
            return write_report(result, args.out, args.title, cfg.path("labels_test"), args.examples)

        metrics = run_pipeline(cfg, then=report)  # the report under the run's lock
        print(
            json.dumps(
                {
                    "accuracy": metrics["accuracy"],
                    "localisation": metrics["localisation"],
                    "seconds": round(time.monotonic() - start, 1),
                    "report": os.path.join(args.out, "report.md"),
                }
            )
        )
        return 0
    raise AssertionError(args.command)


def entry(argv: list[str] | None = None) -> int:
    """The `sdrpn-synth` command: user mistakes as one line, as `sdrpn` reports them."""
    return run_command(main, "sdrpn-synth", argv)


if __name__ == "__main__":
    raise SystemExit(entry())
