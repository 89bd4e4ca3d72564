import json
import logging
import os
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import sdrpn
from conftest import main_thread_opens
from sdrpn.cli import main
from sdrpn.labels import job as label_job
from sdrpn.labels.folder import LabelFolder
from sdrpn.labels.job import LabelJob
from sdrpn.llava.inputs import PROMPT_TEMPLATE
from tiny_llava import save_tiny_llava

Q = "<image>\nwhat is the colour of the tag ?"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("label_job")
    save_tiny_llava(str(root / "model"))
    images = root / "images"
    images.mkdir()
    gen = torch.Generator().manual_seed(0)
    entries = []
    for i, size in enumerate([(80, 40), (40, 90), (56, 56), (120, 60), (33, 71), (64, 64), (90, 30)]):
        pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=gen, dtype=torch.uint8)
        mode = "L" if i == 2 else "RGBA" if i == 3 else "RGB"
        Image.fromarray(pixels.numpy()).convert(mode).save(images / f"img{i}.png")
        entries.append(
            {
                "id": f"s{i}",
                "image": f"img{i}.png",
                "conversations": [{"from": "human", "value": Q}, {"from": "gpt", "value": "red tag"}],
            }
        )
    (images / "corrupt.png").write_bytes(b"not a png at all")
    Image.new("RGB", (60000, 1)).save(images / "long.png")  # a tiny file; padded, a 3.6e9-pixel square
    (root / "secret.png").write_bytes(b"")
    bad = [
        {"id": "missing", "image": "nope.png", "conversations": entries[0]["conversations"]},
        {"id": "corrupt", "image": "corrupt.png", "conversations": entries[0]["conversations"]},
        {"id": "imageless", "conversations": entries[0]["conversations"]},
        {"id": "escape", "image": "../secret.png", "conversations": entries[0]["conversations"]},
        {"id": "blank", "image": "img0.png", "conversations": [{"from": "human", "value": "<image>\n  "}]},
        # What a JSON file can deliver that a tokenizer or a file system refuses.
        {"id": "surrogate", "image": "img0.png", "conversations": [{"from": "human", "value": "<image>\n\ud800"}]},
        {"id": "nul", "image": "img0\x00.png", "conversations": entries[0]["conversations"]},
        {"id": "long", "image": "long.png", "conversations": entries[0]["conversations"]},
    ]
    data = entries[:3] + bad[:3] + entries[3:5] + bad[3:] + entries[5:]
    (root / "data.json").write_text(json.dumps(data))
    return root


def run_label(ws, out, *extra):
    return main(
        [
            "label",
            "--model",
            str(ws / "model"),
            "--data",
            str(ws / "data.json"),
            "--image-folder",
            str(ws / "images"),
            "--out",
            str(out),
            "--dtype",
            "fp32",
            "--preset",
            "llava15-7b",
            "--batch-size",
            "3",
            "--shard-size",
            "2",
            *extra,
        ]
    )


def read_rows(out):
    rows = []
    for name in sorted(os.listdir(out)):
        if name.endswith(".jsonl") and not name.endswith(".skipped.jsonl"):
            rows += [json.loads(line) for line in open(out / name)]
    return rows


def all_tensors(out):
    parts = [load_file(out / n) for n in sorted(os.listdir(out)) if n.endswith(".safetensors")]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


@pytest.fixture(autouse=True)
def small_preset(monkeypatch):
    # The tiny model has 4 layers: probe layers 1-2 instead of LLaVA-7B's 2 and 14.
    from sdrpn.llava import presets

    tiny = presets.LlavaPreset(
        "llava15-7b",
        grounding=presets.HeadSelection(((2, 1), (2, 3))),
        sink=presets.HeadSelection(((1, None),)),
        branch_layer=1,
        depth=2,
    )
    monkeypatch.setitem(presets.PRESETS, "llava15-7b", tiny)


def test_a_given_answer_holding_the_image_placeholder_is_skipped(workspace, tmp_path):
    # Tokenized, it is one more image token: the whole job had stopped at that batch.
    entries = json.loads((workspace / "data.json").read_text())[:3]
    entries[1]["conversations"][1]["value"] = "red <image> tag"
    ws = tmp_path / "ws"
    ws.mkdir()
    for name in ("model", "images"):
        (ws / name).symlink_to(workspace / name)
    (ws / "data.json").write_text(json.dumps(entries))
    assert run_label(ws, tmp_path / "labels", "--answers", "given") == 0
    summary = json.loads((tmp_path / "labels" / "summary.json").read_text())
    assert summary["labelled"] == 2 and summary["skipped_by_reason"] == {"answer holds the image placeholder": 1}


def test_a_sample_without_an_answer_is_skipped_only_when_answers_are_given(workspace, tmp_path):
    entries = json.loads((workspace / "data.json").read_text())[:3]
    del entries[1]["conversations"][1]
    ws = tmp_path / "ws"
    ws.mkdir()
    for name in ("model", "images"):
        (ws / name).symlink_to(workspace / name)
    (ws / "data.json").write_text(json.dumps(entries))
    for answers, labelled, skipped in (("given", 2, {"no answer": 1}), ("self", 3, {})):
        assert run_label(ws, tmp_path / answers, "--answers", answers, "--max-new-tokens", "2") == 0
        summary = json.loads((tmp_path / answers / "summary.json").read_text())
        assert summary["labelled"] == labelled and summary["skipped_by_reason"] == skipped


