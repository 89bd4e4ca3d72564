"""`sdrpn infer --data`: a whole LLaVA-format file answered into JSONL (infer/answers_file.py),
resumable, on one process or on the ranks of torchrun, each answering every world_size-th entry."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass

from PIL import Image

from ..distributed import barrier, check_initialized, check_rank, gather_objects, together
from ..io_utils import exclusive_lock, file_sha256, read_json, write_json
from ..llava.data import (
    FOLDER_REASONS,
    PAST_CONTEXT,
    QASample,
    SkipSample,
    check_image_folder,
    image_folder_problem,
    load_entries,
    open_image,
    parse_entry,
    skip_reasons,
)
from ..llava.model_facts import model_identity, same_model
from ..options import changes_and_moves, require_at_least
from ..prefetch import DEFAULT_WORKERS, prefetch
from ..progress import show_progress
from .answers_file import (
    SETTINGS_SUFFIX,
    SUMMARY_SUFFIX,
    answer_record,
    done_entries,
    finished_rows,
    merge_rows,
    ownerless_parts,
    part_paths,
    read_rows,
    remove_unfinished,
    writer_path,
)
from .pipeline import SDRPNLlava

log = logging.getLogger(__name__)


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
    rank: int = 0  # this process's rank of world_size (torchrun's); it answers entries i % world_size == rank
    world_size: int = 1

    def __post_init__(self):
        require_at_least(1, self, "batch_size", "max_new_tokens")
        require_at_least(1, self, "limit", optional=True)
        require_at_least(0, self, "workers")
        check_rank(self.rank, self.world_size)


def run_settings(pipe: SDRPNLlava, cfg: InferFileConfig) -> dict:
    """What the answers in cfg.out depend on, as JSON reads it back: a resumed run must
    use the same, or its rows would mix answers of two configurations. The number of ranks
    is not among them: each entry's answer is its own."""
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


def _answers_so_far(out: str) -> list[str]:
    return [p for p in [out, *part_paths(out)] if os.path.exists(p) and os.path.getsize(p) > 0]


def _rows(out: str) -> list[dict]:
    """The answers so far, read without a word about bad lines (the job's own read warns)."""
    return [row for path in [out, *part_paths(out)] for row in read_rows(path, rewrite=False, warn=False)]


def _start(pipe: SDRPNLlava, cfg: InferFileConfig) -> None:
    """Refuse to continue answers made with other settings (on every rank, so that all
    stop alike); rank 0 records this run's, and with --restart removes the old answers."""
    path = cfg.out + SETTINGS_SUFFIX
    settings = run_settings(pipe, cfg)
    if not cfg.restart and _answers_so_far(cfg.out):
        if not os.path.exists(path):  # answers whose settings are unknown: they may not be taken as this run's
            raise ValueError(
                f"{cfg.out} holds answers but not their settings ({path} is missing): pass --restart to answer "
                "everything again, or pass another --out"
            )
        recorded = read_json(path)
        if not isinstance(recorded, dict):
            raise ValueError(f"{path} must hold a JSON object of settings: pass --restart to answer everything again")
        if same_model(recorded.get("model"), settings["model"]):  # one model named by another path
            settings["model"] = recorded["model"]
        # Where a file lies is not what it holds: the data file is compared by its content
        # where that is recorded, the image folder by the images the answers record.
        recorded.setdefault("rpn_weights", settings["rpn_weights"])  # answers from before it was recorded
        diff, moved = changes_and_moves(recorded, settings, ("image_folder",), {"data": "data_sha256"})
        if diff:
            raise ValueError(
                f"{cfg.out} holds answers made with other settings ({'; '.join(diff)}): rerun with "
                "the same settings, pass --restart to answer everything again, or pass another --out"
            )
        images = recorded.get("image_folder")
        if images != settings["image_folder"] and (problem := image_folder_problem(cfg.image_folder, _rows(cfg.out))):
            raise ValueError(
                f"{cfg.out} holds answers about the images in {images}, and --image-folder {cfg.image_folder} is "
                f"not shown to hold them ({problem}): pass the folder they are in, --restart to answer "
                "everything again, or another --out"
            )
        if moved:
            log.info("resuming %s with files elsewhere than when it began: %s", cfg.out, "; ".join(moved))
    if cfg.rank != 0:
        return
    if cfg.restart:
        for stale in [cfg.out, cfg.out + SUMMARY_SUFFIX, *part_paths(cfg.out)]:
            if os.path.exists(stale):
                os.remove(stale)
    write_json(path, settings)


