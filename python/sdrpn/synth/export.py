"""Shipping a trained base model: what the demo and the pipeline need, small."""

from __future__ import annotations

import os
import shutil
import tempfile

import torch

from ..io_utils import current_umask, read_json, read_jsonl, write_json
from ..llava.loading import load_llava
from ..llava.presets import PRESET_FILE, preset_from_dict
from .train_base import TRAIN_RECORD

HISTORY_SUMMARY = "history_summary.json"
# RoI options for the synthetic model's 8x8 grid, recorded in its preset: a one-cell RoI is
# the target here, so singletons stay and nothing is grown (SPEC's rules drop singletons and
# grow boxes to 3x3 cells, sized for LLaVA's 24x24 grid); bbox crops, the mode its reported
# results were measured in.
GRID8_ROI = {
    "threshold": 0.3,
    "sigma": 0.5,
    "min_area": 1,
    "max_area": 16,
    "max_boxes": 2,
    "drop_singletons": False,
    "crop_mode": "bbox",
}


def summarise_history(rows: list[dict], every: int = 250) -> dict:
    """A training history kept small enough to ship: every `every`-th logged step and the last."""
    kept = [r for r in rows if r["step"] % every == 0]
    if rows and (not kept or kept[-1] is not rows[-1]):
        kept.append(rows[-1])
    return {"steps_logged": len(rows), "every": every, "rows": kept}


def check_export_target(to: str, model_dir: str) -> None:
    """``to`` may be replaced only where it holds nothing, or an earlier export (a flat
    folder with its preset file), and is neither the model's folder nor one above it or
    the working folder: the export replaces the folder whole."""
    target, model = os.path.realpath(to), os.path.realpath(model_dir)
    if not os.path.lexists(to):
        return
    if os.path.islink(to):
        raise ValueError(f"--to {to} is a link: give the folder itself, or a new one")
    if not os.path.isdir(to):
        raise ValueError(f"--to {to} is a file: it must be a folder, or not exist")
    for inside, name in ((model, "--model's folder"), (os.getcwd(), "the working folder")):
        if inside == target or inside.startswith(target + os.sep):
            raise ValueError(f"--to {to} is {name} or holds it: choose a folder of its own")
    entries = os.listdir(to)
    # What an export of a train-base model holds (a user's model folder may carry a preset).
    marks = {PRESET_FILE, TRAIN_RECORD} <= set(entries)
    earlier_export = marks and not any(os.path.isdir(os.path.join(to, e)) for e in entries)
    if entries and not earlier_export:
        raise ValueError(f"--to {to} holds other files than an earlier export: choose an empty or new folder")


def export_base(model_dir: str, to: str, preset: dict) -> dict:
    """float16 weights and config (save_pretrained), tokenizer, train_base_config.json and a
    summary of the run's history, and the model's preset; returns a summary."""
    check_export_target(to, model_dir)
    parsed = preset_from_dict(preset)  # refuses a malformed preset before anything is written
    model, tokenizer = load_llava(model_dir, "fp32")
    parsed.check_fits(model.config)  # layers and heads the model has
    # A folder of its own beside --to, never one of the user's: a kill leaves it hidden there.
    parent = os.path.dirname(os.path.abspath(to))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".tmp-{os.path.basename(os.path.abspath(to))}.")
    try:
        model.to(torch.float16).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if os.path.exists(os.path.join(model_dir, TRAIN_RECORD)):
            shutil.copyfile(os.path.join(model_dir, TRAIN_RECORD), os.path.join(tmp, TRAIN_RECORD))
        if os.path.exists(os.path.join(model_dir, "history.jsonl")):
            history = summarise_history(read_jsonl(os.path.join(model_dir, "history.jsonl")))
            write_json(os.path.join(tmp, HISTORY_SUMMARY), history)
        write_json(os.path.join(tmp, PRESET_FILE), preset)
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp's 0700: the mode a new folder gets
        shutil.rmtree(to, ignore_errors=True)
        os.replace(tmp, to)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    record = read_json(os.path.join(to, TRAIN_RECORD)) if os.path.exists(os.path.join(to, TRAIN_RECORD)) else {}
    size = sum(os.path.getsize(os.path.join(to, f)) for f in os.listdir(to))
    return {"to": to, "bytes": size, "steps_done": record.get("steps_done"), "preset": preset}
