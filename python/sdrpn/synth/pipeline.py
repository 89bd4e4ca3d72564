"""SD-RPN end to end on the synthetic task, the way a user runs it on LLaVA-1.5:

  data      train/test splits written in LLaVA's format (images + JSON)
  labels    `sdrpn label --answers self`: pseudo labels from the base model's own attention
  labels    the same maps labelled raw (no sink removal, no ignore region), for the ablation
  rpn       `sdrpn train` on each label folder (no ground-truth box is read anywhere here)
  evaluate  test accuracy of the base model, SD-RPN, a random crop and the ground-truth
            crop; IoU and hit rate of the pseudo labels' and the RPN's boxes

Every stage writes its outputs atomically and is skipped when they are already complete,
so a rerun after an interruption goes on where it stopped; a rerun with other settings is
refused (OUT/pipeline_config.json records them), since its stages would mix two runs.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from ..infer.pipeline import SDRPNLlava
from ..io_utils import exclusive_lock, read_json, remove_temporaries, write_json
from ..labels.folder import LabelFolder
from ..labels.job import LabelJob, LabelJobConfig
from ..labels.options import LabelOptions
from ..llava.geometry import grid_box_to_pixels, model_grid
from ..llava.model_facts import model_folder_path
from ..llava.presets import resolve_preset
from ..options import setting_changes
from ..rpn.checkpoints import latest_checkpoint
from ..rpn.model import RegionProposalNetwork
from ..rpn.train import TRAIN_CONFIG_NAME, RPNTrainer
from ..rpn.train_config import TrainConfig
from .attention_check import collect_head_maps, layer_localisation, selection_scores
from .cells import cell_box
from .evaluate import answer_with_views
from .metrics import accuracy_by_kind, box_iou, hit
from .task import TAG_KINDS, make_sample, split_seeds, write_dataset

log = logging.getLogger(__name__)

# The shipped base model; its sdrpn_preset.json holds the layers SD-RPN reads, its prompt
# template and the RoI options for its 8x8 grid (a one-cell RoI is the target here).
BASE_MODEL = os.path.join(os.path.dirname(__file__), "base_model")


@dataclass
class PipelineConfig:
    out: str
    model: str = BASE_MODEL
    train_count: int = 10_000  # samples labelled for the RPN (the issue allows at most 10K)
    test_count: int = 400
    device: str = "cpu"
    label_batch: int = 32
    rpn_epochs: int = 2
    rpn_lr: float = 1e-3
    rpn_batch: int = 32
    eval_batch: int = 32
    max_new_tokens: int = 12
    seed: int = 0

    def path(self, *parts: str) -> str:
        return os.path.join(self.out, *parts)


PIPELINE_CONFIG = "pipeline_config.json"
# Settings a rerun may change: where it runs, and the evaluation's batch (evaluated anew).
RUN_ONLY = ("out", "device", "eval_batch")


def record_settings(cfg: PipelineConfig) -> None:
    """Record the settings that shape the artefacts in OUT/pipeline_config.json, or refuse a
    rerun with others: its stages would skip what the first run finished (an RPN trained on
    fewer samples, for one) and the report would describe neither."""
    path = cfg.path(PIPELINE_CONFIG)
    settings = {k: v for k, v in asdict(cfg).items() if k not in RUN_ONLY}
    settings["model"] = model_folder_path(cfg.model)
    if os.path.exists(path):
        recorded = read_json(path)
        if not isinstance(recorded, dict):
            raise ValueError(f"{path} must hold a JSON object of settings: pass another --out")
        if isinstance(recorded.get("model"), str):  # "~/x" as typed, before
            recorded["model"] = model_folder_path(recorded["model"])
        diff = setting_changes(recorded, settings)
        if diff:
            raise ValueError(
                f"{cfg.out} holds a run with other settings ({'; '.join(diff)}): rerun with the same "
                "settings, or pass another --out"
            )
    else:
        write_json(path, settings)


# ---- stages -----------------------------------------------------------------------------------
def write_splits(cfg: PipelineConfig) -> dict[str, str]:
    data = cfg.path("data")
    return {
        split: write_dataset(data, split, count)
        for split, count in (("train", cfg.train_count), ("test", cfg.test_count))
    }


def make_labels(cfg: PipelineConfig, model, tokenizer, split_json: str, out: str) -> None:
    """`sdrpn label --answers self` with the model's own preset."""
    options = LabelOptions(answers="self", max_new_tokens=cfg.max_new_tokens)
    job = LabelJobConfig(
        data=split_json,
        image_folder=cfg.path("data", "images"),
        out=out,
        options=options,
        batch_size=cfg.label_batch,
        shard_size=2000,
    )
    LabelJob(job, model, tokenizer, resolve_preset(None, model)).run()
    LabelFolder(out).write_summary()