def answer_file(pipe: SDRPNLlava, cfg: InferFileConfig) -> dict:
    """Answer every entry of a LLaVA-format file (this rank's share of it); rows are appended
    as they are done, so a rerun, on any number of ranks, continues where the last stopped.
    Bad samples are skipped and counted. Returns the counts summed over the ranks."""
    check_image_folder(cfg.image_folder)
    check_initialized(cfg.world_size)
    pipe.checked_max_new_tokens(cfg.max_new_tokens)  # refused before anything is written
    own = writer_path(cfg.out, cfg.rank, cfg.world_size)
    with contextlib.ExitStack() as held:
        # Past it, the settings are recorded and, with --restart, the old answers gone.
        with together(cfg.world_size, pipe.device):
            # Rank 0 writes out (its settings, summary, the merged rows, and so the rank files
            # no rank of this job owns); every rank its own rows.
            if cfg.rank == 0:
                for path in ownerless_parts(cfg.out, cfg.world_size):
                    held.enter_context(exclusive_lock(path + ".lock"))
            for path in dict.fromkeys([cfg.out] * (cfg.rank == 0) + [own]):
                held.enter_context(exclusive_lock(path + ".lock"))
                remove_unfinished(cfg.out, path)
            _start(pipe, cfg)
        summary = _answer_file(pipe, cfg, own)
        summary = _summed(gather_objects(summary, cfg.world_size, pipe.device))  # every rank is done
        if cfg.rank == 0:
            merge_rows(cfg.out)
            write_json(cfg.out + SUMMARY_SUFFIX, summary)
    if summary["skipped"] and not summary["answered"] and not summary["already_done"]:
        # A wrong folder is the usual cause where images were not found there; a reason of
        # another kind (prompts past the context, entries the data file got wrong) says what
        # to change itself.
        wrong_folder = not FOLDER_REASONS.isdisjoint(summary["skipped_by_reason"])
        raise ValueError(
            f"no sample of {cfg.data} could be answered: all {summary['skipped']} were skipped "
            f"({skip_reasons(summary['skipped_by_reason'])})" + ("; check --image-folder" if wrong_folder else "")
        )
    return summary


def _summed(summaries: list[dict]) -> dict:
    skipped = sum((Counter(s["skipped_by_reason"]) for s in summaries), Counter())
    return {
        "answered": sum(s["answered"] for s in summaries),
        "already_done": sum(s["already_done"] for s in summaries),
        "skipped": sum(skipped.values()),
        "skipped_by_reason": dict(skipped),
    }


def _answer_file(pipe: SDRPNLlava, cfg: InferFileConfig, own: str) -> dict:
    entries = load_entries(cfg.data)[: cfg.limit]
    mine = range(cfg.rank, len(entries), cfg.world_size)
    done = done_entries(entries, finished_rows(cfg.out, own)) & set(mine)
    barrier(cfg.world_size)  # every rank has read the others' rows before any appends to its own
    skipped: Counter = Counter()
    answered = 0
    pending: list[tuple[QASample, Image.Image]] = []
    # Counted as samples are answered, not as their images load ahead of the model; an earlier
    # run's rows start the count, so the rate and the time left are this run's own.
    desc = "infer" if cfg.world_size == 1 else f"infer rank {cfg.rank}"
    progress = show_progress(total=len(mine), initial=len(done), desc=desc, unit="sample")

    def flush(f) -> None:
        nonlocal answered
        if not pending:
            return
        results = pipe.generate([image for _, image in pending], [s.question for s, _ in pending], cfg.max_new_tokens)
        for (sample, image), result in zip(pending, results):
            row = {"id": sample.id, "index": sample.index, "question": sample.question, **answer_record(result)}
            row.update(image=sample.image, image_size=list(image.size))  # what a moved folder is checked by
            f.write(json.dumps(row) + "\n")
        f.flush()
        answered += len(pending)
        progress.update(len(pending))
        pending.clear()

    def load(index: int):
        sample = parse_entry(entries[index], index)
        if index in done:
            return sample, None
        return sample, open_image(cfg.image_folder, sample.image, pipe.size, pipe.preprocessing)

    loads = prefetch(load, mine, cfg.workers, ahead=2 * cfg.batch_size)
    with open(own, "a") as f:
        for loaded in loads:
            try:
                sample, image = loaded.result()
            except SkipSample as skip:
                skipped[str(skip)] += 1
                progress.update(1)
                continue
            if image is None:  # answered by an earlier run: counted from the start
                continue
            if pipe.prompt_too_long(sample.question):  # tokenized here: the tokenizer is not shared across threads
                skipped[PAST_CONTEXT] += 1
                progress.update(1)
                continue
            pending.append((sample, image))
            if len(pending) == cfg.batch_size:
                flush(f)
        flush(f)
    progress.close()
    return {"answered": answered, "already_done": len(done), "skipped": sum(skipped.values()),
            "skipped_by_reason": dict(skipped)}  # fmt: skip
