"""Pictures of label folders: per sample the image with its heat map, sinks and foreground,
and the grid of map, sinks and labels (`sdrpn viz-labels`), drawn with the thresholds the
folder records."""

from __future__ import annotations

import hashlib
import logging
import os
from collections import Counter
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw
from torch import Tensor

from ..llava.data import SkipSample, check_image_folder, open_image
from ..llava.inputs import centre_crop_square, mean_fill, pad_to_square
from ..pictures import LABEL_COLOURS, heat_rgb, label_rgb, save_atomic, sink_rgb, tile
from .folder import LabelFolder

log = logging.getLogger(__name__)


def label_grid(
    grounding: Tensor,
    is_sink: Tensor,
    labels: Tensor,
    grid_h: int,
    grid_w: int,
    regions: Tensor | Sequence[Sequence[int]] | None = None,
    cell: int = 6,
) -> Image.Image:
    """One row per sample: attention map, sink tokens, labels (planted region outlined)."""
    batch = grounding.shape[0]
    pad = 4
    tile_w, tile_h = grid_w * cell, grid_h * cell
    sheet = Image.new("RGB", (3 * tile_w + 4 * pad, batch * (tile_h + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for b in range(batch):
        g = grounding[b].float().cpu().numpy().reshape(grid_h, grid_w)
        s = is_sink[b].cpu().numpy().reshape(grid_h, grid_w)
        lab = labels[b].cpu().numpy().reshape(grid_h, grid_w)
        y = pad + b * (tile_h + pad)
        for col, rgb in enumerate((heat_rgb(g), sink_rgb(s), label_rgb(lab))):
            x = pad + col * (tile_w + pad)
            sheet.paste(tile(rgb, cell), (x, y))
            if regions is not None:
                r0, c0, r1, c1 = (int(v) for v in regions[b])
                draw.rectangle(
                    [x + c0 * cell, y + r0 * cell, x + c1 * cell - 1, y + r1 * cell - 1], outline=(0, 220, 0)
                )
    return sheet


def overlay_panel(
    image: Image.Image, grounding: np.ndarray, labels: np.ndarray, is_sink: np.ndarray, size: int = 336
) -> Image.Image:
    """The (already padded-to-square) image with the grounding heat map blended in, sink
    cells crossed and the label of every cell as a coloured outline."""
    base = image.convert("RGB").resize((size, size), Image.BICUBIC)
    heat = Image.fromarray(heat_rgb(grounding)).resize((size, size), Image.BILINEAR)
    panel = Image.blend(base, heat, 0.45)
    draw = ImageDraw.Draw(panel)
    grid_h, grid_w = grounding.shape
    ch, cw = size / grid_h, size / grid_w
    for r in range(grid_h):
        for c in range(grid_w):
            box = [c * cw + 1, r * ch + 1, (c + 1) * cw - 2, (r + 1) * ch - 2]
            if labels[r, c] == 1:
                draw.rectangle(box, outline=LABEL_COLOURS[1], width=2)
            if is_sink[r, c]:
                draw.line([box[0], box[1], box[2], box[3]], fill=(255, 255, 255), width=2)
                draw.line([box[0], box[3], box[2], box[1]], fill=(255, 255, 255), width=2)
    return panel


def model_square(image: Image.Image, mode: str) -> Image.Image:
    """The square of the image that the grid covers, at the image's resolution: padded to a
    square ("pad"), or its centre square ("crop")."""
    if mode == "pad":
        return pad_to_square(image, mean_fill())
    return centre_crop_square(image, min(image.size))  # the short side kept: no resize


def picture_name(n: int, sample_id) -> str:
    """``NNNN_ID.png`` with the id in ASCII letters, digits and ``-_.``, cut to 64 characters
    with a hash of the whole id where it is longer (a file name holds at most 255 bytes)."""
    text = str(sample_id)
    safe = "".join(ch if ch.isascii() and (ch.isalnum() or ch in "-_.") else "_" for ch in text)
    if len(safe) > 64:
        safe = safe[:64] + "-" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{n:04d}_{safe}.png"


def visualise_labels(label_dir: str, out: str, num: int = 16, image_folder: str | None = None) -> list[str]:
    """One PNG per sample (image with heat map, sinks and foreground when the image is
    found; then map, sinks and labels on the grid), sinks at the folder's recorded
    threshold and the image as each sample was preprocessed. Returns the written paths.
    ``image_folder`` given must exist; the folder's recorded one may have gone (the
    pictures then show the grids alone)."""
    if image_folder is not None:
        check_image_folder(image_folder)
    folder = LabelFolder(label_dir)
    config = folder.config
    image_folder = image_folder or config.image_folder
    size = config.image_size or 336  # imported labels: LLaVA-1.5's
    written: list[str] = []
    undrawn: Counter = Counter()  # images that could not be drawn, by reason
    for shard in folder.shards():
        for row in shard.rows:
            if len(written) >= num:
                _report_undrawn(undrawn)
                return written
            t = shard.row_tensors(row)
            gh, gw = t["grid"].tolist()
            g = t["grounding"][None]
            sink = t["sink"][None] >= config.sink_threshold
            labels = t["labels"][None].long()
            grid_png = label_grid(g, sink, labels, gh, gw, cell=12)
            panels = [grid_png]
            if image_folder and row.get("image"):
                mode = (row.get("preprocessing") or {}).get("mode", "pad")  # imported labels: LLaVA's
                try:
                    # The label job's checks: a padded 60000x1 image is 10 GB of pixels.
                    image = open_image(image_folder, row["image"], size, mode)
                    panels.insert(
                        0,
                        overlay_panel(
                            model_square(image, mode),
                            g.view(gh, gw).numpy(),
                            labels.view(gh, gw).numpy(),
                            sink.view(gh, gw).numpy(),
                            size=grid_png.height,
                        ),
                    )
                except SkipSample as skip:
                    undrawn[str(skip)] += 1
            sheet = Image.new("RGB", (sum(p.width for p in panels), max(p.height for p in panels)), (255, 255, 255))
            x = 0
            for p in panels:
                sheet.paste(p, (x, 0))
                x += p.width
            path = os.path.join(out, picture_name(len(written), row["id"]))
            save_atomic(sheet, path)
            written.append(path)
    _report_undrawn(undrawn)
    return written


def _report_undrawn(undrawn: Counter) -> None:
    if undrawn:
        reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(undrawn.items()))
        count = sum(undrawn.values())
        log.warning("viz-labels: %d pictures show the grids alone, their images not drawn (%s)", count, reasons)
