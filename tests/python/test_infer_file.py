"""`sdrpn infer`: one image from the command line, and a whole data file answered into a
resumable answers file, by one process or by torchrun's ranks."""

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import main_thread_opens
from infer_samples import GRID, QUESTIONS, TEMPLATE, images
from sdrpn.rpn.model import RegionProposalNetwork


@pytest.fixture(scope="module")
def infer_ws(tmp_path_factory):
    from tiny_llava import save_tiny_llava

    root = tmp_path_factory.mktemp("infer")
    tiny = save_tiny_llava(str(root / "model"), grid=GRID, num_layers=4)
    RegionProposalNetwork.from_llava(tiny.model, branch_layer=2, depth=2).save(str(root / "rpn"))
    (root / "images").mkdir()
    for i, im in enumerate(images(3, seed=5)):
        im.save(root / "images" / f"{i}.png")
    import json

    data = [
        {"id": f"q{i}", "image": f"{i}.png", "conversations": [{"from": "human", "value": "<image>\n" + q}]}
        for i, q in enumerate(QUESTIONS)
    ]
    data.insert(1, {"id": "gone", "image": "missing.png", "conversations": [{"from": "human", "value": "x ?"}]})
    # Entries a JSON file can deliver that a tokenizer, a file system or PIL's pixel budget
    # refuses: each is skipped with its reason and the job goes on.
    Image.new("RGB", (60000, 1)).save(root / "images" / "long.png")
    asks = [{"from": "human", "value": "<image>\nx ?"}]
    data += [
        {"id": "surrogate", "image": "0.png", "conversations": [{"from": "human", "value": "<image>\n\ud800"}]},
        {"id": "nul", "image": "0\x00.png", "conversations": asks},
        {"id": "long", "image": "long.png", "conversations": asks},
    ]
    (root / "data.json").write_text(json.dumps(data))
    return root


def infer_argv(ws, *extra) -> list[str]:
    return [
        "infer",
        "--model",
        str(ws / "model"),
        "--rpn",
        str(ws / "rpn"),
        "--dtype",
        "fp32",
        "--prompt-template",
        TEMPLATE,
        "--max-new-tokens",
        "3",
        "--threshold",
        "-0.9",
        *extra,
    ]


def infer_cli(ws, *extra):
    from sdrpn.cli import main

    return main(infer_argv(ws, *extra))


def test_infer_cli_single_image_with_viz(infer_ws, tmp_path, capsys):
    import json

    viz = tmp_path / "roi.png"
    assert (
        infer_cli(
            infer_ws,
            "--image",
            str(infer_ws / "images" / "0.png"),
            "--question",
            QUESTIONS[0],
            "--viz",
            str(viz),
            "--json",
        )
        == 0
    )
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(record) >= {"answer", "boxes", "timings_s", "viz"}
    with Image.open(viz) as im:
        assert im.size == (120, 60)
    assert infer_cli(infer_ws, "--image", str(infer_ws / "images" / "0.png"), "--question", QUESTIONS[0]) == 0
    said = capsys.readouterr().out
    assert "answer:" in said and "wrote" not in said
    argv = ("--image", str(infer_ws / "images" / "0.png"), "--question", QUESTIONS[0], "--viz", str(viz))
    assert infer_cli(infer_ws, *argv) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"wrote {viz}"


def test_infer_cli_refuses_an_image_too_large_for_its_preprocessing(infer_ws, tmp_path, capsys, monkeypatch):
    from sdrpn.cli import entry

    Image.new("RGB", (9460, 1)).save(tmp_path / "long.png")  # a 9460x9460 canvas: over PIL's budget
    assert entry(infer_argv(infer_ws, "--image", str(tmp_path / "long.png"), "--question", QUESTIONS[0])) == 2
    assert f"--image {tmp_path / 'long.png'}: 9460x1 is too large to pad to a square" in capsys.readouterr().err
    # Crop mode makes 336 rows of 3178560 pixels of it: refused too, where a 4000x100 image
    # (over PIL's budget padded: 16 million pixels) answers.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10**6)
    argv = infer_argv(infer_ws, "--preprocessing", "crop", "--question", QUESTIONS[0], "--image")
    assert entry([*argv, str(tmp_path / "long.png")]) == 2
    assert "9460x1 is too long to resize its short side to" in capsys.readouterr().err
    Image.new("RGB", (4000, 100)).save(tmp_path / "wide.png")
    assert entry([*argv, str(tmp_path / "wide.png")]) == 0
    assert entry(infer_argv(infer_ws, "--image", str(tmp_path / "wide.png"), "--question", QUESTIONS[0])) == 2
    assert "4000x100 is too large to pad to a square in pad mode" in capsys.readouterr().err


