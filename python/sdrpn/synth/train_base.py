"""Training the stand-in base model on the synthetic task, the way LLaVA-style models are
made rather than naively end to end: the VQA loss plus dense auxiliary losses on the
projected vision tokens (which thumbnail cells hold the tag; which characters a crop of the
tag shows), and a share of batches that carry a second, zoomed view after the thumbnail,
mostly around the tag, so that the model learns to read from crop tokens placed where
SD-RPN places them. Ground-truth boxes train this base model only, never the RPN.

Two stages, as LLaVA's vision tower comes pretrained: the first `encoder_steps` steps train
the vision tower, projector and auxiliary heads alone (no language model, no second view: a
step costs about a quarter of a whole one on a CPU), because the language model cannot learn
to read from crop tokens before the encoder puts the character in them, and the encoder
starts reading only after tens of thousands of crops. Then everything trains on the VQA
loss with the auxiliary losses kept.

A later stage starts from a trained model (`init`) to teach reading from crops: after the
first, the encoder's tag tokens in a ground-truth crop told the character to a linear probe
74% of the time while the language model answered from that crop 30% of the time, its errors
look-alike glyphs (N for M, E for F). Two settings aim at that gap: `char_head="lm"` reads the
code-character loss through the language model's own final norm and output layer, so the tag
tokens carry the character in the form the answer is written in and the answer only has to
copy it (600 steps from the first stage, with the tag-cell loss on crops too: 45% of 200
test crops read, against 38% with the linear head and without it), and
`cell_views` cuts views on the encoder's grid cells as SD-RPN cuts crops, stretched to the
square when they are 1x2 or 2x1 cells, which square views never showed.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..io_utils import (
    exclusive_lock,
    read_json,
    read_jsonl,
    read_safetensors,
    remove_temporaries,
    write_atomic,
    write_json,
    write_jsonl,
)
from ..llava.attention_kernels import without_cudnn_attention
from ..llava.inputs import crop_pixels, left_pad, preprocess_image, prompt_token_ids
from ..llava.loading import load_llava
from ..llava.vision import image_features
from ..ops import IGNORE_INDEX
from ..optim_state import load_optimizer_tensors, optimizer_tensors
from ..progress import show_progress
from .cells import grown_cell_box, tag_cells, view_coordinates
from .model import TinyLlavaSpec, build_tiny_llava
from .task import (
    CODE_CHARS,
    CODE_LENGTH,
    COLOURS,
    TAG_CLEARANCE,
    SynthSample,
    check_clearance,
    make_sample,
    split_seeds,
)

log = logging.getLogger(__name__)

TRAIN_RECORD = "train_base_config.json"  # the run's settings and how far it got, beside the model
TEMPLATE = "USER: <image>\n{question} ASSISTANT:"


@dataclass
class BaseTrainConfig:
    out: str
    steps: int = 2200
    batch_size: int = 32
    lr: float = 1e-3
    seed: int = 0
    zoom_fraction: float = 0.4  # batches that carry a zoomed second view
    zoom_on_tag: float = 0.7  # of those views, the share centred on the tag
    read_share_zoomed: float = 0.5  # in zoomed batches, the share of code questions (else as drawn)
    tag_pos_weight: float = 8.0
    aux_weight: float = 1.0
    colour_weight: float = 1.0  # the colour loss's share (0: the recipe before it existed)
    bf16: bool | None = None  # bf16 autocast; None: where the hardware runs it natively
    encoder_steps: int = 0  # the first steps train the vision side alone (see the module doc)
    init: str | None = None  # start from this trained model's weights (a later stage), not at random
    cell_views: float = 0.0  # share of views on the tag that are cell-aligned, as SD-RPN crops
    char_head: str = "linear"  # "lm": the code-character loss reads through the LM's output layer
    crop_tag_weight: float = 0.0  # the tag-cell loss on the crop views too
    tag_clearance: int = TAG_CLEARANCE  # the task's background around the tag (0: anywhere, the shipped model's data)
    device: str = "cpu"
    workers: int = 0  # DataLoader processes making batches (0: in the training loop)
    log_every: int = 50
    save_every: int = 500
    spec: TinyLlavaSpec = field(default_factory=TinyLlavaSpec)


def native_bf16(device: str) -> bool:
    """Whether bf16 autocast is fast here: on CUDA, or on a CPU with bf16 instructions. On an
    AVX2-only CPU oneDNN has no bf16 kernels and a training step ran 12x slower than float32."""
    if device.startswith("cuda"):
        return True
    return device == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def two_stage_lr(step: int, steps: int, encoder_steps: int) -> float:
    """The learning-rate factor: linear warm-up and cosine decay within each stage, so the
    language model starts its stage at the full rate."""
    start, length = (0, encoder_steps) if step < encoder_steps else (encoder_steps, steps - encoder_steps)
    s = step - start
    warmup = max(1, length // 30)
    return min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, length))))


class AuxHeads(nn.Module):
    """Per-token "part of the tag" logit; the code's characters from the mean of a view's tag
    tokens; the tag's colour from the mean of the thumbnail's tag tokens (the colour question
    stayed at chance without it: nothing made those tokens carry it)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.tag = nn.Linear(hidden, 1)
        self.chars = nn.Linear(hidden, CODE_LENGTH * len(CODE_CHARS))
        self.colour = nn.Linear(hidden, len(COLOURS))


