import dataclasses
import json
import logging
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import LlavaConfig, LlavaForConditionalGeneration

from sdrpn.cli import main
from sdrpn.labels.folder import LabelFolder
from sdrpn.llava.backbone import branch_hidden_states
from sdrpn.llava.loading import load_llava
from sdrpn.llava.model_facts import model_identity
from sdrpn.llava.presets import PRESET_FILE
from sdrpn.llava.probe import decoder_layers
from sdrpn.rpn.dataset import LabelCollator, LabelShardDataset
from sdrpn.rpn.for_labels import rpn_for_labels, rpn_settings
from sdrpn.rpn.model import RegionProposalNetwork, read_rpn_config, rpn_loss
from sdrpn.rpn.train import RPNTrainer, evaluate
from sdrpn.rpn.train_config import TrainConfig, accumulation_steps
from synthetic_labels import write_region_labels
from tiny_llava import IMAGE, make_tokenizer, save_tiny_llava

GRID = 4


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    save_tiny_llava(str(root / "model"), grid=GRID, num_layers=4)
    write_region_labels(root / "labels", root / "images", num=240, grid=GRID, image_size=14 * GRID)
    return root


def train_args(ws, out, *extra):
    return [
        "train",
        "--model",
        str(ws / "model"),
        "--labels",
        str(ws / "labels"),
        "--out",
        str(out),
        "--branch-layer",
        "1",
        "--depth",
        "2",
        "--batch-size",
        "16",
        "--effective-batch",
        "16",
        "--lr",
        "2e-3",
        "--held-out-fraction",
        "0.2",
        "--seed",
        "3",
        *extra,
    ]


def test_early_exit_features_equal_full_forward_hidden_states(ws):
    model, tok = load_llava(str(ws / "model"), "fp32")
    ds = LabelShardDataset(str(ws / "labels"), tok, IMAGE)
    batch = LabelCollator(tok.pad_token_id)([ds[i] for i in range(3)])
    for name, value in (
        ("image_token_id", None),
        ("image_token_id", 2**63),
        ("subset_seed", 1.5),
        ("subset_seed", 2**63),
    ):
        with pytest.raises(ValueError, match=rf"{name} must be an int in \[0, 2\*\*63\), got {value!r}"):
            LabelShardDataset(str(ws / "labels"), tok, **{"image_token_id": IMAGE, name: value})
    with pytest.raises(ValueError, match=r"pad_id must be a token id \(an int >= 0\), got None"):
        LabelCollator(None)
    # The pass stops at the branch layer: layers 2 and 3 never run (they would not change the result).
    ran = []
    hooks = [
        layer.register_forward_pre_hook(lambda _module, _args, i=i: ran.append(i))
        for i, layer in enumerate(decoder_layers(model))
    ]
    try:
        hidden, pos = branch_hidden_states(model, batch.input_ids, batch.attention_mask, batch.pixel_values, 2)
    finally:
        for hook in hooks:
            hook.remove()
    assert ran == [0, 1]
    with torch.no_grad():
        full = model.model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            pixel_values=batch.pixel_values,
            position_ids=pos,
            output_hidden_states=True,
        )
    assert torch.equal(hidden, full.hidden_states[2])
    rpn = RegionProposalNetwork.from_llava(model, 2, 2)
    loss_early = rpn_loss(rpn(hidden, batch.attention_mask, pos, batch.input_ids == IMAGE), batch.labels)
    loss_full = rpn_loss(rpn(full.hidden_states[2], batch.attention_mask, pos, batch.input_ids == IMAGE), batch.labels)
    assert torch.equal(loss_early, loss_full)
    for kwargs, message in (
        ({"held_out_fraction": float("nan")}, r"held_out_fraction must be a number in \[0, 1\), got nan"),
        ({"held_out_fraction": -0.1}, r"held_out_fraction must be a number in \[0, 1\), got -0.1"),
        ({"held_out_fraction": 1.0}, r"held_out_fraction must be a number in \[0, 1\), got 1.0"),
        ({"held_out_fraction": "0.1"}, r"held_out_fraction must be a number in \[0, 1\), got '0.1'"),
        ({"max_samples": True}, "max_samples must be an int >= 1 or None, got True"),
        ({"max_samples": 2.5}, "max_samples must be an int >= 1 or None, got 2.5"),
        ({"image_size": 0}, r"image_size must be an int in \[1, 65536\], got 0"),
        ({"image_size": 2**16 + 1}, r"image_size must be an int in \[1, 65536\], got 65537"),
        ({"image_folder": str(ws / "gone")}, r"image_folder \(--image-folder\) '.*gone' does not exist"),
    ):
        with pytest.raises(ValueError, match=message):
            LabelShardDataset(str(ws / "labels"), tok, IMAGE, **kwargs)
    LabelShardDataset(str(ws / "labels"), tok, IMAGE, subset_seed=0, image_size=2**16)  # the ranges' ends are values
    for layer in (0, 99, 2.0):  # 99 was an IndexError
        with pytest.raises(ValueError, match=rf"branch_layer must be an int in \[1, 4\] .*, got {layer!r}"):
            branch_hidden_states(model, batch.input_ids, batch.attention_mask, batch.pixel_values, layer)


def test_the_held_out_split_takes_its_fraction_of_the_samples():
    from sdrpn.rpn.dataset import in_held_out

    ids = [f"sample-{i}" for i in range(10000)]
    for fraction in (0.05, 0.2, 0.5):
        assert sum(in_held_out(i, fraction) for i in ids) / len(ids) == pytest.approx(fraction, abs=0.02)
    assert not any(in_held_out(i, 0) for i in ids)


def test_packed_rows_give_back_the_rows_they_were_made_of():
    from sdrpn.rpn.packed_rows import PackedRows

    rows = [{"id": "a", "image": "x/ü.png", "size": [3, 4]}, {}, {"id": "c", "nested": {"k": None, "f": 0.5}}]
    packed = PackedRows(rows)
    assert len(packed) == 3 and list(packed) == rows and packed[np.int64(1)] == {}
    assert [packed[-i] for i in (1, 2, 3)] == rows[::-1]
    assert packed[::2] == [rows[0], rows[2]] and packed[5:] == []
    for bad in (3, -4):
        with pytest.raises(IndexError, match=rf"row {bad} out of range for 3 rows"):
            packed[bad]
    assert len(PackedRows([])) == 0 and list(PackedRows([])) == []


def test_a_label_dataset_holds_its_samples_without_a_python_object_each(tmp_path):
    """Forked DataLoader workers read the dataset's per-sample data: objects of their own
    would be copied into every worker as their reference counts change. The labels and rows
    read back are the shards' own."""
    import gc

    sizes = {}
    for num in (24, 240):
        write_region_labels(
            tmp_path / f"l{num}", tmp_path / f"i{num}", num=num, grid=GRID, image_size=14, shard_size=16
        )
        gc.collect()
        before = len(gc.get_objects())
        ds = LabelShardDataset(str(tmp_path / f"l{num}"), make_tokenizer(), IMAGE, max_samples=num - 4)
        gc.collect()
        sizes[num] = len(gc.get_objects()) - before
        folder = LabelFolder(str(tmp_path / f"l{num}"))
        shards = {
            row["id"]: (row, shard.tensors["labels"][row["row"]]) for shard in folder.shards() for row in shard.rows
        }
        assert len(ds) == num - 4
        for i in range(len(ds)):
            row, labels = shards[ds.rows[i]["id"]]
            assert ds.rows[i] == {k: row[k] for k in ("id", "image", "question", "image_size", "preprocessing")}
            assert torch.equal(ds.labels(i), labels.long()) and ds.labels(i).dtype == torch.int64
        sample = ds[len(ds) - 1]
        assert torch.equal(sample.labels, ds.labels(len(ds) - 1)) and sample.id == ds.rows[-1]["id"]
        del ds
    assert sizes[240] - sizes[24] < 40, sizes  # a shard's labels tensor each, not objects per sample


def test_labels_holding_the_shards_of_another_job_are_refused(ws, tmp_path):
    """Shards of a second labelling job on more ranks would be trained on beside the first
    job's: its samples twice."""
    shutil.copytree(ws / "labels", tmp_path / "labels")
    labels = LabelFolder(str(tmp_path / "labels"))
    config = labels.config
    config.world_size = 1  # labelled by `sdrpn label` on 1 rank
    labels.write_config(config)
    for path in (tmp_path / "labels").glob("rank000-shard00000.*"):
        shutil.copy(path, tmp_path / "labels" / path.name.replace("rank000", "rank001"))
    with pytest.raises(ValueError, match=r"shards of a job on another number of ranks than 1 \(rank001-shard00000\)"):
        LabelShardDataset(str(tmp_path / "labels"), make_tokenizer(), IMAGE)


