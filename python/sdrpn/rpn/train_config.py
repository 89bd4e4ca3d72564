"""The settings of one RPN training run (`sdrpn train`'s flags), and which of them a resumed
run may change: a checkpoint records them, and a run goes on only with the same."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from ..labels.folder import LabelFolderConfig
from ..options import Options, changes_and_moves, option, require_at_least

# The reference's effective batch: 8 per GPU x 16 accumulation x 4 GPUs.
REFERENCE_EFFECTIVE_BATCH = 512


@dataclass
class TrainConfig(Options):
    """One RPN training run. Fields left at None take the preset's values."""

    labels: str = option(None, "label folder of sdrpn label / convert-labels", required=True, path=True)
    out: str = option(None, "output folder: the RPN, checkpoints and metrics", required=True, path=True)
    image_folder: str | None = option(None, "image folder (default: the one the labels record)", path=True)
    preset: str | None = option(
        None,
        "preset name, JSON file or 'auto' (the model folder's sdrpn_preset.json, else the LLaVA-1.5 preset of "
        "its depth) (default: the one the labels record, else the model's own where it fits, else K=15, T=3)",
        path=True,
    )
    branch_layer: int | None = option(
        None, "K: the RPN reads the hidden states entering layer K (default: the preset's)"
    )
    depth: int | None = option(None, "T: backbone layers K .. K+T-1 copied into the RPN (default: the preset's)")
    epochs: int = option(1, "passes over the train split")
    lr: float = option(5e-5, "peak learning rate")
    batch_size: int = option(8, "samples per micro-batch and rank")
    effective_batch: int = option(
        REFERENCE_EFFECTIVE_BATCH,
        "samples per optimiser step over all ranks; accumulation = effective_batch / (batch_size * "
        "world size). The reference's: 8 per GPU x 16 accumulation x 4 GPUs",
    )
    grad_accum: int | None = option(
        None, "micro-batches per optimiser step, instead of deriving it (effective_batch then left as is or agreeing)"
    )
    max_samples: int | None = option(None, "train on a seeded random subset of this many samples")
    bf16: bool = option(False, "backbone in bf16, RPN under bf16 autocast")
    gradient_checkpointing: bool = option(False, "recompute the RPN's layers in the backward pass")
    resume: bool = option(False, "continue from the last checkpoint in --out")
    warmup_ratio: float = option(0.03, "fraction of the steps spent warming up")
    weight_decay: float = option(0.0, "AdamW weight decay")
    betas: tuple[float, float] = option((0.9, 0.98), "AdamW betas", cli=False)
    max_grad_norm: float = option(1.0, "gradient clipping norm")
    seed: int = option(0, "shuffling and initialisation seed")
    held_out_fraction: float = option(0.05, "share of the labels held out for per-epoch metrics")
    save_every: int = option(200, "optimiser steps between checkpoints")
    keep_checkpoints: int = option(2, "checkpoints kept")
    stop_after_steps: int | None = option(None, "stop (checkpointed) after this many steps in all")
    num_workers: int = option(0, "DataLoader worker processes (0: one loader thread of the training process)")
    partial_labels: bool = option(
        False, "train on the complete shards of a label folder whose label job has not finished (no summary.json)"
    )

    def __post_init__(self):
        for name in ("labels", "out"):
            if not getattr(self, name):
                raise ValueError(f"{name} is required")
        self.check_types()
        require_at_least(1, self, "epochs", "batch_size", "effective_batch", "save_every", "keep_checkpoints")
        optional = ("branch_layer", "depth", "max_samples", "stop_after_steps", "grad_accum")
        require_at_least(1, self, *optional, optional=True)
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.held_out_fraction < 1:
            raise ValueError(f"held_out_fraction must lie in [0, 1), got {self.held_out_fraction}")
        if not 0 <= self.warmup_ratio <= 1:
            raise ValueError(f"warmup_ratio must lie in [0, 1], got {self.warmup_ratio}")
        if not 0 <= self.weight_decay * self.lr < 1:  # AdamW scales the weights by 1 - lr * decay a step
            raise ValueError(f"weight_decay must be >= 0 with lr * weight_decay < 1, got {self.weight_decay}")
        if not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0, got {self.max_grad_norm}")
        require_at_least(0, self, "num_workers", "seed")
        betas = tuple(self.betas) if isinstance(self.betas, (tuple, list)) else ()
        if len(betas) != 2 or not all(
            isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas
        ):  # NaN fails the range
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        self.betas = tuple(float(b) for b in betas)

    # What may change between a run and its resumption: how long it goes on, how it loads
    # data and how often it saves. Everything else shapes the weights.
    RESUMABLE_CHANGES = (
        "resume",
        "stop_after_steps",
        "num_workers",
        "save_every",
        "keep_checkpoints",
        "partial_labels",
    )
    # Where the files lie, not what they hold: a run, label or image folder moved or copied
    # elsewhere resumes. The label folder's content is compared instead (its recorded
    # settings and the train split's sample ids), and the images by their recorded sizes
    # (LabelShardDataset); labels that record none compare the image folder's path.
    _PATHS = ("labels", "out", "image_folder")

    def recorded(self) -> dict:
        """The settings a checkpoint records, paths made absolute, as JSON reads them back."""
        values = self.to_dict()
        for name in self._PATHS:
            if values[name]:
                values[name] = os.path.realpath(values[name])
        return json.loads(json.dumps(values))

    def differences(self, recorded: dict, images_checked: bool = True, **run) -> tuple[list[str], list[str]]:
        """The settings that differ from a checkpoint's and may not change on resume, and the
        folders that moved, each as "name: recorded -> now"; ``run`` adds facts of the run that
        shape the weights as settings do (the world size, the labels' settings, the image
        folder used). ``images_checked``: whether the image folder is known by its images, or
        must keep its path. A name the checkpoint does not record is not compared."""
        now = {**self.recorded(), **run}
        kept = [k for k in now if k not in self.RESUMABLE_CHANGES and k in recorded]
        paths = self._PATHS if images_checked else tuple(p for p in self._PATHS if p != "image_folder")
        return changes_and_moves({k: recorded[k] for k in kept}, {k: now[k] for k in kept}, paths)


