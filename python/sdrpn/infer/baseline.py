"""The baseline rows: LLaVA-1.5 answering from the thumbnail alone, with the prompt template,
preprocessing and normalisation SDRPNLlava uses, so that the two differ only by the crops."""

from __future__ import annotations

import torch
from PIL import Image
from torch import nn

from ..llava.geometry import model_grid
from ..llava.inputs import (
    CLIP_MEAN,
    CLIP_STD,
    PREPROCESSING_MODES,
    PROMPT_TEMPLATE,
    check_template,
    left_pad,
    pixel_batch,
    preprocess_image,
    prompt_token_ids,
)
from ..llava.loading import model_device, model_dtype, pad_token_id


class BaseLlava:
    """Greedy answers of the base model for batches of images and questions (no RPN).

    ``processor`` is a Hugging Face processor or its tokenizer; its image processor's mean
    and std normalise the images where it has one (CLIP's otherwise), as in SDRPNLlava.
    """

    def __init__(
        self, model: nn.Module, processor, *, prompt_template: str = PROMPT_TEMPLATE, preprocessing: str = "pad"
    ):
        if preprocessing not in PREPROCESSING_MODES:
            raise ValueError(f"preprocessing must be one of {PREPROCESSING_MODES}, got {preprocessing!r}")
        self.preprocessing = preprocessing
        self.template = check_template(prompt_template)
        tokenizer = getattr(processor, "tokenizer", processor)
        image_processor = getattr(processor, "image_processor", None)
        self.mean = tuple(getattr(image_processor, "image_mean", None) or CLIP_MEAN)
        self.std = tuple(getattr(image_processor, "image_std", None) or CLIP_STD)
        self.model, self.tokenizer = model.eval(), tokenizer
        self.size = model.config.vision_config.image_size
        grid_h, grid_w = model_grid(model.config)
        self.num_cells = grid_h * grid_w
        self.image_token_id = model.config.image_token_id
        self.pad_id = pad_token_id(tokenizer)

    @torch.no_grad()
    def generate(self, images, questions, max_new_tokens: int = 128) -> list[str]:
        """One greedy answer per (image, question); a sample stops at its end-of-sequence token."""
        if len(images) != len(questions):
            raise ValueError(f"images and questions must pair up, got {len(images)} and {len(questions)}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        for i, (image, question) in enumerate(zip(images, questions)):
            if not isinstance(image, Image.Image):
                raise TypeError(f"images[{i}] must be a PIL image, got {type(image).__name__}")
            if not isinstance(question, str) or not question.strip():
                raise ValueError(f"questions[{i}] must be a non-empty string, got {question!r}")
        device = model_device(self.model)
        pixels = [preprocess_image(im, self.size, self.mean, self.std, mode=self.preprocessing)[0] for im in images]
        prompts = [
            prompt_token_ids(self.tokenizer, q, self.image_token_id, self.num_cells, self.template) for q in questions
        ]
        ids, mask = left_pad(prompts, self.pad_id, device)
        out = self.model.generate(
            input_ids=ids,
            attention_mask=mask,
            pixel_values=pixel_batch(pixels, device, model_dtype(self.model)),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=self.pad_id,
            eos_token_id=self.tokenizer.eos_token_id,
        )
        return self.tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
