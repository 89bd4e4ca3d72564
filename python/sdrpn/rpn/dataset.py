"""Label folders as training data: a map-style dataset of labelled samples and its collator."""

from __future__ import annotations

import hashlib
import logging
import numbers
import os
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..labels.folder import SUMMARY_NAME, LabelFolder, LabelFolderConfig
from ..llava.data import (
    SkipSample,
    check_image_folder,
    folder_problem,
    image_folder_problem,
    open_image,
    recorded_image_sizes,
)
from ..llava.inputs import left_pad, preprocess_image, prompt_token_ids
from ..ops import IGNORE_INDEX
from ..options import is_int
from ..subsets import SUBSET_SEED, seeded_subset
from .packed_rows import PackedRows

log = logging.getLogger(__name__)

# What a sample is rebuilt from and its image checked by: the rest of a label row is not kept.
ROW_FIELDS = ("id", "image", "question", "image_size", "preprocessing")


def in_held_out(sample_id: str, fraction: float) -> bool:
    """A stable split: the same id is always on the same side, whatever the run."""
    digest = hashlib.sha256(str(sample_id).encode()).digest()
    return int.from_bytes(digest[:4], "little") / 2**32 < fraction


@dataclass
class LabelledSample:
    input_ids: list[int]
    pixel_values: Tensor
    labels: Tensor  # (N,) int64
    id: str


@dataclass
class SkippedSample:
    """A sample that could not be rebuilt, in its place in a batch: the collator drops it
    and counts it by reason."""

    id: str
    reason: str


def check_label_folder(label_dir: str, partial: bool = False) -> LabelFolderConfig:
    """The folder's config, refusing what is no label folder, and one whose label job has not
    finished (interrupted, or still running) unless ``partial``: training on it would use a
    part of the data without a word."""
    folder = LabelFolder(label_dir)
    config = folder.config  # names a missing folder, a file, a folder without labels
    if folder.finished():
        return config
    shards = len(folder.complete_shards())
    if not partial or not shards:
        partly = "train on its complete shards (sdrpn train --partial-labels; partial=True in Python)"
        raise ValueError(
            f"{label_dir}: its label job has not finished (no {SUMMARY_NAME}; {shards} complete shard(s)): let it "
            f"finish, or rerun it with the same flags if it stopped{', or ' + partly if shards else ''}"
        )
    return config


