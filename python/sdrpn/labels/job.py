"""The label job: LLaVA-format data in, SD-RPN pseudo labels out (SPEC Stage 1), written
into a label folder (see labels/folder.py) shard by shard; a rerun resumes after the last
complete shard."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .. import ops
from ..distributed import check_rank
from ..io_utils import exclusive_lock, file_sha256
from ..llava.data import PAST_CONTEXT, QASample, SkipSample, check_image_folder, load_entries, open_image, parse_entry
from ..llava.decode import DecoderPool, answer_limits, resolve_decoder
from ..llava.geometry import model_grid
from ..llava.inputs import (
    Preprocessing,
    check_rpn_template,
    left_pad,
    pixel_batch,
    preprocess_image,
    prompt_token_ids,
)
from ..llava.maps import AttentionMaps, given_answer_maps, self_answer_maps
from ..llava.model_facts import (
    DTYPES,
    checked_max_new_tokens,
    context_length,
    model_device,
    model_dtype,
    model_identity,
    pad_token_id,
)
from ..llava.presets import LlavaPreset
from ..options import require_at_least
from ..prefetch import DEFAULT_WORKERS, prefetch
from ..progress import show_progress
from .folder import LabelFolder, LabelFolderConfig, shard_name, summarize
from .options import LabelOptions

log = logging.getLogger(__name__)


@dataclass
class LabelJobConfig:
    """One rank's labelling job: where the data is and goes, how it is split, and the
    labelling options."""

    data: str
    image_folder: str
    out: str
    options: LabelOptions = field(default_factory=LabelOptions)
    batch_size: int = 8
    limit: int | None = None  # only the first `limit` entries of the data
    shard_size: int = 1000  # labelled samples per shard (at least; whole batches)
    rank: int = 0
    world_size: int = 1
    workers: int = DEFAULT_WORKERS  # threads loading images ahead of the model (0: none)

    def __post_init__(self):
        require_at_least(1, self, "batch_size", "shard_size")
        require_at_least(1, self, "limit", optional=True)
        require_at_least(0, self, "workers")
        check_rank(self.rank, self.world_size)
        if not isinstance(self.options, LabelOptions):
            raise TypeError(f"options must be a LabelOptions, got {type(self.options).__name__}")


def skip_record(entry, index: int, reason: str) -> dict:
    """A skipped sample's line in skipped.jsonl: its data index, and its id and image path
    where the entry has them, so that it can be found and fixed; then the reason."""
    record = {"index": index}
    if isinstance(entry, dict):
        if "id" in entry:
            record["id"] = str(entry["id"])  # as labelled rows write it (llava.data.parse_entry)
        if isinstance(entry.get("image"), str) and entry["image"]:
            record["image"] = entry["image"]
    record["reason"] = reason
    return record


@dataclass
class Prepared:
    sample: QASample
    pixels: Tensor
    preprocessing: Preprocessing
    prompt: list[int]
    answer: list[int] | None  # a given answer's tokens with the end token (None: self answers)


@dataclass
class ShardBuffer:
    rows: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    tensors: dict[str, list[Tensor]] = field(
        default_factory=lambda: {"grounding": [], "sink": [], "labels": [], "grid": []}
    )
    first_index: int | None = None
    last_index: int = -1

    def cover(self, index: int) -> None:
        self.first_index = index if self.first_index is None else self.first_index
        self.last_index = max(self.last_index, index)


class LabelJob:
    """Labels one rank's share of the data; `run()` returns the rank's summary. Once every
    rank is done, `LabelFolder(out).write_summary()` writes the folder's summary and raises
    where the folder labelled nothing but skipped samples (as `sdrpn label` does)."""

    def __init__(self, cfg: LabelJobConfig, model: nn.Module, tokenizer, preset: LlavaPreset):
        if not isinstance(preset, LlavaPreset):
            raise TypeError(f"preset must be a LlavaPreset (get_preset gives one by name), got {preset!r}")
        preset.check_fits(model.config)
        self.cfg, self.model, self.tokenizer, self.preset = cfg, model, tokenizer, preset
        self.options = cfg.options.resolved(preset)
        # Labels are for an RPN, which reads the prompt's last token after the image. Checked
        # here, where labels are made: folders recorded before still open (to draw, to convert).
        check_rpn_template(self.options.prompt_template)
        self.image_size = model.config.vision_config.image_size
        self.grid = model_grid(model.config)
        self.num_cells = self.grid[0] * self.grid[1]
        self.image_token_id = model.config.image_token_id
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = pad_token_id(tokenizer)
        self.context = context_length(model)
        checked_max_new_tokens(self.options.max_new_tokens, self.context)
        self.device = model_device(model)
        self.dtype = model_dtype(model)
        # Self answers are greedy: CUDA graphs over a static cache on CUDA (llava/decode.py).
        self.decoder = resolve_decoder("auto", model)
        self.decoders = DecoderPool()
        self.folder = LabelFolder(cfg.out)

    # ---- stages ---------------------------------------------------------------------------
    def _load(self, entry, index: int) -> tuple[QASample, Tensor, Preprocessing]:
        """The sample and its image's pixels: what loader threads do ahead of the model."""
        sample = parse_entry(entry, index)
        if self.options.answers == "given" and not sample.answer:
            raise SkipSample("no answer")
        image = open_image(self.cfg.image_folder, sample.image, self.image_size, self.options.preprocessing)
        pixels, prep = preprocess_image(image, self.image_size, mode=self.options.preprocessing)
        return sample, pixels, prep

    def _prepare(self, loaded: tuple[QASample, Tensor, Preprocessing]) -> Prepared:
        """The prompt's tokens, on the calling thread (one tokenizer is not shared between threads)."""
        sample, pixels, prep = loaded
        prompt = prompt_token_ids(
            self.tokenizer, sample.question, self.image_token_id, self.num_cells, self.options.prompt_template
        )
        answer = None
        if self.options.answers == "given":
            answer = self.tokenizer(sample.answer, add_special_tokens=False)["input_ids"] + [self.eos_id]
            if self.image_token_id in answer:  # "<image>" in its text: one more image token
                raise SkipSample("answer holds the image placeholder")
        if self.context is not None and len(prompt) + len(answer or ()) > self.context:
            raise SkipSample(PAST_CONTEXT)
        return Prepared(sample, pixels, prep, prompt, answer)

    def _pixels(self, items: list[Prepared]) -> Tensor:
        return pixel_batch([p.pixels for p in items], self.device, self.dtype)

    @torch.no_grad()
    def _given_answers_and_maps(self, items: list[Prepared]) -> tuple[list[list[int]], AttentionMaps]:
        """The given answers (with the end token) and their maps from one teacher-forced
        pass over [prompt, answer]."""
        answers = [p.answer for p in items]
        prompts, pixels = [p.prompt for p in items], self._pixels(items)
        maps = given_answer_maps(self.model, prompts, answers, pixels, self.preset, self.num_cells, self.pad_id)
        return answers, maps

    @torch.no_grad()
    def _self_answers_and_maps(self, items: list[Prepared]) -> tuple[list[list[int]], AttentionMaps]:
        """Greedy answers, then their maps from the answers alone on top of the prompts'
        cache (the same rows as a pass over [prompt, answer], without running the prompt
        twice)."""
        ids, mask = left_pad([p.prompt for p in items], self.pad_id, self.device)
        return self_answer_maps(
            self.model,
            ids,
            mask,
            self._pixels(items),
            self.preset,
            self.num_cells,
            max_new_tokens=self.options.max_new_tokens,
            eos_id=self.eos_id,
            pad_id=self.pad_id,
            decoder=self.decoder,
            pool=self.decoders,
            limits=answer_limits([len(p.prompt) for p in items], self.options.max_new_tokens, self.context),
        )

    def _label_batch(self, items: list[Prepared], buf: ShardBuffer) -> None:
        if self.options.answers == "self":
            answers, maps = self._self_answers_and_maps(items)
        else:
            answers, maps = self._given_answers_and_maps(items)
        opts = self.options
        labels = ops.pseudo_labels(
            maps.grounding,
            maps.sink,
            *self.grid,
            sink_threshold=opts.sink_threshold,
            fg_ratio=opts.fg_ratio,
            bg_ratio=opts.bg_ratio,
            max_box_fraction=opts.max_box_fraction,
        )
        # One read of the batch's results rather than one per tensor (each waits for the
        # device); float32 holds the labels' -100, 0 and 1 exactly. Counted on the host.
        grounding, sink, labels = torch.stack([maps.grounding.float(), maps.sink.float(), labels.float()]).cpu()
        labels = labels.to(torch.int8)
        stats = ops.pseudo_label_stats(labels).tolist()
        for b, (p, answer) in enumerate(zip(items, answers)):
            fg, bg, ignore = stats[b]
            buf.rows.append(
                {
                    "id": p.sample.id,
                    "index": p.sample.index,
                    "image": p.sample.image,
                    "question": p.sample.question,
                    "answer": self.tokenizer.decode(answer, skip_special_tokens=True),
                    "answer_source": opts.answers,
                    "image_size": [p.preprocessing.width, p.preprocessing.height],
                    "preprocessing": p.preprocessing.to_dict(),
                    "fg": fg,
                    "bg": bg,
                    "ignore": ignore,
                }
            )
        buf.tensors["grounding"].append(grounding)
        buf.tensors["sink"].append(sink)
        buf.tensors["labels"].append(labels)
        buf.tensors["grid"].append(torch.tensor([list(self.grid)] * len(items)))

    def _flush(self, shard: int, buf: ShardBuffer) -> dict:
        tensors = {k: torch.cat(v) for k, v in buf.tensors.items()} if buf.rows else {}
        return self.folder.write_shard(
            shard_name(self.cfg.rank, shard),
            buf.rows,
            tensors,
            buf.skipped,
            buf.first_index,
            buf.last_index,
            shard,
            self.cfg.world_size,
        )

    def folder_config(self) -> LabelFolderConfig:
        """Every setting of this job that the labels depend on (see LabelFolderConfig)."""
        dtype = next(name for name, value in DTYPES.items() if value == self.dtype)
        return LabelFolderConfig(
            options=self.options,
            preset=self.preset.to_dict(),
            model=model_identity(self.model),
            dtype=dtype,
            data=os.path.realpath(self.cfg.data),
            data_sha256=file_sha256(self.cfg.data),
            world_size=self.cfg.world_size,
            image_folder=os.path.realpath(self.cfg.image_folder),  # a link re-pointed is another folder
            image_size=self.image_size,
            grid=list(self.grid),
            image_token_id=self.image_token_id,
        )

    # ---- driver ---------------------------------------------------------------------------
    def run(self) -> dict:
        """Label this rank's share; a second job on the same folder and rank is refused."""
        # Before anything is written: a wrong folder would otherwise skip every sample as
        # "image missing" and be recorded in the label folder, refusing the corrected rerun.
        check_image_folder(self.cfg.image_folder)
        with exclusive_lock(self.folder.lock_path(self.cfg.rank)):
            self.folder.remove_unfinished(self.cfg.rank)
            return self._run()

    def _run(self) -> dict:
        cfg = self.cfg
        entries = load_entries(cfg.data)  # a file that is no data list is refused before the folder is written
        self.folder.start(self.folder_config(), record=cfg.rank == 0)
        if cfg.limit is not None:
            entries = entries[: cfg.limit]
        markers = self.folder.done_markers(cfg.rank)
        resume_after = max((m["last_index"] for m in markers), default=-1)
        shard = max((m["shard"] for m in markers), default=-1) + 1
        mine = [i for i in range(len(entries)) if i % cfg.world_size == cfg.rank and i > resume_after]
        if markers:
            log.info("resuming after data index %d (%d complete shards)", resume_after, len(markers))
        buf, pending = ShardBuffer(), []
        progress = show_progress(total=len(mine), desc=f"label rank {cfg.rank}", unit="sample")
        loads = prefetch(lambda i: self._load(entries[i], i), mine, cfg.workers, ahead=2 * cfg.batch_size)
        for pos, (index, loaded) in enumerate(zip(mine, loads)):
            buf.cover(index)
            try:
                pending.append(self._prepare(loaded.result()))
            except SkipSample as skip:
                buf.skipped.append(skip_record(entries[index], index, str(skip)))
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