def test_roi_overlay_draws_zero_size_boxes_and_saves_in_the_named_format(tmp_path):
    from sdrpn.infer.viz import roi_overlay
    from sdrpn.pictures import save_atomic

    # A region wholly in the padding keeps its zero height (10, 0, 50, 0): drawn as a line.
    out = roi_overlay(Image.new("RGB", (120, 60)), np.zeros((4, 4)), [(10, 0, 50, 0), (30, 20, 30, 40)])
    red = np.asarray(out)[..., 0] > 200
    assert red[0, 10:50].all() and not red[0, 50:].any() and red[20:40, 30].all() and not red[40:, 30].any()
    for name, picture_format in (("roi.jpg", "JPEG"), ("roi.PNG", "PNG"), ("roi", "PNG"), ("roi.webp", "WEBP")):
        save_atomic(out, str(tmp_path / name))
        with Image.open(tmp_path / name) as written:
            assert written.format == picture_format and written.size == (120, 60)


def test_infer_cli_whole_file_is_resumable(infer_ws, tmp_path, capsys):
    import json

    out = tmp_path / "answers.jsonl"
    data = ("--data", str(infer_ws / "data.json"), "--image-folder", str(infer_ws / "images"), "--out", str(out))
    assert infer_cli(infer_ws, *data, "--limit", "2", "--batch-size", "2") == 0
    first = [json.loads(line)["id"] for line in open(out)]
    assert first == ["q0"]
    with open(out, "a") as f:
        f.write('{"id": "q1", "ans')  # a crash mid-line
    assert infer_cli(infer_ws, *data, "--batch-size", "2") == 0
    ids = [json.loads(line)["id"] for line in open(out)]
    assert ids == ["q0", "q1", "q2"]
    summary = json.loads((tmp_path / "answers.jsonl.summary.json").read_text())
    assert summary == {
        "answered": 2,
        "already_done": 1,
        "skipped": 4,
        "skipped_by_reason": {
            "image missing": 1,
            "text not valid UTF-8 or with a NUL byte": 1,
            "image path not valid text": 1,
            "image too large to pad to a square": 1,
        },
    }
    with pytest.raises(ValueError, match="either --image and --question, or --data"):
        infer_cli(infer_ws)


def test_a_resumed_file_counts_its_earlier_rows_from_the_start(infer_ws, tmp_path, monkeypatch):
    """The progress line's rate and time left are this run's: the rows an earlier run wrote
    start the count rather than being counted as answered in no time."""
    import sdrpn.infer.job as job
    from sdrpn.progress import LogProgress

    bars = []

    def recorded(**kwargs):
        bars.append(LogProgress(**kwargs))
        return bars[-1]

    monkeypatch.setattr(job, "show_progress", recorded)
    data = ("--data", str(infer_ws / "data.json"), "--image-folder", str(infer_ws / "images"))
    data += ("--out", str(tmp_path / "answers.jsonl"))
    assert infer_cli(infer_ws, *data, "--limit", "3") == 0  # q0 answered, "gone" skipped, q1 answered
    assert infer_cli(infer_ws, *data, "--limit", "4") == 0
    assert (bars[1].total, bars[1].first, bars[1].n) == (4, 2, 4)  # 2 done before, 1 skipped, 1 answered


def test_a_killed_writes_temporaries_are_removed_at_the_start(infer_ws, tmp_path):
    out = tmp_path / "answers.jsonl"
    left = [tmp_path / ".tmp-answers.jsonl.abc123", tmp_path / ".tmp-answers.jsonl.settings.json.def456"]
    for path in left:
        path.write_text("half")
    kept = tmp_path / ".tmp-notes.txt.x1"  # another program's
    kept.write_text("mine")
    data = ("--data", str(infer_ws / "data.json"), "--image-folder", str(infer_ws / "images"), "--out", str(out))
    assert infer_cli(infer_ws, *data, "--limit", "2") == 0
    assert not [p for p in left if p.exists()] and kept.exists()


def test_ranks_starting_together_raise_their_own_error_when_the_exchange_fails(monkeypatch):
    from sdrpn import distributed

    def lost(*args, **kwargs):
        raise distributed.RankStopped("a peer is gone")

    monkeypatch.setattr(distributed, "gather_objects", lost)
    with pytest.raises(KeyError, match="mine"):
        with distributed.together(2, "cpu"):
            raise KeyError("mine")
    with pytest.raises(distributed.RankStopped, match="a peer is gone"):  # a rank with no error of its own
        with distributed.together(2, "cpu"):
            pass