def test_self_answers_end_where_the_models_context_does(workspace, tmp_path, monkeypatch):
    import sdrpn.labels.job as job
    from sdrpn.llava.loading import load_llava

    answers = []

    def recording(*args, **kwargs):
        out = real(*args, **kwargs)
        answers.extend(out[0])
        return out

    real = job.self_answer_maps
    monkeypatch.setattr(job, "self_answer_maps", recording)
    from sdrpn.llava.inputs import prompt_token_ids

    _, tok = load_llava(str(workspace / "model"), "fp32")
    entries = json.loads((workspace / "data.json").read_text())[:2]
    long_q = "<image>\n" + "x " * 450 + "?"
    entries[0]["conversations"][0]["value"] = long_q
    (tmp_path / "data.json").write_text(json.dumps(entries))
    prompt = prompt_token_ids(tok, long_q, tok.convert_tokens_to_ids("<image>"), 16, PROMPT_TEMPLATE)
    limit = 512 - len(prompt) + 1  # the tiny model's 512 positions
    assert 1 < limit < 20, limit
    ws = tmp_path / "ws"
    ws.mkdir()
    for name in ("model", "images"):
        (ws / name).symlink_to(workspace / name)
    shutil.copy(tmp_path / "data.json", ws / "data.json")
    assert run_label(ws, tmp_path / "labels", "--answers", "self", "--max-new-tokens", str(limit + 20)) == 0
    assert [r["id"] for r in read_rows(tmp_path / "labels")] == ["s0", "s1"]
    assert 1 <= len(answers[0]) <= limit and len(answers[1]) > limit  # only the long prompt's is cut


@pytest.mark.parametrize("answers", ["given", "self"])
def test_label_job_writes_shards_and_counts_skips(workspace, tmp_path, answers, capsys):
    out = tmp_path / "labels"
    assert run_label(workspace, out, "--answers", answers, "--max-new-tokens", "4") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["labelled"] == 7
    assert summary["skipped"] == 8
    assert summary["skipped_by_reason"] == {
        "empty question": 1,
        "image missing": 1,
        "image outside --image-folder": 1,
        "image path not valid text": 1,
        "image too large to pad to a square": 1,
        "image unreadable": 1,
        "no image": 1,
        "text not valid UTF-8 or with a NUL byte": 1,
    }
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == summary
    rows = read_rows(out)
    assert [r["id"] for r in rows] == [f"s{i}" for i in range(7)]
    assert rows[0]["image_size"] == [80, 40] and rows[0]["preprocessing"]["mode"] == "pad"
    assert json.loads((out / "label_config.json").read_text())["dtype"] == "fp32"
    tensors = all_tensors(out)
    assert tensors["grounding"].shape == (7, 16) and tensors["labels"].dtype == torch.int8
    assert set(tensors["labels"].unique().tolist()) <= {-100, 0, 1}
    assert summary["all_ignore"] == int((tensors["labels"] == -100).all(1).sum())
    assert (tensors["grid"] == 4).all()
    assert (tensors["grounding"] > 0).all()
    if answers == "given":
        assert rows[0]["answer"] == "red tag"
    assert not [n for n in os.listdir(out) if n.startswith(".tmp-")]


@pytest.mark.parametrize("crash", [True, False])
def test_interrupted_run_resumes_without_duplicates(workspace, tmp_path, monkeypatch, crash):
    whole = tmp_path / "whole"
    run_label(workspace, whole, "--answers", "given")
    part = tmp_path / "part"
    run_label(workspace, part, "--answers", "given", "--limit", "7")
    first = read_rows(part)
    markers = sorted(n for n in os.listdir(part) if n.endswith(".done.json"))
    assert len(markers) == 2  # the resume numbers its shards after the last
    if crash:  # between a shard's files and its completion marker: that shard is redone
        os.unlink(part / markers[-1])
    kept = [m[: -len(".done.json")] for m in markers[: 1 if crash else 2]]
    done = {json.loads(line)["id"] for name in kept for line in open(part / f"{name}.jsonl")}
    # The rerun labels only what no complete shard holds (relabelling everything from shard 0
    # would leave the same rows and tensors behind).
    labelled = []
    label_batch = LabelJob._label_batch
    monkeypatch.setattr(
        LabelJob,
        "_label_batch",
        lambda self, items, buf: labelled.extend(p.sample.id for p in items) or label_batch(self, items, buf),
    )
    run_label(workspace, part, "--answers", "given")
    rows = read_rows(part)
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)) == 7
    assert len(first) < 7
    assert done and labelled == [i for i in ids if i not in done]
    assert json.loads((part / "summary.json").read_text()) == json.loads((whole / "summary.json").read_text())
    a, b = all_tensors(part), all_tensors(whole)
    for key in a:
        torch.testing.assert_close(a[key], b[key])


@pytest.mark.parametrize("answers", ["given", "self"])
def test_the_shards_hold_each_batchs_maps_and_labels_exactly(workspace, tmp_path, monkeypatch, answers):
    # What the batches computed, kept as they come out, against what the shards hold: the one
    # read-back of maps and labels together must not swap, round or drop any of them.
    made = {"grounding": [], "sink": [], "labels": []}
    given, self_made, pseudo_labels = label_job.given_answer_maps, label_job.self_answer_maps, sdrpn.ops.pseudo_labels

    def keep(maps):
        made["grounding"].append(maps.grounding.float().clone())
        made["sink"].append(maps.sink.float().clone())
        return maps

    def keep_labels(*args, **kwargs):
        made["labels"].append(pseudo_labels(*args, **kwargs))
        return made["labels"][-1]

    monkeypatch.setattr(label_job, "given_answer_maps", lambda *a, **k: keep(given(*a, **k)))
    monkeypatch.setattr(
        label_job, "self_answer_maps", lambda *a, **k: (lambda r: (r[0], keep(r[1])))(self_made(*a, **k))
    )
    monkeypatch.setattr(sdrpn.ops, "pseudo_labels", keep_labels)
    out = tmp_path / "labels"
    assert run_label(workspace, out, "--answers", answers, "--max-new-tokens", "4") == 0
    tensors = all_tensors(out)
    assert torch.equal(tensors["grounding"], torch.cat(made["grounding"]))
    assert torch.equal(tensors["sink"], torch.cat(made["sink"]))
    labels = torch.cat(made["labels"])
    assert tensors["labels"].dtype == torch.int8 and torch.equal(tensors["labels"], labels.to(torch.int8))
    counts = [[int((row == v).sum()) for v in (1, 0, -100)] for row in labels]
    assert [[r["fg"], r["bg"], r["ignore"]] for r in read_rows(out)] == counts


