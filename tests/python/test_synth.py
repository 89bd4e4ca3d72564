import json
import os

import numpy as np
import pytest

from sdrpn.llava.data import parse_entry
from sdrpn.synth import COLOURS, make_char_tokenizer, make_sample, split_seeds, write_dataset
from sdrpn.synth.task import KINDS, TAG_CLEARANCE


def test_same_seed_same_sample():
    a, b = make_sample(11), make_sample(11)
    assert (a.question, a.answer, a.box) == (b.question, b.answer, b.box)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert make_sample(12).image.tobytes() != a.image.tobytes()


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_and_the_tag_lies_in_its_box(kind):
    for seed in range(5):
        s = make_sample(seed, kind=kind)
        assert s.kind == kind and s.answer
        x0, y0, x1, y1 = s.box
        assert 0 <= x0 < x1 <= 448 and 0 <= y0 < y1 <= 448
        assert (x1 - x0) * (y1 - y0) < 448 * 448 / 400  # a small detail
        patch = np.asarray(s.image)[y0:y1, x0:x1].reshape(-1, 3)
        colours = [np.all(patch == c, axis=1).mean() for c in COLOURS.values()]
        assert max(colours) > 0.4  # mostly the tag's colour, the rest the code's white
        if kind == "read":
            assert len(s.answer) == 1 and s.answer == s.code
        if kind == "where":
            assert s.answer in {"top left", "top right", "bottom left", "bottom right"}
    assert len(make_sample(3, code_length=3).code) == 3


def _clutter_within(sample, pixels: int) -> bool:
    """Whether a clutter shape's colour lies within `pixels` of the tag's box."""
    x0, y0, x1, y1 = sample.box
    wx0, wy0 = max(0, x0 - pixels), max(0, y0 - pixels)
    window = np.asarray(sample.image)[wy0 : y1 + pixels, wx0 : x1 + pixels].astype(int)
    palette = np.array(list(COLOURS.values()))
    coloured = (np.abs(window[..., None, :] - palette).sum(-1) < 40).any(-1)
    coloured[y0 - wy0 : y1 - wy0, x0 - wx0 : x1 - wx0] = False  # the tag itself
    return bool(coloured.any())


def test_the_tag_keeps_clear_of_clutter_and_the_questions_stay():
    near = 0
    for seed in range(60):
        clear, anywhere = make_sample(seed), make_sample(seed, tag_clearance=0)
        assert not _clutter_within(clear, TAG_CLEARANCE)
        near += _clutter_within(anywhere, 8)
        # Only the tag moves: the same question kind, code, colour and circles.
        assert (clear.kind, clear.code, clear.colour) == (anywhere.kind, anywhere.code, anywhere.colour)
        if clear.kind != "where":
            assert (clear.question, clear.answer) == (anywhere.question, anywhere.answer)
    assert near >= 3  # at clearance 0 some tags sit on or beside a shape
    with pytest.raises(ValueError, match="tag_clearance must be >= 0 pixels, got -1"):
        make_sample(0, tag_clearance=-1)


def test_splits_are_disjoint():
    train, val, test = (set(split_seeds(s, 1000)) for s in ("train", "val", "test"))
    assert not (train & val or train & test or val & test)
    with pytest.raises(ValueError, match="split must be one of"):
        split_seeds("dev", 3)


def test_write_dataset_is_llava_format(tmp_path):
    path = write_dataset(str(tmp_path), "val", 4)
    data = json.loads(open(path).read())
    assert len(data) == 4 and (tmp_path / "images" / data[0]["image"]).exists()
    sample = parse_entry(data[0], 0)
    assert sample.question and sample.answer and "gt_box" in data[0]
    before = (tmp_path / "images" / data[0]["image"]).stat().st_mtime_ns
    write_dataset(str(tmp_path), "val", 4)  # a rerun keeps the existing images
    assert (tmp_path / "images" / data[0]["image"]).stat().st_mtime_ns == before


def test_char_tokenizer_round_trip():
    tok = make_char_tokenizer()
    text = "What is written on the red tag? K7"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id and len(ids) == len(text) + 1
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert (tok.pad_token_id, tok.eos_token_id, tok.convert_tokens_to_ids("<image>")) == (0, 2, 3)