def test_edited_or_damaged_answer_files_are_answered_again_or_refused(infer_ws, tmp_path, caplog):
    import json

    out = tmp_path / "answers.jsonl"
    data = ("--data", str(infer_ws / "data.json"), "--image-folder", str(infer_ws / "images"), "--out", str(out))
    assert infer_cli(infer_ws, *data) == 0
    whole = [json.loads(line) for line in open(out)]
    assert [r["id"] for r in whole] == ["q0", "q1", "q2"]
    # A row of another id at an entry's index had been taken as that entry's answer.
    edited = [dict(whole[0], id="zzz", answer="WRONG"), *whole[1:]]
    lines = [json.dumps(r) for r in edited]
    # Lines json cannot read: more digits than Python converts, nesting past its limit, a
    # byte that is no UTF-8 (it had been read as U+FFFD and kept).
    out.write_bytes(("\n".join(lines) + "\n" + "1" * 5000 + "\n" + "[" * 100_000 + "\n").encode())
    with open(out, "ab") as f:
        f.write(b'{"id": "q1", "index": 1, "answer": "\xff"}\n')
    with caplog.at_level(logging.WARNING):
        assert infer_cli(infer_ws, *data) == 0
    rows = [json.loads(line) for line in open(out)]
    assert [r["id"] for r in rows] == ["q0", "q1", "q2"] and rows[0]["answer"] == whole[0]["answer"]
    assert "'zzz' for entry 0 does not match that entry" in caplog.text
    assert "line 4 is not an answer row" in caplog.text and "line 6 is not an answer row" in caplog.text
    # Answers whose settings file is gone: their settings are unknown.
    (tmp_path / "answers.jsonl.settings.json").unlink()
    with pytest.raises(ValueError, match="holds answers but not their settings .* pass --restart"):
        infer_cli(infer_ws, *data, "--max-new-tokens", "5")
    assert infer_cli(infer_ws, *data, "--restart") == 0


def test_a_prompt_past_the_models_context_is_skipped(infer_ws, tmp_path):
    # The tiny model has 512 positions; 600 words make a longer prompt.
    entries = json.loads((infer_ws / "data.json").read_text())
    q0 = next(e for e in entries if e["id"] == "q0")
    wordy = dict(q0, id="wordy", conversations=[{"from": "human", "value": "<image>\n" + "x " * 600 + "?"}])
    (tmp_path / "data.json").write_text(json.dumps([wordy, q0]))
    out = tmp_path / "answers.jsonl"
    assert infer_cli(infer_ws, "--data", str(tmp_path / "data.json"), "--image-folder", str(infer_ws / "images"),
                     "--out", str(out)) == 0  # fmt: skip
    assert [json.loads(line)["id"] for line in open(out)] == ["q0"]
    summary = json.loads((tmp_path / "answers.jsonl.summary.json").read_text())
    assert summary["skipped_by_reason"] == {"prompt past the model's context": 1}
    (tmp_path / "wordy.json").write_text(json.dumps([wordy]))  # the image folder is not the cause there
    with pytest.raises(ValueError, match=r"all 1 were skipped \(1 prompt past the model's context\)$"):
        infer_cli(infer_ws, "--data", str(tmp_path / "wordy.json"), "--image-folder", str(infer_ws / "images"),
                  "--out", str(tmp_path / "wordy.jsonl"))  # fmt: skip
    message = "argument --max-new-tokens: max_new_tokens must be an int from 1 to the model's context of 512"
    with pytest.raises(ValueError, match=message):
        infer_cli(infer_ws, "--data", str(tmp_path / "data.json"), "--image-folder", str(infer_ws / "images"),
                  "--out", str(tmp_path / "more.jsonl"), "--max-new-tokens", "100000")  # fmt: skip
    assert not (tmp_path / "more.jsonl.settings.json").exists()


def test_the_token_ratio_flag_applies_in_the_rpn_folders_crop_mode(infer_ws, tmp_path, capsys):
    # Checked up front against the defaults' mask mode, it was refused for a bbox-mode folder.
    from sdrpn.llava.loading import load_llava

    model, _ = load_llava(str(infer_ws / "model"), "fp32")
    bbox = tmp_path / "bbox_rpn"
    RegionProposalNetwork.from_llava(model, branch_layer=2, depth=2, roi={"crop_mode": "bbox"}).save(str(bbox))
    ask = ("--image", str(infer_ws / "images" / "0.png"), "--question", QUESTIONS[0], "--token-ratio", "0.5")
    assert infer_cli(infer_ws, *ask, "--rpn", str(bbox)) == 0
    message = r"token_ratio resamples bbox-mode crops only, got token_ratio=0.5 with crop_mode='mask': set .*--crop"
    with pytest.raises(ValueError, match=message):
        infer_cli(infer_ws, *ask)  # the fixture's RPN folder records mask mode
    assert infer_cli(infer_ws, *ask, "--crop-mode", "bbox") == 0
    # A folder that records both (as earlier versions wrote) is mended by either flag.
    config = json.loads((bbox / "rpn_config.json").read_text())
    config["roi"].update(crop_mode="mask", token_ratio=0.5)
    (bbox / "rpn_config.json").write_text(json.dumps(config))
    ask = ask[:-2]
    with pytest.raises(ValueError, match=message):
        infer_cli(infer_ws, *ask, "--rpn", str(bbox))
    assert infer_cli(infer_ws, *ask, "--rpn", str(bbox), "--token-ratio", "-1") == 0
    assert infer_cli(infer_ws, *ask, "--rpn", str(bbox), "--crop-mode", "bbox") == 0


