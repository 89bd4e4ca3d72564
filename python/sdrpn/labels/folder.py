"""The label folder: Stage 1's output and Stage 2's input. This module alone names, writes
and reads its files.

  label_config.json              every setting the labels were made with (LabelFolderConfig)
  rank{R}-shard{K}.safetensors   grounding, sink (float32 (n, N)), labels (int8 (n, N)),
                                 grid (int64 (n, 2))
  rank{R}-shard{K}.jsonl         one line per labelled sample: id, index, image, question,
                                 answer, answer_source, image_size, preprocessing, shard,
                                 row, fg/bg/ignore counts
  rank{R}-shard{K}.skipped.jsonl samples skipped in that shard's span: data index, id and
                                 image where known (older folders: index only), reason
  rank{R}-shard{K}.done.json     written last: the shard is complete; data indices covered,
                                 counts, the number of ranks of the job that wrote it
  summary.json                   counts over every complete shard

Every file is written atomically; a shard counts only once its done marker exists. Folders
written before label_config.json recorded every setting (format 1) still read: the
settings they lack take the reference defaults.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from ..distributed import rank_name, rank_of
from ..io_utils import read_json, read_json_as, read_jsonl, remove_temporaries, write_atomic, write_json, write_jsonl
from ..llava.data import image_folder_problem, skip_reasons
from ..llava.inputs import PREPROCESSING_MODES, PROMPT_TEMPLATE, is_text
from ..llava.model_facts import check_model_identity, same_model
from ..llava.presets import PRESETS
from ..ops import IGNORE_INDEX, SINK_THRESHOLD
from ..options import changes_and_moves, check_field_types
from .options import LabelOptions

log = logging.getLogger(__name__)

CONFIG_NAME = "label_config.json"
SUMMARY_NAME = "summary.json"
FORMAT_VERSION = 2
TENSOR_NAMES = ("grounding", "sink", "labels", "grid")


MARKER_SUFFIX = ".done.json"  # a shard's done marker: written last, it completes the shard


def shard_name(rank: int, shard: int) -> str:
    return f"{rank_name(rank)}-shard{shard:05d}"


def _marked_shard(marker_path: str) -> str:
    """The name of the shard a done marker completes."""
    return os.path.basename(marker_path)[: -len(MARKER_SUFFIX)]


def shard_rank(name: str) -> int | None:
    """The rank that writes the shard ``name`` (None: not a shard's name)."""
    rank, _, shard = name.partition("-shard")
    return rank_of(rank) if shard.isdigit() else None


@dataclass
class LabelFolderConfig:
    """What a label folder records: enough to rebuild every sample's input exactly as it
    was labelled, and to draw or judge the labels with the thresholds that made them."""

    options: LabelOptions  # resolved: sink threshold and template filled in
    preset: dict | None = None  # the whole preset (None: imported labels)
    model: dict | None = None  # llava.model_facts.model_identity of the base model
    dtype: str | None = None  # the model's dtype while labelling
    data: str | None = None  # the data file, its real path (links resolved)
    data_sha256: str | None = None  # its content: samples resume by index, so it may not change
    world_size: int | None = None  # ranks: each resumes its own share (index % world_size), so it may not change
    image_folder: str | None = None  # its real path (links resolved)
    image_size: int | None = None  # the encoder's input side
    grid: list[int] | None = None  # [grid_h, grid_w]
    image_token_id: int | None = None
    format_version: int = FORMAT_VERSION

    @property
    def sink_threshold(self) -> float:
        return self.options.sink_threshold if self.options.sink_threshold is not None else SINK_THRESHOLD

    @property
    def prompt_template(self) -> str:
        return self.options.prompt_template or PROMPT_TEMPLATE

    def to_dict(self) -> dict:
        return {
            "format_version": self.format_version,
            "options": self.options.to_dict(),
            "preset": self.preset,
            "model": self.model,
            "dtype": self.dtype,
            "data": self.data,
            "data_sha256": self.data_sha256,
            "world_size": self.world_size,
            "image_folder": self.image_folder,
            "image_size": self.image_size,
            "grid": self.grid,
            "image_token_id": self.image_token_id,
        }

    def __post_init__(self):
        check_field_types(self)
        if self.model is not None:
            check_model_identity(self.model, "model")
        if self.grid is not None and (len(self.grid) != 2 or min(self.grid) < 1):
            raise ValueError(f"grid must be [grid_h, grid_w] of positive ints, got {self.grid!r}")

    @classmethod
    def from_dict(cls, raw: dict) -> LabelFolderConfig:
        if not isinstance(raw, dict):
            raise ValueError(f"must hold a JSON object, got {type(raw).__name__}")
        version = raw.get("format_version", 1)
        if type(version) is not int:
            raise ValueError(f"format_version must be an int, got {version!r}")
        if version >= 2:
            if not isinstance(raw.get("options"), dict):
                raise ValueError(f"options must be a JSON object, got {raw.get('options')!r}")
            return cls(
                options=LabelOptions.from_dict(raw["options"]),
                **{
                    k: raw.get(k)
                    for k in (
                        "preset",
                        "model",
                        "dtype",
                        "data",
                        "data_sha256",
                        "world_size",
                        "image_folder",
                        "image_size",
                        "grid",
                        "image_token_id",
                    )
                },
                format_version=raw["format_version"],
            )
        # Format 1: flat keys, the preset by name, thresholds implied by the reference defaults.
        preset = PRESETS.get(raw.get("preset")) if isinstance(raw.get("preset"), str) else None
        sink = preset.sink_threshold if preset else SINK_THRESHOLD
        options = LabelOptions(
            answers=raw.get("answers", "self"), sink_threshold=sink, prompt_template=raw.get("prompt_template")
        )
        model = {"name": raw["model"], "config_fingerprint": None} if raw.get("model") else None
        return cls(
            options=options,
            preset=preset.to_dict() if preset else None,
            model=model,
            image_folder=raw.get("image_folder"),
            image_size=raw.get("image_size"),
            grid=raw.get("grid"),
            image_token_id=raw.get("image_token_id"),
            format_version=1,
        )

    # Where the inputs lay: not what the labels are (the data's content has its digest).
    PATHS = ("data", "image_folder")
    # Recorded since a later version: a folder from before holds None, and is not checked on them.
    LATER_RECORDED = ("data_sha256", "world_size")

    def without_paths(self, earlier: dict | None = None) -> dict:
        """The recorded settings but the inputs' paths: what a job using the labels compares,
        so that a label folder whose inputs moved, and was resumed there, is still the same.
        ``earlier``: such a record of the folder from before; what it holds as None of the
        later recorded settings is None here too, as a label job resuming it does not check
        them (and fills them in)."""
        values = {k: v for k, v in self.to_dict().items() if k not in self.PATHS}
        for name in self.LATER_RECORDED:
            if isinstance(earlier, dict) and name in earlier and earlier[name] is None:
                values[name] = None
        return values

    def differences(self, other: LabelFolderConfig) -> tuple[list[str], list[str]]:
        """The recorded settings that differ in ``other``, and the paths that moved, each as
        "name: this -> other". The data file is compared by its content where that is
        recorded, the image folder not here (``LabelFolder.check_images_in`` looks at its
        images): a job moved elsewhere resumes."""
        return changes_and_moves(self.to_dict(), other.to_dict(), ("image_folder",), {"data": "data_sha256"})


@dataclass
class Shard:
    """One complete shard as read: its valid rows and their tensors."""

    name: str
    rows: list[dict]
    tensors: dict[str, Tensor]

    def row_tensors(self, row: dict) -> dict[str, Tensor]:
        return {k: v[row["row"]] for k, v in self.tensors.items()}


class LabelFolder:
    """A label folder on disk (see the module docstring)."""

    def __init__(self, path: str):
        self.path = str(path)

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def lock_path(self, rank: int) -> str:
        """The lock a writer of ``rank``'s shards holds (rank 0's also covers the config and
        summary): the label job's, and convert-labels' (rank 0)."""
        return self.file(f".{rank_name(rank)}.lock")

    # ---- config ---------------------------------------------------------------------------
    def read_config(self) -> LabelFolderConfig | None:
        path = self.file(CONFIG_NAME)
        return read_json_as(path, LabelFolderConfig.from_dict) if os.path.exists(path) else None

    @property
    def config(self) -> LabelFolderConfig:
        """The recorded config; a folder of complete shards without one (convert-labels
        wrote none before format 2) reads with SPEC's defaults."""
        config = self.read_config()
        if config is None:
            if not os.path.isdir(self.path):
                problem = "is a file" if os.path.exists(self.path) else "does not exist"
                raise ValueError(f"{self.path} is not a label folder: it {problem}")
            if not self.complete_shards():
                raise ValueError(f"{self.path} is not a label folder: it has no {CONFIG_NAME} and no shards")
            config = LabelFolderConfig.from_dict({})
        return config

    def write_config(self, config: LabelFolderConfig) -> None:
        write_json(self.file(CONFIG_NAME), config.to_dict())

    def start(self, config: LabelFolderConfig, record: bool = True) -> None:
        """Check that a resumed job uses the config recorded, and (``record``: the job's
        one writer of it, rank 0) record this job's."""
        old = self.read_config()
        if old is not None and same_model(old.model, config.model):
            config = replace(config, model=old.model)  # one model named by another path: keep the record
        if old is not None and self.done_markers():
            # Folders labelled before these were recorded are not checked on them.
            unrecorded = {name: None for name in old.LATER_RECORDED if getattr(old, name) is None}
            diff, moved = old.differences(replace(config, **unrecorded))
            if diff:
                raise ValueError(
                    f"{self.path} holds labels made with other settings ({'; '.join(diff)}): "
                    f"resume with the same settings, or pass another --out"
                )
            if old.image_folder != config.image_folder:
                if config.image_folder is None:
                    raise ValueError(
                        f"{self.path} holds labels made from the images in {old.image_folder}: "
                        f"config.image_folder must name the folder they are in, got None"
                    )
                self.check_images_in(old.image_folder, config.image_folder)
            if moved:
                log.info("resuming %s with files elsewhere than when it began: %s", self.path, "; ".join(moved))
        self.check_shard_ranks(config.world_size)
        if record:
            self.write_config(config)
            # The folder is being written again (a rerun may go further, with a larger --limit):
            # it counts as finished once this job writes its summary.
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.file(SUMMARY_NAME))

    def check_images_in(self, recorded: str | None, image_folder: str, shards_read: int = 16) -> None:
        """Refuse an image folder not shown to be the one the labels were made from (in
        ``recorded``, as the folder records it): the rows of up to ``shards_read`` complete
        shards, spread over them, give the images to look for (``image_folder_problem``)."""
        names = self.complete_shards()
        count = min(shards_read, len(names))
        picked = [names[i * len(names) // count] for i in range(count)]
        rows = [row for name in picked for row in read_jsonl(self.file(name + ".jsonl"))]
        if problem := image_folder_problem(image_folder, rows):
            made_from = recorded or "a folder it does not record"
            raise ValueError(
                f"{self.path} holds labels made from the images in {made_from}, and --image-folder {image_folder} "
                f"is not shown to hold them ({problem}): pass the folder they are in, or another --out"
            )

    # ---- shards ---------------------------------------------------------------------------
    def remove_unfinished(self, rank: int) -> None:
        """Delete the temporary files that a kill left of ``rank``'s shards, and for rank 0,
        the config's and summary's writer, of those; for that rank's job, holding its lock
        (other ranks may be writing theirs)."""
        remove_temporaries(self.path, rank_name(rank) + "-shard*")
        if rank == 0:
            for name in (CONFIG_NAME, SUMMARY_NAME):
                remove_temporaries(self.path, name)

    def check_shard_ranks(self, world_size: int | None) -> None:
        """Refuse complete shards that no rank of a job on ``world_size`` ranks writes: a
        higher rank's, or one whose marker records another number of ranks. Resumed on
        other ranks, the job would label their samples again. The recorded settings catch
        most such folders; this catches the shards of a second job on another number of
        ranks started at once on the same empty folder (neither finds shards to check)."""
        if world_size is None:  # imported labels: one writer, no ranks
            return
        strays = []
        for path in self._marker_paths():
            name = _marked_shard(path)
            rank = shard_rank(name)
            if rank is None:
                continue
            if rank >= world_size or _read_marker(path).get("world_size", world_size) != world_size:
                strays.append(name)
        if strays:
            raise ValueError(
                f"{self.path} holds shards of a job on another number of ranks than {world_size} "
                f"({', '.join(strays[:3])}{', ...' if len(strays) > 3 else ''}): resume on the number of ranks "
                f"label_config.json records, or delete {self.path} to start over"
            )

    def _marker_paths(self, rank: int | None = None) -> list[str]:
        """The done markers of the complete shards (``rank``'s alone), in name order."""
        pattern = "rank*-shard*" if rank is None else rank_name(rank) + "-shard*"
        return sorted(glob.glob(self.file(pattern + MARKER_SUFFIX)))

    def done_markers(self, rank: int | None = None) -> list[dict]:
        return [_read_marker(path) for path in self._marker_paths(rank)]

    def complete_shards(self) -> list[str]:
        """Names of the shards whose done marker exists, in order."""
        return [_marked_shard(p) for p in self._marker_paths()]

    def write_shard(
        self,
        name: str,
        rows: list[dict],
        tensors: dict[str, Tensor],
        skipped: list[dict],
        first_index: int | None,
        last_index: int,
        shard: int,
        world_size: int = 1,
    ) -> dict:
        """Write one shard, its done marker last; returns the marker. ``world_size``: the
        number of ranks of the job writing it."""
        for i, row in enumerate(rows):
            row["shard"], row["row"] = name + ".safetensors", i
        base = self.file(name)
        if rows:
            tensors = {k: tensors[k].contiguous() for k in TENSOR_NAMES}
            write_atomic(base + ".safetensors", lambda tmp: save_file(tensors, tmp))
        elif os.path.exists(base + ".safetensors"):
            # A run killed before this shard's marker left its tensors; this one labelled
            # nothing in the span (a smaller --limit, an image gone since), so they must go.
            os.remove(base + ".safetensors")
        write_jsonl(base + ".jsonl", rows)
        write_jsonl(base + ".skipped.jsonl", skipped)
        marker = {
            "shard": shard,
            "first_index": first_index,
            "last_index": last_index,
            "labelled": len(rows),
            "all_ignore": sum(1 for r in rows if r["fg"] == 0 and r["bg"] == 0),
            "skipped": dict(Counter(s["reason"] for s in skipped)),
            "world_size": world_size,
        }
        write_json(base + MARKER_SUFFIX, marker)
        return marker

    def skipped(self, name: str) -> list[dict]:
        """The samples skipped in a shard's span, with their reasons."""
        return read_jsonl(self.file(name + ".skipped.jsonl"))

    def read_shard(self, name: str) -> Shard:
        """A complete shard with its rows checked against its tensors; rows that do not fit
        are left out and counted by reason. A shard whose tensors are unusable raises."""
        base = self.file(name)
        rows = read_jsonl(base + ".jsonl")
        if not rows:
            return Shard(name, [], {})
        try:
            tensors = load_file(base + ".safetensors")
        except (OSError, SafetensorError) as err:
            raise ValueError(f"shard {base}.safetensors cannot be read: {err}") from None
        n = _check_shard_tensors(base, tensors)
        labels = tensors["labels"]
        row_ok = ((labels == 0) | (labels == 1) | (labels == IGNORE_INDEX)).all(1)
        kept, bad = [], Counter()
        image_size = self.config.image_size
        for row in rows:
            index = row.get("row") if isinstance(row, dict) else None
            if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < n:
                bad["row index out of range"] += 1
            elif _malformed(row, image_size):
                bad["malformed row"] += 1
            elif not bool(row_ok[index]):
                bad["label values other than 0, 1 and ignore"] += 1
            else:
                kept.append(row)
        if bad:
            log.warning("%s: left out %s", base, dict(bad))
        return Shard(name, kept, tensors)

    def shards(self) -> Iterator[Shard]:
        for name in self.complete_shards():
            yield self.read_shard(name)

    # ---- summary --------------------------------------------------------------------------
    def finished(self) -> bool:
        """Whether the job that writes the folder has finished: sdrpn label and convert-labels
        record their settings first and the summary once every rank is done (a LabelJob's
        caller writes it). A folder without recorded settings (convert-labels before format
        2) holds complete shards alone."""
        return os.path.isfile(self.file(SUMMARY_NAME)) or not os.path.isfile(self.file(CONFIG_NAME))

    def summary(self) -> dict:
        """Counts over every rank's complete shards."""
        return summarize(self.done_markers())

    def write_summary(self) -> dict:
        """The summary, also written to summary.json. A folder whose complete shards label
        nothing but skip samples raises ValueError once the summary is written: its settings
        (most often --image-folder) fit none of the data. The whole folder's counts decide,
        so a rerun that finds nothing new to label in a complete folder still passes, and
        under torchrun this is called once every rank is done."""
        self.check_shard_ranks(self.config.world_size)
        summary = self.summary()
        write_json(self.file(SUMMARY_NAME), summary)
        if summary["labelled"] == 0 and summary["skipped"] > 0:
            reasons = skip_reasons(summary["skipped_by_reason"])
            raise ValueError(
                f"{self.path}: no sample labelled, {summary['skipped']} skipped ({reasons}); check --data and "
                f"--image-folder, and delete {self.path} to start over with other settings"
            )
        if summary["labelled"] and summary["all_ignore"] == summary["labelled"]:
            log.warning(
                "%s: all %d labelled samples are all-ignore (no foreground or background cell): an RPN cannot "
                "train on them; label again with other options (sdrpn label's --max-box-fraction, --fg-ratio, "
                "--sink-threshold)",
                self.path,
                summary["labelled"],
            )
        return summary


def _read_marker(path: str) -> dict:
    """A done marker, refused where it does not hold what the folder's readers use."""
    marker = read_json(path)
    if not _marker_fits(marker):
        raise ValueError(
            f"{path} is not a done marker of this format (it needs whole numbers shard, labelled, all_ignore, "
            "last_index, first_index and world_size, and skipped counts by reason): remove it to label its "
            "shard again"
        )
    return marker


def _marker_fits(marker) -> bool:
    """Whether a done marker holds the counts the folder's readers sum."""
    if not isinstance(marker, dict) or not isinstance(marker.get("skipped"), dict):
        return False
    counts = [marker.get(key) for key in ("shard", "labelled", "all_ignore", "last_index")]
    counts += list(marker["skipped"].values())
    # first_index: None for a shard that labelled and skipped nothing; world_size: absent
    # from markers of older folders.
    optional = [marker.get(key) for key in ("first_index", "world_size")]
    return all(type(n) is int and n >= 0 for n in counts) and all(n is None or type(n) is int for n in optional)


def _malformed(row: dict, image_size: int | None) -> bool:
    """Whether a row lacks what its sample is rebuilt from (id, image, question text,
    and the preprocessing, where recorded, at the folder's image size)."""
    if not all(isinstance(row.get(key), str) for key in ("id", "image", "question")):
        return True
    if not is_text(row["question"]):
        return True
    prep = row.get("preprocessing")
    if prep is None:  # converted from the reference's pickles: the folder's settings apply
        return False
    if not isinstance(prep, dict) or prep.get("mode") not in PREPROCESSING_MODES:
        return True
    if not all(type(prep.get(key)) is int and prep[key] > 0 for key in ("width", "height", "size")):
        return True
    return image_size not in (None, prep["size"])


def _check_shard_tensors(base: str, tensors: dict[str, Tensor]) -> int:
    missing = [k for k in TENSOR_NAMES if k not in tensors]
    if missing:
        raise ValueError(f"shard {base} lacks tensors {missing}")
    labels, grid = tensors["labels"], tensors["grid"]
    if labels.dtype not in (torch.int8, torch.int16, torch.int32, torch.int64) or labels.dim() != 2:
        raise ValueError(
            f"shard {base}: labels must be an integer (n, N) tensor, got {labels.dtype} {tuple(labels.shape)}"
        )
    n, cells = labels.shape
    for key in ("grounding", "sink"):
        if not tensors[key].is_floating_point() or tuple(tensors[key].shape) != (n, cells):
            raise ValueError(
                f"shard {base}: {key} must be a float ({n}, {cells}) tensor, got "
                f"{tensors[key].dtype} {tuple(tensors[key].shape)}"
            )
    if (
        grid.dtype != torch.int64
        or tuple(grid.shape) != (n, 2)
        or not bool((grid.prod(1) == cells).all())
        or not bool((grid > 0).all())
    ):
        raise ValueError(f"shard {base}: grid must be int64 ({n}, 2) with grid_h * grid_w = {cells}")
    return n


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
