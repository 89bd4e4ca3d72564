"""Reading LLaVA-format training data: [{id, image, conversations: [{from, value}, ...]}]."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from PIL import Image

from ..options import is_int, shortened
from .inputs import is_text, load_rgb, question_text, too_large_to_preprocess


class SkipSample(Exception):
    """A sample that cannot be used; its message is the reason that gets counted."""


# The reason a job counts a sample whose prompt (with what follows it) does not fit the
# model's context.
PAST_CONTEXT = "prompt past the model's context"
# The reasons a wrong --image-folder gives: images not found, or not images, where the
# data's paths lead inside it.
FOLDER_REASONS = frozenset({"image missing", "image path is a folder", "image unreadable", "image empty"})


@dataclass(frozen=True)
class QASample:
    index: int  # position in the data file
    id: str
    image: str  # as written in the data file
    question: str  # the first human turn, placeholder removed
    answer: str | None  # the first gpt turn, if any


def skip_reasons(counts: dict[str, int]) -> str:
    """Skipped samples by reason as one phrase, the most frequent first: "5 image missing,
    1 image unreadable"."""
    ranked = sorted(counts.items(), key=lambda item: -item[1])
    return ", ".join(f"{n} {reason}" for reason, n in ranked) or "none"


def folder_problem(folder: str) -> str | None:
    """Why ``folder`` cannot be an image folder ("does not exist", "is not a directory"), or
    None. The jobs refuse such a folder up front: otherwise every sample would be skipped
    one by one as "image missing"."""
    if os.path.isdir(folder):
        return None
    return "is not a directory" if os.path.exists(folder) else "does not exist"


def check_image_folder(folder: str) -> None:
    """Refuses an image folder given by the user that is not a directory."""
    problem = folder_problem(folder)
    if problem:
        raise ValueError(f"image_folder (--image-folder) {folder!r} {problem}")


def check_data_file(path: str) -> None:
    """Refuses, before a job's slow start, a data file that is missing, not a JSON list
    (JSON Lines among them, named from its first characters) or an empty one. The whole
    file is parsed here and again by the job: a few seconds a gigabyte, against a model
    load of minutes before a truncated file would be found."""
    if os.path.isdir(path):
        raise ValueError(f"--data {path} is a folder: it must be a JSON file")
    if not os.path.isfile(path):
        raise ValueError(f"--data {path}: no such file")
    with open(path, "rb") as f:
        head = f.read(65536).removeprefix(_BOM).lstrip()
    if not head.startswith(b"["):
        lines = " (an object, or JSON Lines: put the samples in one list)" if head.startswith(b"{") else ""
        raise ValueError(f"--data {path} must hold a JSON list of samples, it starts with {head[:16]!r}{lines}")
    if head[1:].lstrip().startswith(b"]"):
        raise ValueError(f"--data {path} holds no samples (an empty list)")
    load_entries(path)


_BOM = b"\xef\xbb\xbf"  # what some editors put before UTF-8 text


