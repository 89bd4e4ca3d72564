"""The synthetic task's SD-RPN pipeline (label -> RPN -> evaluate -> report) on the shipped
base model: every stage runs, writes what it promises, and a rerun resumes."""

import dataclasses
import json
import os

import pytest
import torch

from sdrpn.labels.folder import LabelFolder, LabelFolderConfig, shard_name
from sdrpn.labels.options import LabelOptions
from sdrpn.llava.presets import PRESET_FILE
from sdrpn.synth import make_sample
from sdrpn.synth.metrics import accuracy_by_kind, answer_changes
from sdrpn.synth.pipeline import PipelineConfig, label_box_pixels, localisation, raw_labels, run_pipeline
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
    read, count = make_sample(1, kind="read"), make_sample(1, kind="count")
    scores = localisation([[exact], [far], [far], [exact]], [read, count, read, make_sample(1, kind="where")], 8)
    assert scores["hit_rate_read"] == 0.5 and scores["hit_rate"] == 0.5
    assert scores["hit_rate_tag"] == pytest.approx(2 / 3, abs=1e-3)  # the count question is left out
    assert localisation([[exact]], [count], 8)["hit_rate_read"] == 0.0  # no code question: nothing hit
    table = accuracy_by_kind(
        [make_sample(1, kind="read"), make_sample(2, kind="count")], [make_sample(1, kind="read").answer, "nine"]
    )
    assert table == {"count": 0.0, "read": 1.0, "all": 0.5}
    with pytest.raises(ValueError, match="must pair up"):
        accuracy_by_kind([make_sample(1)], [])


def test_answer_changes_pair_the_questions():
    samples = [make_sample(seed, kind=k) for seed, k in enumerate(["where"] * 4 + ["count"])]
    truth = [s.answer for s in samples]
    before = truth[:2] + ["nowhere", "nowhere", truth[4]]
    after = ["nowhere", truth[1], truth[2], "nowhere", truth[4]]
    table = answer_changes(samples, before, after)
    assert table["where"] == {"questions": 4, "to_right": 1, "to_wrong": 1, "paired_se": 35.4}
    assert table["count"] == {"questions": 1, "to_right": 0, "to_wrong": 0, "paired_se": 0.0}
    with pytest.raises(ValueError, match="must pair up"):
        answer_changes(samples, before, after[:2])


def test_raw_labels_keep_every_cell(tmp_path):
    src, out = LabelFolder(str(tmp_path / "labels")), tmp_path / "raw"
    g = torch.tensor([[0.0, 0.1, 1.0, 0.15], [0.3, 0.3, 0.0, 0.05]])
    tensors = {
        "grounding": g,
        "sink": torch.zeros_like(g),
        "labels": torch.full((2, 4), -100, dtype=torch.int8),
        "grid": torch.tensor([[2, 2], [2, 2]]),
    }
    rows = [{"id": f"s{i}", "image": f"{i}.png", "question": "q", "fg": 0, "bg": 0, "ignore": 4} for i in range(2)]
    src.write_config(LabelFolderConfig(options=LabelOptions(sink_threshold=0.5), grid=[2, 2]))
    src.write_shard(shard_name(0, 0), rows, tensors, [{"index": 2, "reason": "no image"}], 0, 2, 0)
    raw_labels(src.path, str(out))
    raw = LabelFolder(str(out))
    shard = raw.read_shard(raw.complete_shards()[0])
    assert shard.tensors["labels"].tolist() == [[0, 0, 1, 0], [1, 1, 0, 0]]  # > 0.2 * max: no ignore, no sinks
    assert raw.config.sink_threshold == 0.5 and raw.skipped(shard.name) == [{"index": 2, "reason": "no image"}]
    assert raw.write_summary()["skipped"] == 1