def raw_label_rule(grounding: torch.Tensor, fg_ratio: float = 0.2) -> torch.Tensor:
    """1 where G > fg_ratio * max(G), 0 elsewhere: no sink removal, no ignored cells, no
    "box too large" rule."""
    return (grounding > fg_ratio * grounding.amax(-1, keepdim=True)).to(torch.int8)


def raw_labels(labels_dir: str, out: str, fg_ratio: float = 0.2) -> None:
    """The ablation's label folder: the same maps labelled by raw_label_rule, shard by shard
    (a shard already complete in `out` is kept, so an interrupted run goes on)."""
    source, target = LabelFolder(labels_dir), LabelFolder(out)
    target.write_config(source.config)
    done = set(target.complete_shards())
    for marker, name in zip(source.done_markers(), source.complete_shards()):
        if name in done:
            continue
        shard = source.read_shard(name)
        tensors = dict(shard.tensors)
        if shard.rows:
            tensors["labels"] = raw_label_rule(tensors["grounding"], fg_ratio)
        skipped = source.skipped(name)
        target.write_shard(
            name,
            shard.rows,
            tensors,
            skipped,
            marker["first_index"],
            marker["last_index"],
            marker["shard"],
            marker.get("world_size", 1),
        )
    target.write_summary()


def train_rpn(cfg: PipelineConfig, model, tokenizer, labels_dir: str, out: str) -> None:
    """`sdrpn train` with the defaults the label folder's preset gives."""
    if os.path.exists(os.path.join(out, TRAIN_CONFIG_NAME)):
        return  # trained already
    train = TrainConfig(
        labels=labels_dir,
        out=out,
        epochs=cfg.rpn_epochs,
        lr=cfg.rpn_lr,
        batch_size=cfg.rpn_batch,
        # A few thousand samples: one optimiser step per batch, not the reference's 512.
        effective_batch=cfg.rpn_batch,
        seed=cfg.seed,
        save_every=10_000,
        resume=latest_checkpoint(out) is not None,  # an interrupted run goes on
    )
    RPNTrainer(train, model, tokenizer, device=cfg.device).run()


# ---- evaluation -------------------------------------------------------------------------------
def label_box_pixels(labels: torch.Tensor, grid: int, width: int, height: int, size: int):
    """The box of a sample's foreground cells in source pixels, or None without foreground."""
    fg = (labels.view(grid, grid) == 1).nonzero()
    if fg.numel() == 0:
        return None
    y0, x0 = fg.min(0).values.tolist()
    y1, x1 = fg.max(0).values.tolist()
    return grid_box_to_pixels((x0, y0, x1 + 1, y1 + 1), grid, grid, width, height, size, "pad")


def localisation(boxes_per_sample: list[list], samples, grid: int) -> dict:
    """IoU with the target's cells (the best a grid box can do) and with the target itself,
    and the hit rate (some box holds the whole target) over every question, over the
    questions about the tag (count asks for circles and may rightly look there) and over the
    code questions alone (the ones the crop is for); no box counts as a miss."""
    ious_cells, ious, hits, empty = [], [], [], 0
    for boxes, s in zip(boxes_per_sample, samples):
        target_cells = cell_box(s.box, s.image.width, grid)
        empty += not boxes
        ious_cells.append(max((box_iou(b, target_cells) for b in boxes), default=0.0))
        ious.append(max((box_iou(b, s.box) for b in boxes), default=0.0))
        hits.append(hit(boxes, s.box))
    n = max(1, len(samples))

    def hit_rate(kinds) -> float:
        picked = [h for h, s in zip(hits, samples) if s.kind in kinds]
        return round(sum(picked) / max(1, len(picked)), 3)

    return {
        "iou_cells": round(sum(ious_cells) / n, 3),
        "iou_target": round(sum(ious) / n, 3),
        "hit_rate": round(sum(hits) / n, 3),
        "hit_rate_tag": hit_rate(TAG_KINDS),
        "hit_rate_read": hit_rate(("read",)),
        "no_box": round(empty / n, 3),
    }


def sdrpn_answers(cfg: PipelineConfig, model, tokenizer, rpn: RegionProposalNetwork, samples, crop_mode=None):
    """Answers with the settings the RPN records (as `sdrpn infer` gives them), in another
    crop mode where one is given."""
    roi = rpn.config.roi_options
    pipe = SDRPNLlava(model, tokenizer, rpn, roi=replace(roi, crop_mode=crop_mode or roi.crop_mode))
    answers = []
    for i in range(0, len(samples), cfg.eval_batch):
        chunk = samples[i : i + cfg.eval_batch]
        answers += pipe.generate([s.image for s in chunk], [s.question for s in chunk], cfg.max_new_tokens)
    return answers


def labelled_maps(labels_dir: str) -> dict[str, dict[str, torch.Tensor]]:
    """Per labelled sample id: its rows of grounding, sink and labels."""
    return {row["id"]: shard.row_tensors(row) for shard in LabelFolder(labels_dir).shards() for row in shard.rows}


