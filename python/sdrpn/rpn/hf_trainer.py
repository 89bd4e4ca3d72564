"""SD-RPN inside a Hugging Face `Trainer` loop.

from sdrpn.llava.model_facts import pad_token_id
from sdrpn.rpn import LabelShardDataset, rpn_for_labels
from sdrpn.rpn.hf_trainer import RPNForTraining, label_collator

rpn = rpn_for_labels(llava, "labels/")      # the labels' preset, template and preprocessing
module = RPNForTraining(llava, rpn)          # only the RPN's parameters train
data = LabelShardDataset("labels/", tokenizer, llava.config.image_token_id, split="train")
Trainer(model=module, args=TrainingArguments(..., remove_unused_columns=False),
        train_dataset=data, data_collator=label_collator(pad_token_id(tokenizer))).train()
rpn.save_pretrained("runs/rpn")             # an RPN folder, for SDRPNLlava and `sdrpn infer`
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from ..llava.backbone import branch_hidden_states
from .dataset import LabelCollator
from .model import RegionProposalNetwork, rpn_loss

log = logging.getLogger(__name__)


class RPNForTraining(nn.Module):
    """The RPN with the frozen backbone that feeds it, as one module for `Trainer`.

    The backbone is held outside the module's parameters and state dict, so `Trainer`
    optimises and saves the RPN alone; place the backbone on its device yourself. The RPN
    is cast to float32 in place, as `sdrpn train` keeps it: the optimiser updates float32
    weights, and `TrainingArguments(bf16=True)` computes in bf16 by autocast (without it, in
    float32, a bf16 backbone's hidden states cast up). An RPN copied from a bf16 backbone
    would otherwise train in bf16, where most of an update at these learning rates rounds
    away.
    """

    def __init__(self, backbone: nn.Module, rpn: RegionProposalNetwork):
        super().__init__()
        self.rpn = rpn.float()
        backbone.requires_grad_(False).eval()
        self._backbone = (backbone,)  # a tuple: not registered as a submodule
        self.image_token_id = backbone.config.image_token_id

    @property
    def backbone(self) -> nn.Module:
        return self._backbone[0]

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, pixel_values: Tensor, labels: Tensor | None = None
    ) -> dict[str, Tensor]:
        hidden, pos = branch_hidden_states(
            self.backbone, input_ids, attention_mask, pixel_values, self.rpn.config.branch_layer
        )
        if not torch.is_autocast_enabled(hidden.device.type):  # a bf16 backbone without bf16=True
            hidden = hidden.float()
        logits = self.rpn(hidden, attention_mask, pos, input_ids == self.image_token_id)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = rpn_loss(logits.float(), labels)
        return out


def label_collator(pad_id: int):
    """A `data_collator` for LabelShardDataset that returns the dict `Trainer` expects."""
    collate = LabelCollator(pad_id)

    def collator(samples):
        batch, skipped = collate.collate(samples)
        if batch is None:
            raise ValueError(f"every sample of this batch was skipped: {dict(skipped)}")
        if skipped:
            log.warning("left %d samples out of a batch: %s", batch.dropped, dict(skipped))
        return {
            "input_ids": batch.input_ids,
            "attention_mask": batch.attention_mask,
            "pixel_values": batch.pixel_values,
            "labels": batch.labels,
        }

    return collator