def test_pipeline_runs_every_stage_and_resumes(tmp_path):
    # The shipped base model: a random one's attention gives all-ignore labels, which training refuses.
    cfg = PipelineConfig(
        out=str(tmp_path / "run"),
        train_count=24,
        test_count=8,
        rpn_epochs=1,
        label_batch=8,
        rpn_batch=8,
        eval_batch=8,
        max_new_tokens=3,
    )
    result = run_pipeline(cfg)
    for folder in ("labels", "labels_raw", "labels_test", "rpn", "rpn_raw"):
        assert os.path.isdir(cfg.path(folder)), folder
    assert os.path.exists(cfg.path("rpn", "train_config.json"))
    acc = result["accuracy"]
    # SD-RPN in its recorded crop mode, and in the other one.
    other_mode = {"sdrpn_mask", "sdrpn_bbox"} & set(acc)
    assert len(other_mode) == 1
    assert set(acc) - other_mode == {"base", "random_crop", "gt_crop", "sdrpn", "sdrpn_raw_labels"}
    assert all(0.0 <= v <= 1.0 for row in acc.values() for v in row.values())
    other = other_mode.pop()[len("sdrpn_") :]
    assert set(result["localisation"]) == {
        "rpn (denoised labels)",
        f"rpn (denoised labels, {other} crops)",
        "rpn (raw labels)",
        "pseudo labels (denoised)",
        "pseudo labels (raw)",
    }
    assert len(result["base_model"]["layers"]) == 6
    metrics = write_report(result, cfg.out, "test run", cfg.path("labels_test"), examples=2)
    text = open(os.path.join(cfg.out, "report.md")).read()
    assert "| **SD-RPN** (the crop mode its RPN folder records) |" in text and "examples.png" in text
    assert f"| SD-RPN, {other}-mode crops |" in text
    assert "| kind | questions | turned right | turned wrong | change | paired SE |" in text
    assert sum(r["questions"] for r in metrics["changes"].values()) == cfg.test_count
    assert os.path.getsize(os.path.join(cfg.out, "examples.png")) > 1000
    assert json.load(open(os.path.join(cfg.out, "metrics.json")))["accuracy"] == metrics["accuracy"]
    # A rerun finds every stage complete and reproduces the evaluation; it removes what a kill
    # left half-written by the folder's own writers (an image, the report's picture).
    stamp = os.path.getmtime(cfg.path("rpn", "train_config.json"))
    left = [cfg.path(".tmp-examples.png.k1ll3d"), cfg.path("data", "images", ".tmp-synth-40.png.k1ll3d")]
    for path in left:
        open(path, "w").close()
    again = run_pipeline(cfg, then=lambda r: {"then": r["accuracy"]})
    assert os.path.getmtime(cfg.path("rpn", "train_config.json")) == stamp
    assert again == {"then": acc} and not any(os.path.exists(p) for p in left)
    # Other settings would leave the finished stages as they are: refused before anything runs.
    with pytest.raises(ValueError, match=r"other settings \(rpn_epochs: 1 -> 2; train_count: 24 -> 30\)"):
        run_pipeline(dataclasses.replace(cfg, train_count=30, rpn_epochs=2))
    assert len(json.load(open(cfg.path("data", "train.json")))) == 24
    # The evaluation's batch may change, and the model folder may be named another way.
    run_pipeline(dataclasses.replace(cfg, eval_batch=4, model=os.path.relpath(cfg.model) + "/"))


def test_a_model_folder_is_one_model_however_it_is_named(tmp_path, monkeypatch):
    from sdrpn.synth.pipeline import PIPELINE_CONFIG, record_settings

    monkeypatch.setenv("HOME", str(tmp_path))
    base = os.path.realpath(tmp_path / "base")
    os.makedirs(base), os.makedirs(tmp_path / "other"), os.makedirs(tmp_path / "run")
    cfg = PipelineConfig(out=str(tmp_path / "run"), model="~/base")  # the loader takes "~" as home
    record_settings(cfg)
    path = cfg.path(PIPELINE_CONFIG)
    recorded = json.load(open(path))
    assert recorded["model"] == base
    record_settings(dataclasses.replace(cfg, model=base + "/"))
    # Earlier versions recorded a "~" they were given as typed: the same folder still.
    json.dump({**recorded, "model": "~/base"}, open(path, "w"))
    record_settings(dataclasses.replace(cfg, model=base))
    with pytest.raises(ValueError, match=r'other settings \(model: ".*/base" -> ".*/other"\)'):
        record_settings(dataclasses.replace(cfg, model="~/other"))
    os.symlink(base, tmp_path / "link")  # a folder is known by where its links lead
    record_settings(dataclasses.replace(cfg, model=str(tmp_path / "link")))
    # A record whose model is no name is compared as it is; one that is no object is refused.
    json.dump({**recorded, "model": None}, open(path, "w"))
    with pytest.raises(ValueError, match=r"other settings \(model: null -> "):
        record_settings(cfg)
    json.dump([recorded], open(path, "w"))
    with pytest.raises(ValueError, match=r"pipeline_config\.json must hold a JSON object of settings"):
        record_settings(cfg)


