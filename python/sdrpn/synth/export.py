"""Shipping a trained base model: what the demo and the pipeline need, small."""

from __future__ import annotations

import os
import shutil

import torch

from ..io_utils import read_json, write_json
from ..llava.loading import load_llava
from ..llava.presets import preset_from_dict
from .pipeline import PRESET_FILE


def export_base(model_dir: str, to: str, preset: dict) -> dict:
    """float16 weights and config (save_pretrained), tokenizer, train_base_config.json and
    history.jsonl of the run, and the preset of the layers SD-RPN reads; returns a summary."""
    preset_from_dict(preset)  # refuses a malformed preset before anything is written
    model, tokenizer = load_llava(model_dir, "fp32")
    tmp = to.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.to(torch.float16).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    for name in ("train_base_config.json", "history.jsonl"):
        if os.path.exists(os.path.join(model_dir, name)):
            shutil.copyfile(os.path.join(model_dir, name), os.path.join(tmp, name))
    write_json(os.path.join(tmp, PRESET_FILE), preset)
    shutil.rmtree(to, ignore_errors=True)
    os.replace(tmp, to)
    record = read_json(os.path.join(to, "train_base_config.json")) if os.path.exists(
        os.path.join(to, "train_base_config.json")) else {}
    size = sum(os.path.getsize(os.path.join(to, f)) for f in os.listdir(to))
    return {"to": to, "bytes": size, "steps_done": record.get("steps_done"), "preset": preset}
