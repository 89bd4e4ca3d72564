"""The label job: LLaVA-format data in, SD-RPN pseudo labels out (SPEC Stage 1).

Output folder:
  rank{R}-shard{K}.safetensors   grounding, sink (float32 (n, N)), labels (int8 (n, N)),
                                 grid (int64 (n, 2))
  rank{R}-shard{K}.jsonl         one line per labelled sample: id, image, question, answer,
                                 image_size, preprocessing, shard, row, fg/bg/ignore counts
  rank{R}-shard{K}.skipped.jsonl samples skipped in that shard's span, with the reason
  rank{R}-shard{K}.done.json     written last: the shard is complete; data indices covered
  summary.json                   counts over every complete shard
Every file is written atomically; a rerun resumes after the last complete shard.
"""

from __future__ import annotations

import glob
import logging
import os
from collections import Counter
from dataclasses import dataclass, field

import torch
from safetensors.torch import save_file
from torch import Tensor, nn
from tqdm import tqdm

from . import ops
from .data import QASample, SkipSample, load_entries, parse_entry, resolve_image
from .io_utils import read_json, write_atomic, write_json, write_jsonl
from .label_data import LABEL_CONFIG
from .llava.loading import pad_token_id
from .llava.maps import TeacherForcedBatch, attention_maps, left_pad
from .llava.presets import LlavaPreset
from .preprocess import PROMPT_TEMPLATE, Preprocessing, load_rgb, preprocess_image, prompt_token_ids

log = logging.getLogger(__name__)





