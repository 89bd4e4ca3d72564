"""`sdrpn viz-labels`: pictures of the first samples of a label folder."""

from __future__ import annotations

import glob
import os

from PIL import Image
from safetensors.torch import load_file

from .data import SkipSample, resolve_image
from .io_utils import read_jsonl
from .preprocess import load_rgb, mean_fill, pad_to_square
from .viz import label_grid, overlay_panel, save_atomic


def visualise_labels(label_dir: str, out: str, num: int = 16, image_folder: str | None = None,
                     sink_threshold: float = 1e-3) -> list[str]:
    """One PNG per sample (image with heat map, sinks and foreground when the image is
    found; then map, sinks and labels on the grid). Returns the written paths."""
    written: list[str] = []
    for index_path in sorted(glob.glob(os.path.join(label_dir, "rank*-shard*.jsonl"))):
        if index_path.endswith(".skipped.jsonl") or not os.path.exists(
                index_path[: -len(".jsonl")] + ".done.json"):
            continue
        rows = read_jsonl(index_path)
        if not rows:
            continue
        tensors = load_file(index_path[: -len(".jsonl")] + ".safetensors")
        for row in rows:
            if len(written) >= num:
                return written
            i = row["row"]
            gh, gw = tensors["grid"][i].tolist()
            g = tensors["grounding"][i:i + 1]
            sink = tensors["sink"][i:i + 1] >= sink_threshold
            labels = tensors["labels"][i:i + 1].long()
            grid_png = label_grid(g, sink, labels, gh, gw, cell=12)
            panels = [grid_png]
            if image_folder and row.get("image"):
                try:
                    image = load_rgb(resolve_image(image_folder, row["image"]))
                    panels.insert(0, overlay_panel(pad_to_square(image, mean_fill()),
                                                   g.view(gh, gw).numpy(),
                                                   labels.view(gh, gw).numpy(),
                                                   sink.view(gh, gw).numpy(), size=grid_png.height))
                except (SkipSample, OSError):
                    pass
            sheet = Image.new("RGB", (sum(p.width for p in panels), max(p.height for p in panels)),
                              (255, 255, 255))
            x = 0
            for p in panels:
                sheet.paste(p, (x, 0))
                x += p.width
            safe_id = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in str(row["id"]))
            path = os.path.join(out, f"{len(written):04d}_{safe_id}.png")
            save_atomic(sheet, path)
            written.append(path)
    return written


__all__ = ["visualise_labels"]