def test_the_rpn_learns_the_region(ws, tmp_path):
    model, tok = load_llava(str(ws / "model"), "fp32")
    held = LabelShardDataset(str(ws / "labels"), tok, IMAGE, split="held_out", held_out_fraction=0.2)
    chunks = [list(range(i, min(i + 16, len(held)))) for i in range(0, len(held), 16)]
    loader = torch.utils.data.DataLoader(held, batch_sampler=chunks, collate_fn=LabelCollator(0))
    rpn = RegionProposalNetwork.from_llava(model, 1, 2)
    before = evaluate(model, rpn, loader, IMAGE, "cpu", lambda: torch.autocast("cpu", enabled=False))
    out = tmp_path / "run"
    assert main(train_args(ws, out, "--epochs", "4")) == 0
    after = json.loads((out / "metrics-epoch3.json").read_text())
    assert after["iou"] > before["iou"] + 0.3, (before, after)
    assert after["bce"] < before["bce"]
    assert (out / "rpn.safetensors").exists() and (out / "rpn_config.json").exists()
    loaded = RegionProposalNetwork.load(str(out), model)
    assert loaded.config.branch_layer == 1


def test_resume_gives_the_same_weights(ws, tmp_path, caplog, monkeypatch):
    whole, part = tmp_path / "whole", tmp_path / "part"
    common = (
        "--epochs",
        "2",
        "--max-samples",
        "96",
        "--save-every",
        "3",
        "--grad-accum",
        "2",
        "--effective-batch",
        "32",
    )
    assert main(train_args(ws, whole, *common)) == 0
    assert main(train_args(ws, part, *common, "--stop-after-steps", "4")) == 0
    assert not (part / "rpn.safetensors").exists()
    # Other settings would make weights that neither run describes: refused, naming them.
    with pytest.raises(
        ValueError,
        match=r"other settings \(lr: 0\.002 -> 0\.0001; max_samples: 96 -> 64\): resume with the same settings, "
        r"or train into another --out \(out, in TrainConfig\)",
    ):
        main(
            train_args(
                ws,
                part,
                "--epochs",
                "2",
                "--max-samples",
                "64",
                "--save-every",
                "3",
                "--lr",
                "1e-4",
                "--grad-accum",
                "2",
                "--effective-batch",
                "32",
                "--resume",
            )
        )
    # Labels that changed under a stopped run: its steps were counted over other samples.
    labels = tmp_path / "labels"
    shutil.copytree(ws / "labels", labels)
    args = train_args(ws, tmp_path / "changed", *common)
    args[args.index("--labels") + 1] = str(labels)
    assert main([*args, "--stop-after-steps", "1"]) == 0
    for path in labels.glob("rank000-shard00000*"):
        path.unlink()  # the first shard gone
    with pytest.raises(ValueError, match=r"other settings \(the train split's samples \(the label folder's, or"):
        main([*args, "--resume"])

    # A run begun on 2 ranks: resumed on 1, its samples and effective batch would split otherwise.
    def record_world_size(size):
        for path in (part / "checkpoints").glob("step-*/trainer_state.json"):
            state = json.loads(path.read_text())
            state["settings"]["world_size"] = size
            path.write_text(json.dumps(state))

    record_world_size(2)
    with pytest.raises(ValueError, match=r"other settings \(effective_batch: 64 -> 32; world_size: 2 -> 1\)"):
        main(train_args(ws, part, *common, "--resume"))
    record_world_size(1)
    # What a kill left half-written at the root goes; another program's temporary stays.
    killed = [".tmp-rpn.safetensors.k1", ".tmp-metrics-epoch0.json.k2", ".tmp-train_config.json.k3"]
    for name in [*killed, ".tmp-notes.txt.k4"]:
        (part / name).write_text("half")
    # The run, its labels and images moved elsewhere resume, the labels recording their
    # inputs' new places (as a label job resumed there does); labels made with other
    # settings do not.
    part, labels, images = tmp_path / "moved" / "part", tmp_path / "moved" / "labels", tmp_path / "moved" / "images"
    shutil.copytree(ws / "labels", labels)
    shutil.copytree(ws / "images", images)
    shutil.move(tmp_path / "part", part)
    resumed = train_args(ws, part, *common, "--resume", "--num-workers", "0")
    resumed[resumed.index("--labels") + 1] = str(labels)
    folder = LabelFolder(str(labels))
    config = folder.config
    config.image_folder, config.data = str(images), str(tmp_path / "moved" / "data.json")
    made_with = config.options
    config.options = dataclasses.replace(made_with, fg_ratio=0.75)
    folder.write_config(config)
    changed = re.escape(f"other settings (label_config.options.fg_ratio: {made_with.fg_ratio} -> 0.75)")
    with pytest.raises(ValueError, match=changed):
        main(resumed)
    config.options = made_with
    folder.write_config(config)
    # The resumed run takes only the steps left (a restart from step 0 would end at the same
    # weights: the seed fixes them).
    steps = []
    step = RPNTrainer._step
    monkeypatch.setattr(RPNTrainer, "_step", lambda self, *args: steps.append(1) or step(self, *args))
    with caplog.at_level(logging.INFO, logger="sdrpn.rpn.train"):
        assert main(resumed) == 0
    monkeypatch.undo()
    assert len(steps) == 6 - 4 and "at step 4" in caplog.text
    assert f'folders elsewhere than when the run began: image_folder: "{ws / "images"}" -> "{images}"' in caplog.text
    assert f'; labels: "{ws / "labels"}" -> "{labels}"' in caplog.text
    assert not any((part / name).exists() for name in killed) and (part / ".tmp-notes.txt.k4").exists()
    card = (part / "README.md").read_text()
    assert "## Held-out metrics" in card
    # Resumed with nothing left to train, the card keeps the last epoch's metrics.
    assert main(train_args(ws, part, *common, "--resume")) == 0
    assert (part / "README.md").read_text() == card
    # Every epoch walks all its steps: 96 samples at 16 per micro-batch, 2 per step.
    pointer = json.loads((whole / "checkpoints" / "latest.json").read_text())["path"]
    state = json.loads((whole / "checkpoints" / pointer / "trainer_state.json").read_text())
    assert state["progress"] == {"epoch": 2, "step_in_epoch": 0, "global_step": 6}
    a, b = load_file(whole / "rpn.safetensors"), load_file(part / "rpn.safetensors")
    for key in a:  # bit-identical on the CPU; a GPU's GEMMs may differ in the last bit
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0 if not torch.cuda.is_available() else 1e-6)
    steps = sorted(os.listdir(part / "checkpoints"))
    assert "latest.json" in steps and len([s for s in steps if s.startswith("step-")]) <= 2
    # A checkpoint saved mid-run is an RPN folder of its own: from_pretrained loads it.
    model, _ = load_llava(str(ws / "model"), "fp32")
    latest = json.loads((part / "checkpoints" / "latest.json").read_text())["path"]
    mid_run = RegionProposalNetwork.from_pretrained(str(part / "checkpoints" / latest), model=model)
    assert torch.equal(mid_run.trainable_state_dict()["q_proj.weight"], b["q_proj.weight"])


def test_bf16_and_gradient_checkpointing_run(ws, tmp_path):
    assert main(train_args(ws, tmp_path / "bf16", "--max-samples", "32", "--bf16", "--gradient-checkpointing")) == 0
    assert json.loads((tmp_path / "bf16" / "metrics-epoch0.json").read_text())["cells"] > 0


def test_torchrun_data_parallel(ws, tmp_path):
    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # a free port: runs side by side do not collide
        "--nproc_per_node",
        "2",
        "-m",
        "sdrpn",
        *train_args(ws, out, "--max-samples", "64", "--effective-batch", "32"),
    ]
    done = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    state = json.loads(open(out / "checkpoints" / "latest.json").read())
    trainer = json.loads(open(out / "checkpoints" / state["path"] / "trainer_state.json").read())
    assert trainer["progress"]["global_step"] == 2  # 64 samples over 2 ranks at batch 16


