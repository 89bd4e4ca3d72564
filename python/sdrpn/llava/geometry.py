"""Where things are: the model's token grid, and RoI boxes mapped between that grid and
source-image pixels for either preprocessing mode."""

from __future__ import annotations

import math
import numbers
from fractions import Fraction

from .inputs import PREPROCESSING_MODES, centre_crop_offset, shortest_edge_size


def model_grid(config) -> tuple[int, int]:
    """(grid_h, grid_w) of the vision tower's patch tokens: image_size // patch_size a side.
    Refuses a model that feeds its image otherwise than as that grid (LLaVA-1.5's "default"
    feature selection, the patch tokens alone)."""
    strategy = getattr(config, "vision_feature_select_strategy", "default")
    if strategy != "default":
        raise ValueError(
            f"vision_feature_select_strategy {strategy!r} is not supported: sdrpn reads a model's image "
            "tokens as a grid of its patches, as LLaVA-1.5 feeds them ('default'); 'full' feeds the class "
            "token too"
        )
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
    resized to size and the long one to int(size * long / short), then the centre cut
    out, so the cut's offset is added back and each side's resize undone (its source
    side / its resized side), in exact rational arithmetic: the whole grid maps to the
    whole short side, and the long side's rounded resize is undone as it was made.
    """
    if mode not in PREPROCESSING_MODES:
        raise ValueError(f"mode must be one of {PREPROCESSING_MODES}, got {mode!r}")
    if width < 1 or height < 1:
        raise ValueError(f"image must be at least 1x1 pixels, got {width}x{height}")
    if min(grid_h, grid_w, size) < 1:
        raise ValueError(f"grid_h, grid_w and size must be >= 1, got {grid_h}, {grid_w} and {size}")
    if mode == "crop":
        left, top = centre_crop_offset(width, height, size)
        resized_w, resized_h = shortest_edge_size(width, height, size)

        def crop_px(v, cells: int, off: int, side: int, resized: int) -> int:
            if math.isinf(v):  # clamped to the image, as in pad mode
                return 0 if v < 0 else side
            source = (Fraction(v) * size / cells + off) * side / resized
            return math.floor(min(max(source, 0), side))

        # Plain numbers first (tensor and numpy scalars, as pad mode takes them): whole ones
        # stay exact, the others as the floats they are.
        x0, y0, x1, y1 = (int(v) if isinstance(v, numbers.Integral) else float(v) for v in box)
        if any(math.isnan(v) for v in (x0, y0, x1, y1)):
            raise ValueError(f"box must hold numbers, got {box!r}")
        return (
            crop_px(x0, grid_w, left, width, resized_w),
            crop_px(y0, grid_h, top, height, resized_h),
            crop_px(x1, grid_w, left, width, resized_w),
            crop_px(y1, grid_h, top, height, resized_h),
        )
    x0, y0, x1, y1 = (float(v) for v in box)
    sx, sy = size / grid_w, size / grid_h
    x0, x1, y0, y1 = x0 * sx, x1 * sx, y0 * sy, y1 * sy
    ratio = min(size / width, size / height)
    off_x = -(size - int(width * ratio)) / 2
    off_y = -(size - int(height * ratio)) / 2

    def px(v: float, off: float, limit: int) -> int:
        return int(min(max((v + off) / ratio, 0.0), float(limit)))

    return px(x0, off_x, width), px(y0, off_y, height), px(x1, off_x, width), px(y1, off_y, height)
