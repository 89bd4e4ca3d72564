"""Accuracy of a model on the synthetic task's held-out split, from the thumbnail alone or
with a second view (the ground-truth crop, the upper bound, or a random crop of the same
size), answered greedily in the same format SD-RPN uses: [thumbnail, view, question].
The ground-truth crop is the target's box widened to whole cells of the encoder's grid,
the crop SD-RPN takes when its RPN finds the target exactly."""

from __future__ import annotations

import random

import torch

from ..llava.attention_kernels import without_cudnn_attention
from ..llava.geometry import model_grid
from ..llava.inputs import crop_pixels, left_pad, preprocess_image, prompt_token_ids
from ..llava.model_facts import model_device, model_dtype, pad_token_id
from .cells import cell_box
from .metrics import accuracy_by_kind
from .task import make_sample, split_seeds
from .train_base import TEMPLATE


def view_box(sample, views: str, grid: int, rng: random.Random) -> tuple[int, int, int, int] | None:
    """The second view of an evaluation: none, the ground-truth crop, or a crop of the same
    size placed at random."""
    if views == "none":
        return None
    size = sample.image.width
    x0, y0, x1, y1 = cell_box(sample.box, size, grid)
    if views == "gt":
        return x0, y0, x1, y1
    if views == "random":
        w, h = x1 - x0, y1 - y0
        cx, cy = rng.randint(0, size - w), rng.randint(0, size - h)
        return cx, cy, cx + w, cy + h
    raise ValueError(f"views must be 'none', 'gt' or 'random', got {views!r}")


@torch.no_grad()
@without_cudnn_attention()
def answer_with_views(
    model, tokenizer, samples, views: str, batch_size: int = 32, seed: int = 0, max_new_tokens: int = 16
) -> list[str]:
    """views: "none" (thumbnail only), "gt" (plus the ground-truth crop) or "random"."""
    rng = random.Random(seed)
    size = model.config.vision_config.image_size
    grid, _ = model_grid(model.config)
    device = model_device(model)
    image_id = model.config.image_token_id
    pad_id = pad_token_id(tokenizer)
    out: list[str] = []
    for i in range(0, len(samples), batch_size):
        chunk = samples[i : i + batch_size]
        pixels, ids = [], []
        for s in chunk:
            pixels.append(preprocess_image(s.image, size)[0])
            n = 1
            box = view_box(s, views, grid, rng)
            if box is not None:
                pixels.append(crop_pixels(s.image, box, size))
                n = 2
            ids.append(prompt_token_ids(tokenizer, s.question, image_id, grid * grid * n, TEMPLATE))
        input_ids, mask = left_pad(ids, pad_id, device)
        gen = model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            pixel_values=torch.stack(pixels).to(device, model_dtype(model)),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        out += tokenizer.batch_decode(gen[:, input_ids.shape[1] :], skip_special_tokens=True)
    return out


def accuracy_table(model, tokenizer, count: int = 200, split: str = "test") -> dict:
    """Accuracy by question kind for the thumbnail alone, the ground-truth crop and a random crop."""
    samples = [make_sample(seed) for seed in split_seeds(split, count)]
    return {
        views: accuracy_by_kind(samples, answer_with_views(model, tokenizer, samples, views))
        for views in ("none", "gt", "random")
    }
