"""A label folder whose labels mark a known region: a bright square drawn in each image."""

from __future__ import annotations

import os

import torch
from PIL import Image

from sdrpn.io_utils import write_json
from sdrpn.labels.folder import SUMMARY_NAME, LabelFolder, LabelFolderConfig, shard_name
from sdrpn.labels.options import LabelOptions
from sdrpn.ops import IGNORE_INDEX


def write_region_labels(
    folder, image_folder, num: int, grid: int, image_size: int, seed: int = 0, shard_size: int = 64, ignored=False
) -> None:
    """`num` images of image_size pixels (already square) with a white square on a dark
    noisy background covering 1x1 or 2x2 grid cells; labels 1 on those cells, 0 elsewhere
    (with ``ignored``, every cell ignored: all-ignore samples)."""
    os.makedirs(folder, exist_ok=True)
    os.makedirs(image_folder, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    cell = image_size // grid
    rows, labels = [], []
    for i in range(num):
        side = int(torch.randint(1, 3, (1,), generator=gen))
        r = int(torch.randint(0, grid - side + 1, (1,), generator=gen))
        c = int(torch.randint(0, grid - side + 1, (1,), generator=gen))
        pixels = (torch.rand(image_size, image_size, 3, generator=gen) * 60).to(torch.uint8)
        pixels[r * cell : (r + side) * cell, c * cell : (c + side) * cell] = 255
        Image.fromarray(pixels.numpy()).save(os.path.join(image_folder, f"{i}.png"))
        lab = torch.zeros(grid, grid, dtype=torch.int8)
        lab[r : r + side, c : c + side] = 1
        labels.append(lab.flatten().fill_(IGNORE_INDEX) if ignored else lab.flatten())
        rows.append(
            {
                "id": f"r{i}",
                "index": i,
                "image": f"{i}.png",
                "question": "where is the tag ?",
                "answer": "here",
                "answer_source": "given",
                "image_size": [image_size, image_size],
                "preprocessing": {"mode": "pad", "width": image_size, "height": image_size, "size": image_size},
            }
        )
    n_cells = grid * grid
    labels_folder = LabelFolder(str(folder))
    for shard, start in enumerate(range(0, num, shard_size)):
        part = rows[start : start + shard_size]
        lab = torch.stack(labels[start : start + shard_size])
        tensors = {
            "grounding": torch.zeros(len(part), n_cells),
            "sink": torch.zeros(len(part), n_cells),
            "labels": lab,
            "grid": torch.tensor([[grid, grid]] * len(part)),
        }
        for row, cells in zip(part, lab):
            row.update(
                fg=int((cells == 1).sum()), bg=int((cells == 0).sum()), ignore=int((cells == IGNORE_INDEX).sum())
            )
        labels_folder.write_shard(shard_name(0, shard), part, tensors, [], start, start + len(part) - 1, shard)
    write_json(labels_folder.file(SUMMARY_NAME), labels_folder.summary())  # the job finished
    labels_folder.write_config(
        LabelFolderConfig(
            options=LabelOptions(answers="given"),
            image_folder=os.path.abspath(image_folder),
            image_size=image_size,
            grid=[grid, grid],
        )
    )