def test_infer_file_answers_alike_with_or_without_loader_threads(infer_ws, tmp_path, monkeypatch):
    from sdrpn.infer import job as infer_job

    rows = {}
    for workers in ("0", "2"):
        out = tmp_path / f"answers{workers}.jsonl"
        args = ["--data", str(infer_ws / "data.json"), "--image-folder", str(infer_ws / "images"), "--out", str(out)]
        on_main = main_thread_opens(monkeypatch, infer_job)
        assert infer_cli(infer_ws, *args, "--batch-size", "2", "--workers", workers) == 0
        assert on_main and (all(on_main) if workers == "0" else not any(on_main)), on_main
        rows[workers] = [{k: v for k, v in json.loads(line).items() if k != "timings_s"} for line in open(out)]
        summary = json.loads((tmp_path / f"answers{workers}.jsonl.summary.json").read_text())
        assert summary["answered"] == 3 and summary["skipped"] == 4
    assert rows["0"] == rows["2"] and [r["id"] for r in rows["0"]] == ["q0", "q1", "q2"]


def test_answer_file_resume_keeps_every_valid_row(tmp_path, caplog):
    from sdrpn.infer.answers_file import read_rows

    out = tmp_path / "answers.jsonl"
    out.write_text(
        '{"id": "a", "answer": "x"}\n{"id": "b", "ans\n[1, 2]\n{"answer": "no id"}\n\n{"id": "c"}\n{"id": "d"'
    )
    assert read_rows(str(out), rewrite=True) == [{"id": "a", "answer": "x"}, {"id": "c"}]
    assert out.read_text().splitlines() == ['{"id": "a", "answer": "x"}', '{"id": "c"}']
    assert "line 2 is not an answer row" in caplog.text and "line 4" in caplog.text and "line 7" in caplog.text
    # An index that is not an entry's (damaged, or edited by hand) makes no row either.
    out.write_text(
        '{"id": "e", "index": null}\n{"id": "f", "index": "2"}\n{"id": "g", "index": -1}\n{"id": "h", "index": 3}'
    )
    assert read_rows(str(out), rewrite=False) == [{"id": "h", "index": 3}]


def test_a_rank_file_still_written_by_an_earlier_job_is_not_merged_under_it(infer_ws, tmp_path):
    from sdrpn.infer.answers_file import part_path
    from sdrpn.io_utils import FolderBusy, exclusive_lock

    out = str(tmp_path / "answers.jsonl")
    flags = ("--data", str(infer_ws / "data.json"), "--image-folder", str(infer_ws / "images"), "--out", out)
    with exclusive_lock(part_path(out, 3) + ".lock"):  # rank 3 of a job on 4 ranks, still running
        Path(part_path(out, 3)).write_text("")
        with pytest.raises(FolderBusy, match="answers.jsonl.rank003.part.lock is held by another running job"):
            infer_cli(infer_ws, *flags)
    assert infer_cli(infer_ws, *flags) == 0 and not Path(part_path(out, 3)).exists()


def test_ranks_waiting_on_one_that_refused_say_so_in_one_line(infer_ws, tmp_path):
    import subprocess
    import sys

    from sdrpn.io_utils import exclusive_lock

    out = str(tmp_path / "answers.jsonl")
    flags = infer_argv(infer_ws, "--data", str(infer_ws / "data.json"), "--image-folder", str(infer_ws / "images"),
                       "--out", out)  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "sdrpn"]
    with exclusive_lock(out + ".lock"):  # another job writes --out: rank 0 refuses, rank 1 waits for it
        done = subprocess.run([*cmd, *flags], env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                              text=True, timeout=300)  # fmt: skip
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if "sdrpn infer: error: " in line]
    assert len(errors) == 2 and "answers.jsonl.lock is held by another running job" in errors[0] + errors[1]
    # Rank 1 learns why from rank 0 itself, through the start's exchange, not from a lost connection.
    stopped = [line for line in errors if "another rank stopped (rank 0: FolderBusy: " in line]
    assert len(stopped) == 1 and "answers.jsonl.lock is held by another running job" in stopped[0], done.stderr[-3000:]
    assert "sdrpn/distributed.py" not in done.stderr  # no rank's traceback