def test_data_parallel_step_with_dropped_micro_batches(ws, tmp_path):
    """A rank whose last micro-batch of a step was dropped still joins the gradient
    all-reduce, adding nothing: the optimiser sees the average of the ranks' own gradients
    and the ranks' weights stay equal (before, the other ranks waited forever)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    worker = os.path.join(os.path.dirname(__file__), "ddp_dropped_batch.py")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([*cmd, worker, str(ws / "model"), str(ws / "labels"), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in range(2):
        steps = json.loads((tmp_path / f"rank{rank}.json").read_text())["steps"]
        assert len(steps) == 2
        for step in steps:
            assert step["ranks_agree"]
            assert step["max_gradient"] > 0
            assert step["max_gradient_error"] <= 1e-6 * step["max_gradient"]


def test_a_rank_left_alone_mid_step_says_so_in_one_line(ws, tmp_path):
    """Ranks started without torchrun (or after it died): when rank 1 dies mid-step, rank 0's
    gradient all-reduce fails. It stops with one line naming that, not DDP's traceback."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = train_args(ws, tmp_path / "run", *QUICK, "--effective-batch", "32")
    dies = (  # rank 1 exits when its first step begins, as a kill would end it
        "import os, sys\nfrom sdrpn.rpn.train import RPNTrainer\n"
        "RPNTrainer._step = lambda *a: os._exit(9)\n"
        f"from sdrpn.cli import main\nsys.exit(main({args!r}))"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2")
    ranks = [
        subprocess.Popen(command, env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), stderr=subprocess.PIPE, text=True)
        for r, command in enumerate([[sys.executable, "-m", "sdrpn", *args], [sys.executable, "-c", dies]])
    ]
    stderr = [rank.communicate(timeout=300)[1] for rank in ranks]
    assert ranks[1].returncode == 9, stderr[1][-3000:]
    assert ranks[0].returncode == 2, stderr[0][-3000:]
    errors = [line for line in stderr[0].splitlines() if "sdrpn train: error: " in line]
    assert len(errors) == 1 and "another rank stopped" in errors[0], stderr[0][-3000:]
    assert "Traceback" not in stderr[0]


def test_a_steps_own_errors_are_not_taken_for_a_stopped_rank():
    from sdrpn.distributed import RankStopped, peers_may_stop

    with pytest.raises(RuntimeError, match="element 0 of tensors does not require grad") as own:
        with peers_may_stop(mixed=True):
            raise RuntimeError("element 0 of tensors does not require grad")
    assert not isinstance(own.value, RankStopped)
    gloo = "[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:538] Read error: Connection reset by peer"
    with pytest.raises(RankStopped, match="another rank stopped.*Connection reset by peer"):
        with peers_may_stop(mixed=True):
            raise RuntimeError(gloo)
    with pytest.raises(RankStopped, match="NCCL error"):
        with peers_may_stop(mixed=True):
            raise torch.distributed.DistBackendError("NCCL error in: ProcessGroupNCCL.cpp")


def test_bad_config():
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        TrainConfig(labels="x", out="y", batch_size=0)
    with pytest.raises(ValueError, match="held_out_fraction must lie in"):
        TrainConfig(labels="x", out="y", held_out_fraction=1.0)
    with pytest.raises(ValueError, match=r"lr \* weight_decay < 1, got 2.0"):  # the weights zeroed each step
        TrainConfig(labels="x", out="y", lr=0.5, weight_decay=2.0)
    with pytest.raises(ValueError, match="batch_size must be of type int, got 8.0"):
        TrainConfig(labels="x", out="y", batch_size=8.0)
    with pytest.raises(ValueError, match=re.escape("max_samples must be of type int | None, got '100'")):
        TrainConfig(labels="x", out="y", max_samples="100")
    with pytest.raises(ValueError, match="labels is required"):
        TrainConfig(labels=None, out="y")
    for betas in ((0.9, float("nan")), (0.9, 1.0), (0.9,), "ab", 5):  # AdamW refuses a beta of 1 only at its start
        with pytest.raises(ValueError, match=re.escape(f"betas must be two numbers in [0, 1), got {betas!r}")):
            TrainConfig(labels="x", out="y", betas=betas)
    # Values that trained silently to NaN weights, or failed deep inside the run.
    for field, value, message in (
        ("weight_decay", float("inf"), "weight_decay must be a finite number, got inf"),
        ("max_grad_norm", float("nan"), "max_grad_norm must be a finite number, got nan"),
        ("warmup_ratio", 1e300, r"warmup_ratio must lie in \[0, 1\], got 1e\+300"),
        ("weight_decay", -0.1, "weight_decay must be >= 0 with lr \\* weight_decay < 1, got -0.1"),
        ("weight_decay", 1e18, "weight_decay must be >= 0 with lr \\* weight_decay < 1, got 1e\\+18"),
        ("max_grad_norm", 0.0, "max_grad_norm must be > 0, got 0.0"),
        ("num_workers", -1, "num_workers must be >= 0, got -1"),
        ("seed", -1, "seed must be >= 0, got -1"),
        ("epochs", 2**63, r"epochs must fit in 64 bits"),
    ):
        with pytest.raises(ValueError, match=message):
            TrainConfig(labels="x", out="y", **{field: value})
    # An int is a float; numpy's numbers are Python's (they record as JSON).
    cfg = TrainConfig(labels="x", out="y", lr=np.int64(1), seed=np.int64(3), max_samples=None)
    assert (type(cfg.lr), type(cfg.seed)) == (float, int) and json.dumps(cfg.to_dict())
    assert accumulation_steps(512, 8, 4) == 16  # the reference: 8 per GPU x 16 steps x 4 GPUs
    assert accumulation_steps(512, 8, 1) == 64
    with pytest.raises(
        ValueError,
        match=r"effective_batch=512 is not a multiple of batch_size \* world size = 12 \* 2: pick sizes that divide "
        r"it \(--effective-batch, --batch-size\), or pass grad_accum \(--grad-accum\)",
    ):
        accumulation_steps(512, 12, 2)
    # grad_accum is the answer; an effective batch other than the default must be the one it makes.
    assert accumulation_steps(512, 8, 1, grad_accum=2) == accumulation_steps(16, 8, 1, grad_accum=2) == 2
    with pytest.raises(
        ValueError, match=r"grad_accum=2 with batch_size=8 on 1 rank\(s\) makes an effective batch of 16"
    ):
        accumulation_steps(32, 8, 1, grad_accum=2)
    assert accumulation_steps(64, 8, 2, grad_accum=4) == 4  # each step takes a batch from every rank
    with pytest.raises(
        ValueError,
        match=r"on 2 rank\(s\) makes an effective batch of 64, not effective_batch=32: pass one of the two \(--grad",
    ):
        accumulation_steps(32, 8, 2, grad_accum=4)


# The HF Trainer example as a training script is run: directly, and through accelerate's
# launcher (on the CPU here; the same command takes --num_processes N on GPUs).
HF_TRAINER_SCRIPT = os.path.join(os.path.dirname(__file__), "..", "..", "scripts", "train_rpn_with_hf_trainer.py")
LAUNCHERS = {
    "python": [],
    "accelerate": [
        "-m",
        "accelerate.commands.launch",
        "--cpu",
        "--num_processes",
        "1",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
    ],
}