def test_markdown_reports_the_gain():
    acc = {
        k: {"read": r, "colour": 1.0, "where": 1.0, "count": 0.5, "all": 0.8}
        for k, r in (("base", 0.05), ("random_crop", 0.1), ("sdrpn", 0.8), ("sdrpn_raw_labels", 0.4), ("gt_crop", 0.9))
    }
    loc = {"rpn (denoised labels)": {"iou_cells": 0.7, "iou_target": 0.05, "hit_rate": 0.8, "no_box": 0.1}}
    text = markdown({"accuracy": acc, "localisation": loc, "test_samples": 10, "config": {"train_count": 5}}, "t", None)
    assert "+75.0 points over the base model, 10.0 points under the ground-truth crop" in text
    assert "| **SD-RPN** (the crop mode its RPN folder records) | 80.0 | 100.0 | 100.0 | 50.0 | 80.0 |" in text
    assert "Questions per kind" not in text  # an older metrics.json without the counts
    questions = {"colour": 26, "count": 25, "read": 25, "where": 24}
    text = markdown({"accuracy": acc, "localisation": loc, "test_samples": 100, "questions": questions}, "t", None)
    assert "Questions per kind: colour 26, count 25, read 25, where 24. With 24 questions" in text
    assert "standard error is at most 10.2 points" in text
    few = {"read": 1, "count": 3}
    text = markdown({"accuracy": acc, "localisation": loc, "test_samples": 4, "questions": few}, "t", None)
    assert "With 1 question an accuracy's standard error is at most 50.0 points" in text


def test_shipped_base_model_loads_with_its_preset():
    from sdrpn.llava.loading import load_llava
    from sdrpn.llava.presets import get_preset, resolve_preset
    from sdrpn.synth.pipeline import BASE_MODEL
    from sdrpn.synth.train_base import TEMPLATE

    model, tok = load_llava(BASE_MODEL, "fp32")
    preset = get_preset(os.path.join(BASE_MODEL, PRESET_FILE))
    assert resolve_preset(None, model) == preset  # the model folder's own preset is the default
    assert preset.prompt_template == TEMPLATE and not preset.roi.drop_singletons
    record = json.load(open(os.path.join(BASE_MODEL, "train_base_config.json")))
    assert record["steps_done"] == record["steps"]  # a finished run, as its record says
    assert sum(os.path.getsize(os.path.join(BASE_MODEL, f)) for f in os.listdir(BASE_MODEL)) < 8e6
    assert tok.decode(tok("K7", add_special_tokens=False)["input_ids"]) == "K7"