def as_recorded_now(recorded: dict, labels: LabelFolderConfig) -> dict:
    """A checkpoint's settings as this version records them: an image folder left unnamed
    (null) was the labels' own, a label config recorded with its inputs' paths is compared
    without them, and the effective batch is the one used (grad_accum made it, whatever
    effective_batch was recorded beside it)."""
    recorded = dict(recorded)
    made_of = [recorded.get(k) for k in ("grad_accum", "batch_size", "world_size")]
    if all(isinstance(v, int) for v in made_of):
        recorded["effective_batch"] = made_of[0] * made_of[1] * made_of[2]
    if "image_folder" in recorded and recorded["image_folder"] is None and labels.image_folder:
        recorded["image_folder"] = os.path.realpath(labels.image_folder)
    if isinstance(recorded.get("label_config"), dict):
        recorded["label_config"] = {k: v for k, v in recorded["label_config"].items() if k not in labels.PATHS}
    return recorded


def accumulation_steps(effective_batch: int, batch_size: int, world_size: int, grad_accum: int | None = None) -> int:
    """Micro-batches per optimiser step that make the effective batch; refuses one that the
    per-rank batch and the world size do not divide. ``grad_accum``, where given, is the
    answer, and an effective batch other than the default must then be the one it makes."""
    per_step = batch_size * world_size
    if grad_accum is not None:
        made = grad_accum * per_step
        if effective_batch not in (made, REFERENCE_EFFECTIVE_BATCH):
            raise ValueError(
                f"grad_accum={grad_accum} with batch_size={batch_size} on {world_size} rank(s) makes an effective "
                f"batch of {made}, not effective_batch={effective_batch}: pass one of the two (--grad-accum or "
                "--effective-batch)"
            )
        return grad_accum
    if effective_batch % per_step:
        raise ValueError(
            f"effective_batch={effective_batch} is not a multiple of batch_size * world size = "
            f"{batch_size} * {world_size}: pick sizes that divide it (--effective-batch, --batch-size), or pass "
            "grad_accum (--grad-accum)"
        )
    return effective_batch // per_step