def test_merged_answers_are_one_row_per_entry_in_the_datas_order(tmp_path):
    from sdrpn.infer.answers_file import merge_rows, part_path

    out = str(tmp_path / "answers.jsonl")
    rows = [{"id": "old"}, {"id": "a", "index": 0}, {"id": "c", "index": 4}, {"id": "b", "index": 2}]
    Path(out).write_text("".join(json.dumps(r) + "\n" for r in rows))  # a rerun appended entry 2
    Path(part_path(out, 1)).write_text(json.dumps({"id": "b", "index": 2}) + "\n" + json.dumps({"id": "d", "index": 5}))
    (tmp_path / ".tmp-answers.jsonl.rank007.part.x1").write_text("half")  # of a rank that is gone
    merge_rows(out)
    assert [r["id"] for r in map(json.loads, open(out))] == ["old", "a", "b", "c", "d"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["answers.jsonl"]


def test_rank_files_from_rank_1000_on_are_found_and_look_alikes_are_not(tmp_path):
    from sdrpn.infer.answers_file import part_path, part_paths

    out = str(tmp_path / "answers.jsonl")
    ranks = [part_path(out, rank) for rank in (0, 999, 1000, 12345)]
    assert [Path(p).name for p in ranks[1:]] == [f"answers.jsonl.rank{r}.part" for r in (999, 1000, 12345)]
    look_alikes = [".rank12.part", ".rank0001x.part", ".rank001.part.lock", "2.rank001.part"]
    for name in [*ranks, *(out + suffix for suffix in look_alikes)]:
        Path(name).write_text("")
    assert part_paths(out) == sorted(ranks)


def test_a_repeated_id_resumes_entry_by_entry(infer_ws, tmp_path):
    # Two entries share each id; "bad" does not parse, one "twin" has no image.
    entries = json.loads((infer_ws / "data.json").read_text())
    q0, q1, q2 = (e for e in entries if e["id"] in ("q0", "q1", "q2"))
    data = [dict(q0, id="dup"), {"id": "bad"}, dict(q1, id="dup"), dict(q2, id="twin", image="gone.png")]
    data.append(dict(q2, id="twin"))
    (tmp_path / "data.json").write_text(json.dumps(data))
    out = tmp_path / "answers.jsonl"
    flags = ("--data", str(tmp_path / "data.json"), "--image-folder", str(infer_ws / "images"), "--out", str(out))

    def rows():  # without the timings
        return [(r["id"], r.get("index"), r["answer"], r["boxes"]) for r in map(json.loads, open(out))]

    def summary():
        found = json.loads((tmp_path / "answers.jsonl.summary.json").read_text())
        return found["already_done"], found["answered"], found["skipped"]

    assert infer_cli(infer_ws, *flags, "--batch-size", "1") == 0
    whole = rows()
    assert [row[:2] for row in whole] == [("dup", 0), ("dup", 2), ("twin", 4)]
    first = out.read_text().splitlines()[0]
    out.write_text(first + "\n")  # stopped after the first "dup"
    assert infer_cli(infer_ws, *flags, "--batch-size", "1") == 0
    assert rows() == whole and summary() == (1, 2, 2)
    assert infer_cli(infer_ws, *flags) == 0  # done: nothing answered twice, the missing image skipped again
    assert rows() == whole and summary() == (3, 0, 2)
    assert infer_cli(infer_ws, *flags, "--limit", "2") == 0  # what this run covers, not the whole file
    assert summary() == (1, 0, 1)
    # Rows written before the index was recorded: an id's k rows mark its first k entries.
    legacy = json.loads(first)
    del legacy["index"]
    out.write_text(json.dumps(legacy) + "\n")
    assert infer_cli(infer_ws, *flags, "--batch-size", "1") == 0
    assert [row[0] for row in rows()] == ["dup", "dup", "twin"] and summary() == (1, 2, 2)


def test_infer_file_on_ranks_answers_as_one_process_and_resumes_on_any_number(infer_ws, tmp_path):
    """Under torchrun each rank answers every world_size-th entry into its own file; the
    job's end merges them into --out in the data's order: the rows one process writes. A
    run stopped on 2 ranks resumes on 1 and one stopped on 1 resumes on 3, answering
    nothing twice."""
    import subprocess
    import sys

    entries = json.loads((infer_ws / "data.json").read_text())
    data = tmp_path / "data.json"
    data.write_text(json.dumps(entries + [dict(e, id=e["id"] + "-again") for e in entries]))  # 6 of 14 answerable

    def run(out, ranks: int) -> dict:
        flags = infer_argv(infer_ws, "--data", str(data), "--image-folder", str(infer_ws / "images"), "--out",
                           str(out), "--batch-size", "2")  # fmt: skip
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)]
        done = subprocess.run([*cmd, "-m", "sdrpn", *flags], env=dict(os.environ, OMP_NUM_THREADS="1"),
                              capture_output=True, text=True, timeout=300)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        (printed,) = done.stdout.splitlines()  # rank 0's summary alone
        assert json.loads(printed) == json.loads(Path(str(out) + ".summary.json").read_text())
        assert not list(tmp_path.glob("*.part")) and not list(tmp_path.glob(".tmp-*"))
        return json.loads(printed)

    def rows(out) -> list[dict]:
        return [{k: v for k, v in json.loads(line).items() if k != "timings_s"} for line in open(out)]

    assert infer_cli(infer_ws, "--data", str(data), "--image-folder", str(infer_ws / "images"), "--out",
                     str(tmp_path / "one.jsonl"), "--batch-size", "2") == 0  # fmt: skip
    whole = rows(tmp_path / "one.jsonl")
    assert [r["index"] for r in whole] == [0, 2, 3, 7, 9, 10]
    two = tmp_path / "two.jsonl"
    assert run(two, 2) == json.loads((tmp_path / "one.jsonl.summary.json").read_text())
    assert rows(two) == whole
    # Stopped on 2 ranks: rank 0 had written two rows, rank 1 one and part of a line.
    lines = (tmp_path / "one.jsonl").read_text().splitlines()
    shutil.copy(str(two) + ".settings.json", tmp_path / "stopped.jsonl.settings.json")
    (tmp_path / "stopped.jsonl.rank000.part").write_text(lines[0] + "\n" + lines[1] + "\n")
    (tmp_path / "stopped.jsonl.rank001.part").write_text(lines[2] + "\n" + lines[3][:20])
    summary = run(tmp_path / "stopped.jsonl", 1)
    assert rows(tmp_path / "stopped.jsonl") == whole and (summary["already_done"], summary["answered"]) == (3, 3)
    # Stopped on 1 process after two rows, resumed on 3 ranks.
    shutil.copy(str(two) + ".settings.json", tmp_path / "three.jsonl.settings.json")
    (tmp_path / "three.jsonl").write_text("\n".join(lines[:2]) + "\n")
    summary = run(tmp_path / "three.jsonl", 3)
    assert rows(tmp_path / "three.jsonl") == whole and (summary["already_done"], summary["answered"]) == (2, 4)