def test_an_rpn_folder_alone_carries_the_settings_to_use_it(tmp_path, capsys):
    """label -> train -> infer on the shipped model with no template or box-rule flags: the
    label folder records the model's preset, the RPN folder what inference needs."""
    from sdrpn.cli import main
    from sdrpn.infer.pipeline import SDRPNLlava
    from sdrpn.llava.loading import load_llava
    from sdrpn.options import RoiOptions
    from sdrpn.rpn.model import RegionProposalNetwork
    from sdrpn.synth.export import GRID8_ROI
    from sdrpn.synth.pipeline import BASE_MODEL
    from sdrpn.synth.task import write_dataset
    from sdrpn.synth.train_base import TEMPLATE

    data = write_dataset(str(tmp_path / "data"), "train", 24)
    images = str(tmp_path / "data" / "images")
    labels, rpn_dir = str(tmp_path / "labels"), str(tmp_path / "rpn")
    assert (
        main(
            [
                "label",
                "--model",
                BASE_MODEL,
                "--data",
                data,
                "--image-folder",
                images,
                "--out",
                labels,
                "--dtype",
                "fp32",
                "--batch-size",
                "12",
                "--max-new-tokens",
                "12",
            ]
        )
        == 0
    )
    recorded = LabelFolder(labels).config
    assert recorded.prompt_template == TEMPLATE and recorded.sink_threshold == 0.1
    assert recorded.preset["name"] == "synth-tiny" and recorded.model["config_fingerprint"]
    assert (
        main(
            [
                "train",
                "--model",
                BASE_MODEL,
                "--labels",
                labels,
                "--out",
                rpn_dir,
                "--epochs",
                "1",
                "--batch-size",
                "8",
                "--effective-batch",
                "8",
                "--lr",
                "1e-3",
                "--held-out-fraction",
                "0",
            ]
        )
        == 0
    )
    config = json.load(open(os.path.join(rpn_dir, "rpn_config.json")))
    assert (config["branch_layer"], config["depth"], config["grid"]) == (3, 2, [8, 8])
    assert config["prompt_template"] == TEMPLATE and config["preprocessing"] == "pad"
    assert config["roi"] == RoiOptions.from_dict(GRID8_ROI).to_dict()

    capsys.readouterr()
    image = os.path.join(images, sorted(os.listdir(images))[0])
    question = json.load(open(data))[0]["conversations"][0]["value"].replace("<image>", "").strip()
    assert (
        main(
            [
                "infer",
                "--model",
                BASE_MODEL,
                "--rpn",
                rpn_dir,
                "--image",
                image,
                "--question",
                question,
                "--dtype",
                "fp32",
                "--max-new-tokens",
                "12",
                "--json",
            ]
        )
        == 0
    )
    by_cli = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    model, tok = load_llava(BASE_MODEL, "fp32")
    rpn = RegionProposalNetwork.load(rpn_dir, model)
    explicit = SDRPNLlava(model, tok, rpn, roi=RoiOptions.from_dict(GRID8_ROI), prompt_template=TEMPLATE)
    from sdrpn.llava.inputs import load_rgb

    answer = explicit.generate([load_rgb(image)], [question], 12)[0]
    assert by_cli["answer"] == answer.text and by_cli["boxes"] == [list(b) for b in answer.rois.boxes]


def test_export_replaces_only_an_earlier_export(tmp_path, monkeypatch):
    """The export replaces its --to whole: a folder of other files, the model's own, the
    working folder or a file are refused before anything is written (it had deleted them)."""
    from sdrpn.synth.export import export_base
    from sdrpn.synth.pipeline import BASE_MODEL

    preset = json.load(open(os.path.join(BASE_MODEL, "sdrpn_preset.json")))
    to = tmp_path / "export"
    (tmp_path / "export.tmp").mkdir()  # a user's folder by the name a temporary one once had
    (tmp_path / "export.tmp" / "notes.txt").write_text("kept")
    summary = export_base(BASE_MODEL, str(to), preset)
    assert summary["bytes"] > 0 and json.load(open(to / "sdrpn_preset.json")) == preset
    export_base(BASE_MODEL, str(to), preset)  # an earlier export is replaced
    assert (tmp_path / "export.tmp" / "notes.txt").read_text() == "kept"
    assert sorted(os.listdir(tmp_path)) == ["export", "export.tmp"]  # no temporary folder left
    (tmp_path / "link").symlink_to(to)
    user_model = tmp_path / "user_model"  # a model folder with a preset of its own
    user_model.mkdir()
    for name in ("config.json", "sdrpn_preset.json"):
        (user_model / name).write_text("{}")
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "notes.txt").write_text("kept")
    (tmp_path / "afile").write_text("kept")
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    for target, message in (
        (victim, "holds other files than an earlier export"),
        (user_model, "holds other files than an earlier export"),
        (tmp_path / "link", "is a link: give the folder itself"),
        (tmp_path / "afile", "is a file"),
        (".", "is the working folder or holds it"),
        (tmp_path, "is the working folder or holds it"),
        (BASE_MODEL, "is --model's folder or holds it"),
    ):
        with pytest.raises(ValueError, match=f"--to {target} {message}"):
            export_base(BASE_MODEL, str(target), preset)
    assert (victim / "notes.txt").read_text() == "kept" and (tmp_path / "afile").read_text() == "kept"
    with pytest.raises(ValueError, match="preset 'synth-tiny' .* branches at 99 .* the model has 6 layers"):
        export_base(BASE_MODEL, str(tmp_path / "new"), {**preset, "branch_layer": 99})
    assert not (tmp_path / "new").exists()
