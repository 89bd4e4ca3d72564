"""Reading label folders for training: a map-style dataset and its collator."""

from __future__ import annotations

import glob
import hashlib
import logging
import os
from dataclasses import dataclass

import torch
from safetensors.torch import load_file
from torch import Tensor
from torch.utils.data import Dataset

from .data import SkipSample, resolve_image
from .io_utils import read_json, read_jsonl
from .llava.maps import left_pad
from .preprocess import PROMPT_TEMPLATE, load_rgb, preprocess_image, prompt_token_ids

log = logging.getLogger(__name__)

LABEL_CONFIG = "label_config.json"


def complete_shards(label_dir: str) -> list[str]:
    """Base paths of the shards whose completion marker exists, in order."""
    markers = sorted(glob.glob(os.path.join(label_dir, "rank*-shard*.done.json")))
    return [m[: -len(".done.json")] for m in markers]


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


class LabelShardDataset(Dataset):
    """Samples of a label folder, each rebuilt as it was labelled: the image re-read and
    preprocessed with its recorded preprocessing, the prompt rebuilt with the recorded
    template. A sample whose image can no longer be read yields None (the collator drops
    it and counts it)."""

    def __init__(self, label_dir: str, tokenizer, image_token_id: int, *, image_folder: str | None = None,
                 split: str = "all", held_out_fraction: float = 0.05, max_samples: int | None = None):
        if split not in ("all", "train", "held_out"):
            raise ValueError(f"split must be 'all', 'train' or 'held_out', got {split!r}")
        config_path = os.path.join(label_dir, LABEL_CONFIG)
        config = read_json(config_path) if os.path.exists(config_path) else {}
        self.image_folder = image_folder or config.get("image_folder")
        if self.image_folder is None:
            raise ValueError(f"{label_dir} records no image folder: pass image_folder")
        self.template = config.get("prompt_template", PROMPT_TEMPLATE)
        self.tokenizer = tokenizer
        self.image_token_id = image_token_id
        self.rows: list[dict] = []
        labels: list[Tensor] = []
        for base in complete_shards(label_dir):
            rows = read_jsonl(base + ".jsonl")
            if not rows:
                continue
            shard_labels = load_file(base + ".safetensors")["labels"]
            for row in rows:
                held = in_held_out(row["id"], held_out_fraction)
                if split == "all" or (split == "held_out") == held:
                    self.rows.append(row)
                    labels.append(shard_labels[row["row"]].long())
        if max_samples is not None:
            self.rows, labels = self.rows[:max_samples], labels[:max_samples]
        if not self.rows:
            raise ValueError(f"{label_dir} has no labelled samples in split {split!r}")
        self.labels = labels

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> LabelledSample | None:
        row = self.rows[i]
        prep = row.get("preprocessing") or {}
        num_cells = int(self.labels[i].numel())
        try:
            image = load_rgb(resolve_image(self.image_folder, row["image"]))
        except (SkipSample, OSError) as err:
            log.warning("skipping %s: %s", row["id"], err)
            return None
        if prep and (image.width, image.height) != (prep["width"], prep["height"]):
            log.warning("skipping %s: image changed since it was labelled", row["id"])
            return None
        size = prep.get("size") or 336
        pixels, _ = preprocess_image(image, size)
        ids = prompt_token_ids(self.tokenizer, row["question"], self.image_token_id, num_cells, self.template)
        return LabelledSample(ids, pixels, self.labels[i], row["id"])


@dataclass
class LabelBatch:
    input_ids: Tensor       # (B, L) left-padded prompts
    attention_mask: Tensor  # (B, L)
    pixel_values: Tensor    # (B, 3, S, S)
    labels: Tensor          # (B, N) int64, -100 ignored
    dropped: int            # samples of the batch whose image could not be read


class LabelCollator:
    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, samples: list[LabelledSample | None]) -> LabelBatch | None:
        kept = [s for s in samples if s is not None]
        if not kept:
            return None
        ids, mask = left_pad([s.input_ids for s in kept], self.pad_id)
        width = max(s.labels.numel() for s in kept)
        labels = torch.full((len(kept), width), -100, dtype=torch.long)
        for b, s in enumerate(kept):
            labels[b, : s.labels.numel()] = s.labels
        return LabelBatch(ids, mask, torch.stack([s.pixel_values for s in kept]), labels,
                          len(samples) - len(kept))
