"""What every answerer of (image, question) batches shares: the processor's tokenizer and
normalisation, the prompt template, the image preprocessing, and the checks on images."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from PIL import Image
from torch import Tensor, nn

from ..llava.geometry import model_grid
from ..llava.inputs import (
    CLIP_MEAN,
    CLIP_STD,
    PREPROCESSING_MODES,
    check_preprocessable,
    check_template,
    is_text,
    pixel_batch,
    preprocess_image,
    prompt_token_ids,
    question_text,
    to_rgb,
)
from ..llava.model_facts import checked_max_new_tokens, context_length, model_device, model_dtype, pad_token_id
from ..prefetch import thread_map


def _channel_values(name: str, values) -> tuple[float, float, float]:
    """The processor's per-channel normalisation ``name``: three finite numbers."""
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        out = ()
    if len(out) != 3 or not all(math.isfinite(v) for v in out):
        raise ValueError(f"the processor's {name} must be three finite numbers (R, G, B), got {values!r}")
    return out


class LlavaAnswering:
    """``processor`` is a Hugging Face processor or its tokenizer: the images are preprocessed
    here (so that boxes map back), normalised with the processor's mean and std where it has
    an image processor (CLIP's otherwise)."""

    def __init__(self, model: nn.Module, processor, *, prompt_template: str, preprocessing: str):
        if preprocessing not in PREPROCESSING_MODES:
            raise ValueError(f"preprocessing must be one of {PREPROCESSING_MODES}, got {preprocessing!r}")
        self.preprocessing = preprocessing
        self.template = check_template(prompt_template)
        if not isinstance(model, nn.Module) or not hasattr(getattr(model, "config", None), "vision_config"):
            raise TypeError(f"model must be a LLaVA model (load_llava's), got {type(model).__name__}")
        tokenizer = getattr(processor, "tokenizer", processor)
        if not callable(tokenizer) or not hasattr(tokenizer, "decode"):
            raise TypeError(f"processor must be a Hugging Face processor or tokenizer, got {type(processor).__name__}")
        image_processor = getattr(processor, "image_processor", None)
        self.mean = _channel_values("image_mean", getattr(image_processor, "image_mean", None) or CLIP_MEAN)
        self.std = _channel_values("image_std", getattr(image_processor, "image_std", None) or CLIP_STD)
        if min(self.std) <= 0:
            raise ValueError(f"the processor's image_std must be > 0 per channel, got {self.std}")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.size = model.config.vision_config.image_size
        self.grid_h, self.grid_w = model_grid(model.config)
        self.num_cells = self.grid_h * self.grid_w
        self.image_token_id = model.config.image_token_id
        self.pad_id = pad_token_id(tokenizer)
        # The positions the text model was trained for: a longer prompt or answer is refused
        # rather than read from positions it never saw (and a static decoding cache is sized
        # by them).
        self.context = context_length(model)

    @property
    def device(self) -> torch.device:
        return model_device(self.model)

    @property
    def dtype(self) -> torch.dtype:
        return model_dtype(self.model)

    def _pixels(self, images: list[Image.Image]) -> Tensor:
        """(B, 3, S, S) pixel values on the model's device and dtype, the images preprocessed
        side by side in threads (at 1024x768, some 10 ms of CPU each)."""
        size, mean, std, mode = self.size, self.mean, self.std, self.preprocessing
        pixels = thread_map(lambda im: preprocess_image(im, size, mean, std, mode=mode)[0], images)
        return pixel_batch(pixels, self.device, self.dtype)

    def checked_max_new_tokens(self, max_new_tokens) -> int:
        """``max_new_tokens`` as an int from 1 to the model's context, or ValueError naming it."""
        return checked_max_new_tokens(max_new_tokens, self.context)

    def most_crop_tokens(self) -> int:
        """The most tokens a sample's crops can add to its prompt (none here)."""
        return 0

    def prompt_too_long(self, question: str) -> str | None:
        """Why the prompt of ``question`` (a checked question) does not fit the model's
        context with the most crop tokens it could get; None where it fits. Jobs skip such
        samples, ``generate`` refuses them."""
        ids = prompt_token_ids(self.tokenizer, question, self.image_token_id, self.num_cells, self.template)
        return self._prompt_problem(len(ids))

    def _prompt_problem(self, length: int) -> str | None:
        crops = self.most_crop_tokens()
        if self.context is None or length + crops <= self.context:
            return None
        with_crops = f" and up to {crops} crop tokens" if crops else ""
        return (
            f"makes a prompt of {length} tokens (the image's {self.num_cells} among them){with_crops}, "
            f"past the model's context of {self.context} positions"
        )

    def _check_prompt_lengths(self, lengths: list[int]) -> None:
        for i, length in enumerate(lengths):
            problem = self._prompt_problem(length)
            if problem:
                raise ValueError(f"questions[{i}] {problem}")

    @staticmethod
    def _batch_size(images, questions) -> int:
        """The number of (image, question) pairs; 0 answers nothing (an empty list)."""
        # One image and one question are a batch of one, passed as two lists: a string
        # would otherwise count as a list of characters.
        if isinstance(images, Image.Image) or not isinstance(images, Sequence):
            raise TypeError(f"images must be a list of PIL images, got {type(images).__name__}: pass [image]")
        if isinstance(questions, str) or not isinstance(questions, Sequence):
            raise TypeError(f"questions must be a list of strings, got {type(questions).__name__}: pass [question]")
        if len(images) != len(questions):
            raise ValueError(f"images and questions must pair up, got {len(images)} and {len(questions)}")
        return len(images)

    @staticmethod
    def _questions(questions) -> list[str]:
        """The questions as the template takes them (``question_text``), each one checked."""
        out = []
        for i, question in enumerate(questions):
            text = question_text(question) if isinstance(question, str) else ""
            if not text:
                raise ValueError(
                    f"questions[{i}] must be a string with text besides the image placeholder, got {question!r}"
                )
            if not is_text(text):
                raise ValueError(f"questions[{i}] must be valid UTF-8 text without NUL bytes, got {question!r}")
            out.append(text)
        return out

    def _images(self, images) -> list[Image.Image]:
        out = []
        for i, image in enumerate(images):
            if not isinstance(image, Image.Image):
                raise TypeError(f"images[{i}] must be a PIL image, got {type(image).__name__}")
            if image.width < 1 or image.height < 1:
                raise ValueError(f"images[{i}] must be at least 1x1 pixels, got {image.width}x{image.height}")
            check_preprocessable(image, self.size, self.preprocessing, f"images[{i}]")
            try:
                # Decoded here, on the calling thread: a lazily opened image is read from its
                # file once, not by two preprocessing threads at once (the same image asked
                # two questions would share one file position).
                image.load()
                out.append(to_rgb(image))
            except (OSError, ValueError, SyntaxError, EOFError) as error:
                raise ValueError(f"images[{i}] could not be read: {error}") from error
        return out