def test_infer_file_config_checks_its_ranks(infer_ws, tmp_path, monkeypatch):
    from sdrpn.infer.job import InferFileConfig, answer_file

    files = dict(data=str(infer_ws / "data.json"), image_folder=str(infer_ws / "images"), out=str(tmp_path / "a"))
    with pytest.raises(ValueError, match=r"rank must lie in \[0, world_size=2\), got 2"):
        InferFileConfig(**files, rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        InferFileConfig(**files, batch_size=0)
    with pytest.raises(ValueError, match="limit must be >= 1, got -1"):  # had answered all but the last entry
        InferFileConfig(**files, limit=-1)
    with pytest.raises(ValueError, match="limit must be an int >= 1, got 2.5"):
        InferFileConfig(**files, limit=2.5)
    with pytest.raises(ValueError, match="world_size=2 needs torch.distributed's process group started"):
        answer_file(None, InferFileConfig(**files, rank=1, world_size=2))
    assert not list(tmp_path.iterdir())
    monkeypatch.setenv("WORLD_SIZE", "2")  # one question under torchrun: refused before the model loads
    with pytest.raises(ValueError, match="--image answers one question on one process: run it without torchrun"):
        infer_cli(infer_ws, "--image", str(infer_ws / "images" / "0.png"), "--question", "q", "--model", "none")


def test_answer_file_refuses_to_mix_settings(infer_ws, tmp_path, caplog):
    out = tmp_path / "answers.jsonl"
    data = ("--data", str(infer_ws / "data.json"), "--image-folder", str(infer_ws / "images"), "--out", str(out))
    assert infer_cli(infer_ws, *data, "--max-new-tokens", "2") == 0
    rows = out.read_text()
    with pytest.raises(ValueError, match=r"other settings \(max_new_tokens: 2 -> 3; roi\.threshold: -0\.9 -> 0\.3\)"):
        infer_cli(infer_ws, *data, "--max-new-tokens", "3", "--threshold", "0.3")
    assert out.read_text() == rows  # nothing touched
    assert infer_cli(infer_ws, *data, "--max-new-tokens", "2") == 0  # the same settings resume
    # The data and images moved elsewhere resume: the data is compared by its content, the
    # image folder by the sizes of the images the rows record. Another folder is refused.
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    sizes = [list(Image.open(infer_ws / "images" / row["image"]).size) for row in rows]
    assert [row["image_size"] for row in rows] == sizes
    moved = tmp_path / "moved"
    shutil.copytree(infer_ws / "images", moved / "images")
    (moved / "data.json").write_text((infer_ws / "data.json").read_text())
    elsewhere = ("--data", str(moved / "data.json"), "--image-folder", str(moved / "images"), *data[4:])
    with caplog.at_level(logging.INFO, logger="sdrpn.infer.job"):
        assert infer_cli(infer_ws, *elsewhere, "--max-new-tokens", "2") == 0
    assert json.loads((tmp_path / "answers.jsonl.summary.json").read_text())["already_done"] == 3
    assert f'with files elsewhere than when it began: data: "{infer_ws / "data.json"}" -> ' in caplog.text
    assert f'image_folder: "{infer_ws / "images"}" -> "{moved / "images"}"' in caplog.text
    entries = json.loads((moved / "data.json").read_text())  # rows name their entries by index
    (moved / "data.json").write_text(json.dumps(entries[::-1]))
    edited = r"other settings \(data_sha256: \"[0-9a-f]{64}\" -> \"[0-9a-f]{64}\" \(data holds other content\)\)"
    with pytest.raises(ValueError, match=edited):
        infer_cli(infer_ws, *elsewhere, "--max-new-tokens", "2")
    refused = r"answers about the images in .*moved/images, and --image-folder .* is not shown to hold them \(%s\)"
    with pytest.raises(ValueError, match=refused % r"3 of 3 images checked are missing or differ, e\.g\. 0\.png: .*"):
        infer_cli(infer_ws, *data[:2], "--image-folder", str(tmp_path), *data[4:], "--max-new-tokens", "2")
    # Rows of older versions record no image size: they cannot show another folder to be theirs.
    out.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "image_size"}) + "\n" for r in rows))
    with pytest.raises(ValueError, match=refused % "no finished sample records its image's size to check it by"):
        infer_cli(infer_ws, *data, "--max-new-tokens", "2")
    # Moved back, with a damaged line: the job's own read drops it with one warning (the
    # check reads the rows quietly, and leaves the file to its writer).
    out.write_text("".join(json.dumps(row) + "\n" for row in rows) + "{damaged\n")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sdrpn.infer.answers_file"):
        assert infer_cli(infer_ws, *data, "--max-new-tokens", "2") == 0
    assert caplog.text.count("line 4 is not an answer row") == 1
    # Another RPN of the same configuration, trained apart: only its weights differ.
    from safetensors.torch import load_file, save_file

    other = tmp_path / "other-rpn"
    shutil.copytree(infer_ws / "rpn", other)
    weights = load_file(other / "rpn.safetensors")
    save_file({k: v + 0.01 if v.is_floating_point() else v for k, v in weights.items()}, other / "rpn.safetensors")
    with pytest.raises(ValueError, match=r"other settings \(rpn_weights: "):
        infer_cli(infer_ws, *data, "--max-new-tokens", "2", "--rpn", str(other))
    # Answers recorded before the weights and the data's digest were: they resume with the
    # RPN and data named.
    settings_file = tmp_path / "answers.jsonl.settings.json"
    settings = json.loads(settings_file.read_text())
    del settings["rpn_weights"], settings["data_sha256"]
    settings_file.write_text(json.dumps(settings))
    moved = tmp_path / "moved.json"  # without its digest, the data file is known by its path
    shutil.copy(infer_ws / "data.json", moved)
    with pytest.raises(ValueError, match=rf'other settings \(data: "{infer_ws / "data.json"}" -> "{moved}"\)'):
        infer_cli(infer_ws, "--data", str(moved), *data[2:], "--max-new-tokens", "2")
    assert infer_cli(infer_ws, *data, "--max-new-tokens", "2") == 0
    assert infer_cli(infer_ws, *data, "--max-new-tokens", "3", "--restart") == 0
    summary = json.loads((tmp_path / "answers.jsonl.summary.json").read_text())
    assert summary["already_done"] == 0 and summary["answered"] == 3
    # A settings file that is not a JSON object says nothing of the answers: refused, not guessed at.
    settings_file.write_text("[2]")
    with pytest.raises(ValueError, match=r"answers\.jsonl\.settings\.json must hold a JSON object of settings"):
        infer_cli(infer_ws, *data, "--max-new-tokens", "3")
    assert infer_cli(infer_ws, *data, "--max-new-tokens", "3", "--restart") == 0