def test_a_redone_shard_that_labels_nothing_keeps_no_tensors_of_the_killed_run(tmp_path):
    # Killed between a shard's tensors and its marker, then redone over a span with no
    # labelled sample (a smaller --limit, an image gone since): the old tensors must go, or
    # a reader of the folder's .safetensors files counts their samples twice.
    from sdrpn.labels.folder import shard_name

    folder = LabelFolder(str(tmp_path))
    tensors = {
        "grounding": torch.rand(1, 16),
        "sink": torch.zeros(1, 16),
        "labels": torch.zeros(1, 16, dtype=torch.int8),
        "grid": torch.tensor([[4, 4]]),
    }
    name = shard_name(0, 1)
    folder.write_shard(name, [{"id": "a", "fg": 0, "bg": 16}], tensors, [], 2, 2, 1)
    (tmp_path / f"{name}.done.json").unlink()
    marker = folder.write_shard(name, [], {}, [{"index": 2, "reason": "image missing"}], 2, 2, 1)
    assert marker["labelled"] == 0 and not (tmp_path / f"{name}.safetensors").exists()
    assert folder.read_shard(name).rows == [] and folder.summary()["skipped"] == 1


def test_rows_a_sample_cannot_be_rebuilt_from_are_left_out(tmp_path, caplog):
    # Each crashed the training dataset (KeyError, AttributeError, the tokenizer's TypeError).
    from sdrpn.labels.folder import shard_name

    prep = {"mode": "pad", "width": 40, "height": 30, "size": 56}
    good = {"id": "a", "image": "a.png", "question": "q ?", "preprocessing": prep, "fg": 1, "bg": 15}
    rows = [
        good,
        {k: v for k, v in good.items() if k != "question"},
        dict(good, image=None),
        dict(good, question="\ud800"),
        dict(good, preprocessing="pad"),
        dict(good, preprocessing={k: v for k, v in prep.items() if k != "width"}),
        dict(good, preprocessing=dict(prep, size="56")),
        dict(good, preprocessing=dict(prep, mode="x")),
        dict(good, preprocessing=dict(prep, height=True)),
        dict(good, preprocessing=None),  # converted from the reference's pickles
    ]
    rows = [dict(row, row=i) for i, row in enumerate(rows)]
    n = len(rows)
    tensors = {
        "grounding": torch.rand(n, 16),
        "sink": torch.zeros(n, 16),
        "labels": torch.zeros(n, 16, dtype=torch.int8),
        "grid": torch.tensor([[4, 4]] * n),
    }
    folder = LabelFolder(str(tmp_path))
    name = shard_name(0, 1)
    folder.write_shard(name, rows, tensors, [], 0, n - 1, 1)
    assert [r["row"] for r in folder.read_shard(name).rows] == [0, n - 1]
    assert "left out {'malformed row': 8}" in caplog.text


def test_a_damaged_label_config_or_done_marker_is_named(workspace, tmp_path):
    # Each failed inside a reader (AttributeError, KeyError, TypeError).
    out = tmp_path / "labels"
    assert run_label(workspace, out, "--answers", "given") == 0
    path = out / "label_config.json"
    config = json.loads(path.read_text())
    model = config["model"]
    for raw, message in (
        ([], "must hold a JSON object, got list"),
        ({k: v for k, v in config.items() if k != "options"}, "options must be a JSON object, got None"),
        (dict(config, format_version="2"), "format_version must be an int, got '2'"),
        (dict(config, world_size="1"), r"world_size must be of type int \| None, got '1'"),
        (dict(config, image_size="56"), r"image_size must be of type int \| None, got '56'"),
        (dict(config, model="x"), r"model must be of type dict \| None, got 'x'"),
        (dict(config, grid=[4]), r"grid must be \[grid_h, grid_w\] of positive ints, got \[4\]"),
        (dict(config, model=dict(model, name=1.5)), "model.name must be a str or null, got 1.5"),
        (dict(config, model=dict(model, weights_fingerprint=0)), "model.weights_fingerprint must be a list"),
        (dict(config, model=dict(model, weights_fingerprint=["a"])), "model.weights_fingerprint must hold finite"),
    ):
        path.write_text(json.dumps(raw))
        with pytest.raises(ValueError, match=f"{path}: {message}"):
            LabelFolder(str(out)).read_config()
    path.write_text(json.dumps(config))
    marker = next(out.glob("*.done.json"))
    good = json.loads(marker.read_text())
    unlabelled = {k: v for k, v in good.items() if k != "labelled"}
    for bad in (unlabelled, dict(good, world_size="1"), dict(good, shard="1"), []):
        marker.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=f"{marker} is not a done marker of this format"):
            LabelFolder(str(out)).summary()


def test_a_prompt_past_the_models_context_is_skipped(workspace, tmp_path):
    # The tiny model has 512 positions; the sample was labelled from positions it never saw.
    entries = json.loads((workspace / "data.json").read_text())
    wordy = dict(entries[0], id="wordy")
    question = {"from": "human", "value": "<image>\n" + "x " * 600 + "?"}
    wordy["conversations"] = [question, entries[0]["conversations"][1]]
    (tmp_path / "data.json").write_text(json.dumps([entries[0], wordy]))
    out = tmp_path / "labels"
    assert run_label(workspace, out, "--answers", "given", "--data", str(tmp_path / "data.json")) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["labelled"] == 1 and summary["skipped_by_reason"] == {"prompt past the model's context": 1}
    with pytest.raises(
        ValueError, match="max_new_tokens must be an int from 1 to the model's context of 512 positions, got 100000"
    ):
        run_label(workspace, tmp_path / "more", "--max-new-tokens", "100000")


