"""Training the stand-in base model on the synthetic task, the way LLaVA-style models are
made rather than naively end to end: the VQA loss plus dense auxiliary losses on the
projected vision tokens (which thumbnail cells hold the tag; which characters a crop of the
tag shows), and a share of batches that carry a second, zoomed view after the thumbnail,
mostly around the tag, so that the model learns to read from crop tokens placed where
SD-RPN places them. Ground-truth boxes train this base model only, never the RPN.
"""

from __future__ import annotations

import logging
import math
import os
import random
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn
from tqdm import tqdm

from ..io_utils import write_atomic, write_json
from ..llava.maps import left_pad
from ..preprocess import crop_pixels, preprocess_image, prompt_token_ids
from .model import TinyLlavaSpec, build_tiny_llava
from .task import CODE_CHARS, SynthSample, make_sample, split_seeds

log = logging.getLogger(__name__)

TEMPLATE = "USER: <image>\n{question} ASSISTANT:"


@dataclass
class BaseTrainConfig:
    out: str
    steps: int = 2200
    batch_size: int = 32
    lr: float = 1e-3
    seed: int = 0
    zoom_fraction: float = 0.4     # batches that carry a zoomed second view
    zoom_on_tag: float = 0.7       # of those views, the share centred on the tag
    tag_pos_weight: float = 8.0
    aux_weight: float = 1.0
    bf16: bool = True
    device: str = "cpu"
    spec: TinyLlavaSpec = field(default_factory=TinyLlavaSpec)


class AuxHeads(nn.Module):
    """Per-token "part of the tag" logit, and the two code characters from a crop's mean token."""

    def __init__(self, hidden: int):
        super().__init__()
        self.tag = nn.Linear(hidden, 1)
        self.chars = nn.Linear(hidden, 2 * len(CODE_CHARS))


