"""An RPN set up for a label folder as `sdrpn train` sets it up: the preset's layers and RoI
options, the labels' prompt template and preprocessing, and the checks that the labels
are the base model's own."""

from __future__ import annotations

import logging

from torch import nn

from ..labels.folder import LabelFolder
from ..llava.geometry import model_grid
from ..llava.model_facts import fingerprints_match, model_identity, same_model_name
from ..llava.presets import LlavaPreset, model_preset, preset_from_dict, resolve_preset
from ..options import RoiOptions
from .model import RegionProposalNetwork

log = logging.getLogger(__name__)


def check_labels_base_model(labels: str, recorded: dict | None, model: nn.Module) -> None:
    """Refuse labels made by another base model: they are that model's attention, and an
    RPN trained on them fits neither model. The label folder records the architecture's
    fingerprint and (since this check) a weights fingerprint; a folder without the latter
    is only warned about when the model's name differs."""
    theirs = (recorded or {}).get("config_fingerprint")
    if theirs is None:
        # Converted from the reference's pickles, or labelled before the fingerprint was recorded.
        log.info("%s records no base-model fingerprint: not checked", labels)
        return
    ours = model_identity(model)
    advice = "train with the model the labels were made by, or label with this one"
    if theirs != ours["config_fingerprint"]:
        raise ValueError(
            f"the labels in {labels} were made by another base model: {recorded.get('name')!r} (architecture "
            f"fingerprint {theirs}), while --model {ours['name']!r} has another architecture (fingerprint "
            f"{ours['config_fingerprint']}): {advice}"
        )
    weights = recorded.get("weights_fingerprint")
    if weights is not None:
        if not fingerprints_match(weights, ours["weights_fingerprint"]):
            raise ValueError(
                f"the labels in {labels} were made by another base model: {recorded.get('name')!r}, of the same "
                f"architecture as --model {ours['name']!r} but with other weights: {advice}"
            )
    elif not same_model_name(recorded.get("name"), ours["name"]):
        log.warning(
            "the labels in %s were made by %r and --model is %r: the same architecture, but the label folder "
            "records no weights to compare; %s",
            labels,
            recorded.get("name"),
            ours["name"],
            advice,
        )


def check_labels_fit(labels: str, config, model: nn.Module) -> None:
    """Refuse labels on another grid or image size than the model's (a folder that records
    no base model, or records it without them, passes the fingerprint check): its samples
    would fail one by one in the model, or train an RPN on cells that are not its own."""
    grid, size = list(model_grid(model.config)), model.config.vision_config.image_size
    if config.grid is not None and list(config.grid) != grid:
        raise ValueError(
            f"the labels in {labels} are on a {config.grid[0]}x{config.grid[1]} grid, but --model's images "
            f"make {grid[0]}x{grid[1]} cells: train with the model the labels were made by"
        )
    if config.image_size is not None and config.image_size != size:
        raise ValueError(
            f"the labels in {labels} were made at image size {config.image_size}, but --model takes {size}: "
            f"train with the model the labels were made by"
        )


def _fitting(preset: LlavaPreset | None, model: nn.Module) -> LlavaPreset | None:
    """The model's own preset for labels that name none, where it fits the model: a preset
    taken by the model's depth alone may not (another 32-layer model), and what training
    takes of it (the branch layer, depth and RoI options) then falls back to SPEC's."""
    if preset is None:
        return None
    try:
        preset.check_fits(model.config)
    except ValueError as err:
        log.info("the labels record no preset and the model's own does not fit it (%s): SPEC's K=15, T=3", err)
        return None
    return preset


def rpn_settings(
    model: nn.Module,
    labels: str,
    *,
    preset: str | None = None,
    branch_layer: int | None = None,
    depth: int | None = None,
    roi_overrides: dict | None = None,
) -> dict:
    """``RegionProposalNetwork.from_llava``'s arguments for an RPN trained on the labels in
    ``labels``: the preset's branch layer, depth and RoI options (``preset`` if given, a name,
    a JSON file or "auto" as ``resolve_preset`` takes them; else the one the labels record;
    else the model's own, its folder's or the LLaVA-1.5 preset of its depth, where it fits;
    else 15, 3 and SPEC's RoI defaults), any of which the other
    arguments override, and the labels' prompt template and preprocessing, so that the RPN
    prompts at inference as its labels were made. Refuses labels made by another base model."""
    config = LabelFolder(labels).config
    check_labels_base_model(labels, config.model, model)
    check_labels_fit(labels, config, model)
    if preset is not None:  # a name, a file or "auto", as `sdrpn label` takes them
        chosen = resolve_preset(preset, model)
    elif config.preset:
        chosen = preset_from_dict(config.preset)
        chosen.check_fits(model.config)
    else:  # labels that record none (converted from the reference's pickles)
        chosen = _fitting(model_preset(model), model)
    return {
        "branch_layer": branch_layer if branch_layer is not None else (chosen.branch_layer if chosen else 15),
        "depth": depth if depth is not None else (chosen.depth if chosen else 3),
        "preset": chosen.name if chosen else None,
        "prompt_template": config.prompt_template,
        "preprocessing": config.options.preprocessing,
        "roi": (chosen.roi if chosen else RoiOptions()).updated(**(roi_overrides or {})),
    }


def rpn_for_labels(
    model: nn.Module,
    labels: str,
    *,
    preset: str | None = None,
    branch_layer: int | None = None,
    depth: int | None = None,
    roi_overrides: dict | None = None,
) -> RegionProposalNetwork:
    """A new RPN on ``model`` for the labels in ``labels``, set up as ``sdrpn train`` sets it
    up (``rpn_settings`` says what the other arguments override). For training loops of
    one's own, such as a Hugging Face Trainer's."""
    settings = rpn_settings(
        model, labels, preset=preset, branch_layer=branch_layer, depth=depth, roi_overrides=roi_overrides
    )
    return RegionProposalNetwork.from_llava(model, **settings)