def test_loader_threads_change_nothing(workspace, tmp_path, monkeypatch):
    """Images loaded ahead by threads or on the main thread: the same shards, rows, skips."""
    outs = {w: tmp_path / f"workers{w}" for w in ("0", "3")}
    for workers, out in outs.items():
        on_main = main_thread_opens(monkeypatch, label_job)
        assert run_label(workspace, out, "--answers", "given", "--workers", workers) == 0
        assert on_main and (all(on_main) if workers == "0" else not any(on_main)), on_main
    inline, threaded = outs.values()
    assert sorted(os.listdir(inline)) == sorted(os.listdir(threaded))
    for name in os.listdir(inline):
        if name.endswith(".jsonl"):
            assert (inline / name).read_text() == (threaded / name).read_text()
    a, b = all_tensors(inline), all_tensors(threaded)
    for key in a:
        assert torch.equal(a[key], b[key])
    with pytest.raises(SystemExit):
        run_label(workspace, tmp_path / "bad", "--workers", "-1")


def test_viz_labels(workspace, tmp_path, capsys):
    out = tmp_path / "labels"
    run_label(workspace, out, "--answers", "given")
    pngs = tmp_path / "png"
    assert (
        main(["viz-labels", str(out), "--out", str(pngs), "--num", "3", "--image-folder", str(workspace / "images")])
        == 0
    )
    assert "wrote 3 pictures" in capsys.readouterr().out
    names = sorted(os.listdir(pngs))
    assert names[0] == "0000_s0.png"
    with Image.open(pngs / names[0]) as im:
        assert im.width > 2 * im.height  # image panel beside the grid panels
    # An image folder given must exist (the pictures would silently lack their images).
    for folder in (tmp_path / "nowhere", out / "summary.json"):
        with pytest.raises(ValueError, match=f"image_folder \\(--image-folder\\) '{folder}'"):
            main(["viz-labels", str(out), "--out", str(pngs), "--image-folder", str(folder)])


def test_viz_labels_shows_the_square_each_preprocessing_made():
    from sdrpn.labels.viz import model_square

    # 30x10: red, green and blue thirds. Crop mode saw the green centre; pad mode all of it.
    image = Image.new("RGB", (30, 10))
    for i, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        image.paste(colour, (10 * i, 0, 10 * i + 10, 10))
    crop = model_square(image, "crop")
    assert crop.size == (10, 10) and (np.asarray(crop) == (0, 255, 0)).all()
    pad = model_square(image, "pad")
    assert pad.size == (30, 30) and pad.getpixel((5, 15)) == (255, 0, 0) and pad.getpixel((5, 0)) == (122, 116, 104)


def test_viz_labels_draws_sinks_at_the_recorded_threshold(workspace, tmp_path, monkeypatch):
    from sdrpn.labels import viz

    preset = tmp_path / "preset.json"
    preset.write_text(
        json.dumps({"grounding": [[2, 1]], "sink": [[1, None]], "branch_layer": 1, "depth": 2, "sink_threshold": 0.05})
    )
    out = tmp_path / "labels"
    run_label(workspace, out, "--answers", "given")
    out_custom = tmp_path / "labels_custom"
    assert run_label(workspace, out_custom, "--preset", str(preset), "--answers", "given") == 0
    assert LabelFolder(str(out_custom)).config.sink_threshold == 0.05
    drawn = []
    real = viz.label_grid
    monkeypatch.setattr(viz, "label_grid", lambda g, s, *a, **k: drawn.append(s.clone()) or real(g, s, *a, **k))
    for folder, threshold in ((out, 1e-3), (out_custom, 0.05)):
        drawn.clear()
        viz.visualise_labels(str(folder), str(tmp_path / "png"), num=7)
        sink = all_tensors(folder)["sink"]
        assert torch.equal(torch.cat(drawn), sink >= threshold)
    assert not torch.equal(all_tensors(out_custom)["sink"] >= 0.05, all_tensors(out_custom)["sink"] >= 1e-3)


def test_viz_labels_draws_the_grids_alone_where_an_image_cannot_be_drawn(workspace, tmp_path, caplog):
    import logging

    from sdrpn.labels import viz

    out = tmp_path / "labels"
    entries = json.loads((workspace / "data.json").read_text())[:2]
    entries[0]["id"] = "x" * 300  # a file name holds at most 255 bytes
    entries[1]["id"] = "\u6807" * 100
    ws = tmp_path / "ws"
    (ws / "images").mkdir(parents=True)
    (ws / "model").symlink_to(workspace / "model")
    for e in entries:
        shutil.copy(workspace / "images" / e["image"], ws / "images" / e["image"])
    (ws / "data.json").write_text(json.dumps(entries))
    assert run_label(ws, out, "--answers", "given") == 0
    # After labelling, one image is replaced by one whose padded square is 3.6e9 pixels (it
    # had filled the memory), the other by a file that is no image.
    Image.new("RGB", (60000, 1)).save(ws / "images" / entries[0]["image"], format="PNG")
    (ws / "images" / entries[1]["image"]).write_bytes(b"not an image")
    with caplog.at_level(logging.WARNING, logger="sdrpn.labels.viz"):
        paths = viz.visualise_labels(str(out), str(tmp_path / "png"))
    names = [os.path.basename(p) for p in paths]
    assert names[0].startswith("0000_" + "x" * 64 + "-") and len(names[0]) == len("0000_") + 64 + 9 + len(".png")
    assert names[1].startswith("0001_" + "_" * 64 + "-")
    assert "2 pictures show the grids alone" in caplog.text and "1 image unreadable" in caplog.text
    assert "1 image too large to pad to a square" in caplog.text


