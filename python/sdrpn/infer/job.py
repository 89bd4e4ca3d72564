"""`sdrpn infer`: one image and question, or a whole LLaVA-format file (JSONL out, resumable)."""

from __future__ import annotations

import glob
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass

from ..io_utils import exclusive_lock, file_sha256, read_json, remove_temporaries, write_json, write_jsonl
from ..llava.data import (
    QASample,
    SkipSample,
    check_image_folder,
    load_entries,
    open_image,
    parse_entry,
    skip_reasons,
)
from ..llava.loading import model_identity, same_model
from ..options import setting_changes
from ..prefetch import DEFAULT_WORKERS, prefetch
from ..progress import show_progress
from .pipeline import SDRPNAnswer, SDRPNLlava

log = logging.getLogger(__name__)


def answer_record(answer: SDRPNAnswer) -> dict:
    return {
        "answer": answer.text,
        "boxes": [list(b) for b in answer.rois.boxes],
        "grid_boxes": [list(b) for b in answer.rois.grid_boxes],
        "timings_s": {k: round(v, 5) for k, v in answer.timings.items()},
    }


def _finished_rows(out: str) -> list[dict]:
    """The rows already in `out`. A line that is not a JSON object with an id (a torn last
    line after a crash, or a damaged one) is dropped with a warning naming it; every other
    row is kept, and the file is rewritten without the bad lines."""
    if not os.path.exists(out):
        return []
    rows = []
    with open(out, errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            if not isinstance(row, dict) or "id" not in row:
                log.warning("%s line %d is not an answer row: dropped (it will be answered again)", out, number)
                continue
            rows.append(row)
    write_jsonl(out, rows)
    return rows


def _done_entries(entries: list, rows: list[dict]) -> set[int]:
    """The indices of the entries an earlier run answered: each row records its entry's
    index in the data file (whose content the run's settings pin). Rows written before
    the index was recorded are matched by id, an id with k rows marking its first k
    entries that parse."""
    done, by_id = set(), Counter()
    for row in rows:
        if "index" in row:
            done.add(row["index"])
        else:
            by_id[str(row["id"])] += 1
    for index, entry in enumerate(entries):
        if not by_id or index in done:
            continue
        try:
            sample_id = parse_entry(entry, index).id
        except SkipSample:
            continue
        if by_id[sample_id] > 0:
            by_id[sample_id] -= 1
            done.add(index)
    return done & set(range(len(entries)))


@dataclass
class InferFileConfig:
    data: str
    image_folder: str
    out: str
    batch_size: int = 8
    max_new_tokens: int = 128
    limit: int | None = None
    restart: bool = False  # answer everything again, whatever cfg.out holds
    workers: int = DEFAULT_WORKERS  # threads decoding images ahead of the model (0: none)


SETTINGS_SUFFIX = ".settings.json"
SUMMARY_SUFFIX = ".summary.json"


def run_settings(pipe: SDRPNLlava, cfg: InferFileConfig) -> dict:
    """What the answers in cfg.out depend on, as JSON reads it back: a resumed run must
    use the same, or its rows would mix answers of two configurations."""
    settings = {
        "data": os.path.realpath(cfg.data),
        "data_sha256": file_sha256(cfg.data),  # rows name their entries by index in it
        "image_folder": os.path.realpath(cfg.image_folder),
        "max_new_tokens": cfg.max_new_tokens,
        "model": model_identity(pipe.model),
        "dtype": str(pipe.dtype).replace("torch.", ""),
        "rpn": pipe.rpn.config.to_dict(),
        "rpn_weights": pipe.rpn.weights_digest(),  # two RPNs of one configuration
        "roi": pipe.roi.to_dict(),
        "prompt_template": pipe.template,
        "preprocessing": pipe.preprocessing,
    }
    return json.loads(json.dumps(settings))


def _start(pipe: SDRPNLlava, cfg: InferFileConfig) -> None:
    """Record this run's settings; refuse to continue answers made with others."""
    path = cfg.out + SETTINGS_SUFFIX
    settings = run_settings(pipe, cfg)
    if cfg.restart:
        for stale in (cfg.out, cfg.out + SUMMARY_SUFFIX):
            if os.path.exists(stale):
                os.remove(stale)
    elif os.path.exists(path) and os.path.exists(cfg.out) and os.path.getsize(cfg.out) > 0:
        recorded = read_json(path)
        if same_model(recorded.get("model"), settings["model"]):  # one model named by another path
            settings["model"] = recorded["model"]
        for key in ("rpn_weights", "data_sha256"):  # answers from before these were recorded
            recorded.setdefault(key, settings[key])
        diff = setting_changes(recorded, settings)
        if diff:
            raise ValueError(
                f"{cfg.out} holds answers made with other settings ({'; '.join(diff)}): rerun with "
                "the same settings, pass --restart to answer everything again, or pass another --out"
            )
    write_json(path, settings)


def answer_file(pipe: SDRPNLlava, cfg: InferFileConfig) -> dict:
    """Answer every entry of a LLaVA-format file; rows are appended to cfg.out as they are
    done, so a rerun continues where the last stopped. Bad samples are skipped and counted."""
    check_image_folder(cfg.image_folder)
    with exclusive_lock(cfg.out + ".lock"):
        folder, name = os.path.split(os.path.abspath(cfg.out))
        for suffix in ("", SUMMARY_SUFFIX, SETTINGS_SUFFIX):  # what a kill left half-written
            remove_temporaries(folder, glob.escape(name + suffix))
        _start(pipe, cfg)
        summary = _answer_file(pipe, cfg)
    if summary["skipped"] and not summary["answered"] and not summary["already_done"]:
        raise ValueError(
            f"no sample of {cfg.data} could be answered: all {summary['skipped']} were skipped "
            f"({skip_reasons(summary['skipped_by_reason'])}); check --image-folder"
        )
    return summary


def _answer_file(pipe: SDRPNLlava, cfg: InferFileConfig) -> dict:
    entries = load_entries(cfg.data)[: cfg.limit]
    done = _done_entries(entries, _finished_rows(cfg.out))
    skipped: dict[str, int] = {}
    answered = 0
    pending: list[tuple[QASample, object]] = []
    # Counted as samples are answered, not as their images load ahead of the model.
    progress = show_progress(total=len(entries), desc="infer", unit="sample")

    def flush(f) -> None:
        nonlocal answered
        if not pending:
            return
        results = pipe.generate([image for _, image in pending], [s.question for s, _ in pending], cfg.max_new_tokens)
        for (sample, _), result in zip(pending, results):
            row = {"id": sample.id, "index": sample.index, "question": sample.question, **answer_record(result)}
            f.write(json.dumps(row) + "\n")
        f.flush()
        answered += len(pending)
        progress.update(len(pending))
        pending.clear()

    def load(item: tuple[int, object]):
        sample = parse_entry(item[1], item[0])
        return sample, None if sample.index in done else open_image(cfg.image_folder, sample.image)

    loads = prefetch(load, enumerate(entries), cfg.workers, ahead=2 * cfg.batch_size)
    with open(cfg.out, "a") as f:
        for loaded in loads:
            try:
                sample, image = loaded.result()
            except SkipSample as skip:
                skipped[str(skip)] = skipped.get(str(skip), 0) + 1
                progress.update(1)
                continue
            if image is None:  # answered by an earlier run
                progress.update(1)
                continue
            pending.append((sample, image))
            if len(pending) == cfg.batch_size:
                flush(f)
        flush(f)
    progress.close()
    summary = {
        "answered": answered,
        "already_done": len(done),
        "skipped": sum(skipped.values()),
        "skipped_by_reason": skipped,
    }
    write_json(cfg.out + SUMMARY_SUFFIX, summary)
    return summary
