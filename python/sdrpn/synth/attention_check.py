"""Where the base model looks: for every decoder layer and head, how much of the answer
tokens' attention to the image lands on the target's cells, how often its argmax does, and
how often SPEC's labelling rule turns the map into a foreground box that holds the tag. This
is how the heads that SD-RPN reads are chosen for a model (as the reference chose its heads
for LLaVA-1.5); the ground-truth boxes it uses never reach the RPN."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .. import ops
from ..llava.geometry import model_grid
from ..llava.inputs import left_pad, preprocess_image, prompt_token_ids
from ..llava.maps import TeacherForcedBatch, attention_maps, head_maps
from ..llava.model_facts import model_device, pad_token_id
from ..llava.presets import HeadSelection, LlavaPreset
from .cells import tag_cells
from .task import TAG_KINDS
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


@dataclass
class HeadMaps:
    """Every head's map for a set of samples, with their targets."""

    maps: Tensor  # (S, layers, heads, N)
    cells: Tensor  # (S, N) 1.0 on the target's cells
    kinds: list[str]
    grid: int

    def of(self, pairs) -> Tensor:
        """(S, N) the map of a head selection, (layer, head) pairs with head None for every
        head of the layer: the mean of its heads' maps, each head once, as SPEC's G."""
        selection, num_heads = HeadSelection(tuple(map(tuple, pairs))), self.maps.shape[2]
        return torch.stack(
            [self.maps[:, layer, h] for layer in selection.layers for h in selection.heads_of(layer, num_heads)]
        ).mean(0)

    @property
    def about_tag(self) -> Tensor:
        return torch.tensor([k in TAG_KINDS for k in self.kinds])


@torch.no_grad()
def collect_head_maps(model, tokenizer, samples, batch_size: int = 32) -> HeadMaps:
    device = model_device(model)
    grid, _ = model_grid(model.config)
    maps = []
    for i in range(0, len(samples), batch_size):
        chunk = samples[i : i + batch_size]
        maps.append(head_maps(model, teacher_forced_batch(model, tokenizer, chunk, device), grid * grid).cpu())
    cells = torch.stack([tag_cells(s.box, s.image.width, grid) for s in samples])
    return HeadMaps(torch.cat(maps), cells, [s.kind for s in samples], grid)


def localisation_scores(grounding: Tensor, cells: Tensor) -> tuple[Tensor, Tensor]:
    """Per sample: the share of image attention on the target's cells over their share of
    the grid (1.0 = no preference), and whether the argmax is on them."""
    share = (grounding * cells).sum(1) / grounding.sum(1).clamp_min(1e-12)
    mass_ratio = share / (cells.sum(1) / cells.shape[1])
    return mass_ratio, cells.gather(1, grounding.argmax(1, keepdim=True)).squeeze(1).bool()


def _span(mask: Tensor) -> tuple[Tensor, Tensor]:
    """(S, n) bool -> each row's first and last True index (n and -1 where there is none)."""
    idx = torch.arange(mask.shape[1], device=mask.device)
    return torch.where(mask, idx, mask.shape[1]).amin(1), torch.where(mask, idx, -1).amax(1)


def label_hits(grounding: Tensor, cells: Tensor, grid: int) -> Tensor:
    """(S,) bool: SPEC's labelling rule (default ratios, no sinks) gives a foreground box
    that holds every target cell; an all-ignore sample is a miss."""
    fg = (ops.pseudo_labels(grounding, torch.zeros_like(grounding), grid, grid) == 1).view(-1, grid, grid)
    target = cells.bool().view(-1, grid, grid)
    hit = fg.flatten(1).any(1)
    for dim in (2, 1):  # the box's rows, then its columns
        (f0, f1), (t0, t1) = _span(fg.any(dim)), _span(target.any(dim))
        hit &= (f0 <= t0) & (f1 >= t1)
    return hit


def selection_scores(heads: HeadMaps, pairs) -> dict:
    """A head selection's mass_ratio and argmax_hit (all questions) and label_hit (the
    questions about the tag)."""
    g = heads.of(pairs)
    mass, argmax = localisation_scores(g, heads.cells)
    label = label_hits(g, heads.cells, heads.grid)[heads.about_tag]
    return {
        "mass_ratio": round(float(mass.mean()), 3),
        "argmax_hit": round(float(argmax.float().mean()), 3),
        "label_hit": round(float(label.float().mean()), 3),
    }


def layer_localisation(heads: HeadMaps) -> list[dict]:
    """selection_scores of every layer's heads together."""
    return [{"layer": layer, **selection_scores(heads, [(layer, None)])} for layer in range(heads.maps.shape[1])]


def select_heads(heads: HeadMaps, max_heads: int = 6, min_gain: float = 0.005) -> dict:
    """Greedy forward selection of (layer, head) pairs: add the head that most raises the
    share of questions about the tag whose pseudo-label box holds it, while it rises by at
    least min_gain. Returns the pairs, the score after each addition and per kind."""
    if not bool(heads.about_tag.any()):
        raise ValueError(f"select_heads needs questions of kinds {TAG_KINDS}, got {sorted(set(heads.kinds))}")
    everything = [(layer, h) for layer in range(heads.maps.shape[1]) for h in range(heads.maps.shape[2])]
    chosen, trail, best = [], [], 0.0
    while len(chosen) < max_heads:
        gains = [(selection_scores(heads, chosen + [p])["label_hit"], p) for p in everything if p not in chosen]
        value, pair = max(gains)
        if value < best + min_gain:
            break
        chosen.append(pair)
        best = value
        trail.append(round(value, 3))
    if not chosen:  # no head boxes the tag at all (an untrained model)
        return {"heads": [], "label_hit": [], "label_hit_by_kind": {}}
    hits = label_hits(heads.of(chosen), heads.cells, heads.grid)
    by_kind = {k: round(float(hits[[x == k for x in heads.kinds]].float().mean()), 3) for k in sorted(set(heads.kinds))}
    return {"heads": [list(p) for p in chosen], "label_hit": trail, "label_hit_by_kind": by_kind}


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
