"""The model card (README.md) of an RPN folder: the base model it fits, the labels it learned
from, how it was trained and how it did on held-out labels, with the lines that load it."""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

if TYPE_CHECKING:
    from .model import RPNConfig

# A card carrying this line was written by sdrpn and is rewritten on every save, since it
# describes the weights beside it; one without it was written by hand and is kept.
GENERATED_MARK = "<!-- written by sdrpn at save time; remove this line to keep your edits -->"


def hub_id(name: str | None) -> str | None:
    """`name` when it reads as a Hub id rather than a local path: only those go into the
    card's metadata, which the Hub checks."""
    if not name or os.path.isabs(name) or name.startswith((".", "~")) or os.path.isdir(name):
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def _cell(value) -> str:
    if isinstance(value, float):
        text = f"{value:.4g}"
    elif isinstance(value, dict):
        text = ", ".join(f"{k}={v}" for k, v in sorted(value.items()))
    else:
        text = str(value).replace("\n", "\\n")
    return "`" + text.replace("|", "\\|").replace("`", "'") + "`"


def _table(rows: dict, head: str) -> list[str]:
    rows = {k: v for k, v in rows.items() if v is not None}
    return [f"| {head} | value |", "| --- | --- |", *(f"| {k} | {_cell(v)} |" for k, v in rows.items())]


def rpn_card(
    config: RPNConfig,
    *,
    metrics: dict | None = None,
    training: dict | None = None,
    tags: list[str] | None = None,
) -> ModelCard:
    """The card of an RPN with `config`. `training` (settings) and `metrics` (held-out
    results) are shown when given; `tags` go into the metadata."""
    base = config.base_model
    data = ModelCardData(library_name="sdrpn", base_model=hub_id(base), tags=sorted(set(tags or [])))
    k, t = config.branch_layer, config.depth
    # A local base model is named in the title by its folder: the path is this machine's
    # (the table below keeps it whole).
    short = hub_id(base) or (os.path.basename(os.path.normpath(base)) if base else None)
    lines = [
        GENERATED_MARK,
        "",
        "# SD-RPN region proposal network" + (f" for {short}" if short else ""),
        "",
        "A Region Proposal Network trained by self-distillation (SD-RPN) on a frozen LLaVA"
        + (f" (`{base}`)" if base else "")
        + f": it reads the hidden states entering decoder layer {k}, runs copies of layers {k}..{k + t - 1}, "
        "scores the image tokens, and `sdrpn` crops the region it finds from the full-resolution image.",
        "",
        "## Base model and labels",
        "",
        *_table(
            {
                "base model": base,
                "architecture fingerprint": config.base_config_fingerprint,
                "image grid": "x".join(map(str, config.grid)) if config.grid else None,
                "image size": config.image_size,
                "preset": config.preset,
                "prompt template": config.prompt_template,
                "image preprocessing": config.preprocessing,
                "recommended RoI options": config.roi,
            },
            "setting",
        ),
    ]
    if training:
        lines += ["", "## Training", "", *_table(training, "setting")]
    if metrics:
        lines += ["", "## Held-out metrics", "", "On pseudo labels held out from training.", ""]
        lines += _table(metrics, "metric")
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from sdrpn.llava.loading import load_llava",
        "from sdrpn.rpn import RegionProposalNetwork",
        "",
        f"model, tokenizer = load_llava({json.dumps(config.base_model or '<base model folder or Hub id>')})",
        'rpn = RegionProposalNetwork.from_pretrained("<this folder or Hub id>", model=model)',
        "```",
        "",
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))
