"""The synthetic task's SD-RPN pipeline (label -> RPN -> evaluate -> report) on a tiny
untrained model: every stage runs, writes what it promises, and a rerun resumes."""

import json
import os

import pytest
import torch

from sdrpn.synth import make_sample
from sdrpn.synth.metrics import accuracy_by_kind
from sdrpn.synth.pipeline import PRESET_FILE, PipelineConfig, label_box_pixels, localisation, raw_labels, run_pipeline
from sdrpn.synth.report import markdown, write_report


def test_label_box_and_localisation_scores():
    labels = torch.full((64,), -100, dtype=torch.int8)
    assert label_box_pixels(labels, 8, 448, 448, 112) is None
    labels[8 * 2 + 3] = 1  # row 2, column 3
    labels[8 * 3 + 4] = 1
    assert label_box_pixels(labels, 8, 448, 448, 112) == (168, 112, 280, 224)
    s = make_sample(1)
    x0, y0, x1, y1 = s.box
    exact = ((x0 // 56) * 56, (y0 // 56) * 56, -(-x1 // 56) * 56, -(-y1 // 56) * 56)
    far = (0, 0, 10, 10) if x0 >= 112 or y0 >= 112 else (438, 438, 448, 448)
    scores = localisation([[exact], [], [far]], [s, s, s], 8)
    assert scores["iou_cells"] == pytest.approx(1 / 3, abs=1e-3)
    assert scores["hit_rate"] == pytest.approx(1 / 3, abs=1e-3) and scores["no_box"] == pytest.approx(1 / 3, abs=1e-3)
    table = accuracy_by_kind([make_sample(1, kind="read"), make_sample(2, kind="count")],
                             [make_sample(1, kind="read").answer, "nine"])
    assert table == {"count": 0.0, "read": 1.0, "all": 0.5}
    with pytest.raises(ValueError, match="must pair up"):
        accuracy_by_kind([make_sample(1)], [])


def test_raw_labels_keep_every_cell(tmp_path):
    from safetensors.torch import load_file, save_file

    src, out = tmp_path / "labels", tmp_path / "raw"
    src.mkdir()
    g = torch.tensor([[0.0, 0.1, 1.0, 0.15], [0.3, 0.3, 0.0, 0.05]])
    save_file({"grounding": g, "sink": torch.zeros_like(g), "labels": torch.full((2, 4), -100, dtype=torch.int8),
               "grid": torch.tensor([[2, 2], [2, 2]])}, str(src / "rank000-shard00000.safetensors"))
    (src / "rank000-shard00000.jsonl").write_text("")
    (src / "rank000-shard00000.done.json").write_text(json.dumps({"shard": 0}))
    (src / "label_config.json").write_text("{}")
    raw_labels(str(src), str(out))
    labels = load_file(str(out / "rank000-shard00000.safetensors"))["labels"]
    assert labels.tolist() == [[0, 0, 1, 0], [1, 1, 0, 0]]  # > 0.2 * max: no ignore, no sinks
    assert (out / "rank000-shard00000.done.json").exists()


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from sdrpn.synth.model import TinyLlavaSpec, build_tiny_llava

    folder = tmp_path_factory.mktemp("tiny")
    spec = TinyLlavaSpec(vision_layers=1, text_layers=3, vision_hidden=32, text_hidden=32)
    model, tok = build_tiny_llava(spec, seed=1)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    (folder / PRESET_FILE).write_text(json.dumps(
        {"grounding": [[1, None]], "sink": [[0, None]], "branch_layer": 1, "depth": 2, "sink_threshold": 0.5}))
    return str(folder)


def test_pipeline_runs_every_stage_and_resumes(tmp_path, tiny_model_dir):
    cfg = PipelineConfig(out=str(tmp_path / "run"), model=tiny_model_dir, train_count=24, test_count=8,
                         rpn_epochs=1, label_batch=8, rpn_batch=8, eval_batch=8, max_new_tokens=3)
    result = run_pipeline(cfg)
    for folder in ("labels", "labels_raw", "labels_test", "rpn", "rpn_raw"):
        assert os.path.isdir(cfg.path(folder)), folder
    assert os.path.exists(cfg.path("rpn", "train_config.json"))
    acc = result["accuracy"]
    assert set(acc) == {"base", "random_crop", "gt_crop", "sdrpn", "sdrpn_raw_labels"}
    assert all(0.0 <= v <= 1.0 for row in acc.values() for v in row.values())
    assert set(result["localisation"]) == {"rpn (denoised labels)", "rpn (raw labels)",
                                           "pseudo labels (denoised)", "pseudo labels (raw)"}
    assert len(result["base_model"]["layers"]) == 3
    metrics = write_report(result, cfg.out, "test run", cfg.path("labels_test"), examples=2)
    text = open(os.path.join(cfg.out, "report.md")).read()
    assert "| **SD-RPN** |" in text and "examples.png" in text
    assert os.path.getsize(os.path.join(cfg.out, "examples.png")) > 1000
    assert json.load(open(os.path.join(cfg.out, "metrics.json")))["accuracy"] == metrics["accuracy"]
    # A rerun finds every stage complete and reproduces the evaluation.
    stamp = os.path.getmtime(cfg.path("rpn", "train_config.json"))
    again = run_pipeline(cfg)
    assert os.path.getmtime(cfg.path("rpn", "train_config.json")) == stamp
    assert again["accuracy"] == acc


def test_markdown_reports_the_gain():
    acc = {k: {"read": r, "colour": 1.0, "where": 1.0, "count": 0.5, "all": 0.8}
           for k, r in (("base", 0.05), ("random_crop", 0.1), ("sdrpn", 0.8), ("sdrpn_raw_labels", 0.4),
                        ("gt_crop", 0.9))}
    loc = {"rpn (denoised labels)": {"iou_cells": 0.7, "iou_target": 0.05, "hit_rate": 0.8, "no_box": 0.1}}
    text = markdown({"accuracy": acc, "localisation": loc, "test_samples": 10, "config": {"train_count": 5}},
                    "t", None)
    assert "+75.0 points over the base model, 10.0 points under the ground-truth crop" in text
    assert "| **SD-RPN** | 80.0 | 100.0 | 100.0 | 50.0 | 80.0 |" in text


def test_shipped_base_model_loads_with_its_preset():
    from sdrpn.llava.loading import load_llava
    from sdrpn.llava.presets import get_preset
    from sdrpn.synth.pipeline import BASE_MODEL

    model, tok = load_llava(BASE_MODEL, "fp32")
    preset = get_preset(os.path.join(BASE_MODEL, PRESET_FILE))
    layers = model.config.text_config.num_hidden_layers
    assert max(preset.probed_layers) < layers and preset.branch_layer + preset.depth <= layers
    record = json.load(open(os.path.join(BASE_MODEL, "train_base_config.json")))
    assert record["steps_done"] == record["steps"]  # a finished run, as its record says
    assert sum(os.path.getsize(os.path.join(BASE_MODEL, f)) for f in os.listdir(BASE_MODEL)) < 8e6
    assert tok.decode(tok("K7", add_special_tokens=False)["input_ids"]) == "K7"
