"""Answering with RoI (SPEC Stage 3): SD-RPN as a drop-in for LLaVA-1.5's greedy generate.

Pass 1 is one forward of the whole prompt through the whole model: the layer-K hidden
states feed the RPN, and the KV cache, cut back to the prefix (system text + image tokens),
serves pass 2. (The question's trip through layers >= K is wasted arithmetic, cheaper than
the launches of a second, early-exit forward over it.) Crops come from
``sdrpn.ops.roi_crops`` (mask or bbox mode), are mapped to source pixels, cropped from the
full-resolution image, encoded by the model's own vision tower and projector, and pass 2
feeds [crop tokens, question] on top of the prefix cache and decodes; a mask-mode crop
feeds only the tokens its mask keeps. A sample without a box is answered exactly as by the
base model.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from transformers import DynamicCache, GenerationConfig, GenerationMixin

from .. import ops
from ..llava.attention_kernels import without_cudnn_attention
from ..llava.decode import DecoderPool, answer_limits, greedy_decode, resolve_decoder
from ..llava.geometry import grid_box_to_pixels
from ..llava.hf_version import cache_kwarg
from ..llava.inputs import (
    check_rpn_template,
    crop_pixels,
    left_pad,
    pixel_batch,
    position_ids_from_mask,
    split_prompt_ids,
)
from ..llava.probe import capture_outputs, decoder_layers
from ..llava.turns import model_turn
from ..llava.vision import ImageEncoder
from ..options import RoiOptions
from ..prefetch import thread_map
from ..rpn.model import RegionProposalNetwork, non_finite_tensors
from .answering import LlavaAnswering
from .pass2 import GROUP_COST_TOKENS, prefill_new_tokens


def resampled_grid(box_h: int, box_w: int, ratio: float, grid_h: int, grid_w: int) -> tuple[int, int]:
    """The token grid of a resampled crop (SPEC Stage 3 step 4): (box_h * r, box_w * r), with
    ONE scale factor for both sides, so that where it overflows the grid both shrink until
    the longer fits (the aspect kept); rounded, at least 1. The factor is capped before it
    multiplies, so a huge ratio (1e308) fills the grid rather than overflowing."""
    scale = min(ratio, grid_h / box_h if box_h > 0 else ratio, grid_w / box_w if box_w > 0 else ratio)
    return max(1, round(box_h * scale)), max(1, round(box_w * scale))


@dataclass
class RoiPrediction:
    boxes: list[tuple[int, int, int, int]]  # source pixels [x0, y0, x1, y1)
    grid_boxes: list[tuple[int, int, int, int]]  # grid cells [x0, y0, x1, y1)
    prob: Tensor  # (grid_h, grid_w) sigmoid of the RPN logits
    keep: list[Tensor]  # per crop, (grid_h, grid_w) bool: its tokens that are fed (mask mode)


@dataclass
class SDRPNAnswer:
    text: str
    tokens: list[int]
    rois: RoiPrediction
    timings: dict = field(default_factory=dict)


class Stopwatch:
    """Stage timings of one call: ``lap(name)`` ends a stage, ``total()`` gives the seconds
    of each and of all. On CUDA a lap records an event on the current stream instead of
    waiting for the device: GPU work counts in the stage that queued it, and the timing
    adds no host synchronisation to the call (``total`` waits for the last event only)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.names: list[str] = []
        self.marks = [self._mark()]

    def _mark(self):
        if self.device.type != "cuda":
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    def lap(self, name: str) -> None:
        self.names.append(name)
        self.marks.append(self._mark())

    def total(self) -> dict[str, float]:
        if self.device.type == "cuda":
            self.marks[-1].synchronize()
            seconds = [a.elapsed_time(b) / 1e3 for a, b in zip(self.marks, self.marks[1:])]
        else:
            seconds = [b - a for a, b in zip(self.marks, self.marks[1:])]
        return dict(zip(self.names, seconds), total=sum(seconds))


@dataclass
class _Pass1:
    cache: DynamicCache | None  # dropped once pass 2 has made its own
    prefix_mask: Tensor  # (B, Lp)
    suffixes: list[list[int]]
    prompt_lengths: list[int]  # the prompts' tokens, the image's among them
    rois: list[RoiPrediction]
    clock: Stopwatch


# What Hugging Face's generate takes: its own arguments and GenerationConfig's fields.
# Those are refused as other decoding; any other name is a mistake (a TypeError).
_GENERATE_ARGUMENTS = frozenset(inspect.signature(GenerationMixin.generate).parameters) | frozenset(
    vars(GenerationConfig())
)


