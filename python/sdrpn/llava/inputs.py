"""The model's inputs as LLaVA-1.5 builds them: images (preprocessed, and recorded so that
boxes map back), prompts (template, split around the image tokens), batches (left padding,
position ids)."""

from __future__ import annotations

import string
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# LLaVA-1.5's conversation (llava_v1): system text, then the image, the question, "ASSISTANT:".
SYSTEM_TEXT = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
PROMPT_TEMPLATE = SYSTEM_TEXT + " USER: <image>\n{question} ASSISTANT:"
IMAGE_PLACEHOLDER = "<image>"
# "pad": LLaVA-1.5 (pad to a square with the mean colour, resize); "crop": Hugging Face's
# default CLIP processing (resize the shortest edge, cut the centre).
PREPROCESSING_MODES = ("pad", "crop")


@dataclass(frozen=True)
class Preprocessing:
    """How one image became the encoder's input: "pad" (LLaVA-1.5: pad to a square with the
    mean colour, then resize) from a source of width x height to size x size."""

    mode: str
    width: int
    height: int
    size: int

    def to_dict(self) -> dict:
        return asdict(self)


def mean_fill(mean=CLIP_MEAN) -> tuple[int, int, int]:
    """The normalisation mean as an 8-bit colour: what padding is filled with. Truncated, not
    rounded, as LLaVA's expand2square and HF's LlavaImageProcessor(do_pad=True) do:
    (122, 116, 104) for CLIP."""
    return tuple(int(255 * m) for m in mean)


def pad_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """Centre the image on a square canvas of the mean colour (LLaVA-1.5's expand2square)."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


def to_rgb(image: Image.Image) -> Image.Image:
    """The image as 8-bit RGB. Grayscale, palette and CMYK convert as Pillow converts them
    (as LLaVA's ``convert("RGB")`` does), RGBA drops its alpha; 16-bit grayscale (a 16-bit
    PNG's ``I;16``) keeps its high byte, where Pillow's own conversion clips every value
    above 255 to white. Premultiplied ``La`` goes through ``LA``: Pillow converts it to
    nothing else."""
    if image.mode.startswith("I;16"):
        image = Image.fromarray((np.asarray(image, dtype=np.uint16) >> 8).astype(np.uint8))
    if image.mode == "La":
        image = image.convert("LA")
    return image if image.mode == "RGB" else image.convert("RGB")


def load_rgb(path: str) -> Image.Image:
    """Open and decode an image as RGB (``to_rgb``). EXIF orientation is not applied: the
    stored pixels are the image, as LLaVA reads them."""
    with Image.open(path) as img:
        img.load()
        return to_rgb(img)


def shortest_edge_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) after Hugging Face's shortest-edge resize: the short side becomes
    ``size``, the long one ``int(size * long / short)``, as its processors compute it (a
    product with the ratio size / short rounds below an integer for some sides)."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def centre_crop_offset(width: int, height: int, size: int) -> tuple[int, int]:
    """(left, top) of the size x size centre cut, in the shortest-edge-resized image."""
    resized_w, resized_h = shortest_edge_size(width, height, size)
    return (resized_w - size) // 2, (resized_h - size) // 2


def too_large_to_preprocess(width: int, height: int, size: int, mode: str) -> str | None:
    """Why preprocessing a width x height image for a size x size input would make more
    pixels than PIL's budget allows, or None: pad mode's square canvas (10000x10000 for a
    10000x5000 image; a square needs none), crop mode's shortest-edge resize (336x3178560
    for a 1x9460 image at 336)."""
    limit = Image.MAX_IMAGE_PIXELS or float("inf")
    if mode == "pad":
        side = max(width, height)
        return "too large to pad to a square" if width != height and side * side > limit else None
    resized_w, resized_h = shortest_edge_size(width, height, size)
    return f"too long to resize its short side to {size}" if resized_w * resized_h > limit else None


def check_preprocessable(image: Image.Image, size: int, mode: str, name: str) -> None:
    """ValueError naming the image ``name`` where ``too_large_to_preprocess`` says why."""
    reason = too_large_to_preprocess(image.width, image.height, size, mode)
    if reason:
        raise ValueError(
            f"{name}: {image.width}x{image.height} is {reason} in {mode} mode "
            f"(over PIL's {Image.MAX_IMAGE_PIXELS} pixels); scale it down first"
        )


def centre_crop_square(image: Image.Image, size: int) -> Image.Image:
    """Hugging Face's default CLIP preprocessing: shortest edge resized to size, centre cut."""
    resized = image.resize(shortest_edge_size(*image.size, size), Image.BICUBIC)
    left, top = centre_crop_offset(*image.size, size)
    return resized.crop((left, top, left + size, top + size))


