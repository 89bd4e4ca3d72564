"""Reading LLaVA-format training data: [{id, image, conversations: [{from, value}, ...]}]."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from PIL import Image

from .inputs import IMAGE_PLACEHOLDER, load_rgb


class SkipSample(Exception):
    """A sample that cannot be used; its message is the reason that gets counted."""


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


def load_entries(path: str) -> list:
    """The samples of a LLaVA-format JSON file, or an error naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"--data {path} is not a JSON file ({err})") from None
    if not isinstance(data, list):
        raise ValueError(f"--data must hold a JSON list of samples, got {type(data).__name__}")
    return data


def _is_text(value: str) -> bool:
    """Encodable text without NUL bytes: what a tokenizer and a file system accept (JSON
    lets a lone surrogate such as "\\ud800" through)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return "\x00" not in value


def parse_entry(entry, index: int) -> QASample:
    """The first human/gpt pair of one entry; raises SkipSample when it is unusable."""
    if not isinstance(entry, dict):
        raise SkipSample("not an object")
    image = entry.get("image")
    if not isinstance(image, str) or not image:
        raise SkipSample("no image")
    if not _is_text(image):
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
    question = question.replace(IMAGE_PLACEHOLDER, "").strip()
    if not question:
        raise SkipSample("empty question")
    if not _is_text(question) or (answer is not None and not _is_text(answer)):
        raise SkipSample("text not valid UTF-8")
    sample_id = str(entry.get("id", index))
    if not _is_text(sample_id):
        raise SkipSample("id not valid UTF-8")
    return QASample(index, sample_id, image, question, answer)


def resolve_image(folder: str, relative) -> str:
    """The image's real path; refuses paths that resolve outside the image folder."""
    if not isinstance(relative, str) or not relative or not _is_text(relative):
        raise SkipSample("image path not valid text")
    root = os.path.realpath(folder)
    path = os.path.realpath(os.path.join(root, relative))
    if os.path.commonpath([root, path]) != root:
        raise SkipSample("image outside --image-folder")
    if not os.path.isfile(path):
        raise SkipSample("image missing")
    return path


def open_image(folder: str, relative) -> Image.Image:
    """The entry's image decoded as RGB, or SkipSample with the reason: outside the folder,
    missing, unreadable (corrupt, or a decompression bomb), or too elongated to pad to a
    square within PIL's pixel budget (a 50000x1 image would need a 50000x50000 canvas)."""
    path = resolve_image(folder, relative)
    try:
        image = load_rgb(path)
    except Exception as err:  # whatever the decoder raises, one bad file must not stop a job
        raise SkipSample("image unreadable") from err
    side = max(image.width, image.height)
    if image.width < 1 or image.height < 1 or side * side > (Image.MAX_IMAGE_PIXELS or float("inf")):
        raise SkipSample("image too elongated to pad")
    return image
