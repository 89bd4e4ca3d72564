"""Train the SD-RPN head inside a Hugging Face Trainer loop, as a LLaVA training script would.

python scripts/train_rpn_with_hf_trainer.py --model DIR --labels LABELS --out OUT [--steps 100]
"""

import argparse

from transformers import Trainer, TrainingArguments

from sdrpn.llava.loading import load_llava
from sdrpn.rpn.dataset import LabelShardDataset
from sdrpn.rpn.hf_trainer import RPNForTraining, label_collator
from sdrpn.rpn.model import RegionProposalNetwork


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--labels", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--branch-layer", type=int, default=15)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-5)
    args = parser.parse_args()

    llava, tokenizer = load_llava(args.model, "fp32")
    rpn = RegionProposalNetwork.from_llava(llava, args.branch_layer, args.depth)
    data = LabelShardDataset(args.labels, tokenizer, llava.config.image_token_id, split="train")
    trainer = Trainer(
        model=RPNForTraining(llava, rpn),
        args=TrainingArguments(
            output_dir=args.out,
            max_steps=args.steps,
            per_device_train_batch_size=args.batch_size,
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
        data_collator=label_collator(tokenizer.pad_token_id),
    )
    trainer.train()
    rpn.save(args.out)


if __name__ == "__main__":
    main()
