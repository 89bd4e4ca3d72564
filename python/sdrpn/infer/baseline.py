"""The baseline rows: LLaVA-1.5 answering from the thumbnail alone, with the prompt template,
preprocessing and normalisation SDRPNLlava uses, so that the two differ only by the crops."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from torch import nn

from ..llava.attention_kernels import without_cudnn_attention
from ..llava.decode import answer_limits
from ..llava.inputs import PROMPT_TEMPLATE, left_pad, prompt_token_ids
from .answering import LlavaAnswering


class BaseLlava(LlavaAnswering):
    """Greedy answers of the base model for batches of images and questions (no RPN).

    ``processor`` is a Hugging Face processor or its tokenizer; its image processor's mean
    and std normalise the images where it has one (CLIP's otherwise), as in SDRPNLlava.
    """

    def __init__(
        self, model: nn.Module, processor, *, prompt_template: str = PROMPT_TEMPLATE, preprocessing: str = "pad"
    ):
        super().__init__(model, processor, prompt_template=prompt_template, preprocessing=preprocessing)

    @torch.no_grad()
    @without_cudnn_attention()
    def generate(self, images: Sequence[Image.Image], questions: Sequence[str], max_new_tokens: int = 128) -> list[str]:
        """One greedy answer per (image, question); a sample stops at its end-of-sequence token."""
        max_new_tokens = self.checked_max_new_tokens(max_new_tokens)
        if not self._batch_size(images, questions):
            return []
        images = self._images(images)
        device = self.device
        prompts = [
            prompt_token_ids(self.tokenizer, q, self.image_token_id, self.num_cells, self.template)
            for q in self._questions(questions)
        ]
        self._check_prompt_lengths([len(p) for p in prompts])
        # generate takes one count for the batch; each row is cut to its own where the
        # context ends (the rows of a batch do not see each other).
        limits = answer_limits([len(p) for p in prompts], max_new_tokens, self.context)
        ids, mask = left_pad(prompts, self.pad_id, device)
        out = self.model.generate(
            input_ids=ids,
            attention_mask=mask,
            pixel_values=self._pixels(images),
            max_new_tokens=max(limits),
            do_sample=False,
            num_beams=1,
            pad_token_id=self.pad_id,
            eos_token_id=self.tokenizer.eos_token_id,
        )
        rows = [row[:limit] for row, limit in zip(out[:, ids.shape[1] :].tolist(), limits)]
        return self.tokenizer.batch_decode(rows, skip_special_tokens=True)