def test_the_trainer_module_trains_float32_weights_on_a_bf16_backbone():
    # Copied from a bf16 backbone the RPN is bf16, where an update at these learning rates
    # mostly rounds away: the module trains it in float32, under the Trainer's autocast.
    from sdrpn.rpn.hf_trainer import RPNForTraining
    from tiny_llava import make_tiny_llava, teacher_forced_batch

    tiny = make_tiny_llava(num_layers=3, grid=4)
    tiny.model.to(torch.bfloat16)
    rpn = RegionProposalNetwork.from_llava(tiny.model, 2, 1)
    module = RPNForTraining(tiny.model, rpn)
    assert module.rpn is rpn and {p.dtype for p in rpn.parameters()} == {torch.float32}
    batch = teacher_forced_batch(tiny, [[7, 8], [9, 10, 11]], [[12], [13]])
    labels = torch.tensor([[1, 0, -100, 0] * 4, [0, 1, 1, -100] * 4])
    before = [p.detach().clone() for p in rpn.parameters()]
    opt = torch.optim.AdamW(rpn.parameters(), lr=5e-5, betas=(0.9, 0.98), weight_decay=0.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = module(batch.input_ids, batch.attention_mask, batch.pixel_values.to(torch.bfloat16), labels)["loss"]
    loss.backward()
    opt.step()
    # Adam's first step moves every weight by about lr, which bf16 would round to nothing
    # for all but the smallest weights.
    assert all((p != b).float().mean() > 0.9 for p, b in zip(rpn.parameters(), before))
    # Without autocast (TrainingArguments' default) the RPN computes in float32.
    loss = module(batch.input_ids, batch.attention_mask, batch.pixel_values.to(torch.bfloat16), labels)["loss"]
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_hf_trainer_example(ws, tmp_path, launcher):
    out = tmp_path / "hf"
    # Labels made with another template and preprocessing: the RPN must record theirs, or
    # it would prompt at inference as its labels were not made.
    shutil.copytree(ws / "labels", tmp_path / "labels")
    labels = LabelFolder(str(tmp_path / "labels"))
    config = labels.config
    config.options = config.options.updated(
        prompt_template="USER: <image>\n{question} ASSISTANT:", preprocessing="crop"
    )
    labels.write_config(config)
    done = subprocess.run(
        [
            sys.executable,
            *LAUNCHERS[launcher],
            HF_TRAINER_SCRIPT,
            "--model",
            str(ws / "model"),
            "--labels",
            str(tmp_path / "labels"),
            "--out",
            str(out),
            "--branch-layer",
            "1",
            "--depth",
            "2",
            "--steps",
            "3",
            "--batch-size",
            "4",
            "--effective-batch",
            "8",
            "--lr",
            "1e-3",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # The Trainer evaluates nothing, so no label is held out unless asked for.
    assert f"training on {sum(len(s.rows) for s in labels.shards())} labelled samples" in done.stdout
    weights = load_file(out / "rpn.safetensors")
    model, _ = load_llava(str(ws / "model"), "fp32")
    fresh = RegionProposalNetwork.from_llava(model, 1, 2).trainable_state_dict()
    assert not torch.equal(weights["q_proj.weight"], fresh["q_proj.weight"])  # it trained
    assert not any(k.startswith("_backbone") for k in weights)
    loaded = RegionProposalNetwork.from_pretrained(str(out), model=model)
    assert (loaded.config.prompt_template, loaded.config.preprocessing) == (config.prompt_template, "crop")
    assert (out / "README.md").exists()  # save_pretrained's model card
    if launcher == "python":  # the optimiser step's effective batch comes through accumulation
        args = done.args[:-2] + ["--effective-batch", "6"]
        refused = subprocess.run(args, capture_output=True, text=True, timeout=600)
        assert refused.returncode != 0 and "effective_batch=6 is not a multiple of batch_size" in refused.stderr
        for fraction in ("1", "nan"):
            refused = subprocess.run(
                [*done.args, "--held-out-fraction", fraction], capture_output=True, text=True, timeout=600
            )
            assert refused.returncode == 2
            assert f"argument --held-out-fraction: must lie in [0, 1), got {float(fraction)}" in refused.stderr


def test_hf_trainer_example_on_two_ranks_prints_its_sample_count_once(ws, tmp_path):
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", HF_TRAINER_SCRIPT]
    args = ["--model", str(ws / "model"), "--labels", str(ws / "labels"), "--out", str(tmp_path / "hf")]
    args += ["--branch-layer", "1", "--depth", "2", "--steps", "1", "--batch-size", "4", "--effective-batch", "8"]
    done = subprocess.run(
        [*launch, *args], env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("training on ") == 1


# ---- a new user's mistakes ------------------------------------------------------------------
QUICK = ("--max-samples", "32", "--held-out-fraction", "0")


def test_an_image_folder_of_other_images_is_refused_and_a_moved_one_taken(ws, tmp_path):
    # The labels' images at half their size: the same names, other pictures.
    (tmp_path / "halved").mkdir()
    for i in range(240):
        Image.new("RGB", (7 * GRID, 7 * GRID)).save(tmp_path / "halved" / f"{i}.png")
    side = 14 * GRID
    with pytest.raises(
        ValueError,
        match=rf"labels made from the images in .*, and image_folder \(--image-folder\) '.*halved' is not shown to "
        rf"hold them "
        rf"\(16 of 16 images checked are missing or differ, e\.g\. "
        rf"0\.png is {side // 2}x{side // 2}, not the {side}x{side} recorded\): pass the folder",
    ):
        LabelShardDataset(str(ws / "labels"), make_tokenizer(), IMAGE, image_folder=str(tmp_path / "halved"))
    shutil.copytree(ws / "images", tmp_path / "moved")
    assert (
        len(LabelShardDataset(str(ws / "labels"), make_tokenizer(), IMAGE, image_folder=str(tmp_path / "moved"))) == 240
    )


def test_labels_without_image_sizes_keep_their_image_folders_path_on_resume(ws, tmp_path):
    """Rows converted from the reference's pickles record no image sizes: nothing tells a
    moved image folder from another, so a resumed run keeps the one it began with."""
    labels = tmp_path / "labels"
    shutil.copytree(ws / "labels", labels)
    for shard in labels.glob("*.jsonl"):
        rows = [json.loads(line) for line in shard.read_text().splitlines()]
        shard.write_text("".join(json.dumps({**row, "image_size": None, "preprocessing": None}) + "\n" for row in rows))
    (tmp_path / "halved").mkdir()
    for i in range(240):
        Image.new("RGB", (7 * GRID, 7 * GRID)).save(tmp_path / "halved" / f"{i}.png")
    args = train_args(ws, tmp_path / "run", *QUICK)
    args[args.index("--labels") + 1] = str(labels)
    assert main([*args, "--stop-after-steps", "1"]) == 0
    with pytest.raises(ValueError, match=rf"other settings \(image_folder: \"{ws / 'images'}\" -> \".*halved\"\)"):
        main([*args, "--resume", "--image-folder", str(tmp_path / "halved")])


def test_settings_a_checkpoint_does_not_record_are_not_compared(tmp_path):
    # A checkpoint of an earlier version, without a setting or fact recorded since, resumes;
    # one recording no label config, or none at all, is read as it is.
    from sdrpn.labels.folder import LabelFolderConfig
    from sdrpn.labels.options import LabelOptions
    from sdrpn.rpn.train_config import as_recorded_now

    cfg = TrainConfig(labels=str(tmp_path / "labels"), out=str(tmp_path / "out"))
    earlier = {k: v for k, v in cfg.recorded().items() if k != "max_grad_norm"}
    assert cfg.differences(earlier, world_size=2) == ([], [])
    assert cfg.differences({**earlier, "lr": 1.0})[0] == [f"lr: 1.0 -> {cfg.lr}"]
    labels = LabelFolderConfig(options=LabelOptions())
    assert as_recorded_now({}, labels) == {}
    assert as_recorded_now({"lr": 1.0, "label_config": None}, labels) == {"lr": 1.0, "label_config": None}
    # Before the effective batch used was recorded, a run with grad_accum recorded the flag's
    # value beside it: it compares as the batch the run used, so the same accumulation resumes.
    old = {**cfg.recorded(), "batch_size": 16, "effective_batch": 16, "grad_accum": 2, "world_size": 1}
    now = TrainConfig(labels=cfg.labels, out=cfg.out, batch_size=16, grad_accum=2)  # effective_batch left at 512
    assert now.differences(as_recorded_now(old, labels), world_size=1, effective_batch=32) == ([], [])
    assert now.differences(as_recorded_now(old, labels), world_size=1, effective_batch=64)[0] == [
        "effective_batch: 32 -> 64"
    ]
    # The RPN's layers, whichever preset gave them, are compared where a checkpoint records them.
    assert now.differences({"rpn_layers": [15, 3]}, rpn_layers=[1, 2])[0] == ["rpn_layers: [15, 3] -> [1, 2]"]


def test_checkpoints_of_earlier_versions_resume_in_place(ws, tmp_path, caplog):
    """Settings that earlier versions recorded otherwise: an unnamed image folder as null
    (the labels' own), a label config with its inputs' paths, and labels' settings recorded
    only since (None in a folder from before, filled in by a label job resumed since)."""
    shutil.copytree(ws / "labels", tmp_path / "labels")
    labels = LabelFolder(str(tmp_path / "labels"))
    assert labels.config.world_size is None
    args = train_args(ws, tmp_path / "run", *QUICK)
    args[args.index("--labels") + 1] = labels.path
    assert main([*args, "--stop-after-steps", "1"]) == 0
    for path in (tmp_path / "run" / "checkpoints").glob("step-*/trainer_state.json"):
        state = json.loads(path.read_text())
        settings = state["settings"]
        assert settings["image_folder"] == str(ws / "images")  # the folder used, though unnamed
        settings["image_folder"] = None
        settings["label_config"].update(data="/then/data.json", image_folder="/then/images", world_size=None)
        path.write_text(json.dumps(state))
    config = labels.config
    config.world_size = 1  # recorded by the label job resumed since
    labels.write_config(config)
    with caplog.at_level(logging.INFO, logger="sdrpn.rpn.train"):
        assert main([*args, "--resume", "--stop-after-steps", "2"]) == 0
    assert "resumed from" in caplog.text and "folders elsewhere" not in caplog.text


def test_a_missing_image_folder_is_refused_up_front(ws, tmp_path):
    with pytest.raises(ValueError, match=f"image_folder \\(--image-folder\\) '{tmp_path / 'nope'}' does not exist"):
        main(train_args(ws, tmp_path / "a", "--image-folder", str(tmp_path / "nope")))
    # A label folder whose recorded image folder has gone since it was labelled.
    write_region_labels(tmp_path / "labels", tmp_path / "images", num=8, grid=GRID, image_size=14 * GRID)
    shutil.rmtree(tmp_path / "images")
    args = train_args(ws, tmp_path / "b")
    args[args.index("--labels") + 1] = str(tmp_path / "labels")
    with pytest.raises(ValueError, match=f"records, '{tmp_path / 'images'}', does not exist: pass --image-folder"):
        main(args)
    assert not (tmp_path / "a" / "rpn.safetensors").exists() and not (tmp_path / "b" / "rpn.safetensors").exists()


def test_labels_of_another_grid_or_image_size_are_refused_up_front(ws, tmp_path):
    # Labels that record no base model: only their grid and image size tell them apart.
    for grid, size, message in (
        (2, 14 * GRID, f"are on a 2x2 grid, but --model's images make {GRID}x{GRID} cells"),
        (GRID, 14 * GRID + 14, f"were made at image size {14 * GRID + 14}, but --model takes {14 * GRID}"),
    ):
        labels = tmp_path / f"labels-{grid}-{size}"
        write_region_labels(labels, tmp_path / "images", num=8, grid=grid, image_size=size)
        args = train_args(ws, tmp_path / "out")
        args[args.index("--labels") + 1] = str(labels)
        with pytest.raises(ValueError, match=message):
            main(args)


def test_an_epoch_that_skipped_every_sample_stops_before_saving(ws, tmp_path):
    # The labels' own image folder, emptied after labelling.
    write_region_labels(tmp_path / "labels", tmp_path / "images", num=40, grid=GRID, image_size=14 * GRID)
    for image in (tmp_path / "images").iterdir():
        image.unlink()
    out = tmp_path / "run"
    args = train_args(ws, out, *QUICK, "--save-every", "1")  # a checkpoint every step: none may hold
    args[args.index("--labels") + 1] = str(tmp_path / "labels")  # weights that no sample trained
    stopped = r"epoch 0 trained on no sample: all 32 read so far were skipped \(32 image missing\)"
    with pytest.raises(ValueError, match=stopped):
        main(args)
    assert not (out / "rpn.safetensors").exists() and not (out / "checkpoints").exists()


def test_a_first_step_without_images_skips_its_checkpoint_and_training_goes_on(ws, tmp_path, caplog):
    shutil.copytree(ws / "images", tmp_path / "images")
    model, tok = load_llava(str(ws / "model"), "fp32")
    cfg = TrainConfig(
        labels=str(ws / "labels"),
        out=str(tmp_path / "run"),
        image_folder=str(tmp_path / "images"),
        branch_layer=1,
        depth=2,
        batch_size=8,
        effective_batch=8,
        max_samples=32,
        held_out_fraction=0,
        save_every=1,
    )
    trainer = RPNTrainer(cfg, model, tok)
    train_set, _ = trainer._datasets()
    for chunk in trainer._epoch_steps(0, len(train_set))[0]:  # the images of the first step
        for i in chunk:
            (tmp_path / "images" / train_set.rows[i]["image"]).unlink()
    with caplog.at_level(logging.WARNING, logger="sdrpn.rpn.train"):
        trainer.run()
    assert "step 1: no labelled sample trained this epoch yet (8 skipped): no checkpoint" in caplog.text
    assert "epoch 0: skipped 8 samples (8 image missing)" in caplog.text
    assert (tmp_path / "run" / "rpn.safetensors").exists()
    steps = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step-*"))
    assert steps and "step-00000001" not in steps


def _nan_losses(monkeypatch, which):
    """rpn_loss made NaN on the calls ``which`` picks (1 for the first): the gradients an
    attention kernel's faulty backward can give."""
    import sdrpn.rpn.train as train_module

    calls = []

    def loss(logits, labels):
        calls.append(None)
        value = rpn_loss(logits, labels)
        return value * float("nan") if which(len(calls)) else value

    monkeypatch.setattr(train_module, "rpn_loss", loss)


def _nan_config(ws, tmp_path, **extra):
    return TrainConfig(
        labels=str(ws / "labels"), out=str(tmp_path / "run"), image_folder=str(ws / "images"), branch_layer=1,
        depth=2, batch_size=8, effective_batch=8, max_samples=24, held_out_fraction=0, save_every=1, **extra,
    )  # fmt: skip


def test_a_run_whose_held_out_loss_is_not_finite_stops_without_saving(ws, tmp_path):
    # A learning rate that diverges leaves finite weights that overflow in the forward: the
    # RPN had been saved, with a held-out BCE of NaN, and the run had exited 0.
    model, tok = load_llava(str(ws / "model"), "fp32")
    cfg = TrainConfig(
        labels=str(ws / "labels"), out=str(tmp_path / "run"), image_folder=str(ws / "images"), branch_layer=1,
        depth=2, batch_size=4, effective_batch=4, held_out_fraction=0.2, lr=1e10, warmup_ratio=0.0,
    )  # fmt: skip
    with pytest.raises(ValueError, match="epoch 0: the held-out loss is not finite: the RPN diverged; stopped"):
        RPNTrainer(cfg, model, tok).run()
    run = tmp_path / "run"
    assert not (run / "rpn.safetensors").exists() and not (run / "metrics-epoch0.json").exists()
    states = [json.loads((p / "trainer_state.json").read_text()) for p in (run / "checkpoints").glob("step-*")]
    assert all(s["progress"]["epoch"] == 0 for s in states)  # none marks the epoch done


def test_a_step_with_gradients_that_are_not_finite_is_skipped(ws, tmp_path, caplog, monkeypatch):
    """The optimiser never steps with a NaN gradient: the step is named and counted, its
    samples count as untrained (no checkpoint of the untrained start), and training goes on."""
    _nan_losses(monkeypatch, lambda call: call == 1)
    steps = []
    adamw_step = torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: steps.append(1) or adamw_step(self, *a, **k))
    model, tok = load_llava(str(ws / "model"), "fp32")
    with caplog.at_level(logging.WARNING, logger="sdrpn.rpn.train"):
        RPNTrainer(_nan_config(ws, tmp_path), model, tok).run()
    assert "step 1: the gradients are not finite (loss nan): the step is skipped" in caplog.text
    assert "epoch 0: skipped 1 steps whose gradients were not finite" in caplog.text
    assert len(steps) == 2  # of 3
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step-*"))
    assert kept and "step-00000001" not in kept
    trained = load_file(str(tmp_path / "run" / "rpn.safetensors"))
    assert all(torch.isfinite(v).all() for v in trained.values())
    state = json.loads((tmp_path / "run" / "checkpoints" / kept[-1] / "trainer_state.json").read_text())
    assert state["progress"]["epoch"] == 1  # the epoch's end; its tally went with it


def test_an_epoch_whose_gradients_are_never_finite_stops_before_saving(ws, tmp_path, monkeypatch):
    _nan_losses(monkeypatch, lambda call: True)
    model, tok = load_llava(str(ws / "model"), "fp32")
    with pytest.raises(ValueError, match="epoch 0 trained on no sample: the gradients of all its 3 steps were not"):
        RPNTrainer(_nan_config(ws, tmp_path), model, tok).run()
    assert not (tmp_path / "run" / "rpn.safetensors").exists()
    assert not list((tmp_path / "run").glob("checkpoints/step-*"))


def test_an_epoch_resumed_mid_way_counts_what_it_trained_before(ws, tmp_path, caplog):
    """Images of an epoch's later steps go missing while a run is stopped: the resumption
    skips them all, yet the epoch trained before it and is not stopped as one that trained
    nothing; its end reports the skips of the whole epoch."""
    shutil.copytree(ws / "images", tmp_path / "images")
    args = train_args(ws, tmp_path / "run", *QUICK, "--batch-size", "8", "--effective-batch", "8")
    args += ["--image-folder", str(tmp_path / "images"), "--save-every", "1"]
    # Step 1 skips one sample, and steps 3 and 4 find no image.
    model, tok = load_llava(str(ws / "model"), "fp32")
    cfg = TrainConfig(
        labels=str(ws / "labels"), out="x", max_samples=32, held_out_fraction=0, batch_size=8, effective_batch=8, seed=3
    )
    trainer = RPNTrainer(cfg, model, tok)
    train_set, _ = trainer._datasets()
    first, _, *rest = trainer._epoch_steps(0, len(train_set))
    (tmp_path / "images" / train_set.rows[first[0][0]]["image"]).unlink()
    assert main([*args, "--stop-after-steps", "2"]) == 0
    for step in rest:
        for i in step[0]:
            (tmp_path / "images" / train_set.rows[i]["image"]).unlink()
    with caplog.at_level(logging.WARNING, logger="sdrpn.rpn.train"):
        assert main([*args, "--resume"]) == 0
    assert "epoch 0: skipped 17 samples (17 image missing)" in caplog.text
    assert (tmp_path / "run" / "rpn.safetensors").exists()


def test_data_parallel_ranks_agree_that_nothing_trained(ws, tmp_path):
    """Every rank stops with the same error (a rank stopping alone would leave the other
    waiting in its next all-reduce): the counts are summed over the ranks first."""
    write_region_labels(tmp_path / "labels", tmp_path / "images", num=40, grid=GRID, image_size=14 * GRID)
    for image in (tmp_path / "images").iterdir():  # the labels' own image folder, emptied
        image.unlink()
    out = tmp_path / "ddp"
    args = train_args(ws, out, *QUICK, "--effective-batch", "32")
    args[args.index("--labels") + 1] = str(tmp_path / "labels")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "sdrpn"]
    done = subprocess.run([*cmd, *args], env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode != 0
    assert done.stderr.count("epoch 0 trained on no sample: all 32 read so far were skipped (32 image missing)") == 2
    assert not (out / "rpn.safetensors").exists()


def labels_of(ws, folder, model) -> str:
    """A copy of the workspace's labels recording `model` as the base model that made them."""
    shutil.copytree(ws / "labels", folder)
    labels = LabelFolder(str(folder))
    config = labels.config
    config.model = model_identity(model)
    labels.write_config(config)
    return str(folder)


def test_labels_of_another_base_model_architecture_are_refused(ws, tmp_path):
    model_a, _ = load_llava(str(ws / "model"), "fp32")
    labels = labels_of(ws, tmp_path / "labels", model_a)
    # Model B: the same depth, another hidden size.
    config = LlavaConfig.from_pretrained(ws / "model")
    config.text_config.hidden_size = 32
    LlavaForConditionalGeneration(config).save_pretrained(tmp_path / "b")
    make_tokenizer().save_pretrained(tmp_path / "b")
    args = train_args(ws, tmp_path / "run", *QUICK)
    args[args.index("--labels") + 1] = labels
    args[args.index("--model") + 1] = str(tmp_path / "b")
    with pytest.raises(
        ValueError,
        match=f"made by another base model: '{ws / 'model'}' .*--model '{tmp_path / 'b'}' has another architecture",
    ):
        main(args)
    assert not (tmp_path / "run" / "rpn.safetensors").exists()


def test_the_trainer_refuses_a_rank_outside_its_world(ws, tmp_path):
    model, tok = load_llava(str(ws / "model"), "fp32")
    cfg = TrainConfig(labels=str(ws / "labels"), out=str(tmp_path / "run"), branch_layer=1, depth=2)
    # rank 1 of 1 had trained the whole run as a rank that writes nothing
    for rank, world, message in (
        (1, 1, r"rank must lie in \[0, world_size=1\), got 1"),
        (-1, 1, r"rank must lie in \[0, world_size=1\), got -1"),
        (0, 0, "world_size must be >= 1, got 0"),
        (0, 2.0, "world_size must be an int, got 2.0"),
    ):
        with pytest.raises(ValueError, match=message):
            RPNTrainer(cfg, model, tok, rank=rank, world_size=world)
    with pytest.raises(ValueError, match="world_size=2 needs torch.distributed's process group started"):
        RPNTrainer(cfg, model, tok, rank=1, world_size=2).run()
    assert not (tmp_path / "run").exists()


def test_a_train_split_needs_a_sample_for_every_rank(ws):
    model, tok = load_llava(str(ws / "model"), "fp32")

    def train_split(samples):
        cfg = TrainConfig(labels=str(ws / "labels"), out="x", branch_layer=1, depth=2, max_samples=samples)
        return RPNTrainer(cfg, model, tok, world_size=2)._datasets()[0]

    assert len(train_split(2)) == 2  # one each
    with pytest.raises(ValueError, match="the train split has 1 samples, fewer than the 2 ranks"):
        train_split(1)


def test_a_second_run_into_an_out_in_use_fails_at_once(ws, tmp_path):
    """Two jobs training into one --out would interleave their checkpoints: the second one
    stops before it writes anything."""
    from sdrpn.io_utils import FolderBusy, exclusive_lock

    model, tok = load_llava(str(ws / "model"), "fp32")
    cfg = TrainConfig(
        labels=str(ws / "labels"), out=str(tmp_path / "run"), branch_layer=1, depth=2, batch_size=8,
        effective_batch=8, max_samples=16, held_out_fraction=0,
    )  # fmt: skip
    with exclusive_lock(str(tmp_path / "run" / ".train.lock")):  # the first job's
        with pytest.raises(FolderBusy, match="is held by another running job"):
            RPNTrainer(cfg, model, tok).run()
    assert os.listdir(tmp_path / "run") == [".train.lock"]


def test_labels_of_a_same_architecture_model_with_other_weights_are_refused(ws, tmp_path, caplog):
    model_a, tok = load_llava(str(ws / "model"), "fp32")
    save_tiny_llava(str(tmp_path / "b"), grid=GRID, num_layers=4, seed=1)  # same shapes, other weights
    model_b, _ = load_llava(str(tmp_path / "b"), "fp32")
    labels = labels_of(ws, tmp_path / "labels", model_a)
    cfg = TrainConfig(labels=labels, out=str(tmp_path / "run"), branch_layer=1, depth=2)
    with caplog.at_level(logging.WARNING, logger="sdrpn.rpn.train"):
        RPNTrainer(cfg, model_a, tok)
        RPNTrainer(cfg, load_llava(str(ws / "model"), "bf16")[0], tok)  # its own labels, in another dtype
        assert not caplog.records
    with pytest.raises(ValueError, match=f"of the same architecture as --model '{tmp_path / 'b'}' but with other"):
        RPNTrainer(cfg, model_b, tok)
    tuned, _ = load_llava(str(ws / "model"), "fp32")
    with torch.no_grad():  # a fine-tune of the last layer's attention alone
        tuned.get_decoder().layers[-1].self_attn.v_proj.weight.mul_(1.5)
    with pytest.raises(ValueError, match="but with other weights"):
        RPNTrainer(cfg, tuned, tok)
    # Labels written before the weights were recorded: a warning where the names differ.
    old = LabelFolder(labels)
    config = old.config
    config.model = {k: v for k, v in config.model.items() if k != "weights_fingerprint"}
    old.write_config(config)
    with caplog.at_level(logging.WARNING, logger="sdrpn.rpn.train"):
        RPNTrainer(cfg, model_b, tok)
    assert f"made by '{ws / 'model'}' and --model is '{tmp_path / 'b'}': the same architecture" in caplog.text
    # Written before any fingerprint was recorded: nothing to compare, they train.
    config.model = {"name": "another/model", "config_fingerprint": None}
    old.write_config(config)
    RPNTrainer(cfg, model_b, tok)


def test_all_ignore_labels_stop_training_before_an_rpn_is_saved(ws, tmp_path, caplog):
    write_region_labels(tmp_path / "labels", tmp_path / "images", num=32, grid=GRID, image_size=14 * GRID, ignored=True)
    with caplog.at_level(logging.WARNING, logger="sdrpn.labels.folder"):
        assert LabelFolder(str(tmp_path / "labels")).write_summary()["all_ignore"] == 32
    assert "all 32 labelled samples are all-ignore" in caplog.text
    args = train_args(ws, tmp_path / "run", *QUICK)
    args[args.index("--labels") + 1] = str(tmp_path / "labels")
    with pytest.raises(ValueError, match="epoch 0 trained on 32 samples without one labelled cell"):
        main(args)
    assert not (tmp_path / "run" / "rpn.safetensors").exists()
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_run_in_out_is_not_restarted_without_resume(ws, tmp_path):
    out = tmp_path / "run"
    out.mkdir()  # an empty --out is fine
    assert main(train_args(ws, out, *QUICK, "--effective-batch", "16", "--stop-after-steps", "1")) == 0
    kept = sorted(os.listdir(out / "checkpoints"))
    with pytest.raises(
        ValueError,
        match=f"--out {out} holds a run already .*pass --resume to go on with it.*resume=True .* TrainConfig",
    ):
        main(train_args(ws, out, *QUICK, "--effective-batch", "16"))
    assert sorted(os.listdir(out / "checkpoints")) == kept
    assert main(train_args(ws, out, *QUICK, "--effective-batch", "16", "--resume")) == 0
    # A finished run: its RPN is kept too.
    shutil.rmtree(out / "checkpoints")
    with pytest.raises(ValueError, match=r"holds a run already \(.*rpn.safetensors\)"):
        main(train_args(ws, out, *QUICK, "--effective-batch", "16"))


def test_labels_whose_job_has_not_finished_are_refused_unless_partial(ws, tmp_path, caplog):
    # An interrupted (or still running) label job: three complete shards, no summary.json.
    labels = tmp_path / "labels"
    write_region_labels(labels, tmp_path / "images", num=48, grid=GRID, image_size=14 * GRID, shard_size=16)
    os.remove(labels / "summary.json")
    args = train_args(ws, tmp_path / "out", *QUICK, "--stop-after-steps", "1")
    args[args.index("--labels") + 1] = str(labels)
    message = f"{labels}: its label job has not finished (no summary.json; 3 complete shard(s)): let it finish"
    with pytest.raises(ValueError, match=re.escape(message) + ".*sdrpn train --partial-labels"):
        main(args)
    assert not (tmp_path / "out").exists()  # refused before the model loads
    with pytest.raises(ValueError, match=re.escape(message)):
        LabelShardDataset(str(labels), make_tokenizer(), IMAGE)
    with caplog.at_level(logging.WARNING, logger="sdrpn.rpn.train"):
        assert main([*args, "--partial-labels"]) == 0
    assert "its label job has not finished: training on its complete shards (32 samples" in caplog.text
    assert len(LabelShardDataset(str(labels), make_tokenizer(), IMAGE, partial=True)) == 48
    # No complete shard: --partial-labels is not offered, nor taken.
    for name in os.listdir(labels):
        if name.endswith(".done.json"):
            os.remove(labels / name)
    for extra in ((), ("--partial-labels",)):
        with pytest.raises(
            ValueError,
            match=r"\(no summary.json; 0 complete shard\(s\)\): let it finish, or rerun it "
            r"with the same flags if it stopped$",
        ):
            main([*args, *extra])
    # A mistyped --labels is named before the model loads too.
    args[args.index("--labels") + 1] = str(tmp_path / "lables")
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'lables'} is not a label folder: it does not exist")):
        main(args)
    assert not (tmp_path / "out" / "rpn.safetensors").exists()


def test_labels_that_record_no_image_folder_are_told_the_flag(tmp_path):
    labels = tmp_path / "labels"
    write_region_labels(labels, tmp_path / "images", num=8, grid=GRID, image_size=14 * GRID)
    folder = LabelFolder(str(labels))
    folder.write_config(dataclasses.replace(folder.config, image_folder=None))  # as converted without one
    with pytest.raises(ValueError, match=re.escape(f"{labels} records no image folder: pass --image-folder")):
        LabelShardDataset(str(labels), make_tokenizer(), IMAGE)
    assert len(LabelShardDataset(str(labels), make_tokenizer(), IMAGE, image_folder=str(tmp_path / "images"))) == 8


def test_resume_without_a_checkpoint_starts_a_new_run_and_says_so(ws, tmp_path, caplog):
    out = tmp_path / "typo"
    with caplog.at_level(logging.WARNING, logger="sdrpn.rpn.train"):
        assert main(train_args(ws, out, *QUICK, "--resume", "--stop-after-steps", "1")) == 0
    assert f"--resume: {out} holds no checkpoint: starting a new run" in caplog.text
    # The unfinished run is no RPN folder yet; the refusal names what to pass instead.
    latest = out / "checkpoints" / "step-00000001"
    with pytest.raises(
        FileNotFoundError,
        match=re.escape(f"resume it with sdrpn train --resume, or pass its latest checkpoint, {latest})"),
    ):
        read_rpn_config(str(out))
    assert read_rpn_config(str(latest)).branch_layer == 1
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="sdrpn.rpn.train"):
        assert main(train_args(ws, out, *QUICK, "--resume", "--stop-after-steps", "2")) == 0
    assert "resumed from" in caplog.text and "holds no checkpoint" not in caplog.text


def test_metrics_over_nothing_are_undefined(ws):
    model, tok = load_llava(str(ws / "model"), "fp32")
    ds = LabelShardDataset(str(ws / "labels"), tok, IMAGE)
    batch = LabelCollator(tok.pad_token_id)([ds[i] for i in range(2)])
    batch.labels.fill_(-100)  # every cell ignored
    rpn = RegionProposalNetwork.from_llava(model, 1, 2)
    metrics = evaluate(model, rpn, [batch], IMAGE, "cpu", lambda: torch.autocast("cpu", enabled=False))
    assert metrics == {"bce": None, "cells": 0, "precision": None, "recall": None, "iou": None}


def test_metrics_count_the_labelled_cells_of_every_batch(monkeypatch):
    """Precision, recall and IoU of (logit > 0) against the fg/bg labels, and the BCE
    averaged over the labelled cells of all batches (not over the batches): an ignored
    cell counts in none of them, whatever its logit. The forward is stubbed with known
    logits, so that the counts are known: 4 true positives, 1 false positive, 2 false
    negatives over 8 labelled cells."""
    import types

    import sdrpn.rpn.train as train_module

    monkeypatch.setattr(train_module, "_forward", lambda model, rpn, layer, batch, *rest: batch)
    batches = [
        (torch.tensor([[3.0, 2.0, -1.0, -2.0, 5.0, 1.0]]), torch.tensor([[1, 0, 1, 0, -100, 1]])),
        None,  # every sample of the batch skipped
        (torch.tensor([[4.0, -3.0, 2.0, 6.0]]), torch.tensor([[1, 1, -100, 1]])),
    ]
    rpn = types.SimpleNamespace(config=types.SimpleNamespace(branch_layer=1), eval=lambda: None, train=lambda: None)
    metrics = evaluate(None, rpn, batches, IMAGE, "cpu", lambda: torch.autocast("cpu", enabled=False))
    logits = torch.cat([b[0][b[1] != -100] for b in batches if b])
    labels = torch.cat([b[1][b[1] != -100] for b in batches if b]).float()
    bce = float(torch.nn.functional.binary_cross_entropy_with_logits(logits, labels))
    assert metrics.pop("bce") == pytest.approx(bce, rel=1e-6)
    assert metrics == {"cells": 8, "precision": 4 / 5, "recall": 4 / 6, "iou": 4 / 7}


def test_fewer_samples_than_the_effective_batch_are_warned_about(ws, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="sdrpn.rpn.train"):
        assert main(train_args(ws, tmp_path / "few", *QUICK, "--effective-batch", "64")) == 0
    warned = [r.getMessage() for r in caplog.records if "optimiser step" in r.getMessage()]
    assert warned == [
        "32 training samples make one optimiser step of 32 samples per epoch, not the 64 the effective batch "
        "asks for (steps in all: 1): lower --effective-batch (or --grad-accum) for more steps"
    ]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sdrpn.rpn.train"):
        assert main(train_args(ws, tmp_path / "enough", *QUICK, "--effective-batch", "16")) == 0
        assert main(train_args(ws, tmp_path / "one", *QUICK, "--effective-batch", "32")) == 0  # exactly one step
        # --grad-accum makes 4 x 2 = 8 of the 32 samples; the default 512 beside it is not the one used.
        accumulated = ("--effective-batch", "512", "--batch-size", "4", "--grad-accum", "2")
        assert main(train_args(ws, tmp_path / "accumulated", *QUICK, *accumulated)) == 0
    assert not [r for r in caplog.records if "optimiser step" in r.getMessage()]


def test_a_trainer_on_two_ranks_counts_them_in_its_batch_and_its_warning(ws, tmp_path, caplog):
    model, tok = load_llava(str(ws / "model"), "fp32")
    for extra in ({"effective_batch": 16}, {"grad_accum": 2}):
        cfg = TrainConfig(labels=str(ws / "labels"), out=str(tmp_path / "o"), batch_size=4, **extra)
        trainer = RPNTrainer(cfg, model, tok, rank=0, world_size=2)
        assert (trainer.grad_accum, trainer.effective_batch) == (2, 16)
    cfg = TrainConfig(labels=str(ws / "labels"), out=str(tmp_path / "o"), batch_size=4, effective_batch=64)
    trainer = RPNTrainer(cfg, model, tok, rank=0, world_size=2)
    with caplog.at_level(logging.WARNING, logger="sdrpn.rpn.train"):
        trainer._schedule(torch.nn.Linear(1, 1), 33)  # the ranks share 32 of 33 samples
    assert "33 training samples make one optimiser step of 32 samples per epoch" in caplog.text


def test_a_run_records_the_effective_batch_it_used_and_refuses_two_that_disagree(ws, tmp_path):
    """--grad-accum sets the accumulation: train_config.json and the model card record the
    effective batch it makes, not the default it replaced; an --effective-batch that
    disagrees with it is refused before anything is written."""
    out = tmp_path / "run"
    default = ("--effective-batch", "512")  # train_args passes 16: the last flag counts
    assert main(train_args(ws, out, *QUICK, *default, "--batch-size", "4", "--grad-accum", "2")) == 0
    recorded = json.loads((out / "train_config.json").read_text())
    assert (recorded["effective_batch"], recorded["grad_accum"], recorded["batch_size"]) == (8, 2, 4)
    assert "| effective_batch | `8` |" in (out / "README.md").read_text()
    derived = tmp_path / "derived"  # the accumulation --effective-batch makes is recorded too
    assert main(train_args(ws, derived, *QUICK, "--batch-size", "4", "--effective-batch", "16")) == 0
    recorded = json.loads((derived / "train_config.json").read_text())
    assert (recorded["effective_batch"], recorded["grad_accum"], recorded["batch_size"]) == (16, 4, 4)
    refused = tmp_path / "refused"
    with pytest.raises(ValueError, match="makes an effective batch of 8, not effective_batch=16: pass one of the two"):
        main(train_args(ws, refused, *QUICK, "--batch-size", "4", "--grad-accum", "2"))
    assert not refused.exists() or not os.listdir(refused)


def test_held_out_samples_that_were_skipped_are_counted(ws, tmp_path, caplog):
    """Metrics over a held-out split that lost its images say so, instead of reading as
    the figures of the whole split."""
    held = LabelShardDataset(str(ws / "labels"), make_tokenizer(), IMAGE, split="held_out", held_out_fraction=0.2)
    shutil.copytree(ws / "images", tmp_path / "images")
    missing = [row["image"] for row in held.rows[:3]]
    for name in missing:
        os.remove(tmp_path / "images" / name)
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="sdrpn"):
        assert main(train_args(ws, out, "--epochs", "1", "--image-folder", str(tmp_path / "images"))) == 0
    metrics = json.loads((out / "metrics-epoch0.json").read_text())
    assert (metrics["samples"], metrics["skipped"]) == (len(held) - 3, 3)
    assert "epoch 0 held-out: skipped 3 samples (3 image missing)" in caplog.text


