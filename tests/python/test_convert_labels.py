import json
import os
import pickle

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


def test_valid_pickle_is_imported(tmp_path, capsys):
    rng = np.random.default_rng(0)
    records = [
        {
            "question_id": q,
            "image": f"{q}.jpg",
            "prompt": "what?",
            "text": "K7",
            "sink_attn": (rng.random(576) * 2e-3).astype(np.float32),
            "grounding_attn_o2i": rng.random((1, 576)).astype(np.float32) ** 6,
        }
        for q in (10, 11, 12)
    ]
    write_pickle(tmp_path / "in.pkl", records)
    assert main(["convert-labels", str(tmp_path / "in.pkl"), str(tmp_path / "out")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["labelled"] == 3
    tensors = load_file(tmp_path / "out" / "rank000-shard00000.safetensors")
    g = torch.from_numpy(np.stack([r["grounding_attn_o2i"].reshape(-1) for r in records]))
    s = torch.from_numpy(np.stack([r["sink_attn"] for r in records]))
    assert torch.equal(tensors["labels"].long(), reference.pseudo_labels(g, s, 24, 24))
    rows = [json.loads(line) for line in open(tmp_path / "out" / "rank000-shard00000.jsonl")]
    assert [r["id"] for r in rows] == ["10", "11", "12"] and rows[0]["answer"] == "K7"
    # What earlier versions wrote had no label_config.json: it still reads, with SPEC's defaults.
    from sdrpn.labels.folder import LabelFolder

    folder = LabelFolder(str(tmp_path / "out"))
    assert folder.config.grid == [24, 24] and folder.config.sink_threshold == 1e-3
    os.unlink(tmp_path / "out" / "label_config.json")
    assert folder.config.format_version == 1 and folder.config.sink_threshold == 1e-3
    assert [r["id"] for shard in folder.shards() for r in shard.rows] == ["10", "11", "12"]
    with pytest.raises(ValueError, match="is not a label folder"):
        _ = LabelFolder(str(tmp_path)).config


class Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/sdrpn-pwned",))


def test_malicious_pickle_is_refused(tmp_path):
    write_pickle(tmp_path / "evil.pkl", [{"question_id": 1, "sink_attn": Exploit()}])
    with pytest.raises(pickle.UnpicklingError, match=r"refusing to load posix.system"):
        load_reference_pickle(str(tmp_path / "evil.pkl"))
    assert not os.path.exists("/tmp/sdrpn-pwned")


def test_non_square_maps_need_a_grid(tmp_path):
    records = [
        {"question_id": 1, "sink_attn": np.zeros(640, np.float32), "grounding_attn_o2i": np.ones(640, np.float32)}
    ]
    write_pickle(tmp_path / "in.pkl", records)
    with pytest.raises(ValueError, match="not a square grid"):
        main(["convert-labels", str(tmp_path / "in.pkl"), str(tmp_path / "out")])
    assert main(["convert-labels", str(tmp_path / "in.pkl"), str(tmp_path / "out"), "--grid", "16x40"]) == 0
