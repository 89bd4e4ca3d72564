"""Where the base model looks: for every decoder layer, how much of the answer tokens'
attention to the image lands on the target's cells, and how often its argmax does. This
is how the layer that SD-RPN reads is chosen for a model (as the reference chose its
heads for LLaVA-1.5); the ground-truth boxes it uses never reach the RPN."""

from __future__ import annotations

import torch

from ..llava.geometry import model_grid
from ..llava.inputs import left_pad, preprocess_image, prompt_token_ids
from ..llava.loading import model_device, pad_token_id
from ..llava.maps import TeacherForcedBatch, attention_maps
from ..llava.presets import HeadSelection, LlavaPreset
from .cells import tag_cells
from .train_base import TEMPLATE


def teacher_forced_batch(model, tokenizer, samples, device) -> TeacherForcedBatch:
    """[prompt, true answer, eos] for each sample, left-padded."""
    size = model.config.vision_config.image_size
    grid, _ = model_grid(model.config)
    seqs, lengths = [], []
    for s in samples:
        prompt = prompt_token_ids(tokenizer, s.question, model.config.image_token_id, grid * grid, TEMPLATE)
        answer = tokenizer(s.answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        seqs.append(prompt + answer)
        lengths.append(len(answer))
    ids, mask = left_pad(seqs, pad_token_id(tokenizer), device)
    lengths_t = torch.tensor(lengths, device=device)
    pixels = torch.stack([preprocess_image(s.image, size)[0] for s in samples]).to(device, model.dtype)
    return TeacherForcedBatch(ids, mask, pixels, ids.shape[1] - lengths_t, lengths_t)


@torch.no_grad()
def layer_localisation(model, tokenizer, samples, batch_size: int = 32) -> list[dict]:
    """Per layer (all heads averaged): mass_ratio, the share of image attention on the
    target's cells over their share of the grid (1.0 = no preference), and argmax_hit."""
    device = model_device(model)
    grid, _ = model_grid(model.config)
    layers = model.config.text_config.num_hidden_layers
    sums = [{"mass_ratio": 0.0, "argmax_hit": 0.0} for _ in range(layers)]
    for i in range(0, len(samples), batch_size):
        chunk = samples[i : i + batch_size]
        batch = teacher_forced_batch(model, tokenizer, chunk, device)
        cells = torch.stack([tag_cells(s.box, s.image.width, grid) for s in chunk]).to(device)
        for layer in range(layers):
            every_head = HeadSelection(((layer, None),))
            preset = LlavaPreset(name=f"layer{layer}", grounding=every_head, sink=every_head)
            g = attention_maps(model, batch, preset, grid * grid).grounding.float()
            share = (g * cells).sum(1) / g.sum(1).clamp_min(1e-12)
            sums[layer]["mass_ratio"] += float((share / (cells.sum(1) / cells.shape[1])).sum())
            sums[layer]["argmax_hit"] += float(cells.gather(1, g.argmax(1, keepdim=True)).sum())
    return [
        {"layer": layer, **{k: round(v / len(samples), 3) for k, v in row.items()}} for layer, row in enumerate(sums)
    ]


@torch.no_grad()
def attention_quantiles(model, tokenizer, samples, layer: int, batch_size: int = 32) -> dict:
    """Quantiles of one layer's answer-to-image attention per image token (all heads), the
    values S that a sink threshold is set against."""
    device = model_device(model)
    grid, _ = model_grid(model.config)
    every_head = HeadSelection(((layer, None),))
    preset = LlavaPreset(name=f"layer{layer}", grounding=every_head, sink=every_head)
    values = []
    for i in range(0, len(samples), batch_size):
        batch = teacher_forced_batch(model, tokenizer, samples[i : i + batch_size], device)
        values.append(attention_maps(model, batch, preset, grid * grid).sink.float().flatten().cpu())
    v = torch.cat(values)
    qs = (0.5, 0.9, 0.99, 0.999, 1.0)
    return {"layer": layer, **{f"q{q}": round(float(torch.quantile(v, q)), 5) for q in qs}}