def tag_cells(box, image_size: int, grid: int) -> Tensor:
    """(grid*grid,) 1.0 on the thumbnail cells that the tag box overlaps."""
    cell = image_size / grid
    out = torch.zeros(grid, grid)
    x0, y0, x1, y1 = box
    out[int(y0 // cell):int(math.ceil(y1 / cell)), int(x0 // cell):int(math.ceil(x1 / cell))] = 1.0
    return out.flatten()


def zoom_box(sample: SynthSample, rng: random.Random, on_tag: bool, size: int) -> tuple[int, int, int, int]:
    """A square view 2-6 tag widths wide, around the tag or anywhere."""
    x0, y0, x1, y1 = sample.box
    side = int(max(x1 - x0, y1 - y0) * rng.uniform(2.0, 6.0))
    if on_tag:
        cx = rng.randint(max(0, x1 - side), min(x0, size - side)) if side < size else 0
        cy = rng.randint(max(0, y1 - side), min(y0, size - side)) if side < size else 0
    else:
        cx, cy = rng.randint(0, size - side), rng.randint(0, size - side)
    return cx, cy, cx + side, cy + side


class BaseTrainer:
    def __init__(self, cfg: BaseTrainConfig):
        self.cfg = cfg
        self.model, self.tok = build_tiny_llava(cfg.spec, seed=cfg.seed)
        self.model.to(cfg.device).train()
        self.heads = AuxHeads(self.model.config.text_config.hidden_size).to(cfg.device)
        self.size = cfg.spec.image_size
        self.grid = self.size // cfg.spec.patch_size
        self.image_id = self.model.config.image_token_id
        params = list(self.model.parameters()) + list(self.heads.parameters())
        self.opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
        warmup = max(1, cfg.steps // 30)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / cfg.steps))))

    def _batch(self, step: int, rng: random.Random):
        samples = [make_sample(seed) for seed in
                   split_seeds("train", (step + 1) * self.cfg.batch_size)[step * self.cfg.batch_size:]]
        zoom = rng.random() < self.cfg.zoom_fraction
        thumbs, views, crops, ids, labels, tags, chars = [], [], [], [], [], [], []
        for s in samples:
            thumbs.append(preprocess_image(s.image, self.size)[0])
            x0, y0, x1, y1 = s.box
            crops.append(crop_pixels(s.image, (x0 - 2, y0 - 2, x1 + 2, y1 + 2), self.size))
            n_images = 1
            if zoom:
                views.append(crop_pixels(s.image, zoom_box(s, rng, rng.random() < self.cfg.zoom_on_tag,
                                                            s.image.width), self.size))
                n_images = 2
            prompt = prompt_token_ids(self.tok, s.question, self.image_id, self.grid ** 2 * n_images, TEMPLATE)
            answer = self.tok(s.answer, add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id]
            ids.append(prompt + answer)
            labels.append([-100] * len(prompt) + answer)
            tags.append(tag_cells(s.box, s.image.width, self.grid))
            chars.append([CODE_CHARS.index(c) for c in s.code])
        return samples, thumbs, views, crops, ids, labels, torch.stack(tags), chars

    def _features(self, pixels: list[Tensor]) -> Tensor:
        stacked = torch.stack(pixels).to(self.cfg.device)
        out = self.model.model.get_image_features(pixel_values=stacked)
        feats = out.pooler_output if hasattr(out, "pooler_output") else out
        return torch.stack(list(feats))  # (n, grid*grid, D)

    def step(self, step: int, rng: random.Random) -> dict:
        cfg = self.cfg
        samples, thumbs, views, crops, ids, labels, tags, chars = self._batch(step, rng)
        device_type = cfg.device.split(":")[0]
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=cfg.bf16):
            thumb_f = self._features(thumbs)
            image_f = torch.cat([thumb_f, self._features(views)], 1) if views else thumb_f
            input_ids, mask = left_pad(ids, self.tok.pad_token_id, cfg.device)
            label_ids, _ = left_pad(labels, -100, cfg.device)
            embeds = self.model.get_input_embeddings()(input_ids)
            is_image = input_ids == self.image_id
            embeds = embeds.masked_scatter(is_image[..., None], image_f.reshape(-1, image_f.shape[-1]).to(embeds.dtype))
            lm = self.model(inputs_embeds=embeds, attention_mask=mask, labels=label_ids).loss
            tag_logits = self.heads.tag(thumb_f).squeeze(-1).float()
            tag_loss = F.binary_cross_entropy_with_logits(
                tag_logits, tags.to(cfg.device), pos_weight=torch.tensor(cfg.tag_pos_weight, device=cfg.device))
            crop_mean = self._features(crops).mean(1)
            char_logits = self.heads.chars(crop_mean).float().view(-1, 2, len(CODE_CHARS))
            targets = torch.tensor(chars, device=cfg.device)
            char_loss = F.cross_entropy(char_logits.reshape(-1, len(CODE_CHARS)), targets.flatten())
            loss = lm + cfg.aux_weight * (tag_loss + char_loss)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(self.model.parameters()) + list(self.heads.parameters()), 1.0)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return {"loss": float(loss.detach()), "lm": float(lm.detach()), "tag": float(tag_loss.detach()),
                "chars": float(char_loss.detach())}

    def run(self) -> list[dict]:
        rng = random.Random(self.cfg.seed)
        history = []
        for step in tqdm(range(self.cfg.steps), desc="train-base", disable=None):
            history.append(self.step(step, rng))
        self.save()
        return history

    def save(self) -> None:
        out = self.cfg.out
        os.makedirs(out, exist_ok=True)
        self.model.save_pretrained(out)
        self.tok.save_pretrained(out)
        heads = {k: v.detach().cpu().contiguous() for k, v in self.heads.state_dict().items()}
        write_atomic(os.path.join(out, "aux_heads.safetensors"), lambda tmp: save_file(heads, tmp))
        write_json(os.path.join(out, "train_base_config.json"),
                   {k: (v if not hasattr(v, "__dataclass_fields__") else asdict(v)) for k, v in asdict(self.cfg).items()})


__all__ = ["BaseTrainConfig", "BaseTrainer", "TEMPLATE", "tag_cells", "zoom_box"]