def test_rpn_for_labels_passes_its_preset_and_roi_overrides_on(ws, tmp_path):
    model, _ = load_llava(str(ws / "model"), "fp32")
    path = tmp_path / "mine.json"
    path.write_text(
        json.dumps({"name": "mine", "grounding": [[1, 0]], "sink": [[0, None]], "branch_layer": 1, "depth": 3})
    )
    rpn = rpn_for_labels(model, str(ws / "labels"), preset=str(path))
    assert (rpn.config.branch_layer, rpn.config.depth, rpn.config.preset) == (1, 3, "mine")
    rpn = rpn_for_labels(model, str(ws / "labels"), branch_layer=1, depth=1, roi_overrides={"threshold": 0.3})
    assert rpn.config.roi_options.threshold == 0.3


def test_the_preset_labels_record_is_taken_where_it_fits_the_model(ws, tmp_path):
    model, _ = load_llava(str(ws / "model"), "fp32")
    labels = tmp_path / "labels"
    shutil.copytree(ws / "labels", labels)
    config = json.loads((labels / "label_config.json").read_text())
    recorded = {"name": "recorded", "grounding": [[1, 0]], "sink": [[0, None]], "branch_layer": 1, "depth": 3}
    (labels / "label_config.json").write_text(json.dumps({**config, "preset": recorded}))
    settings = rpn_settings(model, str(labels))
    assert (settings["branch_layer"], settings["depth"], settings["preset"]) == (1, 3, "recorded")
    recorded["grounding"] = [[1, 99]]  # a head the model does not have
    (labels / "label_config.json").write_text(json.dumps({**config, "preset": recorded}))
    with pytest.raises(ValueError, match="head 99 of layer 1"):
        rpn_settings(model, str(labels))