def normalise(image: Image.Image, mean=CLIP_MEAN, std=CLIP_STD) -> Tensor:
    """(3, H, W) float32 CLIP-normalised pixel values of an RGB image.

    Computed in numpy, the same float32 operations as torch's in the same order (so the
    same values), on the calling thread: torch's CPU ops on an image this size would wake
    its thread pool in the middle of the host-bound answering path."""
    pixels = np.asarray(image, dtype=np.float32) / np.float32(255.0)
    pixels = (pixels - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))


def pixel_batch(pixels: list[Tensor], device, dtype: torch.dtype) -> Tensor:
    """(B, 3, H, W) on `device` in `dtype` from per-image CPU float32 pixel values, stacked by
    numpy on the calling thread for the reason given in `normalise`. On CUDA the stack is
    made in pinned memory and copied without the host waiting, then converted to `dtype` on
    the device: a copy from pageable memory waits for the work queued on the device, and a
    blocking copy converts on the host (32 images on 2 cores: 19 ms stacked and converted by
    torch, 4 ms stacked by numpy)."""
    arrays = [p.numpy() for p in pixels]
    if torch.device(device).type != "cuda" or not arrays:
        return torch.from_numpy(np.stack(arrays)).to(device, dtype)
    host = torch.empty((len(arrays), *arrays[0].shape), dtype=torch.float32, pin_memory=True)
    np.stack(arrays, out=host.numpy())
    return host.to(device, dtype, non_blocking=True)


def preprocess_image(
    image: Image.Image, size: int, mean=CLIP_MEAN, std=CLIP_STD, mode: str = "pad"
) -> tuple[Tensor, Preprocessing]:
    """(3, size, size) float32 pixel values and the record of how they were made: "pad"
    (LLaVA-1.5: pad to a square with the mean colour, resize) or "crop" (resize the
    shortest edge, cut the centre)."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL image, got {type(image).__name__}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be an int >= 1, got {size!r}")
    if image.width < 1 or image.height < 1:
        raise ValueError(f"image must be at least 1x1 pixels, got {image.width}x{image.height}")
    if mode not in PREPROCESSING_MODES:
        raise ValueError(f"mode must be one of {PREPROCESSING_MODES}, got {mode!r}")
    check_preprocessable(image, size, mode, "image")
    rgb = to_rgb(image)
    if mode == "pad":
        square = pad_to_square(rgb, mean_fill(mean)).resize((size, size), Image.BICUBIC)
    else:
        square = centre_crop_square(rgb, size)
    return normalise(square, mean, std), Preprocessing(mode, image.width, image.height, size)


def check_template(template: str) -> str:
    """A prompt template holds the image placeholder once and one plain {question} field,
    nothing else that str.format would act on (no attribute access, no other fields)."""
    if not isinstance(template, str) or template.count(IMAGE_PLACEHOLDER) != 1:
        raise ValueError(f"prompt_template must hold {IMAGE_PLACEHOLDER} once, got {template!r}")
    try:
        fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(template) if name is not None]
    except ValueError as err:
        raise ValueError(f"prompt_template is not a valid format string ({err}), got {template!r}") from None
    if fields != [("question", "", None)]:
        raise ValueError(
            f"prompt_template must hold exactly one plain {{question}} field and no other braces, got {template!r}"
        )
    return template


def check_rpn_template(template: str) -> str:
    """A template an RPN can prompt with (``check_template``) with text after the image: the
    RPN reads the last prompt token, which must come after the image, and pass 2 inserts
    the crops between the image and that text."""
    if not check_template(template).partition(IMAGE_PLACEHOLDER)[2].strip():
        raise ValueError(f"prompt_template must have text after {IMAGE_PLACEHOLDER}, got {template!r}")
    return template


def is_text(value: str) -> bool:
    """Encodable text without NUL bytes: what a tokenizer and a file system accept (JSON
    lets a lone surrogate such as "\\ud800" through, and so does a command line's invalid
    UTF-8)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return "\x00" not in value