def test_tiny_llava_runs_the_whole_pipeline_on_a_task_sample(tmp_path):
    import torch

    from sdrpn.infer.pipeline import SDRPNLlava
    from sdrpn.options import RoiOptions
    from sdrpn.rpn.model import RegionProposalNetwork
    from sdrpn.synth import build_tiny_llava

    model, tok = build_tiny_llava()
    params = sum(p.numel() for p in model.parameters())
    assert 1.5e6 < params < 4e6  # the size the recipe was measured with
    assert model.config.image_seq_length == 64
    rpn = RegionProposalNetwork.from_llava(model, branch_layer=3, depth=2)
    sample = make_sample(4, kind="read")
    pipe = SDRPNLlava(model, tok, rpn, roi=RoiOptions(threshold=-0.5))
    answer = pipe.generate([sample.image], [sample.question], max_new_tokens=3)[0]
    assert len(answer.tokens) >= 1 and answer.rois.prob.shape == (8, 8)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    from sdrpn.llava.loading import load_llava

    loaded, loaded_tok = load_llava(str(tmp_path / "m"), "fp32")
    assert loaded_tok("K7")["input_ids"] == tok("K7")["input_ids"]
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_metrics():
    from sdrpn.synth import accuracy, box_iou, hit

    assert accuracy([" K7.", "red", "blue"], ["k7", "Red", "green"]) == 2 / 3
    with pytest.raises(ValueError, match="must pair up"):
        accuracy(["a"], [])
    assert box_iou((0, 0, 2, 2), (1, 1, 3, 3)) == pytest.approx(1 / 7)
    assert box_iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0.0
    assert hit([(0, 0, 10, 10)], (2, 2, 5, 5)) and not hit([(3, 3, 10, 10)], (2, 2, 5, 5))


def test_base_training_learns_and_evaluates(tmp_path):
    from sdrpn.synth.cells import cell_box, tag_cells
    from sdrpn.synth.evaluate import accuracy_table, view_box
    from sdrpn.synth.model import TinyLlavaSpec
    from sdrpn.synth.train_base import BaseTrainConfig, BaseTrainer

    spec = TinyLlavaSpec(vision_layers=2, text_layers=3)
    cfg = BaseTrainConfig(out=str(tmp_path / "base"), steps=40, batch_size=8, lr=2e-3, spec=spec, zoom_fraction=0.5)
    history = BaseTrainer(cfg).run()
    # The answer loss falls first (answers are short and few); the auxiliary ones follow.
    first = sum(h["lm"] for h in history[:4]) / 4
    last = sum(h["lm"] for h in history[-4:]) / 4
    assert last < 0.8 * first, (first, last)
    assert (tmp_path / "base" / "aux_heads.safetensors").exists()
    from sdrpn.llava.loading import load_llava

    model, tok = load_llava(str(tmp_path / "base"), "fp32")
    table = accuracy_table(model, tok, count=4)
    assert set(table) == {"none", "gt", "random"}
    assert tag_cells((0, 0, 57, 10), 448, 8).view(8, 8)[0, :2].tolist() == [1.0, 1.0]
    assert cell_box((100, 100, 120, 108), 448, 8) == (56, 56, 168, 112)
    assert cell_box((60, 60, 70, 70), 448, 8) == (56, 56, 112, 112)
    import random

    sample = make_sample(2)
    assert view_box(sample, "none", 8, random.Random(0)) is None
    x0, y0, x1, y1 = view_box(sample, "random", 8, random.Random(0))
    g = cell_box(sample.box, 448, 8)
    assert (x1 - x0, y1 - y0) == (g[2] - g[0], g[3] - g[1]) and 0 <= x0 and x1 <= 448


