"""Reading LLaVA-format training data: [{id, image, conversations: [{from, value}, ...]}]."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from .inputs import IMAGE_PLACEHOLDER


class SkipSample(Exception):
    """A sample that cannot be used; its message is the reason that gets counted."""


@dataclass(frozen=True)
class QASample:
    index: int  # position in the data file
    id: str
    image: str  # as written in the data file
    question: str  # the first human turn, placeholder removed
    answer: str | None  # the first gpt turn, if any


def load_entries(path: str) -> list:
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, list):
        raise ValueError(f"--data must hold a JSON list of samples, got {type(data).__name__}")
    return data


def parse_entry(entry, index: int) -> QASample:
    """The first human/gpt pair of one entry; raises SkipSample when it is unusable."""
    if not isinstance(entry, dict):
        raise SkipSample("not an object")
    image = entry.get("image")
    if not isinstance(image, str) or not image:
        raise SkipSample("no image")
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
    return QASample(index, str(entry.get("id", index)), image, question, answer)


def resolve_image(folder: str, relative: str) -> str:
    """The image's real path; refuses paths that resolve outside the image folder."""
    root = os.path.realpath(folder)
    path = os.path.realpath(os.path.join(root, relative))
    if os.path.commonpath([root, path]) != root:
        raise SkipSample("image outside --image-folder")
    if not os.path.isfile(path):
        raise SkipSample("image missing")
    return path
