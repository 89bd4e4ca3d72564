"""`sdrpn infer`: one image and question, or a whole LLaVA-format file (JSONL out, resumable)."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

from tqdm import tqdm

from ..io_utils import write_json, write_jsonl
from ..llava.data import SkipSample, load_entries, parse_entry, resolve_image
from ..llava.inputs import load_rgb
from .pipeline import SDRPNAnswer, SDRPNLlava

log = logging.getLogger(__name__)


def answer_record(answer: SDRPNAnswer) -> dict:
    return {
        "answer": answer.text,
        "boxes": [list(b) for b in answer.rois.boxes],
        "grid_boxes": [list(b) for b in answer.rois.grid_boxes],
        "timings_s": {k: round(v, 5) for k, v in answer.timings.items()},
    }


def _finished_ids(out: str) -> set[str]:
    """Ids already answered in `out`; a torn last line (a crash mid-write) is dropped."""
    if not os.path.exists(out):
        return set()
    rows = []
    with open(out) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("dropping a torn line at the end of %s", out)
                break
    write_jsonl(out, rows)
    return {str(r["id"]) for r in rows}


@dataclass
class InferFileConfig:
    data: str
    image_folder: str
    out: str
    batch_size: int = 8
    max_new_tokens: int = 128
    limit: int | None = None


def answer_file(pipe: SDRPNLlava, cfg: InferFileConfig) -> dict:
    """Answer every entry of a LLaVA-format file; rows are appended to cfg.out as they are
    done, so a rerun continues where the last stopped. Bad samples are skipped and counted."""
    entries = load_entries(cfg.data)[: cfg.limit]
    done = _finished_ids(cfg.out)
    skipped: dict[str, int] = {}
    answered = 0
    pending: list[tuple[str, object, str]] = []

    def flush(f) -> None:
        nonlocal answered
        if not pending:
            return
        results = pipe.generate([p[1] for p in pending], [p[2] for p in pending], cfg.max_new_tokens)
        for (sample_id, _, question), result in zip(pending, results):
            f.write(json.dumps({"id": sample_id, "question": question, **answer_record(result)}) + "\n")
        f.flush()
        answered += len(pending)
        pending.clear()

    with open(cfg.out, "a") as f:
        for index, entry in enumerate(tqdm(entries, desc="infer", unit="sample", disable=None)):
            try:
                sample = parse_entry(entry, index)
                if sample.id in done:
                    continue
                image = load_rgb(resolve_image(cfg.image_folder, sample.image))
            except SkipSample as skip:
                skipped[str(skip)] = skipped.get(str(skip), 0) + 1
                continue
            except OSError:
                skipped["image unreadable"] = skipped.get("image unreadable", 0) + 1
                continue
            pending.append((sample.id, image, sample.question))
            if len(pending) == cfg.batch_size:
                flush(f)
        flush(f)
    summary = {
        "answered": answered,
        "already_done": len(done),
        "skipped": sum(skipped.values()),
        "skipped_by_reason": skipped,
    }
    write_json(cfg.out + ".summary.json", summary)
    return summary