def test_resume_refuses_changed_settings(workspace, tmp_path, caplog):
    out = tmp_path / "labels"
    run_label(workspace, out, "--answers", "given")
    changed = r'other settings \(options\.prompt_template: "A chat .* -> "USER: <image> \{question\} A:"\)'
    with pytest.raises(ValueError, match=changed):
        run_label(workspace, out, "--answers", "given", "--prompt-template", "USER: <image> {question} A:")
    # Files are compared by what they hold, not where they lie: a data file and an image
    # folder moved elsewhere resume (an image lost on the way is a skipped sample); another
    # folder of images is refused.
    refused = (
        r"holds labels made from the images in .*images, and --image-folder .* is not shown to hold them "
        r"\((\d+) of \1 images checked are missing or differ, e\.g\. img"
    )
    with pytest.raises(ValueError, match=refused):
        run_label(workspace, out, "--answers", "given", "--image-folder", str(tmp_path))
    moved = tmp_path / "moved"
    shutil.copytree(workspace / "images", moved / "images")
    (moved / "images" / json.loads((workspace / "data.json").read_text())[0]["image"]).unlink()
    (moved / "data.json").write_text((workspace / "data.json").read_text())
    with caplog.at_level(logging.INFO, logger="sdrpn.labels.folder"):
        assert (
            run_label(
                workspace,
                out,
                "--answers",
                "given",
                "--data",
                str(moved / "data.json"),
                "--image-folder",
                str(moved / "images"),
            )
            == 0
        )
    assert (
        "with files elsewhere than when it began: data: " in caplog.text and f'-> "{moved / "images"}"' in caplog.text
    )
    assert json.loads((out / "label_config.json").read_text())["image_folder"] == str(moved / "images")
    assert run_label(workspace, out, "--answers", "given") == 0  # and moved back
    # A run killed before its first shard was done labelled nothing: any settings may start over.
    for marker in [n for n in os.listdir(out) if n.endswith(".done.json")]:
        os.unlink(out / marker)
    template = "USER: <image> {question} A:"
    assert run_label(workspace, out, "--answers", "given", "--prompt-template", template) == 0
    assert json.loads((out / "label_config.json").read_text())["options"]["prompt_template"] == template


def test_an_image_folder_named_by_a_link_is_the_folder_it_leads_to(workspace, tmp_path):
    """The label folder records where a link leads: the same link re-pointed at other
    images is another folder, checked by their sizes."""
    others = tmp_path / "others"
    others.mkdir()
    for image in (workspace / "images").glob("img*.png"):
        Image.open(image).resize((7, 7)).save(others / image.name)
    link, out = tmp_path / "link", tmp_path / "labels"
    link.symlink_to(workspace / "images")
    assert run_label(workspace, out, "--answers", "given", "--image-folder", str(link)) == 0
    assert json.loads((out / "label_config.json").read_text())["image_folder"] == str(workspace / "images")
    link.unlink()
    link.symlink_to(others)
    with pytest.raises(ValueError, match=r"images checked are missing or differ, e\.g\. img\d\.png is 7x7, not the "):
        run_label(workspace, out, "--answers", "given", "--image-folder", str(link))


def test_an_image_folder_is_checked_on_sixteen_shards_spread_over_them(tmp_path, monkeypatch):
    import sdrpn.labels.folder as folder_module
    from synthetic_labels import write_region_labels

    write_region_labels(tmp_path / "labels", tmp_path / "images", num=40, grid=4, image_size=56, shard_size=1)
    original, read = folder_module.read_jsonl, []

    def counted(path):
        read.append(os.path.basename(path))
        return original(path)

    monkeypatch.setattr(folder_module, "read_jsonl", counted)
    images = str(tmp_path / "images")
    LabelFolder(str(tmp_path / "labels")).check_images_in(images, images)
    assert read == [f"rank000-shard{40 * i // 16:05d}.jsonl" for i in range(16)]


def test_labels_that_are_all_ignore_are_warned_of(workspace, tmp_path, caplog):
    out = tmp_path / "labels"
    # Any foreground box covers a thousandth of the grid: every sample carries no signal.
    assert run_label(workspace, out, "--answers", "given", "--max-box-fraction", "0.001") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["labelled"] == summary["all_ignore"] == 7
    assert "all 7 labelled samples are all-ignore" in caplog.text


def test_a_label_folder_from_before_the_data_digest_compares_the_data_path():
    from dataclasses import replace

    from sdrpn.labels.folder import LabelFolderConfig
    from sdrpn.labels.options import LabelOptions

    old = LabelFolderConfig(options=LabelOptions(), data="/a/d.json", image_folder="/a/img")
    moved = ['data: "/a/d.json" -> "/b/d.json"']
    assert old.differences(replace(old, data="/b/d.json", image_folder="/b/img")) == (
        moved, ['image_folder: "/a/img" -> "/b/img"'])  # fmt: skip
    digested = replace(old, data_sha256="1")
    assert digested.differences(replace(digested, data="/b/d.json")) == ([], moved)
    changed = digested.differences(replace(digested, data="/b/d.json", data_sha256="2"))
    assert changed == (['data_sha256: "1" -> "2" (data holds other content)'], moved)


def test_resume_refuses_a_data_file_edited_in_place(workspace, tmp_path):
    # Samples resume by their index in the data file: reordered, they would be labelled twice or never.
    data, out = tmp_path / "data.json", tmp_path / "labels"
    entries = json.loads((workspace / "data.json").read_text())
    data.write_text(json.dumps(entries))
    assert run_label(workspace, out, "--answers", "given", "--data", str(data), "--limit", "4") == 0
    data.write_text(json.dumps(entries[::-1]))
    edited = r"other settings \(data_sha256: \"[0-9a-f]{64}\" -> \"[0-9a-f]{64}\" \(data holds other content\)\)"
    with pytest.raises(ValueError, match=edited):
        run_label(workspace, out, "--answers", "given", "--data", str(data))
    # A folder labelled before the digest was recorded resumes unchecked, and records it.
    config = json.loads((out / "label_config.json").read_text())
    del config["data_sha256"]
    (out / "label_config.json").write_text(json.dumps(config))
    assert run_label(workspace, out, "--answers", "given", "--data", str(data)) == 0
    assert json.loads((out / "label_config.json").read_text())["data_sha256"]


