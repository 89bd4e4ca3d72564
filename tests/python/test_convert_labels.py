import json
import os
import pickle
import random
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import reference
from sdrpn.cli import main
from sdrpn.labels.convert import load_reference_pickle


def write_pickle(path, records):
    with open(path, "wb") as f:
        pickle.dump(records, f)


def blob_record(q: int, rng) -> dict:
    """A record whose labels hold foreground and background: a 3x4 blob over faint noise
    in its grounding map, and 20 sinks (over the 1e-3 threshold) in its sink map."""
    grounding = (rng.random((24, 24)) * 0.05).astype(np.float32)
    r, c = rng.integers(2, 18, size=2)
    grounding[r : r + 3, c : c + 4] = 1.0
    sink = np.zeros(576, np.float32)
    sink[rng.choice(576, 20, replace=False)] = 0.01
    return {
        "question_id": q,
        "image": f"{q}.jpg",
        "prompt": "what?",
        "text": "K7",
        "sink_attn": sink,
        "grounding_attn_o2i": grounding.reshape(1, 576),
    }


def test_valid_pickle_is_imported(tmp_path, capsys):
    rng = np.random.default_rng(0)
    records = [blob_record(q, rng) for q in (10, 11, 12)]
    write_pickle(tmp_path / "in.pkl", records)
    assert main(["convert-labels", str(tmp_path / "in.pkl"), str(tmp_path / "out")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["labelled"] == 3
    # Into a folder of labels it would replace shard 0 and keep the rest under its own config.
    with pytest.raises(ValueError, match=f"OUT {tmp_path / 'out'} holds files already"):
        main(["convert-labels", str(tmp_path / "in.pkl"), str(tmp_path / "out")])
    (tmp_path / "afile").write_text("")
    with pytest.raises(ValueError, match=f"OUT {tmp_path / 'afile'} is a file"):
        main(["convert-labels", str(tmp_path / "in.pkl"), str(tmp_path / "afile")])
    tensors = load_file(tmp_path / "out" / "rank000-shard00000.safetensors")
    g = torch.from_numpy(np.stack([r["grounding_attn_o2i"].reshape(-1) for r in records]))
    s = torch.from_numpy(np.stack([r["sink_attn"] for r in records]))
    want = reference.pseudo_labels(g, s, 24, 24)
    assert ((want == 1).sum(1) > 0).all() and ((want == 0).sum(1) > 0).all()  # labels to compare
    assert torch.equal(tensors["labels"].long(), want)
    rows = [json.loads(line) for line in open(tmp_path / "out" / "rank000-shard00000.jsonl")]
    assert [r["id"] for r in rows] == ["10", "11", "12"] and rows[0]["answer"] == "K7"
    assert [[r["fg"], r["bg"], r["ignore"]] for r in rows] == [
        [int((w == v).sum()) for v in (1, 0, -100)] for w in want
    ]
    # What earlier versions wrote had no label_config.json: it still reads, with SPEC's defaults.
    from sdrpn.labels.folder import LabelFolder

    folder = LabelFolder(str(tmp_path / "out"))
    assert folder.config.grid == [24, 24] and folder.config.sink_threshold == 1e-3
    os.unlink(tmp_path / "out" / "label_config.json")
    assert folder.config.format_version == 1 and folder.config.sink_threshold == 1e-3
    assert [r["id"] for shard in folder.shards() for r in shard.rows] == ["10", "11", "12"]
    with pytest.raises(ValueError, match="is not a label folder: it has no label_config.json and no shards"):
        _ = LabelFolder(str(tmp_path)).config
    with pytest.raises(ValueError, match="is not a label folder: it does not exist"):
        _ = LabelFolder(str(tmp_path / "nowhere")).config


class Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/sdrpn-pwned",))


def test_malicious_pickle_is_refused(tmp_path):
    write_pickle(tmp_path / "evil.pkl", [{"question_id": 1, "sink_attn": Exploit()}])
    message = r"evil.pkl cannot be read as a label pickle \(UnpicklingError: refusing to load posix.system"
    with pytest.raises(ValueError, match=message):
        load_reference_pickle(str(tmp_path / "evil.pkl"))
    assert not os.path.exists("/tmp/sdrpn-pwned")


@pytest.mark.parametrize(
    "content, error",
    [
        (b"", "EOFError"),
        (b'{"a": 1}', "UnpicklingError"),
        (pickle.dumps([{"question_id": 1}])[:-3], "UnpicklingError|EOFError"),
        (os.urandom(64), ""),
    ],
    ids=["empty", "json", "truncated", "noise"],
)
def test_a_file_that_is_no_pickle_is_refused_naming_it(tmp_path, capsys, content, error):
    from sdrpn.cli import entry

    (tmp_path / "in.pkl").write_bytes(content)
    assert entry(["convert-labels", str(tmp_path / "in.pkl"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "in.pkl cannot be read as a label pickle (" in err and "Traceback" not in err
    assert re.search(error, err)


def test_a_missing_pickle_or_image_folder_is_named_before_the_load(tmp_path, monkeypatch):
    import sdrpn.labels.convert as convert

    write_pickle(tmp_path / "in.pkl", [record(1)])
    monkeypatch.setattr(convert, "load_reference_pickle", lambda path: pytest.fail("loaded the pickle"))
    for pickle_path, extra, message in (
        (tmp_path / "nope.pkl", [], f"pickle '{tmp_path / 'nope.pkl'}' does not exist"),
        (tmp_path, [], f"pickle '{tmp_path}' is a folder"),
        (
            tmp_path / "in.pkl",
            ["--image-folder", "imgs"],
            "image_folder (--image-folder) 'imgs' does not exist",
        ),
    ):
        with pytest.raises(ValueError, match=re.escape(message)):
            main(["convert-labels", str(pickle_path), str(tmp_path / "out"), *extra])
    assert not (tmp_path / "out").exists()


def test_non_square_maps_need_a_grid(tmp_path):
    records = [
        {
            "question_id": 1,
            "image": "1.jpg",
            "prompt": "what?",
            "sink_attn": np.zeros(640, np.float32),
            "grounding_attn_o2i": np.ones(640, np.float32),
        }
    ]
    write_pickle(tmp_path / "in.pkl", records)
    with pytest.raises(ValueError, match="not a square grid"):
        main(["convert-labels", str(tmp_path / "in.pkl"), str(tmp_path / "out")])
    with pytest.raises(ValueError, match="grid 4x4 has 16 cells, but the maps have 640"):
        main(["convert-labels", str(tmp_path / "in.pkl"), str(tmp_path / "out"), "--grid", "4x4"])
    assert main(["convert-labels", str(tmp_path / "in.pkl"), str(tmp_path / "out"), "--grid", "16x40"]) == 0


def record(q, image=None, rng=None):
    rng = rng or np.random.default_rng(q)
    return {
        "question_id": q,
        "image": image if image is not None else f"{q}.jpg",
        "prompt": "what?",
        "text": "K7",
        "sink_attn": (rng.random(16) * 2e-3).astype(np.float16),
        "grounding_attn_o2i": (rng.random(16) ** 6).astype(np.float32),
    }


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_every_pickle_protocol_from_2_loads(tmp_path, protocol):
    with open(tmp_path / "in.pkl", "wb") as f:
        pickle.dump([record(1), record(2)], f, protocol=protocol)
    loaded = load_reference_pickle(str(tmp_path / "in.pkl"))
    assert [r["question_id"] for r in loaded] == [1, 2]
    np.testing.assert_array_equal(loaded[1]["sink_attn"], record(2)["sink_attn"])


def test_a_pickle_of_shared_references_is_refused_before_it_expands(tmp_path):
    # A few hundred bytes that would expand to 100**4 elements if converted.
    level = np.zeros(100, np.float32)
    for _ in range(3):
        level = [level] * 100
    write_pickle(tmp_path / "bomb.pkl", level)
    assert os.path.getsize(tmp_path / "bomb.pkl") < 2000
    with pytest.raises(ValueError, match="expands to more than"):
        load_reference_pickle(str(tmp_path / "bomb.pkl"))


@pytest.mark.parametrize("nest", [lambda inner: [inner], lambda inner: [{"sink_attn": inner}]], ids=["lists", "dicts"])
def test_a_deeply_nested_pickle_is_refused(tmp_path, nest):
    deep = []
    for _ in range(200):
        deep = nest(deep)
    write_pickle(tmp_path / "deep.pkl", deep)
    with pytest.raises(ValueError, match="nests deeper than 16 levels"):
        load_reference_pickle(str(tmp_path / "deep.pkl"))


def test_shared_references_inside_an_object_array_are_counted_too(tmp_path):
    # numpy pickles an object array's elements with the memo as well: the same bomb, one level down.
    level = np.zeros(100, np.float32)
    for _ in range(2):
        level = [level] * 100
    holder = np.empty(100, dtype=object)
    for i in range(100):
        holder[i] = level
    write_pickle(tmp_path / "bomb.pkl", [{"question_id": 1, "sink_attn": holder}])
    assert os.path.getsize(tmp_path / "bomb.pkl") < 4000
    with pytest.raises(ValueError, match="expands to more than"):
        load_reference_pickle(str(tmp_path / "bomb.pkl"))


def test_bad_records_are_skipped_and_counted(tmp_path, capsys):
    complex_maps = record(3)
    complex_maps["grounding_attn_o2i"] = complex_maps["grounding_attn_o2i"].astype(np.complex64)
    no_sink = record(4)
    del no_sink["sink_attn"]
    short = record(5)
    short["sink_attn"] = short["sink_attn"][:9]
    no_prompt, blank_prompt = record(6), record(7)
    del no_prompt["prompt"]  # counted as labelled, it had been left out of training
    blank_prompt["prompt"] = " <image> "
    records = [record(1), complex_maps, no_sink, short, record(2, image=12345), no_prompt, blank_prompt]
    write_pickle(tmp_path / "in.pkl", records)
    assert main(["convert-labels", str(tmp_path / "in.pkl"), str(tmp_path / "out")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["labelled"] == 1
    assert summary["skipped_by_reason"] == {
        "grounding_attn_o2i not real numbers": 1,
        "no sink_attn": 1,
        "maps of another size": 1,
        "no image path": 1,
        "no question": 2,
    }


def test_image_paths_are_normalised_against_the_image_folder(tmp_path, capsys):
    images = tmp_path / "images"
    (images / "coco" / "train2017").mkdir(parents=True)
    (images / "gqa").mkdir()
    for name in ("coco/train2017/a.jpg", "gqa/b.jpg"):
        (images / name).write_bytes(b"x")
    records = [
        record(1, "/data/llava/coco/train2017/a.jpg"),  # found by its tail
        record(2, "playground/data/gqa/b.jpg"),  # the given prefix stripped
        record(3, "/data/llava/ocr_vqa/missing.jpg"),  # nowhere: skipped
        record(4, "../../etc/passwd"),  # outside the folder: skipped
    ]
    write_pickle(tmp_path / "in.pkl", records)
    argv = ["convert-labels", str(tmp_path / "in.pkl"), str(tmp_path / "out"), "--image-folder", str(images)]
    assert main(argv + ["--strip-prefix", "playground/data/", "--grid", "4x4"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["skipped_by_reason"] == {"image not found under --image-folder": 2}
    rows = [json.loads(line) for line in open(tmp_path / "out" / "rank000-shard00000.jsonl")]
    assert [r["image"] for r in rows] == ["coco/train2017/a.jpg", "gqa/b.jpg"]
    from sdrpn.labels.folder import LabelFolder

    assert LabelFolder(str(tmp_path / "out")).config.image_folder == str(images)


def test_a_folder_written_into_while_the_pickle_loads_is_left_alone(tmp_path, monkeypatch):
    """OUT is checked before the load, which may take minutes, and again under the lock:
    labels another job wrote there meanwhile are neither replaced nor mixed with these."""
    import sdrpn.labels.convert as convert

    write_pickle(tmp_path / "in.pkl", [record(1)])
    load = convert.load_reference_pickle

    def load_while_another_job_writes(path):
        records = load(path)
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "rank000-shard00000.jsonl").write_text("theirs\n")
        return records

    monkeypatch.setattr(convert, "load_reference_pickle", load_while_another_job_writes)
    with pytest.raises(ValueError, match="holds files already"):
        main(["convert-labels", str(tmp_path / "in.pkl"), str(tmp_path / "out"), "--grid", "4x4"])
    assert (tmp_path / "out" / "rank000-shard00000.jsonl").read_text() == "theirs\n"
    assert not (tmp_path / "out" / "label_config.json").exists()


def test_max_samples_takes_the_seeded_subset(tmp_path, capsys):
    from sdrpn.subsets import seeded_subset

    write_pickle(tmp_path / "in.pkl", [record(q) for q in range(20)])
    assert main(["convert-labels", str(tmp_path / "in.pkl"), str(tmp_path / "out"), "--max-samples", "5"]) == 0
    rows = [json.loads(line) for line in open(tmp_path / "out" / "rank000-shard00000.jsonl")]
    assert [r["index"] for r in rows] == seeded_subset(20, 5) != list(range(5))
    assert [r["id"] for r in rows] == [str(i) for i in seeded_subset(20, 5)]


@pytest.mark.parametrize(("count", "n"), [(20, 5), (1000, 100), (152_000, 10_000)])
def test_the_seeded_subset_is_the_references(count, n):
    # The reference's training script: random.seed(42); random.shuffle(records); records[:n].
    from sdrpn.subsets import seeded_subset

    state = random.getstate()
    try:
        records = [{"id": f"r{i}"} for i in range(count)]
        random.seed(42)
        random.shuffle(records)
        theirs = sorted(int(r["id"][1:]) for r in records[:n])
    finally:
        random.setstate(state)
    assert seeded_subset(count, n) == theirs


def test_converted_labels_rebuild_their_images_at_the_models_size(tmp_path, capsys):
    # They record no image size: the dataset took 336, LLaVA-1.5's, whatever the model.
    from PIL import Image

    from sdrpn.rpn.dataset import LabelShardDataset
    from tiny_llava import IMAGE, make_tokenizer

    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    Image.new("RGB", (40, 30)).save(tmp_path / "images" / "a.jpg")
    grounding = np.zeros(16, dtype=np.float32)
    grounding[5] = 1.0
    records = [
        {"question_id": 1, "image": "a.jpg", "prompt": "what ?", "text": "K7", "sink_attn": np.zeros(16, np.float32),
         "grounding_attn_o2i": grounding + rng.random(16).astype(np.float32) * 1e-3}
    ]  # fmt: skip
    write_pickle(tmp_path / "in.pkl", records)
    argv = ["convert-labels", str(tmp_path / "in.pkl"), str(tmp_path / "out"), "--grid", "4x4"]
    assert main(argv + ["--image-folder", str(tmp_path / "images")]) == 0
    capsys.readouterr()
    for size in (56, 336):
        sample = LabelShardDataset(str(tmp_path / "out"), make_tokenizer(), IMAGE, image_size=size)[0]
        assert sample.pixel_values.shape == (3, size, size)
