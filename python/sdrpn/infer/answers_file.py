"""The answers file of `sdrpn infer --data`: ANSWERS.jsonl, one JSON row per answered entry
with its `id` and its `index` in the data file, and what sits beside it:

- ANSWERS.jsonl.rankRRR.part: under torchrun, rank R's rows while the job runs (each rank
  appends to its own); the job's end merges them into ANSWERS.jsonl in the data's order;
- ANSWERS.jsonl.settings.json: what the answers depend on (infer/job.py checks a rerun on it);
- ANSWERS.jsonl.summary.json: the last run's counts;
- ANSWERS.jsonl.lock, ANSWERS.jsonl.rankRRR.part.lock: held by the job's writers."""

from __future__ import annotations

import glob
import json
import logging
import os
from collections import Counter

from ..distributed import RANK_NAME_GLOB, rank_name, rank_of
from ..io_utils import remove_temporaries, write_jsonl
from ..llava.data import SkipSample, parse_entry
from .pipeline import SDRPNAnswer

log = logging.getLogger(__name__)

SETTINGS_SUFFIX = ".settings.json"
SUMMARY_SUFFIX = ".summary.json"


def answer_record(answer: SDRPNAnswer) -> dict:
    return {
        "answer": answer.text,
        "boxes": [list(b) for b in answer.rois.boxes],
        "grid_boxes": [list(b) for b in answer.rois.grid_boxes],
        "timings_s": {k: round(v, 5) for k, v in answer.timings.items()},
    }


def part_path(out: str, rank: int) -> str:
    return f"{out}.{rank_name(rank)}.part"


def _parts_glob(out_name: str) -> str:
    """The rank files of the answers file named ``out_name``, whichever ranks wrote them."""
    return f"{glob.escape(out_name)}.{RANK_NAME_GLOB}.part"


def part_paths(out: str) -> list[str]:
    """The rank files in out's folder, whichever number of ranks wrote them."""
    prefix, suffix = len(os.path.basename(out)) + 1, len(".part")
    return sorted(p for p in glob.glob(_parts_glob(out)) if rank_of(os.path.basename(p)[prefix:-suffix]) is not None)


def ownerless_parts(out: str, world_size: int) -> list[str]:
    """The rank files that no rank of a job on ``world_size`` ranks writes (those of an
    earlier job on more ranks, or all of them for a single process): out's writer locks
    them, so that a rank of that job still running is refused, not merged under."""
    mine = {part_path(out, rank) for rank in range(world_size)} if world_size > 1 else set()
    return [path for path in part_paths(out) if path not in mine]


def writer_path(out: str, rank: int, world_size: int) -> str:
    """The file a rank appends its rows to: out itself for a single process."""
    return out if world_size == 1 else part_path(out, rank)


def remove_unfinished(out: str, path: str) -> None:
    """Delete what a kill left half-written of ``path`` (out or a rank's part), for its
    writer, holding its lock; out's writer also takes the settings and summary."""
    folder, name = os.path.split(os.path.abspath(path))
    names = [name] + ([name + SUMMARY_SUFFIX, name + SETTINGS_SUFFIX] if path == out else [])
    for each in names:
        remove_temporaries(folder, glob.escape(each))


def _is_row(row) -> bool:
    """A JSON object with an id and, where it has one (rows of older versions have none),
    an entry index that is a whole number >= 0."""
    if not isinstance(row, dict) or "id" not in row:
        return False
    index = row.get("index", 0)
    return isinstance(index, int) and not isinstance(index, bool) and index >= 0


def read_rows(path: str, rewrite: bool, warn: bool = True) -> list[dict]:
    """The rows in ``path``. A line that is not a JSON object with an id (a torn last line
    after a crash, or a damaged one) is dropped with a warning naming it (``warn``); every
    other row is kept. ``rewrite``: the file's writer rewrites it without the bad lines."""
    if not os.path.exists(path):
        return []
    rows = []
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:  # a byte that is no UTF-8, more digits than Python converts, nesting past its limit
                row = json.loads(line.decode("utf-8"))
            except (ValueError, RecursionError):
                row = None
            if not _is_row(row):
                if warn:
                    log.warning("%s line %d is not an answer row: dropped (it will be answered again)", path, number)
                continue
            rows.append(row)
    if rewrite:
        write_jsonl(path, rows)
    return rows


def finished_rows(out: str, own: str) -> list[dict]:
    """Every row answered so far, in out and in the rank files a run on any number of ranks
    left; the calling writer's own file is rewritten without its bad lines (the others'
    writers do theirs)."""
    return [row for path in dict.fromkeys([out, *part_paths(out), own]) for row in read_rows(path, path == own)]


def done_entries(entries: list, rows: list[dict]) -> set[int]:
    """The indices of the entries an earlier run answered: each row records its entry's
    index in the data file (whose content the run's settings pin). Rows written before
    the index was recorded are matched by id, an id with k rows marking its first k
    entries that parse."""
    done, by_id = set(), Counter()
    for row in rows:
        if "index" not in row:
            by_id[str(row["id"])] += 1
        elif _entry_id(entries, row["index"]) == str(row["id"]):
            done.add(row["index"])
        else:  # an edited row: the entry at its index is another (merge_rows keeps the later answer)
            log.warning("answer row %r for entry %d does not match that entry: it will be answered again",
                        row["id"], row["index"])  # fmt: skip
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


def _entry_id(entries: list, index: int) -> str | None:
    """The id of entry ``index`` as a row records it; None where there is no such entry or
    it does not parse."""
    if index >= len(entries):
        return None
    try:
        return parse_entry(entries[index], index).id
    except SkipSample:
        return None


def merge_rows(out: str) -> None:
    """Fold the rank files into out, one row per entry, in the data's order (rows of older
    versions, without an index, first as they stood), then remove the rank files; out alone
    is put in order too (a rerun appends the entries an earlier one skipped). For out's
    writer, once no rank appends: a kill between the two steps leaves rows that the next
    merge takes once. Of two rows of one entry the later is kept: a row that did not match
    its entry (done_entries) was answered again after it."""
    parts = part_paths(out)
    found = [row for path in [out, *parts] for row in read_rows(path, rewrite=False)]
    legacy = [row for row in found if "index" not in row]
    latest = {row["index"]: row for row in found if "index" in row}
    rows = legacy + sorted(latest.values(), key=lambda row: row["index"])  # the legacy rows as they stood
    if parts or rows != found:
        write_jsonl(out, rows)
    for path in parts:
        os.remove(path)
    folder, name = os.path.split(os.path.abspath(out))
    remove_temporaries(folder, _parts_glob(name))  # ranks that are gone