class LabelShardDataset(Dataset):
    """Samples of a label folder, each rebuilt as it was labelled: the image re-read and
    preprocessed with its recorded preprocessing, the prompt rebuilt with the recorded
    template. A sample whose image can no longer be read yields a SkippedSample."""

    def __init__(
        self,
        label_dir: str,
        tokenizer,
        image_token_id: int,
        *,
        image_folder: str | None = None,
        split: str = "all",
        held_out_fraction: float = 0.05,
        max_samples: int | None = None,
        subset_seed: int = SUBSET_SEED,
        image_size: int = 336,
        partial: bool = False,
    ):
        """max_samples: a random subset of that many samples of the split (seeded, as the
        reference takes its "trained on N samples" subsets), not the first ones.
        image_size: the encoder's input side for labels that record none (converted from the
        reference's pickles, made for LLaVA-1.5's 336); pass the model's.
        partial: read a folder whose label job has not finished (interrupted or still
        running: no summary.json), its complete shards; otherwise such a folder is refused."""
        if split not in ("all", "train", "held_out"):
            raise ValueError(f"split must be 'all', 'train' or 'held_out', got {split!r}")
        fraction_ok = isinstance(held_out_fraction, numbers.Real) and not isinstance(held_out_fraction, bool)
        if not fraction_ok or not 0 <= held_out_fraction < 1:  # NaN fails the range too
            raise ValueError(f"held_out_fraction must be a number in [0, 1), got {held_out_fraction!r}")
        if max_samples is not None and (not is_int(max_samples) or max_samples < 1):
            raise ValueError(f"max_samples must be an int >= 1 or None, got {max_samples!r}")
        folder = LabelFolder(label_dir)
        self.config = check_label_folder(label_dir, partial)
        folder.check_shard_ranks(self.config.world_size)  # shards of two jobs would repeat samples
        self.image_folder = image_folder or self.config.image_folder
        if self.image_folder is None:
            raise ValueError(f"{label_dir} records no image folder: pass --image-folder (image_folder)")
        # A folder that is gone would have every sample skipped one by one: refuse it here.
        if image_folder:
            check_image_folder(image_folder)
        elif problem := folder_problem(self.image_folder):
            raise ValueError(
                f"the image folder that {label_dir} records, {self.image_folder!r}, {problem}: pass "
                "--image-folder with where the images are now"
            )
        if isinstance(image_size, bool) or not isinstance(image_size, int) or not 1 <= image_size <= 2**16:
            raise ValueError(f"image_size must be an int in [1, 65536], got {image_size!r}")
        for name, value, top in (("image_token_id", image_token_id, 2**63), ("subset_seed", subset_seed, 2**63)):
            if not is_int(value) or not 0 <= value < top:
                raise ValueError(f"{name} must be an int in [0, 2**63), got {value!r}")
        self.image_size = image_size
        self.template = self.config.prompt_template
        self.tokenizer = tokenizer
        self.image_token_id = image_token_id
        # Per sample, the row's fields a sample is rebuilt and checked from and where its labels
        # lie: (the shard's labels in shard_labels, the row in them). The labels stay int8, as
        # the shards hold them (values 0, 1 and ignore, checked by the folder).
        rows: list[dict] = []
        where: list[tuple[int, int]] = []
        shard_labels: list[Tensor] = []
        for shard in folder.shards():
            taken = []
            for row in shard.rows:
                held = in_held_out(row["id"], held_out_fraction)
                if split == "all" or (split == "held_out") == held:
                    rows.append({k: row[k] for k in ROW_FIELDS if k in row})
                    where.append((len(shard_labels), len(taken)))
                    taken.append(row["row"])
            if taken:
                shard_labels.append(shard.tensors["labels"][taken].to(torch.int8))
        keep = seeded_subset(len(rows), max_samples, subset_seed)
        rows = [rows[i] for i in keep]
        if not rows:
            raise ValueError(f"{label_dir} has no labelled samples in split {split!r}")
        # Whether the rows tell the images they were made from (labels converted from the
        # reference's pickles record no sizes): then another folder than the labels' own is
        # checked to hold them, the same images moved rather than others.
        self.records_image_sizes = bool(recorded_image_sizes(rows))
        recorded = self.config.image_folder
        moved = image_folder and recorded and os.path.realpath(image_folder) != os.path.realpath(recorded)
        if moved and self.records_image_sizes and (problem := image_folder_problem(image_folder, rows)):
            raise ValueError(
                f"{label_dir} holds labels made from the images in {recorded}, and image_folder (--image-folder) "
                f"{image_folder!r} is not shown to hold them ({problem}): pass the folder they are in"
            )
        self._ids_digest = hashlib.sha256("\n".join(str(row["id"]) for row in rows).encode()).hexdigest()[:16]
        # No Python object per sample: forked DataLoader workers read these pages without copying them.
        self.rows = PackedRows(rows)
        self._shard_labels = shard_labels
        self._where = np.array([where[i] for i in keep], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def ids_digest(self) -> str:
        """A short hash of the samples' ids in order: a resumed run must see the samples its
        checkpoint's steps were counted over."""
        return self._ids_digest

    def labels(self, i: int) -> Tensor:
        """Sample ``i``'s labels, (N,) int64 with IGNORE_INDEX on ignored cells."""
        shard, row = self._where[i]
        return self._shard_labels[shard][row].long()

    def __getitem__(self, i: int) -> LabelledSample | SkippedSample:
        row = self.rows[i]
        labels = self.labels(i)
        prep = row.get("preprocessing") or {}
        num_cells = int(labels.numel())
        size, mode = prep.get("size") or self.config.image_size or self.image_size, prep.get("mode", "pad")
        try:
            image = open_image(self.image_folder, row.get("image"), size, mode)
        except SkipSample as err:
            return _skipped(row["id"], str(err))
        if prep and (image.width, image.height) != (prep["width"], prep["height"]):
            return _skipped(row["id"], "image changed since it was labelled")
        pixels, _ = preprocess_image(image, size, mode=mode)
        ids = prompt_token_ids(self.tokenizer, row["question"], self.image_token_id, num_cells, self.template)
        return LabelledSample(ids, pixels, labels, row["id"])


def _skipped(sample_id: str, reason: str) -> SkippedSample:
    # Per sample at debug level: the trainer reports the counts by reason once an epoch.
    log.debug("skipping %s: %s", sample_id, reason)
    return SkippedSample(sample_id, reason)


@dataclass
class LabelBatch:
    input_ids: Tensor  # (B, L) left-padded prompts
    attention_mask: Tensor  # (B, L)
    pixel_values: Tensor  # (B, 3, S, S)
    labels: Tensor  # (B, N) int64, IGNORE_INDEX on ignored cells
    skipped: dict[str, int] = field(default_factory=dict)  # samples left out of the batch, by reason

    @property
    def dropped(self) -> int:
        return sum(self.skipped.values())


class LabelCollator:
    def __init__(self, pad_id: int):
        if not is_int(pad_id) or pad_id < 0:
            raise ValueError(f"pad_id must be a token id (an int >= 0), got {pad_id!r}")
        self.pad_id = pad_id

    def __call__(self, samples: list[LabelledSample | SkippedSample | None]) -> LabelBatch | None:
        """The batch of the samples that could be rebuilt; None when none could."""
        return self.collate(samples)[0]

    def collate(self, samples: list[LabelledSample | SkippedSample | None]) -> tuple[LabelBatch | None, Counter]:
        """The batch (None when every sample was skipped) and the skipped samples by reason,
        which an all-skipped batch cannot carry."""
        kept = [s for s in samples if isinstance(s, LabelledSample)]
        skipped = Counter(
            s.reason if isinstance(s, SkippedSample) else "no sample"
            for s in samples
            if not isinstance(s, LabelledSample)
        )
        if not kept:
            return None, skipped
        ids, mask = left_pad([s.input_ids for s in kept], self.pad_id)
        width = max(s.labels.numel() for s in kept)
        labels = torch.full((len(kept), width), IGNORE_INDEX, dtype=torch.long)
        for b, s in enumerate(kept):
            labels[b, : s.labels.numel()] = s.labels
        batch = LabelBatch(ids, mask, torch.stack([s.pixel_values for s in kept]), labels, dict(skipped))
        return batch, skipped