def test_a_resume_keeps_what_the_first_run_used(ws, tmp_path):
    """A run with --grad-accum (the effective batch left at its default) resumes; a model
    folder whose preset changed the RPN's layers since is refused, naming them."""
    common = ("--epochs", "2", "--max-samples", "96", "--save-every", "3")
    accumulated = (*common, "--grad-accum", "2", "--effective-batch", "512")
    assert main(train_args(ws, tmp_path / "accumulated", *accumulated, "--stop-after-steps", "4")) == 0
    assert main(train_args(ws, tmp_path / "accumulated", *accumulated, "--resume")) == 0

    model = tmp_path / "model"
    shutil.copytree(ws / "model", model)
    preset = {"name": "own", "grounding": [[1, 0]], "sink": [[0, None]], "branch_layer": 1, "depth": 2}
    (model / PRESET_FILE).write_text(json.dumps(preset))
    args = train_args(ws, tmp_path / "own", *common, "--preset", "auto")
    args[args.index("--model") + 1] = str(model)
    for flag in ("--branch-layer", "--depth"):  # left to the model's preset
        del args[args.index(flag) : args.index(flag) + 2]
    assert main([*args, "--stop-after-steps", "4"]) == 0
    (model / PRESET_FILE).write_text(json.dumps({**preset, "depth": 1}))
    with pytest.raises(ValueError, match=r"rpn_layers: \[1, 2\] -> \[1, 1\]"):
        main([*args, "--resume"])