def masked_mean(features: Tensor, cells: Tensor) -> Tensor:
    """(B, N, D) features averaged over the cells where cells (B, N) is 1: a view's tag tokens."""
    cells = cells[..., None]
    return (features * cells).sum(1) / cells.sum(1).clamp_min(1.0)


def zoom_box(
    sample: SynthSample, rng: random.Random, on_tag: bool, size: int, sides: tuple[int, int] = (48, 120)
) -> tuple[int, int, int, int]:
    """A square view with a side drawn from `sides` (pixels; never less than 1.5 tag sizes),
    holding the tag or anywhere. The default spans the crops SD-RPN takes on this task: one
    or two cells of the 8x8 grid (56 or 112 px of the 448 px source)."""
    x0, y0, x1, y1 = sample.box
    tag = max(x1 - x0, y1 - y0)
    side = min(size, max(int(1.5 * tag), rng.randint(*sides)))
    if on_tag:
        cx = rng.randint(max(0, x1 - side), min(x0, size - side)) if side < size else 0
        cy = rng.randint(max(0, y1 - side), min(y0, size - side)) if side < size else 0
    else:
        cx, cy = rng.randint(0, size - side), rng.randint(0, size - side)
    return cx, cy, cx + side, cy + side


def tag_view(
    sample: SynthSample, rng: random.Random, cfg: BaseTrainConfig, grid: int, sides: tuple[int, int] = (48, 120)
) -> tuple[int, int, int, int]:
    """A view holding the tag: with probability cfg.cell_views the crop SD-RPN takes (the
    tag's cells of the encoder grid, a side sometimes a cell wider; about 30% of ground-truth
    crops are 1x2 or 2x1 cells, stretched when they reach the encoder's square), else a
    square zoom_box. Answer-time crops are cell-aligned, and a model trained on square views
    alone read the tag from 1x1-cell ground-truth crops at 36% and from stretched ones at 15%."""
    if cfg.cell_views and rng.random() < cfg.cell_views:  # no draw at 0: earlier recipes' batches stay
        return grown_cell_box(sample.box, sample.image.width, grid, rng)
    return zoom_box(sample, rng, True, sample.image.width, sides)