def question_text(question: str) -> str:
    """The question as the template takes it: LLaVA-format questions carry the image
    placeholder, which the template places itself (left in, the tokenizer would read it
    as one more image token). Removed until none is left: removing "<image>" from
    "<im<image>age>" makes one, and the text must be the same however often it is taken."""
    while IMAGE_PLACEHOLDER in question:
        question = question.replace(IMAGE_PLACEHOLDER, "")
    return question.strip()


def split_prompt_ids(
    tokenizer, question: str, image_token_id: int, num_image_tokens: int, template: str = PROMPT_TEMPLATE
) -> tuple[list[int], list[int]]:
    """The prompt as (prefix, suffix): the prefix ends with the num_image_tokens image
    tokens that replace the placeholder, the suffix holds the question and what follows.

    The text around the placeholder is tokenized on its own, so the image tokens never
    merge with neighbouring text whatever the tokenizer.
    """
    text = question_text(question)
    before, _, after = check_template(template).format(question=text).partition(IMAGE_PLACEHOLDER)
    prefix = tokenizer(before, add_special_tokens=True)["input_ids"] + [image_token_id] * num_image_tokens
    return prefix, tokenizer(after, add_special_tokens=False)["input_ids"]


def prompt_token_ids(
    tokenizer, question: str, image_token_id: int, num_image_tokens: int, template: str = PROMPT_TEMPLATE
) -> list[int]:
    """The whole prompt of split_prompt_ids as one list."""
    prefix, suffix = split_prompt_ids(tokenizer, question, image_token_id, num_image_tokens, template)
    return prefix + suffix


def crop_pixels(image: Image.Image, box, size: int, mean=CLIP_MEAN, std=CLIP_STD) -> Tensor:
    """A source-image crop [x0, y0, x1, y1) (at least one pixel) resized to the encoder's
    input with PIL bilinear (antialiased when shrinking) and normalised: (3, size, size).
    A box wholly in the pad-to-square padding maps to zero size on the image's edge: the
    crop is then the edge's last row or column (at the far edge as at the near one), not
    the pad colour PIL would fill in beyond the image."""
    x0, y0, x1, y1 = box
    x0, y0 = min(x0, image.width - 1), min(y0, image.height - 1)
    crop = to_rgb(image.crop((x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)))).resize((size, size), Image.BILINEAR)
    return normalise(crop, mean, std)


def left_pad(seqs: list[list[int]], pad_id: int, device=None) -> tuple[Tensor, Tensor]:
    """Token lists padded on the left to one length, as batched generation wants them:
    ids and attention mask, both (B, L) int64."""
    return _pad(seqs, pad_id, device, left=True)


def right_pad(seqs: list[list[int]], pad_id: int, device=None) -> tuple[Tensor, Tensor]:
    """Token lists padded on the right to one length: ids and attention mask, (B, L) int64."""
    return _pad(seqs, pad_id, device, left=False)


def _pad(seqs: list[list[int]], pad_id: int, device, left: bool) -> tuple[Tensor, Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for b, s in enumerate(seqs):
        cols = slice(width - len(s), width) if left else slice(0, len(s))
        ids[b, cols] = torch.tensor(s, dtype=torch.long)
        mask[b, cols] = 1
    return ids.to(device), mask.to(device)


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Positions that skip left padding, as generate() numbers them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
