"""The built-in demo: label synthetic attention maps with known regions and draw them."""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass

import torch

from .. import ops
from ..io_utils import write_json
from ..ops import SINK_THRESHOLD
from ..pictures import save_atomic
from .synthetic_maps import make_synthetic_maps
from .viz import label_grid

log = logging.getLogger(__name__)


# The demo draws every map: 200K cells (350 maps of 24x24) make a picture of 22M pixels.
DEMO_MAX_CELLS = 200_000


@dataclass
class LabelDemoConfig:
    out: str = "outputs/label-demo"
    batch: int = 12
    grid_h: int = 24
    grid_w: int = 24
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self):
        cells = self.batch * self.grid_h * self.grid_w
        if cells > DEMO_MAX_CELLS:
            raise ValueError(
                f"label-demo draws at most {DEMO_MAX_CELLS} cells, got --batch {self.batch} x --grid "
                f"{self.grid_h}x{self.grid_w} = {cells}"
            )


def region_iou(labels: torch.Tensor, regions: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    """IoU between each sample's foreground cells and its planted region, (B,) float."""
    rows = torch.arange(grid_h)[None, :, None]
    cols = torch.arange(grid_w)[None, None, :]
    r0, c0, r1, c1 = (regions[:, i, None, None] for i in range(4))
    planted = (rows >= r0) & (rows < r1) & (cols >= c0) & (cols < c1)
    fg = (labels == 1).view(-1, grid_h, grid_w)
    inter = (fg & planted).flatten(1).sum(1)
    union = (fg | planted).flatten(1).sum(1)
    return inter.float() / union.clamp(min=1).float()


def run_label_demo(cfg: LabelDemoConfig) -> dict:
    maps = make_synthetic_maps(cfg.batch, cfg.grid_h, cfg.grid_w, seed=cfg.seed)
    grounding = maps.grounding.to(cfg.device)
    sink = maps.sink.to(cfg.device)
    labels = ops.pseudo_labels(grounding, sink, cfg.grid_h, cfg.grid_w).cpu()
    stats = ops.pseudo_label_stats(labels)
    with_signal = stats[:, 2] < labels.shape[1]
    iou = region_iou(labels, maps.regions, cfg.grid_h, cfg.grid_w)
    is_sink = maps.sink >= SINK_THRESHOLD

    png = os.path.join(cfg.out, "labels_grid.png")
    save_atomic(label_grid(maps.grounding, is_sink, labels, cfg.grid_h, cfg.grid_w, maps.regions), png)
    summary = {
        "config": asdict(cfg),
        "samples": cfg.batch,
        "with_signal": int(with_signal.sum()),
        "all_ignore": int((~with_signal).sum()),
        "sinks_removed": int(is_sink.sum()),
        "mean_fg_iou_with_region": round(float(iou[with_signal].mean()) if with_signal.any() else 0.0, 4),
        "cells": {
            "foreground": int(stats[:, 0].sum()),
            "background": int(stats[:, 1].sum()),
            "ignore": int(stats[:, 2].sum()),
        },
        "png": png,
    }
    write_json(os.path.join(cfg.out, "summary.json"), summary)
    return summary


def summary_line(summary: dict) -> str:
    cfg = summary["config"]
    return (
        f"labelled {summary['samples']} maps ({cfg['grid_h']}x{cfg['grid_w']}): "
        f"{summary['with_signal']} with signal, {summary['all_ignore']} all-ignore, "
        f"{summary['sinks_removed']} sink tokens removed, mean foreground IoU with the planted "
        f"region {summary['mean_fg_iou_with_region']:.3f}; wrote {summary['png']}"
    )