def test_a_data_file_of_no_samples_or_no_json_is_refused_before_the_folder_is_made(workspace, tmp_path):
    data, out = tmp_path / "data.json", tmp_path / "labels"
    empty = "holds no samples \\(an empty list\\)"
    for text, message in (("[]", empty), (" [\n ]\n", empty), ('[{"id": 1', "is not a JSON file")):
        data.write_text(text)
        with pytest.raises(ValueError, match=f"--data {data} {message}"):
            run_label(workspace, out, "--answers", "given", "--data", str(data))
        assert not out.exists()  # seen before the folder is made
    data.write_text((workspace / "data.json").read_text())  # the fixed file goes on
    assert run_label(workspace, out, "--answers", "given", "--data", str(data), "--limit", "2") == 0


def test_a_rerun_leaves_the_folder_unfinished_until_its_own_summary(workspace, tmp_path):
    # A rerun may label further (a larger --limit): while it runs, or once interrupted, the
    # earlier run's summary must not make the folder pass as finished (training refuses it).
    from sdrpn.labels.folder import LabelFolder

    out = tmp_path / "labels"
    assert run_label(workspace, out, "--answers", "given", "--limit", "2") == 0
    folder = LabelFolder(str(out))
    assert folder.finished()
    folder.start(folder.config)  # what the rerun does first
    assert not folder.finished()
    assert run_label(workspace, out, "--answers", "given", "--limit", "4") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert folder.finished() and summary["labelled"] + summary["skipped"] == 4


def test_resume_refuses_another_number_of_ranks(workspace, tmp_path):
    # Each rank resumes its own share (index % world size): another count would label twice or never.
    from dataclasses import replace

    from sdrpn.labels.folder import LabelFolder

    out = tmp_path / "labels"
    assert run_label(workspace, out, "--answers", "given", "--limit", "4") == 0
    folder = LabelFolder(str(out))
    assert folder.config.world_size == 1
    with pytest.raises(ValueError, match=r"other settings \(world_size: 1 -> 2\)"):
        folder.start(replace(folder.config, world_size=2))
    # A folder labelled before the count was recorded (in its config and its shards' markers)
    # is not checked on it.
    for path in [out / "label_config.json", *out.glob("*.done.json")]:
        record = json.loads(path.read_text())
        del record["world_size"]
        path.write_text(json.dumps(record))
    folder.start(replace(folder.config, world_size=2))