def test_only_rank_0_records_the_settings_and_removes_old_answers(tmp_path, monkeypatch):
    # Every rank checks the recorded settings; one writes them: another rank removing answers
    # or rewriting the settings would race rank 0, which does both before the ranks meet.
    from sdrpn.infer import job
    from sdrpn.infer.answers_file import part_path

    out = tmp_path / "answers.jsonl"
    old = [out, Path(str(out) + ".summary.json"), Path(part_path(str(out), 1))]
    monkeypatch.setattr(job, "run_settings", lambda pipe, cfg: {"max_new_tokens": cfg.max_new_tokens})
    files = dict(data=str(tmp_path / "d.json"), image_folder=str(tmp_path), out=str(out), restart=True)
    for path in old:
        path.write_text("{}\n")
    job._start(None, job.InferFileConfig(**files, max_new_tokens=3, rank=1, world_size=2))
    assert all(path.exists() for path in old) and not Path(str(out) + ".settings.json").exists()
    job._start(None, job.InferFileConfig(**files, max_new_tokens=3, rank=0, world_size=2))
    assert not any(path.exists() for path in old)
    assert json.loads(Path(str(out) + ".settings.json").read_text()) == {"max_new_tokens": 3}


def test_the_command_reports_user_mistakes_in_one_line(infer_ws, tmp_path, capsys):
    from sdrpn.cli import entry

    missing = str(tmp_path / "nowhere")
    image = str(infer_ws / "images" / "0.png")
    assert entry(["infer", "--model", missing, "--rpn", missing, "--image", image, "--question", "q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sdrpn infer: error: ") and "nowhere" in err and len(err.splitlines()) == 1
    with pytest.raises((OSError, ValueError)):
        entry(["infer", "--debug", "--model", missing, "--rpn", missing, "--image", image, "--question", "q"])
    # The flags, the image and the data file are checked before the model loads (the model is missing too).
    cut = tmp_path / "cut.json"
    cut.write_text('[{"id": "a"}, {"id": "b"')  # a copy that stopped part way
    for flags, message in [
        (["--image", str(tmp_path / "x.png"), "--question", "q"], "--image " + str(tmp_path / "x.png")),
        (["--image", str(infer_ws / "data.json"), "--question", "q"], "cannot read it as an image"),
        (["--image", image], "--image and --question go together"),
        # Invalid UTF-8 on the command line reaches Python as a lone surrogate.
        (["--image", image, "--question", "what \udcff ?"], "--question must be valid UTF-8 text"),
        (
            ["--data", str(infer_ws / "data.json")],
            "--data needs --image-folder and --out: --image-folder and --out missing",
        ),
        (
            ["--data", str(infer_ws / "data.json"), "--out", "a.jsonl"],
            "--image-folder and --out: --image-folder missing",
        ),
        (["--image", image, "--question", " <image> "], "--question must hold text besides the image placeholder"),
        # A flag of the other mode had been ignored without a word.
        (["--image", image, "--question", "q", "--out", "a.jsonl", "--restart"], "--out, --restart: only with --data"),
        (["--image", image, "--question", "q", "--limit", "1"], "--limit: only with --data"),
        (
            ["--image", image, "--question", "q", "--viz", str(tmp_path)],
            f"--viz {tmp_path} is a folder: it must be a file",
        ),
        (["--image", image, "--question", "q", "--image-folder", missing], "--image-folder: only with --data"),
        (
            ["--data", str(cut), "--image-folder", str(infer_ws / "images"), "--out", str(tmp_path / "a.jsonl")],
            f"--data {cut} is not a JSON file",
        ),
        (
            ["--data", str(infer_ws / "data.json"), "--image-folder", missing, "--out", "a.jsonl", "--viz", "v.png"],
            "--viz: only with --image",
        ),
    ]:
        assert entry(["infer", "--model", missing, "--rpn", missing, *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("sdrpn infer: error: ") and message in err and "nowhere" not in err, err
    with pytest.raises(SystemExit) as exit_:
        entry(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith("sdrpn 0.1.0 (torch ")


def test_infer_file_refuses_a_wrong_image_folder(infer_ws, tmp_path):
    """A folder that is not there is refused before anything is written; one that holds
    none of the images ends in an error once the summary is written."""
    import json

    out = tmp_path / "answers.jsonl"
    data = ("--data", str(infer_ws / "data.json"), "--out", str(out))
    with pytest.raises(ValueError, match=f"\\(--image-folder\\) '{tmp_path / 'nowhere'}' does not exist"):
        infer_cli(infer_ws, *data, "--image-folder", str(tmp_path / "nowhere"))
    assert not out.exists()
    (tmp_path / "empty").mkdir()
    all_skipped = r"no sample of .* could be answered: all 7 were skipped \(5 image missing.*\); check --image-folder$"
    with pytest.raises(ValueError, match=all_skipped):
        infer_cli(infer_ws, *data, "--image-folder", str(tmp_path / "empty"))
    assert json.loads((tmp_path / "answers.jsonl.summary.json").read_text())["answered"] == 0


def test_infer_file_resumes_with_the_same_model_by_another_path(infer_ws, tmp_path):
    import json

    out = tmp_path / "answers.jsonl"
    data = ("--data", str(infer_ws / "data.json"), "--image-folder", str(infer_ws / "images"), "--out", str(out))
    assert infer_cli(infer_ws, *data, "--max-new-tokens", "2", "--limit", "3") == 0
    assert infer_cli(infer_ws, *data, "--max-new-tokens", "2", "--model", str(infer_ws / "model") + "/") == 0
    path = tmp_path / "answers.jsonl.settings.json"
    recorded = json.loads(path.read_text())["model"]["name"]
    assert recorded == str(infer_ws / "model")  # the first name is kept
    settings = json.loads(path.read_text())  # answers made by a model of another name are another's
    settings["model"]["name"] = str(tmp_path / "another-model")
    path.write_text(json.dumps(settings))
    with pytest.raises(ValueError, match=r"other settings \(model\.name: "):
        infer_cli(infer_ws, *data, "--max-new-tokens", "2")