def test_the_training_splits_digest_is_its_ids_in_order(ws):
    """Checkpoints record it and resumes compare it: its formula is part of the format."""
    import hashlib

    data = LabelShardDataset(str(ws / "labels"), make_tokenizer(), IMAGE, split="all", max_samples=20)
    ids = "\n".join(str(row["id"]) for row in data.rows)
    assert data.ids_digest() == hashlib.sha256(ids.encode()).hexdigest()[:16]


def test_rpn_for_labels_takes_the_labels_settings_and_refuses_a_zero_branch_layer(ws, tmp_path):
    model, _ = load_llava(str(ws / "model"), "fp32")
    rpn = rpn_for_labels(model, str(ws / "labels"), branch_layer=1, depth=2)
    labels = LabelFolder(str(ws / "labels")).config
    assert (rpn.config.branch_layer, rpn.config.depth) == (1, 2)
    assert (rpn.config.prompt_template, rpn.config.preprocessing) == (labels.prompt_template, "pad")
    with pytest.raises(ValueError, match="got K=0, depth=2"):  # 0 is a value, not "the preset's"
        rpn_for_labels(model, str(ws / "labels"), branch_layer=0, depth=2)
    # Labels that record no preset (converted from the reference's pickles), on a model
    # without one of its own and of no LLaVA-1.5 depth: SPEC's K=15, T=3.
    settings = rpn_settings(model, str(ws / "labels"))
    assert (settings["branch_layer"], settings["depth"], settings["preset"]) == (15, 3, None)
    # A model folder with its own preset: that one, as "auto" (the label job's default) takes it.
    (tmp_path / PRESET_FILE).write_text(
        json.dumps({"name": "own", "grounding": [[1, 0]], "sink": [[0, None]], "branch_layer": 1, "depth": 2})
    )
    model.config._name_or_path = str(tmp_path)
    for preset in (None, "auto"):
        settings = rpn_settings(model, str(ws / "labels"), preset=preset)
        assert (settings["branch_layer"], settings["depth"], settings["preset"]) == (1, 2, "own")
    # One that does not fit the model: refused where named ("auto"), SPEC's K and T where
    # the labels name none (a preset taken by depth alone may be another model's).
    (tmp_path / PRESET_FILE).write_text(
        json.dumps({"name": "own", "grounding": [[1, 99]], "sink": [[0, None]], "branch_layer": 1, "depth": 2})
    )
    with pytest.raises(ValueError, match="preset 'own': head 99 of layer 1"):
        rpn_settings(model, str(ws / "labels"), preset="auto")
    settings = rpn_settings(model, str(ws / "labels"))
    assert (settings["branch_layer"], settings["depth"], settings["preset"]) == (15, 3, None)
    # "auto" on a model with no preset of its own and of no LLaVA-1.5 depth: refused, as the label job does.
    model.config._name_or_path = str(ws / "model")
    with pytest.raises(ValueError, match="no preset for a model with 4 decoder layers"):
        rpn_settings(model, str(ws / "labels"), preset="auto")