def load_entries(path: str) -> list:
    """The samples of a LLaVA-format JSON file, or an error naming the file."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            data = json.load(f)
    except (ValueError, RecursionError) as err:  # see io_utils.read_json
        raise ValueError(f"--data {path} is not a JSON file ({err})") from None
    if not isinstance(data, list):
        raise ValueError(f"--data must hold a JSON list of samples, got {type(data).__name__}")
    if not data:
        raise ValueError(f"--data {path} holds no samples (an empty list)")
    return data


def parse_entry(entry, index: int) -> QASample:
    """The first human/gpt pair of one entry; raises SkipSample when it is unusable."""
    if not isinstance(entry, dict):
        raise SkipSample("not an object")
    image = entry.get("image")
    if isinstance(image, list):
        raise SkipSample("several images")  # LLaVA-1.5 sees one image per prompt
    if not isinstance(image, str) or not image:
        raise SkipSample("no image")
    if not is_text(image):
        raise SkipSample("image path not valid text")
    turns = entry.get("conversations")
    if not isinstance(turns, list):
        raise SkipSample("no conversations")
    question = answer = None
    for turn in turns:
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            continue
        if turn.get("from") == "human" and question is None:
            question = turn["value"]
        elif turn.get("from") == "gpt" and question is not None:
            answer = turn["value"]
            break
    if question is None:
        raise SkipSample("no question")
    question = question_text(question)
    if not question:
        raise SkipSample("empty question")
    if not is_text(question) or (answer is not None and not is_text(answer)):
        raise SkipSample("text not valid UTF-8 or with a NUL byte")
    sample_id = str(entry.get("id", index))
    if not is_text(sample_id):
        raise SkipSample("id not valid UTF-8 or with a NUL byte")
    return QASample(index, sample_id, image, question, answer)


def resolve_image(folder: str, relative) -> str:
    """The image's real path; refuses paths that lead outside the image folder ("..",
    absolute paths). Links inside the folder are followed wherever they point: a dataset
    linked into the folder (LLaVA's playground/data/coco) is the folder's."""
    if not isinstance(relative, str) or not relative or not is_text(relative):
        raise SkipSample("image path not valid text")
    root = os.path.abspath(folder)
    written = os.path.normpath(os.path.join(root, relative))
    if os.path.commonpath([root, written]) != root:
        raise SkipSample("image outside --image-folder")
    path = os.path.realpath(written)
    if os.path.isdir(path):
        raise SkipSample("image path is a folder")
    if not os.path.isfile(path):
        raise SkipSample("image missing")
    return path


def recorded_image_sizes(rows: list) -> list[tuple[str, list[int]]]:
    """(image, [width, height]) of the rows that record both, well-formed."""
    pairs = []
    for row in rows:
        image, size = (row.get("image"), row.get("image_size")) if isinstance(row, dict) else (None, None)
        if isinstance(image, str) and isinstance(size, list) and len(size) == 2 and all(is_int(v) for v in size):
            pairs.append((image, size))
    return pairs


def image_folder_problem(folder: str, rows: list, most: int = 16) -> str | None:
    """Why ``folder`` is not shown to be the image folder that ``rows`` were made from, or
    None. Rows record their image's path in the folder and its size (``image_size``); up to
    ``most`` images, spread evenly over the rows, are looked up and their sizes read from
    the file headers, so that a job tells a moved folder from another cheaply. A folder is
    another when none of them is there at its size, or more are there at other sizes than
    at theirs; images gone from the same folder are skipped samples, not another dataset.
    Rows that record no size show nothing: with none, that is the problem."""
    pairs = recorded_image_sizes(rows)
    if not pairs:
        return "no finished sample records its image's size to check it by"
    count = min(most, len(pairs))
    same, other, gone = 0, [], []
    for relative, size in (pairs[i * len(pairs) // count] for i in range(count)):
        shown = shortened(relative)
        try:
            with Image.open(resolve_image(folder, relative)) as image:
                found = list(image.size)
        except SkipSample as err:
            gone.append(f"{shown}: {err}")
            continue
        except Exception:  # whatever the decoder raises on a header it does not read
            gone.append(f"{shown}: image unreadable")
            continue
        if found == size:
            same += 1
        else:
            other.append(f"{shown} is {found[0]}x{found[1]}, not the {size[0]}x{size[1]} recorded")
    if same and len(other) <= same:
        return None
    return f"{count - same} of {count} images checked are missing or differ, e.g. {(other or gone)[0]}"


def open_image(folder: str, relative, size: int, mode: str) -> Image.Image:
    """The entry's image decoded as RGB, or SkipSample with the reason: outside the folder,
    missing, unreadable (corrupt, or a decompression bomb), empty, or too large for
    preprocessing ``mode`` to make a size x size input of (``too_large_to_preprocess``)."""
    path = resolve_image(folder, relative)
    try:
        image = load_rgb(path)
    except Exception as err:  # whatever the decoder raises, one bad file must not stop a job
        raise SkipSample("image unreadable") from err
    if image.width < 1 or image.height < 1:
        raise SkipSample("image empty")
    reason = too_large_to_preprocess(image.width, image.height, size, mode)
    if reason:
        raise SkipSample(f"image {reason}")
    return image