@dataclass
class Batch:
    thumbs: Tensor  # (B, 3, S, S) thumbnails
    views: Tensor | None  # (B, 3, S, S) zoomed second views, or None for a thumbnail-only batch
    crops: Tensor  # (B, 3, S, S) views around the tag, for the code-character loss
    crop_cells: Tensor  # (B, grid*grid) the cells of those views that hold the tag
    ids: list[list[int]]  # empty in the vision-only stage
    labels: list[list[int]]
    tags: Tensor  # (B, grid*grid) tag cells
    chars: Tensor  # (B, CODE_LENGTH) code-character classes
    colours: Tensor  # (B,) the tag's colour class


def make_batch(step: int, cfg: BaseTrainConfig, tokenizer, image_token_id: int) -> Batch:
    """Training batch `step`: the same on any machine and in any worker (its randomness is
    seeded by the run's seed and the step alone), so a resumed run sees the same data."""
    size = cfg.spec.image_size
    grid = size // cfg.spec.patch_size
    rng = random.Random(cfg.seed * 1_000_003 + step)
    seeds = split_seeds("train", (step + 1) * cfg.batch_size)[step * cfg.batch_size :]
    vision_only = step < cfg.encoder_steps  # no second view and no prompt: nothing reads them
    zoom = not vision_only and rng.random() < cfg.zoom_fraction
    thumbs, views, crops, crop_cells, ids, labels, tags, chars, colours = [], [], [], [], [], [], [], [], []
    for seed in seeds:
        # Zoomed batches ask mostly for the code: reading from crop tokens is what they teach.
        kind = "read" if zoom and rng.random() < cfg.read_share_zoomed else None
        s = make_sample(seed, kind=kind, tag_clearance=cfg.tag_clearance)
        thumbs.append(preprocess_image(s.image, size)[0])
        tags.append(tag_cells(s.box, s.image.width, grid))
        chars.append([CODE_CHARS.index(c) for c in s.code])
        colours.append(sorted(COLOURS).index(s.colour))
        # The code-character loss reads the tag's tokens in a view around it, from tight
        # (large glyphs, learnt first) to the scale of the crops taken at answer time.
        crop = tag_view(s, rng, cfg, grid, sides=(16, 120))
        crops.append(crop_pixels(s.image, crop, size))
        crop_cells.append(tag_cells(view_coordinates(s.box, crop), crop[2] - crop[0], grid, crop[3] - crop[1]))
        if vision_only:
            continue
        n_images = 1
        if zoom:
            on_tag = rng.random() < cfg.zoom_on_tag
            view = tag_view(s, rng, cfg, grid) if on_tag else zoom_box(s, rng, False, s.image.width)
            views.append(crop_pixels(s.image, view, size))
            n_images = 2
        prompt = prompt_token_ids(tokenizer, s.question, image_token_id, grid**2 * n_images, TEMPLATE)
        answer = tokenizer(s.answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids.append(prompt + answer)
        labels.append([IGNORE_INDEX] * len(prompt) + answer)
    return Batch(
        torch.stack(thumbs),
        torch.stack(views) if views else None,
        torch.stack(crops),
        torch.stack(crop_cells),
        ids,
        labels,
        torch.stack(tags),
        torch.tensor(chars),
        torch.tensor(colours),
    )


class _BatchStream(IterableDataset):
    """Batches start..stop-1 in order; worker w of n makes steps w, w+n, ... (the DataLoader
    takes one batch from each worker in turn, so the order holds)."""

    def __init__(self, cfg: BaseTrainConfig, tokenizer, image_token_id: int, start: int, stop: int):
        self.cfg, self.tokenizer, self.image_token_id = cfg, tokenizer, image_token_id
        self.start, self.stop = start, stop

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        torch.set_num_threads(1)
        for step in range(self.start + worker, self.stop, workers):
            yield make_batch(step, self.cfg, self.tokenizer, self.image_token_id)


def _collate(batch: Batch) -> Batch:
    return batch


def _remove_states(folder: str, but: str) -> None:
    """The checkpoint's tensor files other than the one state.json names."""
    for old in os.listdir(folder):
        if old.startswith("state") and old.endswith(".safetensors") and old != but:
            os.remove(os.path.join(folder, old))


class BaseTrainer:
    """Trains, checkpoints to cfg.out/checkpoint every cfg.save_every steps, and resumes from
    there: a resumed run continues with the same batches, learning rate and optimiser state."""

    def __init__(self, cfg: BaseTrainConfig):
        self.cfg = cfg
        self.model, self.tok = build_tiny_llava(cfg.spec, seed=cfg.seed)
        self.model.to(cfg.device).train()
        self.heads = AuxHeads(self.model.config.text_config.hidden_size).to(cfg.device)
        self.image_id = self.model.config.image_token_id
        self.params = list(self.model.parameters()) + list(self.heads.parameters())
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=0.0)
        if not 0 <= cfg.encoder_steps < cfg.steps:
            raise ValueError(f"encoder_steps must be in [0, steps={cfg.steps}), got {cfg.encoder_steps}")
        if not 0.0 <= cfg.cell_views <= 1.0:
            raise ValueError(f"cell_views must be in [0, 1], got {cfg.cell_views}")
        check_clearance(cfg.tag_clearance)  # here, not first in a batch-making worker
        if cfg.char_head not in ("linear", "lm"):
            raise ValueError(f"char_head must be 'linear' or 'lm', got {cfg.char_head!r}")
        if cfg.char_head == "lm" and CODE_LENGTH != 1:  # one answer token holds one character
            raise ValueError(f"char_head 'lm' reads one character, but codes have {CODE_LENGTH}")
        if cfg.init is not None:
            self._load_init(cfg.init)
        # The code characters' token ids, the output rows char_head "lm" reads them through.
        self.char_ids = torch.tensor(self.tok.convert_tokens_to_ids(list(CODE_CHARS)), device=cfg.device)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: two_stage_lr(s, cfg.steps, cfg.encoder_steps)
        )
        self.bf16 = native_bf16(cfg.device) if cfg.bf16 is None else cfg.bf16
        self.done_steps = 0

    def _load_init(self, folder: str) -> None:
        """The weights of a trained model of the same spec (and its auxiliary heads when the
        folder has them): the start of a later stage."""
        if not os.path.exists(os.path.join(folder, "config.json")):
            raise FileNotFoundError(f"init must be a trained base model's folder, got {folder!r} (no config.json)")
        src, _ = load_llava(folder, "fp32")
        spec = getattr(src.config, "sdrpn_spec", None)
        if spec != asdict(self.cfg.spec):
            raise ValueError(f"init {folder!r} has spec {spec}, but this run's spec is {asdict(self.cfg.spec)}")
        self.model.load_state_dict(src.state_dict())
        heads = os.path.join(folder, "aux_heads.safetensors")
        if os.path.exists(heads):
            self.heads.load_state_dict(read_safetensors(heads, device=str(self.cfg.device)))

    def _char_logits(self, tag_mean: Tensor) -> Tensor:
        """(B * CODE_LENGTH, len(CODE_CHARS)) logits of the code's characters from a view's tag tokens."""
        if self.cfg.char_head == "lm":
            hidden = self.model.model.language_model.norm(tag_mean)
            return self.model.lm_head(hidden).float()[:, self.char_ids]
        return self.heads.chars(tag_mean).float().view(-1, len(CODE_CHARS))

    def _features(self, pixels: Tensor) -> Tensor:
        return image_features(self.model, pixels.to(self.cfg.device, non_blocking=True))  # (n, grid*grid, D)

    @without_cudnn_attention()
    def step(self, batch: Batch) -> dict:
        cfg, device = self.cfg, self.cfg.device
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=self.bf16):
            thumb_f = self._features(batch.thumbs)
            if self.done_steps < cfg.encoder_steps:
                lm = thumb_f.new_zeros(())  # the vision side alone: no language model forward
            else:
                lm = self._answer_loss(batch, thumb_f)
            tags = batch.tags.to(device)
            tag_loss = self._tag_loss(thumb_f, tags)
            crop_f, crop_cells = self._features(batch.crops), batch.crop_cells.to(device)
            if cfg.crop_tag_weight:  # where the tag is in a crop too: what the answer must attend to
                tag_loss = tag_loss + cfg.crop_tag_weight * self._tag_loss(crop_f, crop_cells)
            char_logits = self._char_logits(masked_mean(crop_f, crop_cells))
            char_loss = F.cross_entropy(char_logits, batch.chars.to(device).flatten())
            colour_logits = self.heads.colour(masked_mean(thumb_f, tags)).float()
            colour_loss = F.cross_entropy(colour_logits, batch.colours.to(device))
            loss = lm + cfg.aux_weight * (tag_loss + char_loss + cfg.colour_weight * colour_loss)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        self.done_steps += 1
        return {
            "loss": loss.detach(),
            "lm": lm.detach(),
            "tag": tag_loss.detach(),
            "chars": char_loss.detach(),
            "colour": colour_loss.detach(),
        }

    def _tag_loss(self, features: Tensor, cells: Tensor) -> Tensor:
        logits = self.heads.tag(features).squeeze(-1).float()
        pos_weight = torch.tensor(self.cfg.tag_pos_weight, device=logits.device)
        return F.binary_cross_entropy_with_logits(logits, cells, pos_weight=pos_weight)

    def _answer_loss(self, batch: Batch, thumb_f: Tensor) -> Tensor:
        device = self.cfg.device
        image_f = thumb_f if batch.views is None else torch.cat([thumb_f, self._features(batch.views)], 1)
        input_ids, mask = left_pad(batch.ids, self.tok.pad_token_id, device)
        label_ids, _ = left_pad(batch.labels, IGNORE_INDEX, device)
        embeds = self.model.get_input_embeddings()(input_ids)
        is_image = input_ids == self.image_id
        embeds = embeds.masked_scatter(is_image[..., None], image_f.reshape(-1, image_f.shape[-1]).to(embeds.dtype))
        return self.model(inputs_embeds=embeds, attention_mask=mask, labels=label_ids).loss

    def run(self, resume: bool = False, max_seconds: float | None = None) -> list[dict]:
        """Train up to cfg.steps, or until max_seconds pass (checkpointing first); saves the
        model to cfg.out and returns this call's history. One run at a time on cfg.out."""
        os.makedirs(self.cfg.out, exist_ok=True)
        with exclusive_lock(os.path.join(self.cfg.out, ".train_base.lock")):
            # What a kill left half-written (the model's own files are written by Hugging
            # Face in place, and written again by the run that finishes).
            for folder in (self.cfg.out, os.path.join(self.cfg.out, "checkpoint")):
                remove_temporaries(folder)
            return self._run(resume, max_seconds)

    def _run(self, resume: bool, max_seconds: float | None) -> list[dict]:
        cfg = self.cfg
        history_path = os.path.join(cfg.out, "history.jsonl")
        if resume and os.path.exists(os.path.join(cfg.out, "checkpoint", "state.json")):
            self.load_checkpoint()
            # The steps after the checkpoint run again: their rows are dropped, not repeated.
            if os.path.exists(history_path):
                kept = [row for row in read_jsonl(history_path) if row["step"] < self.done_steps]
                write_jsonl(history_path, kept)
        loader = DataLoader(
            _BatchStream(cfg, self.tok, self.image_id, self.done_steps, cfg.steps),
            batch_size=None,
            num_workers=cfg.workers,
            collate_fn=_collate,
            pin_memory=cfg.device.startswith("cuda"),
            prefetch_factor=4 if cfg.workers else None,
            persistent_workers=False,
        )
        start, history, pending = time.monotonic(), [], []
        with open(history_path, "a") as log_file:
            bar = show_progress(total=cfg.steps, initial=self.done_steps, desc="train-base", unit="step")
            for batch in loader:
                pending.append((self.done_steps, self.step(batch)))
                bar.update(1)
                due = self.done_steps % cfg.log_every == 0 or self.done_steps == cfg.steps
                out_of_time = max_seconds is not None and time.monotonic() - start > max_seconds
                checkpoint = self.done_steps % cfg.save_every == 0 or out_of_time
                # One host sync per log interval, not per step; and the rows a checkpoint
                # covers written before it, as a resume keeps only those.
                if due or checkpoint:
                    for step, row in pending:
                        row = {
                            "step": step,
                            **{k: round(float(v), 4) for k, v in row.items()},
                            "seconds": round(time.monotonic() - start, 1),
                        }
                        history.append(row)
                        log_file.write(json.dumps(row) + "\n")
                    log_file.flush()
                    pending = []
                if checkpoint:
                    self.save_checkpoint()
                if out_of_time:
                    log.warning(
                        "train-base: stopped at step %d of %d after %.0f s; resume to go on",
                        self.done_steps,
                        cfg.steps,
                        time.monotonic() - start,
                    )
                    break
            bar.close()
        self.save()  # also when stopped early: usable, and train_base_config.json says how far it got
        return history

    # ---- checkpoints and the final model ------------------------------------------------------
    def save_checkpoint(self) -> None:
        """The tensors under a name of their own step, then state.json naming them: a kill
        between the two leaves the previous pair whole, never new weights beside the step
        and optimiser state of the one before."""
        folder = os.path.join(self.cfg.out, "checkpoint")
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        tensors.update({f"heads.{k}": v for k, v in self.heads.state_dict().items()})
        opt_tensors, opt_meta = optimizer_tensors(self.opt)
        tensors.update({f"opt.{k}": v for k, v in opt_tensors.items()})
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        name = f"state-{self.done_steps:08d}.safetensors"
        write_atomic(os.path.join(folder, name), lambda tmp: save_file(tensors, tmp))
        write_json(
            os.path.join(folder, "state.json"),  # written last: it names a complete state
            {"step": self.done_steps, "tensors": name, "optimizer": opt_meta, "scheduler": self.sched.state_dict()},
        )
        _remove_states(folder, but=name)

    def load_checkpoint(self) -> None:
        folder = os.path.join(self.cfg.out, "checkpoint")
        meta = read_json(os.path.join(folder, "state.json"))
        name = meta.get("tensors", "state.safetensors")  # checkpoints of earlier versions: one file
        if not isinstance(name, str) or os.path.basename(name) != name:
            raise ValueError(f"{folder}/state.json names its tensors {name!r}: not a file of that folder")
        tensors = read_safetensors(os.path.join(folder, name), device=str(self.cfg.device))
        _remove_states(folder, but=name)  # one a kill left written but never named
        part = lambda prefix: {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}  # noqa: E731
        self.model.load_state_dict(part("model."))
        self.heads.load_state_dict(part("heads."))
        load_optimizer_tensors(self.opt, part("opt."), meta["optimizer"])
        self.sched.load_state_dict(meta["scheduler"])
        self.done_steps = int(meta["step"])
        log.info("train-base: resumed at step %d", self.done_steps)

    def save(self) -> None:
        out = self.cfg.out
        self.model.save_pretrained(out)
        self.tok.save_pretrained(out)
        heads = {k: v.detach().cpu().contiguous() for k, v in self.heads.state_dict().items()}
        write_atomic(os.path.join(out, "aux_heads.safetensors"), lambda tmp: save_file(heads, tmp))
        record = {**asdict(self.cfg), "bf16": self.bf16, "steps_done": self.done_steps}
        if self.cfg.init:  # the record of the stage this one started from, where it has one
            before = os.path.join(self.cfg.init, TRAIN_RECORD)
            if os.path.exists(before):
                record["init_record"] = read_json(before)
        write_json(os.path.join(out, TRAIN_RECORD), record)


__all__ = ["Batch", "BaseTrainConfig", "BaseTrainer", "make_batch", "TEMPLATE", "zoom_box"]
