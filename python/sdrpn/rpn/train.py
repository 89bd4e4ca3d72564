"""`sdrpn train`: the RPN on a frozen LLaVA with the pseudo labels (SPEC Stage 2).

Only decoder layers < K run in the backbone (early exit); the RPN trains with masked
BCE; AdamW (0.9, 0.98), weight decay 0, cosine schedule with 3% warm-up, gradient
clipping at 1. Checkpoints are atomic and a resumed run continues to the same weights
as an uninterrupted one. Under torchrun every rank takes its share of each epoch's
shuffled order and gradients are averaged by DistributedDataParallel. Branch layer,
depth and the recommended RoI options come from the preset the labels were made with
(or the one given); template and preprocessing from the label folder: all are recorded
in the RPN folder for inference.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from transformers import get_cosine_schedule_with_warmup

from ..distributed import barrier, check_initialized, check_rank, gather_objects, peers_may_stop
from ..io_utils import exclusive_lock, read_json, remove_temporaries, write_json
from ..labels.folder import LabelFolder
from ..llava.backbone import branch_hidden_states
from ..llava.data import skip_reasons
from ..llava.model_facts import pad_token_id
from ..ops import IGNORE_INDEX
from ..prefetch import prefetch
from ..progress import show_progress
from .checkpoints import (
    LATEST,
    checkpoint_settings,
    latest_checkpoint,
    load_checkpoint,
    remove_unfinished,
    save_checkpoint,
)
from .dataset import LabelBatch, LabelCollator, LabelShardDataset
from .for_labels import rpn_settings
from .model import CONFIG_NAME, HUB_CONFIG_NAME, WEIGHTS_NAME, RegionProposalNetwork, rpn_loss
from .train_config import TrainConfig, accumulation_steps, as_recorded_now

log = logging.getLogger(__name__)


TRAIN_CONFIG_NAME = "train_config.json"
METRICS_NAME = "metrics-epoch{epoch}.json"
# What a run writes at --out's root (its checkpoints lie under checkpoints/).
_ROOT_FILES = (WEIGHTS_NAME, CONFIG_NAME, HUB_CONFIG_NAME, TRAIN_CONFIG_NAME, METRICS_NAME.format(epoch="*"))


def remove_unfinished_outputs(out: str) -> None:
    """Delete what a kill left half-written in a run's folder: checkpoints being saved, and
    the temporary files of the root's outputs. For the run's one writer, holding its lock."""
    remove_unfinished(out)
    for names in _ROOT_FILES:
        remove_temporaries(out, names)


def check_fresh_out(cfg: TrainConfig) -> None:
    """Without --resume, refuse an --out that holds a run: starting over would delete its
    checkpoints. An empty or new --out is fine."""
    if cfg.resume:
        return
    held = [
        path
        for path in (os.path.join(cfg.out, "checkpoints", LATEST), os.path.join(cfg.out, WEIGHTS_NAME))
        if os.path.exists(path)
    ]
    if held:
        raise ValueError(
            f"--out {cfg.out} holds a run already ({held[0]}): pass --resume to go on with it, or choose another "
            "--out (resume=True or another out, in TrainConfig)"
        )


# ---- metrics --------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: nn.Module, rpn: RegionProposalNetwork, loader, image_token_id: int, device, autocast) -> dict:
    """Held-out BCE and precision / recall / IoU of (sigmoid > 0.5) against fg/bg labels;
    None for those whose denominator is zero."""
    branch_layer = rpn.config.branch_layer
    rpn.eval()
    loss_sum, cells, tp, fp, fn = 0.0, 0, 0, 0, 0
    for batch in loader:
        if batch is None:
            continue
        logits, labels = _forward(model, rpn, branch_layer, batch, image_token_id, device, autocast)
        keep = labels != IGNORE_INDEX
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
    # A ratio over nothing (no labelled cell, no predicted or true foreground) is undefined:
    # None, not a 0.0 that would read as a model that failed.
    ratio = lambda num, den: num / den if den else None
    return {
        "bce": ratio(loss_sum, cells),
        "cells": cells,
        "precision": ratio(tp, tp + fp),
        "recall": ratio(tp, tp + fn),
        "iou": ratio(tp, tp + fp + fn),
    }


def _forward(model, rpn, branch_layer: int, batch: LabelBatch, image_token_id: int, device, autocast):
    ids = batch.input_ids.to(device)
    mask = batch.attention_mask.to(device)
    hidden, pos = branch_hidden_states(model, ids, mask, batch.pixel_values.to(device), branch_layer)
    with autocast():
        logits = rpn(hidden, mask, pos, ids == image_token_id)
    return logits.float(), batch.labels.to(device)


def _join_gradient_sync(rpn: DistributedDataParallel, device, autocast) -> None:
    """A backward of zero loss through DDP: it adds nothing to this rank's gradients but
    runs the all-reduce that the ranks with a last micro-batch run (this rank's was dropped)."""
    width = rpn.module.config.hidden_size
    hidden = torch.zeros(1, 2, width, device=device)
    mask = torch.ones(1, 2, dtype=torch.long, device=device)
    visual = torch.tensor([[True, False]], device=device)
    with autocast():
        logits = rpn(hidden, mask, torch.arange(2, device=device)[None], visual)
    (logits.float().sum() * 0).backward()


@dataclass
class _Tally:
    """What an epoch's micro-batches held so far, on this rank."""

    trained: int = 0  # samples
    cells: int = 0  # labelled (foreground or background) cells of the trained samples
    skipped: Counter = field(default_factory=Counter)  # samples, by reason
    non_finite_steps: int = 0  # optimiser steps skipped for a gradient that is not finite

    def recorded(self) -> dict:
        return {
            "trained": self.trained,
            "cells": self.cells,
            "skipped": dict(self.skipped),
            "non_finite_steps": self.non_finite_steps,
        }

    @classmethod
    def resumed(cls, recorded: dict | None) -> _Tally:
        """The tally a checkpoint recorded (the whole run's, summed over its ranks), so that
        the epoch's end judges the whole epoch, not only the part after a resumption."""
        if not recorded:
            return cls()
        return cls(
            recorded["trained"],
            recorded["cells"],
            Counter(recorded["skipped"]),
            recorded.get("non_finite_steps", 0),  # (not recorded before it was counted)
        )


def _tallied(loads: Iterable, tally: _Tally) -> Iterator[LabelBatch | None]:
    """The batches of (batch, skipped) pairs, counted into `tally` as they are taken."""
    for batch, skipped in loads:
        tally.skipped.update(skipped)
        if batch is not None:
            tally.trained += len(batch.labels)
            tally.cells += int((batch.labels != IGNORE_INDEX).sum())
        yield batch


# ---- the loop -------------------------------------------------------------------------------
class RPNTrainer:
    def __init__(
        self,
        cfg: TrainConfig,
        model: nn.Module,
        tokenizer,
        *,
        rank: int = 0,
        world_size: int = 1,
        device: str | torch.device = "cpu",
        roi_overrides: dict | None = None,
    ):
        """roi_overrides: RoiOptions fields to recommend with the RPN instead of the preset's
        (None values are left to the preset)."""
        check_rank(rank, world_size)
        self.cfg, self.model, self.tokenizer = cfg, model, tokenizer
        self.rank, self.world, self.device = rank, world_size, torch.device(device)
        self.image_token_id = model.config.image_token_id
        self.collator = LabelCollator(pad_token_id(tokenizer))
        self.rpn_settings = rpn_settings(
            model, cfg.labels, preset=cfg.preset, branch_layer=cfg.branch_layer, depth=cfg.depth,
            roi_overrides=roi_overrides,
        )  # fmt: skip
        self.branch_layer = self.rpn_settings["branch_layer"]
        self.grad_accum = accumulation_steps(cfg.effective_batch, cfg.batch_size, world_size, cfg.grad_accum)
        self.effective_batch = cfg.batch_size * self.grad_accum * world_size  # the one used, whichever was given

    def _autocast(self):
        if self.cfg.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return torch.autocast(self.device.type, enabled=False)

    def _loader(self, dataset, chunks) -> Iterable[tuple[LabelBatch | None, Counter]]:
        """The chunks' batches in order, each with its skipped samples by reason, loaded
        while the model runs: by DataLoader worker processes, or (num_workers 0) by one
        thread of this process, one thread because the dataset tokenizes and a tokenizer is
        not to be shared between threads."""
        collate = self.collator.collate
        if self.cfg.num_workers > 0:
            return DataLoader(dataset, batch_sampler=chunks, collate_fn=collate, num_workers=self.cfg.num_workers)
        loads = prefetch(lambda chunk: collate([dataset[i] for i in chunk]), chunks, workers=1, ahead=2)
        return (load.result() for load in loads)

    def _datasets(self) -> tuple[LabelShardDataset, LabelShardDataset | None]:
        cfg = self.cfg
        common = dict(
            image_folder=cfg.image_folder,
            held_out_fraction=cfg.held_out_fraction,
            image_size=self.model.config.vision_config.image_size,  # for labels that record none
            partial=cfg.partial_labels,
        )
        train_set = LabelShardDataset(
            cfg.labels, self.tokenizer, self.image_token_id, split="train", max_samples=cfg.max_samples, **common
        )
        if cfg.partial_labels and self.rank == 0 and not LabelFolder(cfg.labels).finished():
            log.warning(
                "%s: its label job has not finished: training on its complete shards (%d samples in the train split)",
                cfg.labels,
                len(train_set),
            )
        if len(train_set) < self.world:
            raise ValueError(f"the train split has {len(train_set)} samples, fewer than the {self.world} ranks")
        held_out = None
        if cfg.held_out_fraction > 0:
            try:
                held_out = LabelShardDataset(
                    cfg.labels, self.tokenizer, self.image_token_id, split="held_out", **common
                )
            except ValueError:
                log.warning("the held-out split is empty: no per-epoch metrics")
        return train_set, held_out

    def _rpn(self) -> RegionProposalNetwork:
        rpn = RegionProposalNetwork.from_llava(self.model, **self.rpn_settings)
        rpn = rpn.to(self.device, torch.float32).train()
        if self.cfg.gradient_checkpointing:
            rpn.gradient_checkpointing_enable()
        return rpn

    def _schedule(self, rpn, train_size: int):
        cfg = self.cfg
        optimizer = torch.optim.AdamW(rpn.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
        micro_per_epoch = math.ceil(train_size // self.world / cfg.batch_size)
        total = math.ceil(micro_per_epoch / self.grad_accum) * cfg.epochs
        per_step = self.effective_batch
        if train_size < per_step and self.rank == 0:  # e.g. a smoke test left at the default 512
            log.warning(
                "%d training samples make one optimiser step of %d samples per epoch, not the %d the "
                "effective batch asks for (steps in all: %d): lower --effective-batch (or --grad-accum) for more "
                "steps",
                train_size,
                train_size // self.world * self.world,
                per_step,
                total,
            )
        scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(cfg.warmup_ratio * total), total)
        return optimizer, scheduler, total

    def _epoch_steps(self, epoch: int, size: int) -> list[list[list[int]]]:
        """This rank's optimiser steps of an epoch: lists of micro-batches of sample indices."""
        cfg = self.cfg
        per_rank = size // self.world
        order = torch.randperm(size, generator=torch.Generator().manual_seed(cfg.seed + epoch))
        mine = order[: per_rank * self.world][self.rank :: self.world].tolist()
        chunks = [mine[i : i + cfg.batch_size] for i in range(0, len(mine), cfg.batch_size)]
        return [chunks[i : i + self.grad_accum] for i in range(0, len(chunks), self.grad_accum)]

    def run(self) -> dict:
        """Train (or resume); rank 0 holds the output folder's lock while it runs."""
        check_initialized(self.world)
        if self.rank != 0:
            return self._run()
        with exclusive_lock(os.path.join(self.cfg.out, ".train.lock")):
            return self._run()

    def _run(self) -> dict:
        cfg = self.cfg
        check_fresh_out(cfg)
        torch.manual_seed(cfg.seed)
        train_set, held_out = self._datasets()
        rpn = self._rpn()
        optimizer, scheduler, total = self._schedule(rpn, len(train_set))
        progress = {"epoch": 0, "step_in_epoch": 0, "global_step": 0}
        # What checkpoints record: the settings, the labels' own (wherever the folder lies),
        # and which samples the steps walk.
        facts = {
            "world_size": self.world,  # another splits the samples and the effective batch otherwise
            "effective_batch": self.effective_batch,  # the one used, whichever flag made it
            # The layers the RPN copies, from whichever preset gave them: a model folder's own
            # preset may differ from the one a run began with.
            "rpn_layers": [self.rpn_settings["branch_layer"], self.rpn_settings["depth"]],
            "label_config": json.loads(json.dumps(train_set.config.without_paths())),
            "image_folder": os.path.realpath(train_set.image_folder),  # the one used, named or not
        }
        self._recorded = {**cfg.recorded(), **facts, "train_split": train_set.ids_digest()}
        if cfg.resume and (ckpt := latest_checkpoint(cfg.out)) is not None:
            recorded = as_recorded_now(checkpoint_settings(ckpt) or {}, train_set.config)
            earlier = train_set.config.without_paths(recorded.get("label_config"))
            facts["label_config"] = json.loads(json.dumps(earlier))
            diff, moved = cfg.differences(recorded, train_set.records_image_sizes, **facts)
            split = self._recorded["train_split"]
            if not diff and recorded.get("train_split", split) != split:  # (other settings change it too)
                # The folder's samples changed, or the subset drawn from them: this version
                # draws --max-samples as the reference does, which earlier ones did not.
                diff.append("the train split's samples (the label folder's, or the subset drawn from them, differ)")
            if diff:
                raise ValueError(
                    f"{cfg.out} holds a run with other settings ({'; '.join(diff)}): resume with the "
                    "same settings, or train into another --out (out, in TrainConfig)"
                )
            if moved:
                log.info("resuming with folders elsewhere than when the run began: %s", "; ".join(moved))
            progress = load_checkpoint(ckpt, rpn, optimizer, scheduler)
            log.info("resumed from %s at step %d", ckpt, progress["global_step"])
        elif cfg.resume and self.rank == 0:  # a script may always pass --resume; a mistyped --out shows here
            log.warning("--resume: %s holds no checkpoint: starting a new run", cfg.out)
        if self.rank == 0:  # the checkpoints' one writer, holding the lock
            remove_unfinished_outputs(cfg.out)
        with peers_may_stop(mixed=True):  # DDP starts by broadcasting rank 0's weights
            model_for_grad = DistributedDataParallel(rpn) if self.world > 1 else rpn
        metrics = {}
        bar = show_progress(
            total=total, initial=progress["global_step"], desc="train", unit="step", disable=self.rank != 0
        )
        while progress["epoch"] < cfg.epochs:
            epoch = progress["epoch"]
            steps = self._epoch_steps(epoch, len(train_set))[progress["step_in_epoch"] :]
            # One loader for the epoch, so that loading runs ahead across step boundaries too.
            # Rank 0 carries what the epoch trained before a resumption: the counts are summed.
            so_far = progress.pop("epoch_so_far", None)
            tally = _Tally.resumed(so_far if self.rank == 0 else None)
            batches = _tallied(self._loader(train_set, [chunk for step in steps for chunk in step]), tally)
            for step_chunks in steps:
                before = tally.trained, tally.cells
                with peers_may_stop(mixed=True):  # its gradients' all-reduce meets the other ranks
                    loss_value, stepped = self._step(model_for_grad, optimizer, scheduler, len(step_chunks), batches)
                if not stepped:  # its samples trained nothing
                    tally.trained, tally.cells = before
                    if self.rank == 0:  # the ranks skipped it together; their tallies are summed
                        tally.non_finite_steps += 1
                        log.warning(
                            "step %d: the gradients are not finite (loss %s): the step is skipped",
                            progress["global_step"] + 1,
                            loss_value,
                        )
                progress["step_in_epoch"] += 1
                progress["global_step"] += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
                stop = cfg.stop_after_steps is not None and progress["global_step"] >= cfg.stop_after_steps
                if stop or progress["global_step"] % cfg.save_every == 0:
                    # No checkpoint of weights that no sample has trained: a resumption would
                    # take them for a finished part of the run. A stop that trained nothing
                    # raises; otherwise the epoch goes on: its later samples may train (and
                    # if none does, its end stops the run).
                    so_far = self._check_trained(epoch, tally) if stop else self._epoch_counts(tally)
                    if so_far.trained and so_far.cells:
                        self._checkpoint(rpn, optimizer, scheduler, {**progress, "epoch_so_far": so_far.recorded()})
                    elif self.rank == 0:
                        log.warning(
                            "step %d: no labelled sample trained this epoch yet (%d skipped): no checkpoint",
                            progress["global_step"],
                            sum(so_far.skipped.values()),
                        )
                if stop:
                    bar.close()
                    return {"stopped_at_step": progress["global_step"]}
            self._check_trained(epoch, tally)
            progress = {"epoch": epoch + 1, "step_in_epoch": 0, "global_step": progress["global_step"]}
            if held_out is not None:
                metrics = self._held_out_metrics(rpn, held_out, epoch, progress["global_step"])
            self._checkpoint(rpn, optimizer, scheduler, progress)
        bar.close()
        last_metrics = self._metrics_path(cfg.epochs - 1)
        if not metrics and held_out is not None and os.path.exists(last_metrics):
            metrics = read_json(last_metrics)  # a resumption that found the last epoch done
        if self.rank == 0:
            card = {"metrics": metrics or None, "training": self._card_settings(len(train_set))}
            rpn.save_pretrained(cfg.out, model_card_kwargs=card)
            used = {"effective_batch": self.effective_batch, "grad_accum": self.grad_accum}
            write_json(os.path.join(cfg.out, TRAIN_CONFIG_NAME), {**cfg.to_dict(), **used})
        return metrics

    def _card_settings(self, train_size: int) -> dict:
        """The settings that made the weights, for the model card (train_config.json has all)."""
        cfg = self.cfg
        run_only = {"labels", "out", "image_folder", "resume", "save_every", "keep_checkpoints", "num_workers"}
        settings = {"labels": os.path.basename(os.path.normpath(cfg.labels)), "train_samples": train_size}
        settings.update((k, v) for k, v in cfg.to_dict().items() if k not in run_only and v is not None)
        settings.update(world_size=self.world, grad_accum=self.grad_accum, effective_batch=self.effective_batch)
        return settings

    def _metrics_path(self, epoch: int) -> str:
        return os.path.join(self.cfg.out, METRICS_NAME.format(epoch=epoch))

    def _held_out_metrics(self, rpn, held_out, epoch: int, global_step: int) -> dict:
        """Rank 0's metrics on the held-out split ({} on the others); a loss that is not
        finite stops every rank before the epoch's checkpoint."""
        metrics: dict = {}
        if self.rank == 0:
            size = self.cfg.batch_size
            chunks = [list(range(i, min(i + size, len(held_out)))) for i in range(0, len(held_out), size)]
            tally = _Tally()
            batches = _tallied(self._loader(held_out, chunks), tally)
            metrics = evaluate(self.model, rpn, batches, self.image_token_id, self.device, self._autocast)
            # What the figures cover: a held-out split whose images went missing reads as such.
            skipped = sum(tally.skipped.values())
            metrics.update(samples=tally.trained, skipped=skipped, epoch=epoch, global_step=global_step)
        # Weights a diverged run left finite can still overflow in the forward: steps whose
        # gradients were not finite are skipped, the others go on. Every rank stops together.
        bce = metrics.get("bce")
        if not all(gather_objects(bce is None or math.isfinite(bce), self.world, self.device)):
            raise ValueError(
                f"epoch {epoch}: the held-out loss is not finite: the RPN diverged; stopped without saving it or "
                "the epoch's checkpoint: train again with a lower --lr (or float32 without --bf16)"
            )
        if self.rank != 0:
            return metrics
        write_json(self._metrics_path(epoch), metrics)
        log.info("epoch %d held-out: %s", epoch, metrics)
        if skipped:
            log.warning("epoch %d held-out: skipped %d samples (%s)", epoch, skipped, skip_reasons(tally.skipped))
        return metrics

    def _epoch_counts(self, tally: _Tally) -> _Tally:
        """The epoch's trained samples, labelled cells and skipped samples by reason so far,
        summed over the ranks, so that all of them reach the same decision on them (one
        that raised or saved alone would leave the others waiting in a collective)."""
        everyone = gather_objects(tally.recorded(), self.world, self.device)
        return _Tally(
            sum(t["trained"] for t in everyone),
            sum(t["cells"] for t in everyone),
            sum((Counter(t["skipped"]) for t in everyone), Counter()),
            sum(t["non_finite_steps"] for t in everyone),
        )

    def _check_trained(self, epoch: int, tally: _Tally) -> _Tally:
        """Stop, before anything is saved, when the ranks together have trained on no sample
        of the epoch, or on no labelled cell (all-ignore labels leave the loss at 0 and the
        RPN as it started); log the samples they skipped. Returns the ranks' summed tally."""
        summed = self._epoch_counts(tally)
        trained, cells, skipped = summed.trained, summed.cells, summed.skipped
        if trained == 0 and summed.non_finite_steps:
            raise ValueError(
                f"epoch {epoch} trained on no sample: the gradients of all its {summed.non_finite_steps} steps were "
                "not finite (NaN or infinite); stopped without saving the RPN: check the labels and the settings "
                "(a lower --lr, or float32 without --bf16)"
            )
        # Nothing trained and nothing skipped: a resumption that found the epoch already done.
        if trained == 0 and skipped:
            raise ValueError(
                f"epoch {epoch} trained on no sample: all {sum(skipped.values())} read so far were skipped "
                f"({skip_reasons(skipped)}); stopped without saving the RPN: check --image-folder and the label folder"
            )
        if trained and not cells:
            raise ValueError(
                f"epoch {epoch} trained on {trained} samples without one labelled cell: their pseudo labels are all "
                f"ignore (see all_ignore in {self.cfg.labels}/summary.json); stopped without saving the RPN: "
                "label again with other options (--max-box-fraction, --fg-ratio, --sink-threshold)"
            )
        if skipped and self.rank == 0:
            log.warning("epoch %d: skipped %d samples (%s)", epoch, sum(skipped.values()), skip_reasons(skipped))
        if summed.non_finite_steps and self.rank == 0:
            log.warning("epoch %d: skipped %d steps whose gradients were not finite", epoch, summed.non_finite_steps)
        return summed

    def _step(self, rpn, optimizer, scheduler, count: int, batches: Iterator) -> tuple[float, bool]:
        """One optimiser step over the next ``count`` micro-batches (the later ones load
        meanwhile): (the loss, whether it stepped; a gradient that is not finite is not
        stepped with)."""
        total = 0.0
        ddp = isinstance(rpn, DistributedDataParallel)
        for i in range(count):
            batch = next(batches)
            sync = i == count - 1 or not ddp
            if batch is None:
                if sync and ddp:
                    # Every rank must join the step's all-reduce, or the others wait for it forever.
                    _join_gradient_sync(rpn, self.device, self._autocast)
                continue
            # Gradients are averaged across ranks once, on the last micro-batch of a step.
            context = rpn.no_sync() if not sync else contextlib.nullcontext()
            with context:
                logits, labels = _forward(
                    self.model, rpn, self.branch_layer, batch, self.image_token_id, self.device, self._autocast
                )
                loss = rpn_loss(logits, labels) / count
                loss.backward()
            total += float(loss.detach())
        norm = torch.nn.utils.clip_grad_norm_(rpn.parameters(), self.cfg.max_grad_norm)
        # A NaN or infinite gradient would reach every weight through the optimiser's step
        # and its moments, silently. The ranks all-reduced their gradients: they agree.
        # A skipped step leaves the weights, the optimiser and the schedule as they were.
        finite = bool(torch.isfinite(norm))
        if finite:
            optimizer.step()
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return total, finite

    def _checkpoint(self, rpn, optimizer, scheduler, progress) -> None:
        if self.rank == 0:
            save_checkpoint(
                self.cfg.out,
                rpn,
                optimizer,
                scheduler,
                dict(progress),
                self.cfg.keep_checkpoints,
                settings=self._recorded,
            )
        barrier(self.world)


__all__ = ["RPNTrainer", "TrainConfig", "evaluate", "latest_checkpoint", "save_checkpoint"]