def _roi_options(rpn: RegionProposalNetwork, task: str | None, roi: RoiOptions | Mapping | None) -> RoiOptions:
    """The RPN folder's RoI options (its task's threshold with ``task``), with a dict's
    fields changed, or a whole ``RoiOptions`` instead."""
    if isinstance(roi, RoiOptions):
        if task is not None:
            raise ValueError(
                f"task={task!r} sets the threshold and roi={roi!r} sets every option: pass one, or roi as a dict of "
                "the fields to change"
            )
        return roi
    base = rpn.config.task_roi_options(task) if task is not None else rpn.config.roi_options
    if roi is None:
        return base
    if not isinstance(roi, Mapping):
        raise TypeError(f"roi must be a RoiOptions, a dict of its fields or None, got {type(roi).__name__}")
    # None leaves a field as it was, as in Options.updated; unknown names are refused.
    return RoiOptions.from_dict({**base.to_dict(), **{k: v for k, v in roi.items() if v is not None}})


class SDRPNLlava(LlavaAnswering):
    """LLaVA-1.5 with a trained RPN: ``predict_rois`` and greedy ``generate`` for batches.

    The prompt template, the image preprocessing and the RoI options default to what the
    RPN records (its labels' template and preprocessing, its preset's RoI options); ``task``
    picks the threshold the reference used for a benchmark ("textvqa", "docvqa", ...).
    ``roi`` as a dict changes those fields of them (``{"threshold": 0.1}``); as a
    ``RoiOptions`` it replaces them all. ``decoder`` picks how tokens after the prompt
    are decoded (``sdrpn.llava.decode``: CUDA graphs on CUDA by default).
    ``pass2_group_cost`` is the padded tokens a further pass-2 forward must save to run
    (``sdrpn.infer.pass2``); a very large value runs every batch as one padded forward.
    """

    def __init__(
        self,
        model: nn.Module,
        processor,
        rpn: RegionProposalNetwork,
        *,
        task: str | None = None,
        roi: RoiOptions | Mapping | None = None,
        preprocessing: str | None = None,
        prompt_template: str | None = None,
        decoder: str = "auto",
        pass2_group_cost: int = GROUP_COST_TOKENS,
    ):
        if not isinstance(rpn, RegionProposalNetwork):
            raise TypeError(f"rpn must be a RegionProposalNetwork, got {type(rpn).__name__}")
        self.roi = _roi_options(rpn, task, roi).check_crop_mode()
        # None takes the RPN's own (an empty string is refused, as BaseLlava refuses it).
        super().__init__(
            model,
            processor,
            prompt_template=rpn.config.prompt_template if prompt_template is None else prompt_template,
            preprocessing=rpn.config.preprocessing if preprocessing is None else preprocessing,
        )
        what = rpn.config.base_model_problem(model)
        if what:
            named = f": {rpn.config.base_model!r}" if rpn.config.base_model else ""
            raise ValueError(f"rpn was made on another base model than model ({what}){named}")
        check_rpn_template(self.template)
        # An RPN whose weights went non-finite (a diverged run still in memory) maps every
        # cell to NaN: no region passes, and every question would be answered as by the base
        # model without a word. A saved one is refused on loading.
        bad = non_finite_tensors(rpn.trainable_state_dict())
        if bad:
            raise ValueError(f"rpn's weights hold NaN or Inf values: {bad}")
        self.rpn = rpn.eval()
        self.branch = rpn.config.branch_layer
        self.eos_id = self.tokenizer.eos_token_id
        self.decoder = resolve_decoder(decoder, model)
        self.decoders = DecoderPool()  # buffers and graphs kept between calls; .clear() frees them
        self.encoder = ImageEncoder(model, graph=self.decoder == "graph")  # .clear() frees its graphs
        if isinstance(pass2_group_cost, bool) or not isinstance(pass2_group_cost, int) or pass2_group_cost < 0:
            raise ValueError(f"pass2_group_cost must be an int >= 0, got {pass2_group_cost!r}")
        self.pass2_group_cost = pass2_group_cost
        crops = self.most_crop_tokens()
        if self.context is not None and self.num_cells + crops >= self.context:
            # Each prompt is checked against its most crop tokens before pass 1 picks its boxes.
            budget = f"max_boxes={self.roi.max_boxes} crops" if self.roi.crop_mode == "bbox" else "one crop"
            raise ValueError(
                f"{budget} of up to {self._most_tokens_a_crop()} tokens and the image's {self.num_cells} take "
                f"{self.num_cells + crops} of the model's {self.context} positions: no question could be answered"
                + (" (lower max_boxes)" if self.roi.crop_mode == "bbox" and self.roi.max_boxes > 1 else "")
            )

    # ---- inputs ---------------------------------------------------------------------------
    def _most_tokens_a_crop(self) -> int:
        """A whole crop's tokens; in bbox mode with token_ratio, the whole grid resampled,
        the most any box can give (a box within the grid gives no more)."""
        if self.roi.crop_mode != "bbox" or self.roi.token_ratio <= 0:
            return self.num_cells
        h, w = resampled_grid(self.grid_h, self.grid_w, self.roi.token_ratio, self.grid_h, self.grid_w)
        return h * w

    def most_crop_tokens(self) -> int:
        """The tokens of up to max_boxes crops (bbox mode) or of one crop (mask mode)."""
        return self._most_tokens_a_crop() * (self.roi.max_boxes if self.roi.crop_mode == "bbox" else 1)

    def _split_prompt(self, question: str) -> tuple[list[int], list[int]]:
        return split_prompt_ids(self.tokenizer, question, self.image_token_id, self.num_cells, self.template)

    # ---- pass 1 ---------------------------------------------------------------------------
    @torch.no_grad()
    @without_cudnn_attention()
    def _pass1(self, images, questions) -> tuple[_Pass1, list[Image.Image]]:
        clock = Stopwatch(self.device)
        images = self._images(images)
        prompts = [self._split_prompt(q) for q in self._questions(questions)]
        self._check_prompt_lengths([len(p) + len(s) for p, s in prompts])
        pixels = self._pixels(images)
        prefix_ids, prefix_mask = left_pad([p for p, _ in prompts], self.pad_id, self.device)
        # Both parts are padded on their left: every prefix ends with its image tokens, and
        # the padding of the suffixes sits between prefix and question.
        suffix_ids, suffix_mask = left_pad([s for _, s in prompts], self.pad_id, self.device)
        ids = torch.cat([prefix_ids, suffix_ids], 1)
        full_mask = torch.cat([prefix_mask, suffix_mask], 1)
        positions = position_ids_from_mask(full_mask)
        # The image features go in at the prefix's last tokens, the image tokens (the
        # model's own insertion would count them with a device read).
        embeds = self.model.get_input_embeddings()(ids)
        embeds[:, prefix_ids.shape[1] - self.num_cells : prefix_ids.shape[1]] = self.encoder(pixels)
        # Without padding (batch 1, or prompts of one length) no mask: the model would read
        # it back from the device to find that out.
        padded = len({(len(p), len(s)) for p, s in prompts}) > 1
        cache = DynamicCache(config=self.model.config.get_text_config())
        with capture_outputs(decoder_layers(self.model)[self.branch - 1]) as captured:
            self.model.model(
                inputs_embeds=embeds,
                attention_mask=full_mask if padded else None,
                position_ids=positions,
                **cache_kwarg(cache),
                use_cache=True,
            )
        clock.lap("prompt")
        cache.crop(-suffix_ids.shape[1])  # at least one token: the template has text after the image
        hidden = captured[0]
        # The image tokens end every (left-padded) prefix: given as positions, and the mask
        # only where it pads, the RPN reads nothing back from the device.
        image_tokens = slice(prefix_ids.shape[1] - self.num_cells, prefix_ids.shape[1])
        logits = self.rpn(
            hidden.to(self.rpn.q_proj.weight.dtype), full_mask if padded else None, positions, image_tokens
        )
        prob = torch.sigmoid(logits.float()).view(-1, self.grid_h, self.grid_w)
        clock.lap("rpn")
        boxes, index, keep = ops.roi_crops(prob, mode=self.roi.crop_mode, **self.roi.box_rules())
        rois = []
        boxes, index, keep, prob_host = boxes.tolist(), index.tolist(), keep.cpu(), prob.cpu()
        for b, image in enumerate(images):
            grid_boxes = [tuple(bx) for bx, i in zip(boxes, index) if i == b]
            rois.append(
                RoiPrediction(
                    [
                        grid_box_to_pixels(
                            gb, self.grid_h, self.grid_w, image.width, image.height, self.size, self.preprocessing
                        )
                        for gb in grid_boxes
                    ],
                    grid_boxes,
                    prob_host[b],
                    [keep[m] for m, i in enumerate(index) if i == b],
                )
            )
        clock.lap("boxes")
        lengths = [len(p) + len(s) for p, s in prompts]
        return _Pass1(cache, prefix_mask, [s for _, s in prompts], lengths, rois, clock), images

    def predict_rois(self, images: Sequence[Image.Image], questions: Sequence[str]) -> list[RoiPrediction]:
        """RoIs for a batch: boxes in source pixels and grid cells, probabilities, kept tokens."""
        if not self._batch_size(images, questions):
            return []
        with model_turn(self.model):
            p1, _ = self._pass1(images, questions)
        return p1.rois

    # ---- pass 2 ---------------------------------------------------------------------------
    def _crop_tokens(self, images: list[Image.Image], rois: list[RoiPrediction]) -> list[Tensor]:
        """Per sample, the projected crop features (tokens, D), empty without boxes: every
        token of a whole crop (optionally resampled), the kept ones of a mask-mode crop."""
        crops, owner, grid_boxes, keeps = [], [], [], []
        for b, (image, roi) in enumerate(zip(images, rois)):
            for box, gbox, keep in zip(roi.boxes, roi.grid_boxes, roi.keep):
                crops.append((image, box))
                owner.append(b)
                grid_boxes.append(gbox)
                keeps.append(keep)
        hidden = self.model.config.text_config.hidden_size
        per_sample = [torch.empty(0, hidden, device=self.device, dtype=self.dtype) for _ in images]
        if not crops:
            return per_sample
        size, mean, std = self.size, self.mean, self.std
        pixels = thread_map(lambda crop: crop_pixels(crop[0], crop[1], size, mean, std), crops)
        # The kept tokens' indices go to the device before the encoder is queued: a copy
        # to the device waits for the work queued before it.
        kept = [None if bool(k.all()) else k.flatten().nonzero()[:, 0].to(self.device) for k in keeps]
        feats = self.encoder(pixel_batch(pixels, self.device, self.dtype))
        for b, f, gbox, index in zip(owner, feats, grid_boxes, kept):
            tokens = self._resample(f, gbox) if index is None else f.index_select(0, index)
            per_sample[b] = torch.cat([per_sample[b], tokens])
        return per_sample

    def _resample(self, features: Tensor, grid_box) -> Tensor:
        """Optionally fewer crop tokens: (box_h * r, box_w * r)."""
        if self.roi.token_ratio <= 0:
            return features
        x0, y0, x1, y1 = grid_box
        th, tw = resampled_grid(y1 - y0, x1 - x0, self.roi.token_ratio, self.grid_h, self.grid_w)
        grid = features.view(self.grid_h, self.grid_w, -1).permute(2, 0, 1)[None].float()
        out = F.interpolate(grid, size=(th, tw), mode="bilinear", align_corners=False)
        return out[0].permute(1, 2, 0).reshape(th * tw, -1).to(features.dtype)

    @torch.no_grad()
    def generate(
        self, images: Sequence[Image.Image], questions: Sequence[str], max_new_tokens: int = 128, **generate_kwargs
    ) -> list[SDRPNAnswer]:
        """Greedy answers with the RoI crops; one SDRPNAnswer per sample.

        Decoding is greedy (as SD-RPN evaluates); other `generate` options are refused
        rather than silently ignored. ``do_sample=False``, ``num_beams=1`` and
        ``temperature=0`` (greedy in evaluation harnesses' terms, lmms-eval's among them) are
        taken as the greedy decoding they name.
        """
        unknown = sorted(k for k in generate_kwargs if k not in _GENERATE_ARGUMENTS)
        if unknown:
            raise TypeError(f"generate() got unexpected keyword arguments {unknown}")
        greedy = {"do_sample": False, "num_beams": 1, "temperature": 0}
        # None is Hugging Face's "unset": the default, greedy here.
        other = {k: v for k, v in generate_kwargs.items() if v is not None and greedy.get(k, object()) != v}
        if other:
            raise NotImplementedError(
                "only greedy decoding is supported, up to max_new_tokens and ending at the tokenizer's "
                f"end-of-sequence token; other generate options are not, got {other}"
            )
        max_new_tokens = self.checked_max_new_tokens(max_new_tokens)
        if not self._batch_size(images, questions):
            return []
        with model_turn(self.model):
            return self._answer(images, questions, max_new_tokens)

    def _answer(self, images, questions, max_new_tokens: int) -> list[SDRPNAnswer]:
        p1, images = self._pass1(images, questions)
        clock = p1.clock
        # On the device before any pass-2 work is queued (a copy there waits for that work).
        suffixes = [torch.tensor(s, dtype=torch.long, device=self.device) for s in p1.suffixes]
        crop_tokens = self._crop_tokens(images, p1.rois)
        clock.lap("crop_encode")
        embed = self.model.get_input_embeddings()
        parts = [torch.cat([c, embed(s)]) for c, s in zip(crop_tokens, suffixes)]
        cache, logits, mask, positions = prefill_new_tokens(
            self.model, p1.cache, p1.prefix_mask, parts, self.pass2_group_cost
        )
        p1.cache = None  # extended into `cache`, or copied into it: not held twice
        lengths = [n + len(c) for n, c in zip(p1.prompt_lengths, crop_tokens)]
        tokens = greedy_decode(
            self.model,
            cache,
            logits,
            mask,
            positions,
            max_new_tokens,
            self.eos_id,
            self.decoder,
            self.decoders,
            keep_layers=0,
            limits=answer_limits(lengths, max_new_tokens, self.context),
        )
        clock.lap("pass2_decode")
        timings = clock.total()
        return [
            SDRPNAnswer(self.tokenizer.decode(tok, skip_special_tokens=True), tok, roi, timings)
            for tok, roi in zip(tokens, p1.rois)
        ]
