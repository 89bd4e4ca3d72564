"""The task generator: deterministic from a seed, with the ground-truth box of the target.

Each image (default 448x448, four times a 112 px encoder input) holds a noisy background,
clutter shapes, and one small coloured tag carrying a two-character code in a small font:
unreadable in the thumbnail, readable in a crop. Questions ask for the code (the
fine-detail question) or for things the thumbnail shows (the tag's colour, where it is,
how many circles), so a model learns where to look.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..io_utils import write_atomic, write_json

COLOURS = {
    "red": (215, 40, 40),
    "blue": (40, 80, 215),
    "green": (35, 160, 60),
    "yellow": (225, 195, 30),
    "purple": (140, 55, 185),
}
CODE_CHARS = "ABCDEFHKLMNPRTUVXY345789"
CODE_LENGTH = 1  # characters on the tag
KINDS = ("read", "colour", "where", "count")
TAG_KINDS = ("read", "colour", "where")  # the questions about the tag (count looks at circles)
SPLITS = {"train": 0, "val": 10_000_000, "test": 20_000_000}  # disjoint seed ranges
# Background, in source pixels, kept between the tag and any clutter shape (half a cell of
# the 8x8 grid). A tag on or beside a shape is where the small base model's own attention
# loses it: with the tag placed anywhere, its answer attention peaked on the tag for 22% of
# validation questions when a shape touched it (19% of images), 51% within 8-16 px, 74%
# within 16-28 px, 95-100% from 28 px on. 0 places the tag anywhere (the generator the
# shipped base model was trained on; each of its images at 0 is the same as before).
TAG_CLEARANCE = 28


@dataclass
class SynthSample:
    id: str
    image: Image.Image
    question: str
    answer: str
    kind: str
    box: tuple[int, int, int, int]  # the tag, pixels [x0, y0, x1, y1)
    code: str  # the tag's code, whatever the question
    colour: str  # the tag's colour, whatever the question

    def record(self, image_path: str) -> dict:
        """The LLaVA-format entry; the box is kept for evaluation only."""
        return {
            "id": self.id,
            "image": image_path,
            "kind": self.kind,
            "gt_box": list(self.box),
            "conversations": [
                {"from": "human", "value": "<image>\n" + self.question},
                {"from": "gpt", "value": self.answer},
            ],
        }


def split_seeds(split: str, count: int) -> range:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    return range(SPLITS[split], SPLITS[split] + count)


def _where(box, size: int) -> str:
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    return ("top" if cy < size / 2 else "bottom") + " " + ("left" if cx < size / 2 else "right")


def check_clearance(tag_clearance: int) -> None:
    if tag_clearance < 0:
        raise ValueError(f"tag_clearance must be >= 0 pixels, got {tag_clearance}")


def _clear(box, shapes, clearance: int) -> bool:
    x0, y0, x1, y1 = box
    return all(
        x0 - clearance >= sx1 or x1 + clearance <= sx0 or y0 - clearance >= sy1 or y1 + clearance <= sy0
        for sx0, sy0, sx1, sy1 in shapes
    )


def make_sample(
    seed: int,
    size: int = 448,
    tag_font_px: int = 13,
    kind: str | None = None,
    code_length: int = CODE_LENGTH,
    tag_clearance: int = TAG_CLEARANCE,
) -> SynthSample:
    """One sample, identical for the same arguments on any machine."""
    check_clearance(tag_clearance)
    rng = random.Random(seed)
    base = rng.randint(90, 160)
    # Coarse grey noise in 4x4 blocks (numpy's PCG64 stream is stable across versions).
    blocks = base + np.random.default_rng(seed).integers(-25, 26, ((size + 3) // 4, (size + 3) // 4))
    grey = np.repeat(np.repeat(blocks, 4, 0), 4, 1)[:size, :size].astype(np.uint8)
    image = Image.fromarray(np.stack([grey] * 3, axis=-1))
    draw = ImageDraw.Draw(image)
    circles = rng.randint(1, 4)
    palette = list(COLOURS.values())
    shapes = []  # their boxes, [x0, y0, x1, y1)
    for i in range(circles + rng.randint(2, 5)):
        r = rng.randint(size // 20, size // 9)
        x, y = rng.randint(r, size - r), rng.randint(r, size - r)
        colour = palette[rng.randrange(len(palette))]
        if i < circles:
            draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)
            shapes.append((x - r, y - r, x + r + 1, y + r + 1))
        else:
            draw.rectangle([x - r, y - r // 2, x + r, y + r // 2], fill=colour, outline=(30, 30, 30))
            shapes.append((x - r, y - r // 2, x + r + 1, y + r // 2 + 1))
    font = ImageFont.load_default(size=tag_font_px)
    code = "".join(rng.choice(CODE_CHARS) for _ in range(code_length))
    tag_colour = rng.choice(sorted(COLOURS))
    left, top, right, bottom = draw.textbbox((0, 0), code, font=font)
    tw, th = right - left + 4, bottom - top + 4
    x0, y0 = rng.randint(2, size - tw - 2), rng.randint(2, size - th - 2)
    if tag_clearance and not _clear((x0, y0, x0 + tw, y0 + th), shapes, tag_clearance):
        # Other places from a stream of their own, so the question drawn next is the one the
        # image had at clearance 0; after 200 tries (a crowded image) the last place stays.
        spare = random.Random(f"tag place {seed}")
        for _ in range(200):
            x0, y0 = spare.randint(2, size - tw - 2), spare.randint(2, size - th - 2)
            if _clear((x0, y0, x0 + tw, y0 + th), shapes, tag_clearance):
                break
    box = (x0, y0, x0 + tw, y0 + th)
    draw.rectangle([box[0], box[1], box[2] - 1, box[3] - 1], fill=COLOURS[tag_colour])
    draw.text((x0 + 2 - left, y0 + 2 - top), code, font=font, fill=(255, 255, 255))
    kind = kind or rng.choice(KINDS)
    if kind == "read":
        question, answer = f"What is written on the {tag_colour} tag?", code
    elif kind == "colour":
        question, answer = "What colour is the tag?", tag_colour
    elif kind == "where":
        question, answer = "Where is the tag?", _where(box, size)
    elif kind == "count":
        question, answer = "How many circles are there?", str(circles)
    else:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return SynthSample(f"synth-{seed}", image, question, answer, kind, box, code, tag_colour)


def write_dataset(folder: str, split: str, count: int, **kwargs) -> str:
    """Images under folder/images and folder/{split}.json in LLaVA's format; returns the JSON
    path. Existing images are kept, so a rerun only adds what is missing."""
    images = os.path.join(folder, "images")
    os.makedirs(images, exist_ok=True)
    records = []
    for seed in split_seeds(split, count):
        sample = make_sample(seed, **kwargs)
        name = f"{sample.id}.png"
        path = os.path.join(images, name)
        if not os.path.exists(path):
            write_atomic(path, lambda tmp, im=sample.image: im.save(tmp, format="PNG"))
        records.append(sample.record(name))
    out = os.path.join(folder, f"{split}.json")
    write_json(out, records)
    return out


__all__ = [
    "CODE_CHARS",
    "CODE_LENGTH",
    "COLOURS",
    "KINDS",
    "SynthSample",
    "TAG_CLEARANCE",
    "TAG_KINDS",
    "make_sample",
    "split_seeds",
    "write_dataset",
]
