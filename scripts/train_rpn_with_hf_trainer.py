"""Train the SD-RPN head inside a Hugging Face Trainer loop, as a LLaVA training script would.

python scripts/train_rpn_with_hf_trainer.py --model DIR --labels LABELS --out OUT [--steps N] [--bf16]
accelerate launch scripts/train_rpn_with_hf_trainer.py ...

The optimiser step takes the reference's effective batch of 512 samples by default, through
gradient accumulation as `sdrpn train` derives it (`--effective-batch`, `--grad-accum`):
with the same learning rate, steps of 8 samples would take 64 times more of them. Without
`--steps` it trains one epoch, as the reference does.

The RPN is set up for its labels as `sdrpn train` sets it up (`sdrpn.rpn.rpn_for_labels`: the
preset the labels record, their prompt template and preprocessing), and OUT is an RPN folder
that `RegionProposalNetwork.from_pretrained` and `sdrpn infer --rpn` read. Trainer's own
checkpoints, if you turn them on, hold the weights under `rpn.` names, not an RPN folder.
"""

import argparse
import os

from transformers import Trainer, TrainingArguments

from sdrpn.cli import positive_int
from sdrpn.llava.loading import load_llava
from sdrpn.llava.model_facts import pad_token_id
from sdrpn.rpn import LabelShardDataset, rpn_for_labels
from sdrpn.rpn.hf_trainer import RPNForTraining, label_collator
from sdrpn.rpn.train_config import REFERENCE_EFFECTIVE_BATCH, accumulation_steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--labels", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--branch-layer", type=int, help="default: the labels' preset's, else the model's own, else 15")
    parser.add_argument("--depth", type=int, help="default: the labels' preset's, else the model's own, else 3")
    parser.add_argument("--steps", type=int, help="optimiser steps (default: one epoch)")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="per device")
    parser.add_argument(
        "--effective-batch", type=positive_int, default=REFERENCE_EFFECTIVE_BATCH, help="samples per optimiser step"
    )
    parser.add_argument("--grad-accum", type=positive_int, help="micro-batches per optimiser step (default: derived)")
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument(
        "--held-out-fraction",
        type=float,
        default=0.0,
        help="share of the labels left out, as sdrpn train holds them out (default 0: the Trainer evaluates "
        "nothing here, and the reference trains on all of them)",
    )
    parser.add_argument(
        "--bf16", action="store_true", help="backbone in bf16, RPN under bf16 autocast (its weights stay float32)"
    )
    args = parser.parse_args()
    if not 0 <= args.held_out_fraction < 1:  # before the model loads (NaN fails too)
        parser.error(f"argument --held-out-fraction: must lie in [0, 1), got {args.held_out_fraction}")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))  # set by accelerate launch and torchrun
    grad_accum = accumulation_steps(args.effective_batch, args.batch_size, world_size, args.grad_accum)

    llava, tokenizer = load_llava(args.model, "bf16" if args.bf16 else "fp32")
    rpn = rpn_for_labels(llava, args.labels, branch_layer=args.branch_layer, depth=args.depth)
    data = LabelShardDataset(
        args.labels,
        tokenizer,
        llava.config.image_token_id,
        split="train",
        held_out_fraction=args.held_out_fraction,
        image_size=llava.config.vision_config.image_size,  # for converted labels, which record none
    )
    trainer = Trainer(
        model=RPNForTraining(llava, rpn),
        args=TrainingArguments(
            output_dir=args.out,
            max_steps=args.steps or -1,
            num_train_epochs=1,
            per_device_train_batch_size=args.batch_size,
            gradient_accumulation_steps=grad_accum,
            bf16=args.bf16,
            learning_rate=args.lr,
            adam_beta2=0.98,
            weight_decay=0.0,
            lr_scheduler_type="cosine",
            warmup_steps=0.03,
            remove_unused_columns=False,
            report_to=[],
            save_strategy="no",
            logging_steps=10,
            use_cpu=not llava.device.type == "cuda",
        ),
        train_dataset=data,
        data_collator=label_collator(pad_token_id(tokenizer)),  # the end-of-sequence id where there is no pad
    )
    if trainer.is_world_process_zero():
        print(f"training on {len(data)} labelled samples (held out: {args.held_out_fraction:g} of the labels)")
    trainer.train()
    if trainer.is_world_process_zero():
        rpn.save_pretrained(args.out)


if __name__ == "__main__":
    main()