def pseudo_label_boxes(labels_dir: str, samples, grid: int, size: int, raw: bool = False) -> list[list]:
    """Per test sample, the box of its pseudo labels (denoised, or raw from the same maps)."""
    maps = labelled_maps(labels_dir)
    out = []
    for s in samples:
        box = None
        if s.id in maps:
            labels = raw_label_rule(maps[s.id]["grounding"]) if raw else maps[s.id]["labels"]
            box = label_box_pixels(labels, grid, s.image.width, s.image.height, size)
        out.append([box] if box is not None else [])
    return out


@torch.no_grad()
def evaluate(cfg: PipelineConfig, model, tokenizer) -> dict:
    samples = [make_sample(seed) for seed in split_seeds("test", cfg.test_count)]
    size = model.config.vision_config.image_size
    grid, _ = model_grid(model.config)
    accuracy, answers = {}, {}
    for name, views in (("base", "none"), ("random_crop", "random"), ("gt_crop", "gt")):
        answers[name] = answer_with_views(
            model, tokenizer, samples, views, cfg.eval_batch, cfg.seed, cfg.max_new_tokens
        )
        accuracy[name] = accuracy_by_kind(samples, answers[name])
    loc, rois = {}, {}
    # The RPN in the crop mode its folder records (bbox for this model), the same RPN in the
    # other mode, and the RPN trained on raw-attention labels.
    # Each folder is loaded once; the denoised RPN serves both modes.
    rpn, rpn_raw = (
        RegionProposalNetwork.load(cfg.path(name), model).to(cfg.device).eval() for name in ("rpn", "rpn_raw")
    )
    other = "mask" if rpn.config.roi_options.crop_mode == "bbox" else "bbox"
    runs = (
        ("sdrpn", rpn, None, "denoised labels"),
        (f"sdrpn_{other}", rpn, other, f"denoised labels, {other} crops"),
        ("sdrpn_raw_labels", rpn_raw, None, "raw labels"),
    )
    for name, run_rpn, mode, what in runs:
        result = sdrpn_answers(cfg, model, tokenizer, run_rpn, samples, mode)
        answers[name] = [a.text for a in result]
        rois[name] = [a.rois for a in result]
        accuracy[name] = accuracy_by_kind(samples, answers[name])
        loc[f"rpn ({what})"] = localisation([r.boxes for r in rois[name]], samples, grid)
    for raw in (False, True):
        boxes = pseudo_label_boxes(cfg.path("labels_test"), samples, grid, size, raw=raw)
        loc[f"pseudo labels ({'raw' if raw else 'denoised'})"] = localisation(boxes, samples, grid)
    return {"accuracy": accuracy, "localisation": loc, "samples": samples, "answers": answers, "rois": rois}


def run_pipeline(cfg: PipelineConfig, then: Callable[[dict], Any] | None = None) -> Any:
    """All stages; returns the evaluation (metrics, and per-sample answers and RoIs), or what
    ``then`` makes of it under the same lock (the report). One run at a time on an OUT folder."""
    os.makedirs(cfg.out, exist_ok=True)
    with exclusive_lock(cfg.path(".pipeline.lock")):
        # What a kill left half-written by this folder's own writers (the stages' folders
        # clean up their own when they start).
        for folder in (cfg.out, cfg.path("data"), cfg.path("data", "images")):
            remove_temporaries(folder)
        record_settings(cfg)
        result = _run_pipeline(cfg)
        return then(result) if then else result


def _run_pipeline(cfg: PipelineConfig) -> dict:
    from ..llava.loading import load_llava

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    model, tokenizer = load_llava(cfg.model, "fp32", cfg.device)
    splits = write_splits(cfg)
    make_labels(cfg, model, tokenizer, splits["train"], cfg.path("labels"))
    make_labels(cfg, model, tokenizer, splits["test"], cfg.path("labels_test"))
    raw_labels(cfg.path("labels"), cfg.path("labels_raw"))
    train_rpn(cfg, model, tokenizer, cfg.path("labels"), cfg.path("rpn"))
    train_rpn(cfg, model, tokenizer, cfg.path("labels_raw"), cfg.path("rpn_raw"))
    result = evaluate(cfg, model, tokenizer)
    result["label_summary"] = {name: LabelFolder(cfg.path(name)).summary() for name in ("labels", "labels_test")}
    result["config"] = asdict(cfg)
    probe = collect_head_maps(model, tokenizer, [make_sample(seed) for seed in split_seeds("val", 128)])
    preset = resolve_preset(None, model)
    result["base_model"] = {
        "layers": layer_localisation(probe),
        "grounding": selection_scores(probe, preset.grounding.pairs),
        "preset": preset.to_dict(),
    }
    result["model"] = model
    result["tokenizer"] = tokenizer
    return result