def test_base_training_resumes_where_it_stopped(tmp_path, monkeypatch):
    import torch
    from safetensors.torch import load_file

    from sdrpn.synth.model import TinyLlavaSpec
    from sdrpn.synth.train_base import BaseTrainConfig, BaseTrainer, make_batch

    spec = TinyLlavaSpec(vision_layers=1, text_layers=2, vision_hidden=32, text_hidden=32)
    whole = BaseTrainConfig(out=str(tmp_path / "whole"), steps=4, batch_size=4, spec=spec, bf16=False)
    BaseTrainer(whole).run()
    cut = BaseTrainConfig(out=str(tmp_path / "cut"), steps=4, batch_size=4, spec=spec, bf16=False)
    first = BaseTrainer(cut)
    first.run(max_seconds=0.0)  # checkpoints after one step and stops
    assert first.done_steps == 1
    checkpoint = tmp_path / "cut" / "checkpoint"
    assert sorted(os.listdir(checkpoint)) == ["state-00000001.safetensors", "state.json"]
    # What a kill later in the run could leave: rows of steps past the checkpoint, the next
    # state's tensors written but not yet named, a temporary file.
    with open(tmp_path / "cut" / "history.jsonl", "a") as f:
        f.write('{"step": 1, "loss": 9.0}\n{"step": 2, "loss": 9.0}\n')
    (checkpoint / "state-00000003.safetensors").write_bytes(b"half")
    (checkpoint / ".tmp-state-00000004.safetensors.k1ll3d").write_bytes(b"")
    # The resumed run takes steps 1 to 3 only (one that restored nothing would rerun the
    # seeded run from step 0 to the same weights and history).
    taken = []
    step = BaseTrainer.step
    monkeypatch.setattr(BaseTrainer, "step", lambda self, batch: taken.append(self.done_steps) or step(self, batch))
    second = BaseTrainer(cut)
    second.run(resume=True)
    assert second.done_steps == 4 and taken == [1, 2, 3]
    assert sorted(os.listdir(checkpoint)) == ["state-00000001.safetensors", "state.json"]  # the named one
    steps = [json.loads(line)["step"] for line in open(tmp_path / "cut" / "history.jsonl")]
    assert steps == [0, 1, 2, 3]
    a = load_file(str(tmp_path / "whole" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # A batch depends on the seed and the step alone, in any process.
    tok = first.tok
    x, y = (make_batch(2, cut, tok, first.image_id) for _ in range(2))
    assert torch.equal(x.thumbs, y.thumbs) and x.ids == y.ids and torch.equal(x.crop_cells, y.crop_cells)


def test_a_kill_between_a_checkpoint_and_the_next_log_loses_no_history_row(tmp_path, monkeypatch):
    from sdrpn.synth.model import TinyLlavaSpec
    from sdrpn.synth.train_base import BaseTrainConfig, BaseTrainer

    spec = TinyLlavaSpec(vision_layers=1, text_layers=2, vision_hidden=32, text_hidden=32)
    cfg = BaseTrainConfig(
        out=str(tmp_path / "b"), steps=6, batch_size=4, spec=spec, bf16=False, save_every=2, log_every=4
    )
    real_step = BaseTrainer.step

    def killed_at_step_3(self, batch):
        if self.done_steps == 3:
            raise KeyboardInterrupt  # after the step-2 checkpoint, before the step-4 log
        return real_step(self, batch)

    monkeypatch.setattr(BaseTrainer, "step", killed_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        BaseTrainer(cfg).run()
    monkeypatch.setattr(BaseTrainer, "step", real_step)
    BaseTrainer(cfg).run(resume=True)
    steps = [json.loads(line)["step"] for line in open(tmp_path / "b" / "history.jsonl")]
    assert steps == [0, 1, 2, 3, 4, 5]  # rows 0 and 1 had been lost


def test_base_training_vision_stage_leaves_the_language_model_alone(tmp_path):
    import torch

    from sdrpn.synth.model import TinyLlavaSpec
    from sdrpn.synth.train_base import BaseTrainConfig, BaseTrainer, make_batch, two_stage_lr

    spec = TinyLlavaSpec(vision_layers=1, text_layers=2, vision_hidden=32, text_hidden=32)
    cfg = BaseTrainConfig(out=str(tmp_path / "b"), steps=4, encoder_steps=2, batch_size=4, spec=spec)
    trainer = BaseTrainer(cfg)
    first = make_batch(0, cfg, trainer.tok, trainer.image_id)
    assert first.ids == [] and first.views is None and first.crops.shape[0] == 4
    assert make_batch(2, cfg, trainer.tok, trainer.image_id).ids  # the second stage has prompts
    text = lambda: {  # noqa: E731
        k: v.clone() for k, v in trainer.model.named_parameters() if "language_model" in k or "lm_head" in k
    }
    vision = lambda: {k: v.clone() for k, v in trainer.model.named_parameters() if "vision_tower" in k}  # noqa: E731
    text0, vision0 = text(), vision()
    for step in range(2):
        row = trainer.step(make_batch(step, cfg, trainer.tok, trainer.image_id))
        assert row["lm"] == 0
    assert all(torch.equal(v, text0[k]) for k, v in text().items())
    assert any(not torch.equal(v, vision0[k]) for k, v in vision().items())
    row = trainer.step(make_batch(2, cfg, trainer.tok, trainer.image_id))
    assert row["lm"] > 0 and any(not torch.equal(v, text0[k]) for k, v in text().items())
    # Each stage warms up from a small rate and decays; the second restarts at its warm-up.
    assert two_stage_lr(1999, 3000, 2000) < 0.01 and two_stage_lr(2000, 3000, 2000) < 0.1
    assert two_stage_lr(2033, 3000, 2000) == pytest.approx(1.0, abs=0.01)
    with pytest.raises(ValueError, match="encoder_steps must be in \\[0, steps=4\\), got 4"):
        BaseTrainer(BaseTrainConfig(out=str(tmp_path / "c"), steps=4, encoder_steps=4, spec=spec))


def test_bf16_autocast_only_where_it_is_native():
    import torch

    from sdrpn.synth.train_base import native_bf16

    assert native_bf16("cuda") and native_bf16("cuda:1")
    assert native_bf16("cpu") == torch.ops.mkldnn._is_mkldnn_bf16_supported()


def test_colour_weight_zero_is_the_recipe_without_the_colour_loss(tmp_path):
    import torch

    from sdrpn.synth.model import TinyLlavaSpec
    from sdrpn.synth.train_base import BaseTrainConfig, BaseTrainer, make_batch

    spec = TinyLlavaSpec(vision_layers=1, text_layers=2, vision_hidden=32, text_hidden=32)
    cfg = BaseTrainConfig(out=str(tmp_path / "b"), steps=2, encoder_steps=1, batch_size=4, spec=spec, colour_weight=0)
    trainer = BaseTrainer(cfg)
    before = trainer.heads.colour.weight.clone()
    row = trainer.step(make_batch(0, cfg, trainer.tok, trainer.image_id))
    assert row["colour"] > 0 and torch.equal(trainer.heads.colour.weight, before)


def test_cells_of_stretched_crops_and_the_crops_an_rpn_takes():
    import random

    import torch

    from sdrpn.synth.cells import cell_box, grown_cell_box, tag_cells, view_coordinates

    # A 56x112 crop stretched to the square: a cell is 7 px wide and 14 px high.
    cells = tag_cells(view_coordinates((20, 30, 30, 40), (0, 0, 56, 112)), 56, 8, 112).view(8, 8)
    assert cells.nonzero().tolist() == [[2, 2], [2, 3], [2, 4]]
    assert torch.equal(tag_cells((0, 0, 57, 10), 448, 8), tag_cells((0, 0, 57, 10), 448, 8, 448))
    rng = random.Random(0)
    seen = set()
    for seed in range(200):
        box = make_sample(seed).box
        exact = cell_box(box, 448, 8)
        g = grown_cell_box(box, 448, 8, rng)
        assert all(v % 56 == 0 for v in g) and 0 <= g[0] and g[2] <= 448 and 0 <= g[1] and g[3] <= 448
        assert g[0] <= exact[0] and g[1] <= exact[1] and g[2] >= exact[2] and g[3] >= exact[3]
        assert exact[0] - g[0] <= 56 and g[2] - exact[2] <= 56
        seen.add(g == exact)
    assert seen == {True, False}  # exact crops and a cell too wide both occur
    assert grown_cell_box((60, 60, 70, 70), 448, 8, rng, grow=0.0) == (56, 56, 112, 112)


def test_cell_views_cut_crops_on_the_grid_and_mark_the_tag_cells(tmp_path):
    import torch

    from sdrpn.synth.cells import tag_cells
    from sdrpn.synth.model import TinyLlavaSpec
    from sdrpn.synth.train_base import BaseTrainConfig, BaseTrainer, make_batch

    spec = TinyLlavaSpec(vision_layers=1, text_layers=2, vision_hidden=32, text_hidden=32)
    plain = BaseTrainConfig(out="x", batch_size=4, spec=spec, zoom_fraction=1.0)
    trainer = BaseTrainer(plain)
    tok, image_id = trainer.tok, trainer.image_id
    assert make_batch(0, plain, tok, image_id).views is not None
    cells = BaseTrainConfig(out="x", batch_size=4, spec=spec, zoom_fraction=1.0, cell_views=1.0, zoom_on_tag=1.0)
    batch = make_batch(0, cells, tok, image_id)
    assert batch.views is not None and batch.views.shape == batch.crops.shape
    # Every tag-cell mask of a cell-aligned crop holds the tag and is a rectangle of cells.
    for mask in batch.crop_cells.view(-1, 8, 8):
        rows, cols = mask.nonzero()[:, 0], mask.nonzero()[:, 1]
        assert mask.sum() == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1) > 0
    assert tag_cells((0, 0, 1, 1), 56, 8, 112).sum() == 1
    with pytest.raises(ValueError, match="cell_views must be in \\[0, 1\\], got 1.5"):
        BaseTrainer(BaseTrainConfig(out="x", spec=spec, cell_views=1.5))
    # The training images follow the configured clearance (0: the shipped model's data).
    anywhere = BaseTrainConfig(out="x", batch_size=64, spec=spec, tag_clearance=0)
    clear = BaseTrainConfig(out="x", batch_size=64, spec=spec)
    assert not torch.equal(make_batch(0, anywhere, tok, image_id).tags, make_batch(0, clear, tok, image_id).tags)
    with pytest.raises(ValueError, match="tag_clearance must be >= 0 pixels, got -1"):
        BaseTrainer(BaseTrainConfig(out="x", spec=spec, tag_clearance=-1))


def test_a_later_stage_starts_from_a_trained_model_and_reads_through_the_lm(tmp_path):
    import torch

    from sdrpn.synth.model import TinyLlavaSpec
    from sdrpn.synth.train_base import BaseTrainConfig, BaseTrainer, make_batch

    spec = TinyLlavaSpec(vision_layers=1, text_layers=2, vision_hidden=32, text_hidden=32)
    first = BaseTrainer(BaseTrainConfig(out=str(tmp_path / "a"), steps=2, batch_size=4, spec=spec, bf16=False))
    first.run()
    cfg = BaseTrainConfig(
        out=str(tmp_path / "b"), steps=2, batch_size=4, spec=spec, bf16=False, init=str(tmp_path / "a"), char_head="lm"
    )
    second = BaseTrainer(cfg)
    for (k, v), w in zip(first.model.state_dict().items(), second.model.state_dict().values(), strict=True):
        assert torch.equal(v, w), k
    assert torch.equal(first.heads.tag.weight, second.heads.tag.weight)
    lm_head = second.model.lm_head.weight.clone()
    chars = second.heads.chars.weight.clone()
    second.step(make_batch(0, cfg, second.tok, second.image_id))
    # The character loss trains the LM's output rows and leaves the linear head alone.
    assert not torch.equal(second.model.lm_head.weight, lm_head)
    assert torch.equal(second.heads.chars.weight, chars)
    other = TinyLlavaSpec(vision_layers=1, text_layers=3, vision_hidden=32, text_hidden=32)
    with pytest.raises(ValueError, match="has spec .* but this run's spec is"):
        BaseTrainer(BaseTrainConfig(out="x", spec=other, init=str(tmp_path / "a")))
    with pytest.raises(FileNotFoundError, match="init must be a trained base model's folder"):
        BaseTrainer(BaseTrainConfig(out="x", spec=spec, init=str(tmp_path / "missing")))
    with pytest.raises(ValueError, match="char_head must be 'linear' or 'lm', got 'mlp'"):
        BaseTrainer(BaseTrainConfig(out="x", spec=spec, char_head="mlp"))
