"""The synthetic task's report: metrics.json, report.md (accuracy and localisation tables)
and examples.png (per test image: the image and true box, the attention map, the pseudo
labels, the RPN's map and boxes, the crop, and the answers)."""

from __future__ import annotations

import os
from collections import Counter

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..infer.viz import roi_overlay
from ..io_utils import write_json, write_text
from ..pictures import heat_rgb, label_rgb, save_atomic
from .metrics import answer_changes, normalise_answer
from .pipeline import labelled_maps

SETTINGS = [
    ("base", "base model (thumbnail only)"),
    ("random_crop", "random crop of the same size"),
    ("sdrpn_raw_labels", "SD-RPN, RPN trained on raw-attention labels"),
    ("sdrpn", "**SD-RPN** (the crop mode its RPN folder records)"),
    ("sdrpn_mask", "SD-RPN, mask-mode crops"),
    ("sdrpn_bbox", "SD-RPN, bbox-mode crops"),
    ("gt_crop", "ground-truth crop (upper bound)"),
]
KINDS = ["read", "colour", "where", "count", "all"]
PANEL = 168  # pixels per picture in the example grid


def metrics_payload(result: dict) -> dict:
    return {
        "accuracy": result["accuracy"],
        "localisation": result["localisation"],
        "label_summary": result.get("label_summary", {}),
        "test_samples": len(result["samples"]),
        "questions": dict(sorted(Counter(s.kind for s in result["samples"]).items())),
        # SD-RPN against the thumbnail alone, question by question.
        "changes": answer_changes(result["samples"], result["answers"]["base"], result["answers"]["sdrpn"])
        if {"base", "sdrpn"} <= set(result.get("answers", {}))
        else {},
        "config": result.get("config", {}),
        "base_model": result.get("base_model", {}),
    }


def spread_note(questions: dict) -> str:
    """How far one accuracy of the table moves by chance at this test-set size: the binomial
    standard error at p = 0.5, its largest, for the fewest questions of a kind."""
    counts = ", ".join(f"{k} {n}" for k, n in questions.items())
    fewest = min(questions.values())
    return (
        f"Questions per kind: {counts}. With {fewest} question{'s' * (fewest != 1)} an accuracy's standard error is at "
        f"most {50 / fewest**0.5:.1f} points (binomial, p = 0.5): differences between settings "
        "smaller than about twice that are within chance."
    )


def _pct(v: float) -> str:
    return f"{100 * v:.1f}"