def test_a_resume_without_an_image_folder_or_on_one_unrecorded_is_named(workspace, tmp_path):
    from dataclasses import replace

    from sdrpn.labels.folder import LabelFolder

    out = tmp_path / "labels"
    assert run_label(workspace, out, "--answers", "given", "--limit", "4") == 0
    folder = LabelFolder(str(out))
    recorded = folder.config.image_folder
    unnamed = rf"images in {re.escape(recorded)}: config\.image_folder must name .* got None"
    with pytest.raises(ValueError, match=unnamed):
        folder.start(replace(folder.config, image_folder=None), record=False)
    # A folder whose config does not record its images is checked on their sizes alone.
    config = json.loads((out / "label_config.json").read_text())
    del config["image_folder"]
    (out / "label_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"made from the images in a folder it does not record, and --image-folder "):
        run_label(workspace, out, "--answers", "given", "--limit", "4", "--image-folder", str(tmp_path))
    assert run_label(workspace, out, "--answers", "given", "--limit", "4") == 0


def test_shards_of_a_job_on_another_number_of_ranks_are_refused(workspace, tmp_path):
    # Two jobs on 1 and 3 ranks started at once on one empty folder: neither finds shards
    # to check its settings on, and the folder ends with label_config.json of one and shards
    # of both. Resuming or summing it would label or count some samples twice.
    from sdrpn.rpn.dataset import LabelShardDataset

    out = tmp_path / "labels"
    assert run_label(workspace, out, "--answers", "given", "--limit", "4") == 0
    folder = LabelFolder(str(out))
    assert {json.loads(p.read_text())["world_size"] for p in out.glob("*.done.json")} == {1}
    marker = json.loads((out / "rank000-shard00000.done.json").read_text())
    for rank in (1, 2):  # the 3-rank job's ranks 1 and 2
        (out / f"rank00{rank}-shard00000.done.json").write_text(json.dumps(dict(marker, world_size=3)))
    message = r"holds shards of a job on another number of ranks than 1 \(rank001-shard00000, rank002-shard00000\)"
    with pytest.raises(ValueError, match=message):
        folder.start(folder.config, record=False)
    with pytest.raises(ValueError, match=message):
        folder.write_summary()
    with pytest.raises(ValueError, match=message):  # the command: a rerun on one rank
        run_label(workspace, out, "--answers", "given")
    with pytest.raises(ValueError, match=message):  # training on the folder
        LabelShardDataset(str(out), tokenizer=None, image_token_id=3)
    # A shard of a rank the job does not have is refused on its name alone (markers of
    # older folders record no number of ranks).
    (out / "rank002-shard00000.done.json").unlink()
    (out / "rank001-shard00000.done.json").write_text(json.dumps(marker))
    with pytest.raises(ValueError, match=r"than 1 \(rank001-shard00000\)"):
        folder.start(folder.config, record=False)


def test_format1_label_folders_still_read(workspace, tmp_path):
    out = tmp_path / "labels"
    run_label(workspace, out, "--answers", "given")
    config = json.loads((out / "label_config.json").read_text())
    (out / "label_config.json").write_text(
        json.dumps(
            {
                "model": "m",
                "image_folder": config["image_folder"],
                "prompt_template": PROMPT_TEMPLATE,
                "preset": "llava15-13b",
                "answers": "given",
                "image_size": 56,
                "grid": [4, 4],
                "image_token_id": 3,
            }
        )
    )
    old = LabelFolder(str(out)).config
    assert old.format_version == 1 and old.sink_threshold == 1e-3 and old.preset["name"] == "llava15-13b"
    assert old.prompt_template == PROMPT_TEMPLATE and old.options.answers == "given"
    assert sum(len(shard.rows) for shard in LabelFolder(str(out)).shards()) == 7


def test_torchrun_splits_the_data_by_rank(workspace, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "dist"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # a free port: runs side by side do not collide
        "--nproc_per_node",
        "2",
        "-m",
        "sdrpn",
        "label",
        "--model",
        str(workspace / "model"),
        "--data",
        str(workspace / "data.json"),
        "--image-folder",
        str(workspace / "images"),
        "--out",
        str(out),
        "--dtype",
        "fp32",
        "--answers",
        "given",
        "--preset",
        "llava15-13b",
    ]
    # llava15-13b probes layer 16: too deep for the tiny model, so the run must fail cleanly...
    failed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert failed.returncode != 0 and "but the model has 4 layers" in failed.stderr
    # ...and with a preset that fits, two gloo ranks share the samples.
    custom = tmp_path / "tiny-preset.json"
    custom.write_text(json.dumps({"grounding": [[2, 1], [2, 3]], "sink": [[1, None]], "branch_layer": 1, "depth": 2}))
    cmd[cmd.index("llava15-13b")] = str(custom)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["labelled"] == 7 and summary["skipped"] == 8
    ranks = {n.split("-")[0] for n in os.listdir(out) if n.endswith(".done.json")}
    assert ranks == {"rank000", "rank001"}
    assert sorted(r["id"] for r in read_rows(out)) == [f"s{i}" for i in range(7)]


def test_missing_image_folder_is_refused_before_writing(workspace, tmp_path, capsys):
    from sdrpn.cli import entry

    out = tmp_path / "labels"
    for folder, problem in ((tmp_path / "nowhere", "does not exist"), (workspace / "data.json", "is not a directory")):
        with pytest.raises(ValueError, match=rf"--image-folder.*{folder.name}.*{problem}"):
            run_label(workspace, out, "--answers", "given", "--image-folder", str(folder))
        assert not out.exists()  # nothing recorded: a rerun with the right folder starts afresh
    argv = ["label", "--model", str(workspace / "model"), "--data", str(workspace / "data.json")]
    argv += ["--image-folder", str(tmp_path / "nowhere"), "--out", str(out), "--preset", "llava15-7b"]
    assert entry(argv) == 2
    assert "sdrpn label: error: image_folder (--image-folder)" in capsys.readouterr().err
    assert run_label(workspace, out, "--answers", "given") == 0


def test_a_run_that_labels_nothing_fails_after_its_summary(workspace, tmp_path):
    empty, out = tmp_path / "empty", tmp_path / "labels"
    empty.mkdir()
    for _ in range(2):  # a rerun over the finished folder says the same
        with pytest.raises(ValueError, match=r"no sample labelled, 15 skipped \(10 image missing, .*delete"):
            run_label(workspace, out, "--answers", "given", "--image-folder", str(empty))
        summary = json.loads((out / "summary.json").read_text())
        assert summary["labelled"] == 0 and summary["skipped"] == 15
    # The folder's totals decide, not this run's: entries 3-5 are all bad, but 0-2 were
    # labelled before, and a rerun over a complete folder labels nothing new at all.
    out = tmp_path / "resumed"
    assert run_label(workspace, out, "--answers", "given", "--limit", "3") == 0
    assert run_label(workspace, out, "--answers", "given", "--limit", "6") == 0
    assert run_label(workspace, out, "--answers", "given", "--limit", "6") == 0
    assert json.loads((out / "summary.json").read_text())["skipped"] == 3


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--sink-threshold", "-1"], r"argument --sink-threshold: sink_threshold must be > 0, got -1.0"),
        (["--sink-threshold", "0"], r"sink_threshold must be > 0, got 0.0"),
        (["--sink-threshold", "inf"], r"sink_threshold must be a finite number, got inf"),
        (["--max-box-fraction", "inf"], r"max_box_fraction must be a finite number, got inf"),
        (["--max-new-tokens", str(2**63)], r"max_new_tokens must fit in 64 bits"),
        (["--fg-ratio", "2"], r"argument --fg-ratio: fg_ratio must be in \(0, 1\), got 2.0"),
        (["--fg-ratio", "1"], r"fg_ratio must be in \(0, 1\), got 1.0"),
        (["--fg-ratio", "0"], r"fg_ratio must be in \(0, 1\), got 0.0"),
        (["--fg-ratio", "nan"], r"fg_ratio must be a finite number, got nan"),
        (["--bg-ratio", "-0.1"], r"argument --bg-ratio: bg_ratio must be >= 0, got -0.1"),
        (["--bg-ratio", "1e400"], r"bg_ratio must be a finite number, got inf"),
        (["--max-box-fraction", "0"], r"max_box_fraction must be > 0, got 0.0"),
        # Labels no RPN could be trained on: it reads the prompt's last token, after the image.
        (["--prompt-template", "USER: {question} <image>"], r"prompt_template must have text after <image>"),
    ],
)
def test_label_options_out_of_range_are_refused(workspace, tmp_path, flags, message):
    out = tmp_path / "labels"
    with pytest.raises(ValueError, match=message):
        run_label(workspace, out, "--answers", "given", *flags)
    assert not out.exists()


def test_a_folder_labelled_with_the_image_last_still_opens(tmp_path):
    # Refused where labels are made; a folder recorded before still opens (to draw, to convert).
    from sdrpn.labels.folder import LabelFolderConfig
    from sdrpn.labels.options import LabelOptions

    template = "USER: {question} <image>"
    LabelFolder(str(tmp_path)).write_config(LabelFolderConfig(options=LabelOptions(prompt_template=template)))
    assert LabelFolder(str(tmp_path)).config.prompt_template == template


