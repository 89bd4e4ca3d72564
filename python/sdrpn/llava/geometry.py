"""Where things are: the model's token grid, and RoI boxes mapped between that grid and
source-image pixels for either preprocessing mode."""

from __future__ import annotations

from .inputs import PREPROCESSING_MODES, centre_crop_offset


def model_grid(config) -> tuple[int, int]:
    """(grid_h, grid_w) of the vision tower's patch tokens: image_size // patch_size a side."""
    vision = config.vision_config
    side = vision.image_size // vision.patch_size
    return side, side


def grid_box_to_pixels(
    box, grid_h: int, grid_w: int, width: int, height: int, size: int = 336, mode: str = "pad"
) -> tuple[int, int, int, int]:
    """A grid box [x0, y0, x1, y1) to source pixels, for the preprocessing that was used.

    "pad" (LLaVA-1.5): the image was padded to a square and resized to size, so the
    reference arithmetic applies: scale to size, remove the padding, undo the resize,
    clamp to the image, truncate. "crop" (Hugging Face's default): the shortest edge was
    resized to size and the centre cut out, so the offset of that cut is added back and
    the resize undone as short side / size (a product of integers first: the whole grid
    maps to the whole short side, where dividing by the ratio can fall a pixel short).
    """
    if mode not in PREPROCESSING_MODES:
        raise ValueError(f"mode must be one of {PREPROCESSING_MODES}, got {mode!r}")
    if width < 1 or height < 1:
        raise ValueError(f"image must be at least 1x1 pixels, got {width}x{height}")
    x0, y0, x1, y1 = (float(v) for v in box)
    sx, sy = size / grid_w, size / grid_h
    x0, x1, y0, y1 = x0 * sx, x1 * sx, y0 * sy, y1 * sy
    if mode == "pad":
        ratio = min(size / width, size / height)
        off_x = -(size - int(width * ratio)) / 2
        off_y = -(size - int(height * ratio)) / 2

        def px(v: float, off: float, limit: int) -> int:
            return int(min(max((v + off) / ratio, 0.0), float(limit)))
    else:
        off_x, off_y = centre_crop_offset(width, height, size)
        short = min(width, height)

        def px(v: float, off: float, limit: int) -> int:
            return int(min(max((v + off) * short / size, 0.0), float(limit)))

    return px(x0, off_x, width), px(y0, off_y, height), px(x1, off_x, width), px(y1, off_y, height)