@dataclass
class LabelJobConfig:
    data: str
    image_folder: str
    out: str
    answers: str = "self"          # "self": greedy answers of the model; "given": the data's
    batch_size: int = 8
    max_new_tokens: int = 128
    limit: int | None = None       # only the first `limit` entries of the data
    shard_size: int = 1000         # labelled samples per shard (at least; whole batches)
    rank: int = 0
    world_size: int = 1
    fg_ratio: float = 0.2
    bg_ratio: float = 0.1
    max_box_fraction: float = 0.5
    prompt_template: str = PROMPT_TEMPLATE

    def __post_init__(self):
        if self.answers not in ("self", "given"):
            raise ValueError(f"answers must be 'self' or 'given', got {self.answers!r}")
        for name in ("batch_size", "max_new_tokens", "shard_size", "world_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if "<image>" not in self.prompt_template or "{question}" not in self.prompt_template:
            raise ValueError(f"prompt_template must hold <image> and {{question}}, got {self.prompt_template!r}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must lie in [0, world_size={self.world_size}), got {self.rank}")


@dataclass
class Prepared:
    sample: QASample
    pixels: Tensor
    preprocessing: Preprocessing
    prompt: list[int]


@dataclass
class ShardBuffer:
    rows: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    tensors: dict[str, list[Tensor]] = field(default_factory=lambda: {k: [] for k in ("grounding", "sink", "labels", "grid")})
    first_index: int | None = None
    last_index: int = -1

    def cover(self, index: int) -> None:
        self.first_index = index if self.first_index is None else self.first_index
        self.last_index = max(self.last_index, index)


class LabelJob:
    """Labels one rank's share of the data; `run()` returns the rank's summary."""

    def __init__(self, cfg: LabelJobConfig, model: nn.Module, tokenizer, preset: LlavaPreset):
        self.cfg, self.model, self.tokenizer, self.preset = cfg, model, tokenizer, preset
        config = model.config
        vision = config.vision_config
        self.image_size = vision.image_size
        self.grid = vision.image_size // vision.patch_size
        self.num_cells = self.grid * self.grid
        self.image_token_id = config.image_token_id
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = pad_token_id(tokenizer)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.prefix = f"rank{cfg.rank:03d}"

    # ---- resume ---------------------------------------------------------------------------
    def _done_markers(self) -> list[dict]:
        pattern = os.path.join(self.cfg.out, f"{self.prefix}-shard*.done.json")
        return [read_json(p) for p in sorted(glob.glob(pattern))]

    # ---- stages ---------------------------------------------------------------------------
    def _prepare(self, entry, index: int) -> Prepared:
        sample = parse_entry(entry, index)
        if self.cfg.answers == "given" and not sample.answer:
            raise SkipSample("no answer")
        path = resolve_image(self.cfg.image_folder, sample.image)
        try:
            image = load_rgb(path)
        except Exception as err:  # a corrupt file must not stop the job
            raise SkipSample("image unreadable") from err
        pixels, prep = preprocess_image(image, self.image_size)
        prompt = prompt_token_ids(self.tokenizer, sample.question, self.image_token_id,
                                  self.num_cells, self.cfg.prompt_template)
        return Prepared(sample, pixels, prep, prompt)

    def _left_pad(self, seqs: list[list[int]]) -> tuple[Tensor, Tensor]:
        return left_pad(seqs, self.pad_id, self.device)

    def _pixels(self, items: list[Prepared]) -> Tensor:
        return torch.stack([p.pixels for p in items]).to(self.device, self.dtype)

    @torch.no_grad()
    def _answers(self, items: list[Prepared]) -> list[list[int]]:
        if self.cfg.answers == "given":
            return [self.tokenizer(p.sample.answer, add_special_tokens=False)["input_ids"] + [self.eos_id]
                    for p in items]
        ids, mask = self._left_pad([p.prompt for p in items])
        out = self.model.generate(input_ids=ids, attention_mask=mask, pixel_values=self._pixels(items),
                                  max_new_tokens=self.cfg.max_new_tokens, do_sample=False,
                                  pad_token_id=self.pad_id, eos_token_id=self.eos_id)
        answers = []
        for row in out[:, ids.shape[1]:].tolist():
            cut = row.index(self.eos_id) + 1 if self.eos_id in row else len(row)
            answers.append(row[:cut])
        return answers

    def _label_batch(self, items: list[Prepared], buf: ShardBuffer) -> None:
        answers = self._answers(items)
        ids, mask = self._left_pad([p.prompt + a for p, a in zip(items, answers)])
        width = ids.shape[1]
        starts = torch.tensor([width - len(a) for a in answers], device=self.device)
        lengths = torch.tensor([len(a) for a in answers], device=self.device)
        batch = TeacherForcedBatch(ids, mask, self._pixels(items), starts, lengths)
        maps = attention_maps(self.model, batch, self.preset, self.num_cells)
        labels = ops.pseudo_labels(maps.grounding, maps.sink, self.grid, self.grid,
                                   sink_threshold=self.preset.sink_threshold,
                                   fg_ratio=self.cfg.fg_ratio, bg_ratio=self.cfg.bg_ratio,
                                   max_box_fraction=self.cfg.max_box_fraction)
        stats = ops.pseudo_label_stats(labels).tolist()
        for b, (p, answer) in enumerate(zip(items, answers)):
            fg, bg, ignore = stats[b]
            buf.rows.append({
                "id": p.sample.id, "index": p.sample.index, "image": p.sample.image,
                "question": p.sample.question,
                "answer": self.tokenizer.decode(answer, skip_special_tokens=True),
                "answer_source": self.cfg.answers,
                "image_size": [p.preprocessing.width, p.preprocessing.height],
                "preprocessing": p.preprocessing.to_dict(),
                "row": len(buf.rows), "fg": fg, "bg": bg, "ignore": ignore,
            })
        buf.tensors["grounding"].append(maps.grounding.float().cpu())
        buf.tensors["sink"].append(maps.sink.float().cpu())
        buf.tensors["labels"].append(labels.to(torch.int8).cpu())
        buf.tensors["grid"].append(torch.tensor([[self.grid, self.grid]] * len(items)))

    def _flush(self, shard: int, buf: ShardBuffer) -> dict:
        base = os.path.join(self.cfg.out, f"{self.prefix}-shard{shard:05d}")
        name = os.path.basename(base) + ".safetensors"
        for row in buf.rows:
            row["shard"] = name
        if buf.rows:
            tensors = {k: torch.cat(v).contiguous() for k, v in buf.tensors.items()}
            write_atomic(base + ".safetensors", lambda tmp: save_file(tensors, tmp))
        write_jsonl(base + ".jsonl", buf.rows)
        write_jsonl(base + ".skipped.jsonl", buf.skipped)
        marker = {
            "shard": shard, "first_index": buf.first_index, "last_index": buf.last_index,
            "labelled": len(buf.rows),
            "all_ignore": sum(1 for r in buf.rows if r["fg"] == 0 and r["bg"] == 0),
            "skipped": dict(Counter(s["reason"] for s in buf.skipped)),
        }
        write_json(base + ".done.json", marker)  # last: the shard now counts as complete
        return marker

    def _write_label_config(self) -> None:
        """What training needs to rebuild each sample's input exactly as it was labelled."""
        write_json(os.path.join(self.cfg.out, LABEL_CONFIG), {
            "model": getattr(self.model.config, "_name_or_path", None),
            "image_folder": os.path.abspath(self.cfg.image_folder),
            "prompt_template": self.cfg.prompt_template,
            "preset": self.preset.name,
            "answers": self.cfg.answers,
            "image_size": self.image_size,
            "grid": [self.grid, self.grid],
            "image_token_id": self.image_token_id,
        })

    # ---- driver ---------------------------------------------------------------------------
    def run(self) -> dict:
        cfg = self.cfg
        self._write_label_config()
        entries = load_entries(cfg.data)
        if cfg.limit is not None:
            entries = entries[:cfg.limit]
        markers = self._done_markers()
        resume_after = max((m["last_index"] for m in markers), default=-1)
        shard = max((m["shard"] for m in markers), default=-1) + 1
        mine = [i for i in range(len(entries)) if i % cfg.world_size == cfg.rank and i > resume_after]
        if markers:
            log.info("resuming after data index %d (%d complete shards)", resume_after, len(markers))
        buf, pending = ShardBuffer(), []
        progress = tqdm(total=len(mine), desc=f"label rank {cfg.rank}", unit="sample",
                        disable=None)
        for pos, index in enumerate(mine):
            buf.cover(index)
            try:
                pending.append(self._prepare(entries[index], index))
            except SkipSample as skip:
                buf.skipped.append({"index": index, "reason": str(skip)})
            last = pos == len(mine) - 1
            if pending and (len(pending) == cfg.batch_size or last):
                self._label_batch(pending, buf)
                pending = []
            progress.update(1)
            if len(buf.rows) >= cfg.shard_size or (last and buf.first_index is not None):
                markers.append(self._flush(shard, buf))
                shard, buf = shard + 1, ShardBuffer()
        progress.close()
        return summarize(markers)


def summarize(markers: list[dict]) -> dict:
    skipped = Counter()
    for m in markers:
        skipped.update(m["skipped"])
    return {
        "shards": len(markers),
        "labelled": sum(m["labelled"] for m in markers),
        "all_ignore": sum(m["all_ignore"] for m in markers),
        "skipped": sum(skipped.values()),
        "skipped_by_reason": dict(sorted(skipped.items())),
    }


def merge_summaries(out: str) -> dict:
    """Summary over every rank's complete shards in the folder."""
    markers = [read_json(p) for p in sorted(glob.glob(os.path.join(out, "rank*-shard*.done.json")))]
    summary = summarize(markers)
    write_json(os.path.join(out, "summary.json"), summary)
    return summary