def markdown(metrics: dict, title: str, examples_png: str | None) -> str:
    acc, loc = metrics["accuracy"], metrics["localisation"]
    lines = [f"# {title}", ""]
    cfg = metrics.get("config", {})
    lines += [
        f"{metrics['test_samples']} held-out test images; RPN trained on "
        f"{cfg.get('train_count', '?')} samples labelled by `sdrpn label --answers self` "
        "(the base model's own answers and attention; no ground-truth box anywhere in the "
        "RPN's training). Accuracy in % (exact match), greedy decoding.",
        "",
    ]
    lines += ["| setting | " + " | ".join(KINDS) + " |", "|---|" + "---:|" * len(KINDS)]
    for key, name in SETTINGS:
        if key in acc:
            lines.append(f"| {name} | " + " | ".join(_pct(acc[key].get(k, 0.0)) for k in KINDS) + " |")
    if "sdrpn" in acc and "base" in acc:
        gain = acc["sdrpn"]["read"] - acc["base"]["read"]
        gap = acc["gt_crop"]["read"] - acc["sdrpn"]["read"]
        lines += [
            "",
            f"Reading the tag: SD-RPN {gain * 100:+.1f} points over the base model, "
            f"{gap * 100:.1f} points under the ground-truth crop.",
        ]
    if metrics.get("questions"):
        lines += ["", spread_note(metrics["questions"])]
    if metrics.get("changes"):
        lines += [
            "",
            "What SD-RPN's crop changed against the thumbnail alone, question by question "
            "(paired standard error of the change = sqrt(changed) / questions):",
            "",
            "| kind | questions | turned right | turned wrong | change | paired SE |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {kind} | {r['questions']} | {r['to_right']} | {r['to_wrong']} | "
            f"{100 * (r['to_right'] - r['to_wrong']) / r['questions']:+.1f} | {r['paired_se']:.1f} |"
            for kind, r in metrics["changes"].items()
        ]
    lines += [
        "",
        "Localisation on the same images (a box per sample; IoU with the tag's grid cells, "
        "which is the best a grid box can reach, and with the tag itself; hit = a box holds the "
        "whole tag: over all questions, over the questions about the tag (count questions ask "
        "for circles and may rightly look there) and over code questions, the ones the crop is for):",
        "",
        "| boxes from | IoU (cells) | IoU (target) | hit rate | hit rate, tag questions | "
        "hit rate, code questions | no box |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in loc.items():
        rates = " | ".join(_pct(row[k]) if k in row else "-" for k in ("hit_rate", "hit_rate_tag", "hit_rate_read"))
        lines.append(f"| {name} | {row['iou_cells']:.3f} | {row['iou_target']:.3f} | {rates} | {_pct(row['no_box'])} |")
    base = metrics.get("base_model") or {}
    if base.get("layers"):
        lines += [
            "",
            "Where the base model looks (answer tokens' attention to the image on 128 validation "
            "images; mass = share on the target's cells over their share of the grid; label box "
            "holds the tag = SPEC's labelling rule on that map gives a foreground box holding the "
            "tag, on the questions about the tag):",
            "",
            "| heads | mass ratio | argmax on target | label box holds the tag |",
            "|---|---:|---:|---:|",
        ]
        rows = [(f"layer {r['layer']}, all", r) for r in base["layers"]]
        if base.get("grounding"):
            pairs = base.get("preset", {}).get("grounding", [])
            named = ", ".join(f"{layer}:{'all' if head is None else head}" for layer, head in pairs)
            rows.append((f"grounding ({named})", base["grounding"]))
        lines += [
            f"| {name} | {r['mass_ratio']:.2f} | {_pct(r['argmax_hit'])} | "
            f"{_pct(r['label_hit']) if 'label_hit' in r else '-'} |"
            for name, r in rows
        ]
    if examples_png:
        lines += [
            "",
            "Examples (columns: image with the true box in green; attention map; pseudo "
            "labels, red foreground / blue background / grey ignored; RPN map with its boxes; "
            "the crop SD-RPN adds):",
            "",
            f"![examples]({os.path.basename(examples_png)})",
        ]
    return "\n".join(lines) + "\n"


def _grid_picture(rgb: np.ndarray) -> Image.Image:
    return Image.fromarray(rgb).resize((PANEL, PANEL), Image.NEAREST)


def example_grid(result: dict, labels_dir: str, count: int = 8) -> Image.Image:
    """Rows of code-reading test images: pictures, then the question and the answers."""
    samples = result["samples"]
    maps = labelled_maps(labels_dir)
    picked = [i for i, s in enumerate(samples) if s.kind == "read" and s.id in maps][:count]
    font = ImageFont.load_default(size=13)
    text_w, pad = 250, 6
    width = 5 * (PANEL + pad) + text_w + pad
    sheet = Image.new("RGB", (width, max(1, len(picked)) * (PANEL + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for row, i in enumerate(picked):
        s = samples[i]
        y = pad + row * (PANEL + pad)
        grounding, labels = maps[s.id]["grounding"], maps[s.id]["labels"]
        grid = int(round(grounding.numel() ** 0.5))
        roi = result["rois"]["sdrpn"][i]
        encoder = result["model"].config.vision_config.image_size
        scale = PANEL / s.image.width
        image = s.image.resize((PANEL, PANEL), Image.BICUBIC)
        ImageDraw.Draw(image).rectangle([v * scale for v in s.box], outline=(0, 220, 0), width=2)
        crop = (
            s.image.crop(roi.boxes[0]).resize((PANEL, PANEL), Image.BILINEAR)
            if roi.boxes
            else Image.new("RGB", (PANEL, PANEL), (235, 235, 235))
        )
        pictures = [
            image,
            _grid_picture(heat_rgb(grounding.float().view(grid, grid).numpy())),
            _grid_picture(label_rgb(labels.view(grid, grid).numpy())),
            roi_overlay(s.image, roi.prob.numpy(), roi.boxes, size=encoder, max_side=PANEL),
            crop,
        ]
        for col, pic in enumerate(pictures):
            sheet.paste(pic.resize((PANEL, PANEL)), (pad + col * (PANEL + pad), y))
        x = pad + 5 * (PANEL + pad)
        ok = {k: normalise_answer(result["answers"][k][i]) == normalise_answer(s.answer) for k in ("base", "sdrpn")}
        text = [
            s.question,
            f"truth: {s.answer}",
            f"base: {result['answers']['base'][i]!r} {'right' if ok['base'] else 'wrong'}",
            f"SD-RPN: {result['answers']['sdrpn'][i]!r} {'right' if ok['sdrpn'] else 'wrong'}",
            f"boxes: {len(roi.boxes)}",
        ]
        for k, line in enumerate(text):
            colour = (0, 130, 0) if (k == 3 and ok["sdrpn"]) else (170, 0, 0) if k == 3 else (20, 20, 20)
            draw.text((x, y + 8 + 20 * k), line, fill=colour, font=font)
    return sheet


def write_report(result: dict, out: str, title: str, labels_dir: str, examples: int = 8) -> dict:
    """metrics.json, report.md and examples.png under `out`; returns the metrics."""
    os.makedirs(out, exist_ok=True)
    metrics = metrics_payload(result)
    write_json(os.path.join(out, "metrics.json"), metrics)
    png = os.path.join(out, "examples.png")
    save_atomic(example_grid(result, labels_dir, examples), png)
    text = markdown(metrics, title, png)
    write_text(os.path.join(out, "report.md"), text)
    return metrics


__all__ = ["example_grid", "markdown", "write_report"]
