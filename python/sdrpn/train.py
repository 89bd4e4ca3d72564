"""`sdrpn train`: the RPN on a frozen LLaVA with the pseudo labels (SPEC Stage 2).

Only decoder layers < K run in the backbone (early exit); the RPN trains with masked
BCE; AdamW (0.9, 0.98), weight decay 0, cosine schedule with 3% warm-up, gradient
clipping at 1. Checkpoints are atomic and a resumed run continues to the same weights
as an uninterrupted one. Under torchrun every rank takes its share of each epoch's
shuffled order and gradients are averaged by DistributedDataParallel.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm
from transformers import get_cosine_schedule_with_warmup

from .features import branch_hidden_states
from .io_utils import read_json, write_json
from .label_data import LabelBatch, LabelCollator, LabelShardDataset
from .llava.loading import pad_token_id
from .optim_state import load_optimizer_tensors, optimizer_tensors
from .rpn import RegionProposalNetwork, rpn_loss

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    labels: str
    out: str
    image_folder: str | None = None
    epochs: int = 1
    lr: float = 5e-5
    batch_size: int = 8
    grad_accum: int = 1
    max_samples: int | None = None
    bf16: bool = False
    gradient_checkpointing: bool = False
    resume: bool = False
    branch_layer: int = 15
    depth: int = 3
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.98)
    max_grad_norm: float = 1.0
    seed: int = 0
    held_out_fraction: float = 0.05
    save_every: int = 200          # optimizer steps between checkpoints
    keep_checkpoints: int = 2
    stop_after_steps: int | None = None  # stop (checkpointed) after this many steps in all
    num_workers: int = 0
    preset: str | None = None

    def __post_init__(self):
        for name in ("epochs", "batch_size", "grad_accum", "save_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.held_out_fraction < 1:
            raise ValueError(f"held_out_fraction must lie in [0, 1), got {self.held_out_fraction}")


# ---- checkpoints ----------------------------------------------------------------------------
def save_checkpoint(folder: str, rpn: RegionProposalNetwork, optimizer, scheduler, progress: dict,
                    keep: int) -> str:
    """Write checkpoints/step-N as a whole (temporary folder, then rename) and point
    checkpoints/latest.json at it; older ones beyond `keep` are removed."""
    root = os.path.join(folder, "checkpoints")
    final = os.path.join(root, f"step-{progress['global_step']:08d}")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    rpn.save(tmp)
    tensors, meta = optimizer_tensors(optimizer)
    save_file(tensors, os.path.join(tmp, "optimizer.safetensors"))
    write_json(os.path.join(tmp, "trainer_state.json"),
               {"progress": progress, "optimizer": meta, "scheduler": scheduler.state_dict()})
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    write_json(os.path.join(root, "latest.json"), {"path": os.path.basename(final)})
    steps = sorted(d for d in os.listdir(root) if d.startswith("step-") and not d.endswith(".tmp"))
    for old in steps[:-keep]:
        shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    return final


def latest_checkpoint(folder: str) -> str | None:
    pointer = os.path.join(folder, "checkpoints", "latest.json")
    if not os.path.exists(pointer):
        return None
    return os.path.join(folder, "checkpoints", read_json(pointer)["path"])


# ---- metrics --------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: nn.Module, rpn: RegionProposalNetwork, loader, image_token_id: int,
             device, autocast) -> dict:
    """Held-out BCE and precision / recall / IoU of (sigmoid > 0.5) against fg/bg labels."""
    rpn.eval()
    loss_sum, cells, tp, fp, fn = 0.0, 0, 0, 0, 0
    for batch in loader:
        if batch is None:
            continue
        logits, labels = _forward(model, rpn, batch, image_token_id, device, autocast)
        keep = labels != -100
        n = int(keep.sum())
        if n:
            loss_sum += float(rpn_loss(logits, labels)) * n
            cells += n
        pred = (logits > 0) & keep
        truth = (labels == 1) & keep
        tp += int((pred & truth).sum())
        fp += int((pred & ~truth).sum())
        fn += int((~pred & truth & keep).sum())
    rpn.train()
    return {"bce": loss_sum / cells if cells else None, "cells": cells,
            "precision": tp / (tp + fp) if tp + fp else 0.0,
            "recall": tp / (tp + fn) if tp + fn else 0.0,
            "iou": tp / (tp + fp + fn) if tp + fp + fn else 0.0}


def _forward(model, rpn, batch: LabelBatch, image_token_id: int, device, autocast):
    ids = batch.input_ids.to(device)
    mask = batch.attention_mask.to(device)
    hidden, pos = branch_hidden_states(model, ids, mask, batch.pixel_values.to(device),
                                       _branch_of(rpn))
    with autocast():
        logits = rpn(hidden, mask, pos, ids == image_token_id)
    return logits.float(), batch.labels.to(device)


def _branch_of(rpn) -> int:
    return (rpn.module if isinstance(rpn, DistributedDataParallel) else rpn).config.branch_layer


# ---- the loop -------------------------------------------------------------------------------
class RPNTrainer:
    def __init__(self, cfg: TrainConfig, model: nn.Module, tokenizer, *, rank: int = 0,
                 world_size: int = 1, device: str | torch.device = "cpu"):
        self.cfg, self.model, self.tokenizer = cfg, model, tokenizer
        self.rank, self.world, self.device = rank, world_size, torch.device(device)
        self.image_token_id = model.config.image_token_id
        self.collator = LabelCollator(pad_token_id(tokenizer))

    def _autocast(self):
        if self.cfg.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return torch.autocast(self.device.type, enabled=False)

    def _loader(self, dataset, chunks):
        return DataLoader(dataset, batch_sampler=chunks, collate_fn=self.collator,
                          num_workers=self.cfg.num_workers)

    def run(self) -> dict:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        train_set = LabelShardDataset(cfg.labels, self.tokenizer, self.image_token_id,
                                      image_folder=cfg.image_folder, split="train",
                                      held_out_fraction=cfg.held_out_fraction,
                                      max_samples=cfg.max_samples)
        held_out = None
        if cfg.held_out_fraction > 0:
            try:
                held_out = LabelShardDataset(cfg.labels, self.tokenizer, self.image_token_id,
                                             image_folder=cfg.image_folder, split="held_out",
                                             held_out_fraction=cfg.held_out_fraction)
            except ValueError:
                log.warning("the held-out split is empty: no per-epoch metrics")
        rpn = RegionProposalNetwork.from_llava(self.model, cfg.branch_layer, cfg.depth, cfg.preset)
        rpn = rpn.to(self.device, torch.float32).train()
        if cfg.gradient_checkpointing:
            rpn.gradient_checkpointing_enable()
        optimizer = torch.optim.AdamW(rpn.parameters(), lr=cfg.lr, betas=cfg.betas,
                                      weight_decay=cfg.weight_decay)
        per_rank = len(train_set) // self.world
        if per_rank == 0:
            raise ValueError(f"the train split has {len(train_set)} samples, fewer than the "
                             f"{self.world} ranks")
        micro_per_epoch = math.ceil(per_rank / cfg.batch_size)
        steps_per_epoch = math.ceil(micro_per_epoch / cfg.grad_accum)
        total = steps_per_epoch * cfg.epochs
        scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(cfg.warmup_ratio * total), total)
        progress = {"epoch": 0, "step_in_epoch": 0, "global_step": 0}
        if cfg.resume and (ckpt := latest_checkpoint(cfg.out)) is not None:
            state = read_json(os.path.join(ckpt, "trainer_state.json"))
            rpn.load_state_dict(load_file(os.path.join(ckpt, "rpn.safetensors")), strict=False)
            load_optimizer_tensors(optimizer, load_file(os.path.join(ckpt, "optimizer.safetensors")), state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            progress = state["progress"]
            log.info("resumed from %s at step %d", ckpt, progress["global_step"])
        model_for_grad = rpn
        if self.world > 1:
            model_for_grad = DistributedDataParallel(rpn)

        metrics = {}
        bar = tqdm(total=total, initial=progress["global_step"], desc="train", unit="step",
                   disable=None if self.rank == 0 else True)
        while progress["epoch"] < cfg.epochs:
            epoch = progress["epoch"]
            order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(cfg.seed + epoch))
            mine = order[: per_rank * self.world][self.rank::self.world].tolist()
            chunks = [mine[i:i + cfg.batch_size] for i in range(0, len(mine), cfg.batch_size)]
            steps = [chunks[i:i + cfg.grad_accum] for i in range(0, len(chunks), cfg.grad_accum)]
            for step_chunks in steps[progress["step_in_epoch"]:]:
                loss_value = self._step(model_for_grad, optimizer, scheduler, step_chunks, train_set)
                progress["step_in_epoch"] += 1
                progress["global_step"] += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
                stop = cfg.stop_after_steps is not None and progress["global_step"] >= cfg.stop_after_steps
                if progress["global_step"] % cfg.save_every == 0 or stop:
                    self._checkpoint(rpn, optimizer, scheduler, progress)
                if stop:
                    bar.close()
                    return {"stopped_at_step": progress["global_step"]}
            progress = {"epoch": epoch + 1, "step_in_epoch": 0, "global_step": progress["global_step"]}
            if held_out is not None and self.rank == 0:
                chunks = [list(range(i, min(i + cfg.batch_size, len(held_out))))
                          for i in range(0, len(held_out), cfg.batch_size)]
                metrics = evaluate(self.model, rpn, self._loader(held_out, chunks), self.image_token_id,
                                   self.device, self._autocast)
                metrics.update(epoch=epoch, global_step=progress["global_step"])
                write_json(os.path.join(cfg.out, f"metrics-epoch{epoch}.json"), metrics)
                log.info("epoch %d held-out: %s", epoch, metrics)
            self._checkpoint(rpn, optimizer, scheduler, progress)
        bar.close()
        if self.rank == 0:
            rpn.save(cfg.out)
            write_json(os.path.join(cfg.out, "train_config.json"), asdict(cfg))
        return metrics

    def _step(self, rpn, optimizer, scheduler, step_chunks, dataset) -> float:
        total = 0.0
        micro = list(self._loader(dataset, step_chunks))
        for i, batch in enumerate(micro):
            if batch is None:
                continue
            sync = i == len(micro) - 1 or not isinstance(rpn, DistributedDataParallel)
            # Gradients are averaged across ranks once, on the last micro-batch of a step.
            context = rpn.no_sync() if not sync else contextlib.nullcontext()
            with context:
                logits, labels = _forward(self.model, rpn, batch, self.image_token_id, self.device,
                                          self._autocast)
                loss = rpn_loss(logits, labels) / len(micro)
                loss.backward()
            total += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(rpn.parameters(), self.cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return total

    def _checkpoint(self, rpn, optimizer, scheduler, progress) -> None:
        if self.rank == 0:
            save_checkpoint(self.cfg.out, rpn, optimizer, scheduler, dict(progress), self.cfg.keep_checkpoints)
        if self.world > 1:
            dist.barrier()




__all__ = ["RPNTrainer", "TrainConfig", "evaluate", "latest_checkpoint", "save_checkpoint"]