def test_label_options_edges_of_the_ranges_are_accepted():
    from sdrpn.labels.options import LabelOptions

    # SPEC's defaults, and the bounds that still leave labels to find.
    for values in (
        {},
        {"sink_threshold": 1e-3, "fg_ratio": 0.2, "bg_ratio": 0.1, "max_box_fraction": 0.5},
        {"fg_ratio": 0.999, "bg_ratio": 0.0, "max_box_fraction": 1.5},
        {"fg_ratio": 0.25, "bg_ratio": 0.25, "sink_threshold": 20.0},
        # Background lies outside the foreground box: a larger ratio takes all of it there.
        {"fg_ratio": 0.05, "bg_ratio": 0.1},
        {"bg_ratio": 1.5, "sink_threshold": 1e30},  # no sink removal
    ):
        LabelOptions(**values)


def test_skipped_records_name_the_sample(workspace, tmp_path):
    out = tmp_path / "labels"
    assert run_label(workspace, out, "--answers", "given") == 0
    folder = LabelFolder(str(out))
    skipped = [s for name in folder.complete_shards() for s in folder.skipped(name)]
    assert skipped[:3] == [
        {"index": 3, "id": "missing", "image": "nope.png", "reason": "image missing"},
        {"index": 4, "id": "corrupt", "image": "corrupt.png", "reason": "image unreadable"},
        {"index": 5, "id": "imageless", "reason": "no image"},  # no image to name
    ]
    assert [s["id"] for s in skipped] == [
        "missing",
        "corrupt",
        "imageless",
        "escape",
        "blank",
        "surrogate",
        "nul",
        "long",
    ]
    # Old folders' records (index and reason only) still read and count.
    name = folder.complete_shards()[0]
    (out / f"{name}.skipped.jsonl").write_text('{"index": 6, "reason": "no image"}\n')
    assert folder.skipped(name) == [{"index": 6, "reason": "no image"}]
    assert folder.write_summary()["labelled"] == 7


def test_resume_takes_the_same_model_by_another_path(workspace, tmp_path, monkeypatch):
    out = tmp_path / "labels"
    assert run_label(workspace, out, "--answers", "given", "--limit", "3") == 0
    monkeypatch.chdir(workspace)
    for name in (str(workspace / "model") + "/", "model"):  # a trailing slash, a relative path
        assert run_label(workspace, out, "--answers", "given", "--limit", "6", "--model", name) == 0
    other = tmp_path / "copy"
    shutil.copytree(workspace / "model", other)  # the same architecture in another folder
    with pytest.raises(ValueError, match=r"other settings \(model.name: "):
        run_label(workspace, out, "--answers", "given", "--model", str(other))


def test_files_are_checked_before_the_model_loads(workspace, tmp_path, capsys):
    from sdrpn.cli import entry

    (tmp_path / "afile").write_text("x")
    (tmp_path / "lines.jsonl").write_text('{"id": "a"}\n{"id": "b"}\n')
    (tmp_path / "cut.json").write_text('[{"id": "a"}, {"id": "b"')  # a copy that stopped part way
    missing_model = ["--model", str(tmp_path / "no-model")]
    for flags, message in [
        (["--data", str(tmp_path / "nope.json")], f"--data {tmp_path / 'nope.json'}: no such file"),
        (["--data", str(tmp_path)], f"--data {tmp_path} is a folder: it must be a JSON file"),
        (["--data", str(tmp_path / "lines.jsonl")], "JSON Lines: put the samples in one list"),
        (["--data", str(tmp_path / "cut.json")], f"--data {tmp_path / 'cut.json'} is not a JSON file"),
        (["--out", str(tmp_path / "afile")], f"--out {tmp_path / 'afile'} is a file: it must be a folder"),
    ]:
        argv = ["label", "--data", str(workspace / "data.json"), "--image-folder", str(workspace / "images")]
        assert entry([*argv, "--out", str(tmp_path / "o"), *missing_model, *flags]) == 2
        err = capsys.readouterr().err
        assert message in err and "no-model" not in err, err


def test_folders_without_a_weights_record_resume(workspace, tmp_path):
    """A folder labelled before the weights fingerprint was recorded resumes: the same
    model, whose record then stays as it was."""
    out = tmp_path / "labels"
    assert run_label(workspace, out, "--answers", "given", "--limit", "3") == 0
    config = json.loads((out / "label_config.json").read_text())
    del config["model"]["weights_fingerprint"]
    (out / "label_config.json").write_text(json.dumps(config))
    assert run_label(workspace, out, "--answers", "given", "--limit", "6") == 0
    assert "weights_fingerprint" not in json.loads((out / "label_config.json").read_text())["model"]


def test_label_job_config_checks_its_counts_and_rank():
    from sdrpn.labels.job import LabelJobConfig

    files = dict(data="d.json", image_folder="images", out="labels")
    for field, value, message in (
        ("batch_size", 0, "batch_size must be >= 1, got 0"),
        ("batch_size", None, "batch_size must be an int >= 1, got None"),
        ("workers", -1, "workers must be >= 0, got -1"),
        ("world_size", 0, "world_size must be >= 1, got 0"),
        ("rank", 3, r"rank must lie in \[0, world_size=1\), got 3"),
        ("rank", 0.0, r"rank must be an int, got 0.0"),
        ("limit", 0, "limit must be >= 1, got 0"),
        ("limit", -1, "limit must be >= 1, got -1"),
        ("limit", 2.5, "limit must be an int >= 1, got 2.5"),
        ("batch_size", 2.5, "batch_size must be an int >= 1, got 2.5"),
        ("shard_size", True, "shard_size must be an int >= 1, got True"),
    ):
        with pytest.raises(ValueError, match=message):
            LabelJobConfig(**files, **{field: value})
    with pytest.raises(TypeError, match="options must be a LabelOptions, got dict"):
        LabelJobConfig(**files, options={"answers": "given"})
