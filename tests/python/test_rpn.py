import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from host_reads import NoHostSync
from sdrpn.llava.inputs import position_ids_from_mask
from sdrpn.options import RoiOptions
from sdrpn.rpn.model import RegionProposalNetwork, gather_visual, last_real_token, non_finite_tensors, rpn_loss
from tiny_llava import IMAGE, make_tiny_llava, random_tokens, teacher_forced_batch

K, T = 1, 3


@pytest.fixture(scope="module")
def tiny():
    return make_tiny_llava(num_layers=4)


def backbone_hidden(tiny, batch):
    with torch.no_grad():
        out = tiny.model.model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            pixel_values=batch.pixel_values,
            output_hidden_states=True,
            position_ids=position_ids_from_mask(batch.attention_mask),
        )
    return out.hidden_states


def prompt_batch(tiny, padding="left", seed=0):
    gen = torch.Generator().manual_seed(seed)
    questions = [random_tokens(gen, n) for n in (3, 6, 1)]
    return teacher_forced_batch(tiny, questions, [[], [], []], padding=padding, seed=seed)


def test_copied_layers_reproduce_the_backbone(tiny):
    rpn = RegionProposalNetwork.from_llava(tiny.model, branch_layer=K, depth=T).eval()
    batch = prompt_batch(tiny)
    hs = backbone_hidden(tiny, batch)
    pos = position_ids_from_mask(batch.attention_mask)
    with torch.no_grad():
        got = rpn.run_layers(hs[K], batch.attention_mask, pos)
    assert torch.equal(got, hs[K + T - 1])


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_an_rpn_loaded_in_half_precision_reproduces_the_backbone(tmp_path, dtype):
    """Loaded as a half-precision model is (its rotary frequencies kept float32), an RPN
    casts its weights but not those frequencies: its layers are still the backbone's."""
    from sdrpn.llava.loading import load_llava
    from tiny_llava import save_tiny_llava

    save_tiny_llava(str(tmp_path / "model"), grid=4, num_layers=4)
    model, _ = load_llava(str(tmp_path / "model"), dtype)
    assert model.get_decoder().rotary_emb.inv_freq.dtype == torch.float32
    RegionProposalNetwork.from_llava(model, branch_layer=K, depth=T).save(str(tmp_path / "rpn"))
    rpn = RegionProposalNetwork.load(str(tmp_path / "rpn"), model).eval()
    assert rpn.q_proj.weight.dtype == model.dtype and rpn.rotary_emb.inv_freq.dtype == torch.float32
    batch = prompt_batch(make_tiny_llava(num_layers=4))
    with torch.no_grad():
        out = model.model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            pixel_values=batch.pixel_values.to(model.dtype),
            output_hidden_states=True,
            position_ids=position_ids_from_mask(batch.attention_mask),
        )
        got = rpn.run_layers(out.hidden_states[K], batch.attention_mask, position_ids_from_mask(batch.attention_mask))
    assert torch.equal(got, out.hidden_states[K + T - 1])
    assert rpn.half().rotary_emb.inv_freq.dtype == torch.float32


def test_logits_equal_the_naive_head(tiny):
    rpn = RegionProposalNetwork.from_llava(tiny.model, branch_layer=K, depth=T).eval()
    batch = prompt_batch(tiny, seed=1)
    hs = backbone_hidden(tiny, batch)
    pos = position_ids_from_mask(batch.attention_mask)
    visual = batch.input_ids == IMAGE
    with torch.no_grad():
        logits = rpn(hs[K], batch.attention_mask, pos, visual)
        head_layer = tiny.model.get_decoder().layers[K + T - 1]
        x = head_layer.input_layernorm(tiny.model.get_decoder().norm(hs[K + T - 1]))
        heads, d = 4, 16
        for b in range(3):
            q = head_layer.self_attn.q_proj(x[b, -1]).view(heads, d)
            k = head_layer.self_attn.k_proj(x[b][visual[b]]).view(-1, 2, d).repeat_interleave(2, 1)
            want = torch.einsum("hd,nhd->nh", q, k).mean(-1) / math.sqrt(d)
            torch.testing.assert_close(logits[b], want, rtol=1e-5, atol=1e-5)
    assert logits.shape == (3, tiny.num_cells)


def test_padding_side_does_not_change_logits(tiny):
    rpn = RegionProposalNetwork.from_llava(tiny.model, branch_layer=K, depth=T).eval()
    out = []
    for padding in ("left", "right"):
        batch = prompt_batch(tiny, padding, seed=2)
        hs = backbone_hidden(tiny, batch)
        with torch.no_grad():
            out.append(
                rpn(hs[K], batch.attention_mask, position_ids_from_mask(batch.attention_mask), batch.input_ids == IMAGE)
            )
    torch.testing.assert_close(out[0], out[1], rtol=1e-4, atol=1e-5)


def test_what_the_caller_knows_spares_every_device_read(tiny):
    """Prompts without padding and with their image tokens at known positions: no mask and
    a slice of positions give the logits of the mask and the visual mask, and nothing is
    read back from the device (on a GPU each read is a wait for it)."""
    rpn = RegionProposalNetwork.from_llava(tiny.model, branch_layer=K, depth=T).eval()
    gen = torch.Generator().manual_seed(3)
    batch = teacher_forced_batch(tiny, [random_tokens(gen, 4), random_tokens(gen, 4)], [[], []])
    assert bool(batch.attention_mask.all())
    hs = backbone_hidden(tiny, batch)
    pos = position_ids_from_mask(batch.attention_mask)
    visual = batch.input_ids == IMAGE
    first = int(visual[0].int().argmax())
    image_tokens = slice(first, first + tiny.num_cells)
    assert bool(visual[:, image_tokens].all())
    with torch.no_grad():
        want = rpn(hs[K], batch.attention_mask, pos, visual)
        with NoHostSync():
            got = rpn(hs[K], None, pos, image_tokens)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for bad in (slice(first, first + 4, 2), slice(10**6, None), slice(first, first + 10**6), slice(0.5, 3)):
        with pytest.raises(ValueError, match="visual_mask as a slice"):
            rpn(hs[K], None, pos, bad)
    length = hs[K].shape[1]
    with torch.no_grad():  # Python's negative ends, numpy's ints and 0-d tensors select the same tokens
        torch.testing.assert_close(rpn(hs[K], None, pos, slice(first - length, first + tiny.num_cells - length)), got)
        ends = (np.int64(first), torch.tensor(first + tiny.num_cells))
        torch.testing.assert_close(rpn(hs[K], None, pos, slice(*ends)), got)
        # A slice without a start starts at token 0, as Python's do.
        leading = torch.zeros_like(visual)
        leading[:, : tiny.num_cells] = True
        want = rpn(hs[K], None, pos, leading)
        torch.testing.assert_close(rpn(hs[K], None, pos, slice(None, tiny.num_cells)), want)
        assert not torch.allclose(want, got)
    h, mask = hs[K], batch.attention_mask
    shape = rf"\(hidden_states is 2 x {length}\)"
    for args, message in (
        ((h, mask, pos, visual[:, 5:]), rf"visual_mask must be \(B, L\) bool or a slice {shape}, got \[2, "),
        ((h, mask, pos, visual.float()), "visual_mask must hold integers or bools, got torch.float32"),
        ((h, mask, pos, visual.long()), "visual_mask must be bool, got torch.int64"),
        ((h, mask[:, 1:], pos, visual), rf"attention_mask must be \(B, L\) {shape}"),
        ((h, mask, None, visual), rf"position_ids must be \(B, L\) or \(1, L\) {shape}, got NoneType"),
        ((h, mask, pos[:, 1:], visual), "position_ids must be"),
        ((h.double(), mask, pos, visual), "hidden_states must be torch.float32 .*, got torch.float64"),
        ((h[..., :8], mask, pos, visual), rf"hidden_states must be \(B, L, {h.shape[-1]}\), got \[2, {length}, 8\]"),
        ((h[0], mask, pos, visual), rf"hidden_states must be \(B, L, {h.shape[-1]}\), got \[{length}, {h.shape[-1]}\]"),
    ):
        with pytest.raises(ValueError, match=message):
            rpn(*args)
    with torch.no_grad():  # one row of positions serves every sample
        torch.testing.assert_close(rpn(h, None, pos[:1], image_tokens), got)


def test_samples_with_different_grids():
    states = torch.arange(2 * 6 * 1, dtype=torch.float32).view(2, 6, 1)
    mask = torch.tensor([[0, 1, 1, 1, 0, 0], [1, 0, 0, 1, 0, 0]], dtype=torch.bool)
    gathered, cells = gather_visual(states, mask)
    assert gathered[0, :, 0].tolist() == [1, 2, 3] and gathered[1, :2, 0].tolist() == [6, 9]
    assert cells.tolist() == [[True, True, True], [True, True, False]]
    assert last_real_token(torch.tensor([[0, 1, 1], [1, 1, 0]])).tolist() == [2, 1]


def test_rpn_loss():
    logits = torch.tensor([[2.0, -1.0, 0.5, float("-inf")]], requires_grad=True)
    labels = torch.tensor([[1, 0, -100, -100]])
    want = F.binary_cross_entropy_with_logits(torch.tensor([2.0, -1.0]), torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(rpn_loss(logits, labels), want)
    empty = rpn_loss(logits, torch.full((1, 4), -100))
    assert empty.item() == 0.0 and empty.requires_grad
    empty.backward()
    assert torch.equal(logits.grad, torch.zeros(1, 4))
    with pytest.raises(ValueError, match="logits and labels must have one shape"):
        rpn_loss(logits, labels[:, :2])
    with pytest.raises(ValueError, match=r"labels must be 0, 1 or ignore_index=-100, got \[2\]"):
        rpn_loss(logits, torch.tensor([[2, 0, 1, 0]]))
    with pytest.raises(ValueError, match=r"labels must be 0, 1 or ignore_index=-100, got \[-1\]"):
        rpn_loss(logits, torch.tensor([[-1, 0, -1, 1]]))
    with pytest.raises(TypeError, match="logits and labels must be tensors, got Tensor and ndarray"):
        rpn_loss(logits, labels.numpy())
    with pytest.raises(TypeError, match="ignore_index must be an int, got None"):
        rpn_loss(logits, labels, ignore_index=None)


def test_save_load_round_trip_and_refusal(tiny, tmp_path):
    rpn = RegionProposalNetwork.from_llava(tiny.model, branch_layer=K, depth=T, preset="tiny")
    with torch.no_grad():
        rpn.q_proj.weight.add_(0.5)
    rpn.save(str(tmp_path / "rpn"))
    loaded = RegionProposalNetwork.load(str(tmp_path / "rpn"), tiny.model)
    for (k1, v1), (k2, v2) in zip(
        rpn.trainable_state_dict().items(), loaded.trainable_state_dict().items(), strict=True
    ):
        assert k1 == k2 and torch.equal(v1, v2)
    assert loaded.config.preset == "tiny" and loaded.config.grid == [4, 4]
    assert not any(m.training for m in loaded.modules())  # for inference, as from_pretrained gives a model
    other = make_tiny_llava(num_layers=4, seed=1)
    with pytest.raises(ValueError, match=r"another base model \(the same architecture, other weights\)"):
        RegionProposalNetwork.load(str(tmp_path / "rpn"), other.model)
    wider = make_tiny_llava(num_layers=4, num_key_value_heads=4)
    with pytest.raises(ValueError, match=r"another base model \(another architecture\)"):
        RegionProposalNetwork.load(str(tmp_path / "rpn"), wider.model)


def test_a_damaged_weights_file_is_named(tiny, tmp_path):
    RegionProposalNetwork.from_llava(tiny.model, branch_layer=K, depth=T).save(str(tmp_path / "rpn"))
    path = tmp_path / "rpn" / "rpn.safetensors"
    weights = path.read_bytes()
    path.write_bytes(weights[:100])  # cut short
    with pytest.raises(ValueError, match=f"{path} cannot be read as safetensors"):
        RegionProposalNetwork.load(str(tmp_path / "rpn"), tiny.model)
    path.unlink()
    path.mkdir()
    with pytest.raises(IsADirectoryError, match=f"{path} is a folder, not a safetensors file"):
        RegionProposalNetwork.load(str(tmp_path / "rpn"), tiny.model)


def test_integer_weights_are_refused_and_other_floats_cast(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    RegionProposalNetwork.from_llava(tiny.model, branch_layer=K, depth=T).save(str(tmp_path / "rpn"))
    path = str(tmp_path / "rpn" / "rpn.safetensors")
    weights = load_file(path)
    save_file({k: v.to(torch.bfloat16) for k, v in weights.items()}, path)
    loaded = RegionProposalNetwork.load(str(tmp_path / "rpn"), tiny.model)
    assert loaded.q_proj.weight.dtype == torch.float32
    save_file({k: (v * 100).to(torch.int32) if k == "q_proj.weight" else v for k, v in weights.items()}, path)
    with pytest.raises(
        ValueError, match=r"do not fit this model: q_proj.weight of torch.int32 \(the model's torch.float32\)"
    ):
        RegionProposalNetwork.load(str(tmp_path / "rpn"), tiny.model)


def test_a_fine_tune_of_the_attention_alone_is_another_base_model(tiny, tmp_path):
    import copy
    import json

    RegionProposalNetwork.from_llava(tiny.model, branch_layer=K, depth=T).save(str(tmp_path / "rpn"))
    tuned = copy.deepcopy(tiny.model)  # what a merged LoRA on the attention leaves: embeddings and MLPs as they were
    with torch.no_grad():
        tuned.get_decoder().layers[-1].self_attn.q_proj.weight.add_(0.1)
    with pytest.raises(ValueError, match=r"another base model \(the same architecture, other weights\)"):
        RegionProposalNetwork.load(str(tmp_path / "rpn"), tuned)
    # A folder written before the last layer was probed holds 16 values: compared on those.
    path = tmp_path / "rpn" / "rpn_config.json"
    config = json.loads(path.read_text())
    assert len(config["base_fingerprint"]) == 32
    config["base_fingerprint"] = config["base_fingerprint"][:16]
    path.write_text(json.dumps(config))
    RegionProposalNetwork.load(str(tmp_path / "rpn"), tiny.model)
    RegionProposalNetwork.load(str(tmp_path / "rpn"), tuned)  # what the old record cannot tell


def test_rpn_folders_record_their_settings_and_refuse_contradictions(tiny, tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "rpn"
    rpn = RegionProposalNetwork.from_llava(
        tiny.model,
        K,
        T,
        prompt_template="Q: <image> {question} A:",
        preprocessing="crop",
        roi=RoiOptions(threshold=0.4, min_area=1),
    )
    rpn.save(str(folder))
    loaded = RegionProposalNetwork.load(str(folder), tiny.model).config
    assert loaded.prompt_template == "Q: <image> {question} A:" and loaded.preprocessing == "crop"
    assert loaded.roi_options == RoiOptions(threshold=0.4, min_area=1)
    assert loaded.base_config_fingerprint and loaded.image_size == 56
    assert loaded.task_thresholds["docvqa"] == 0.10 and loaded.task_thresholds["ocrbench"] == 0.05
    assert loaded.task_roi_options("ocrbench") == RoiOptions(threshold=0.05, min_area=1)
    with pytest.raises(ValueError, match="task must be one of"):
        loaded.task_roi_options("mmbench")
    config = json.loads((folder / "rpn_config.json").read_text())

    # A folder of the first format (no template, preprocessing, RoI options or fingerprint).
    old = {
        k: config[k]
        for k in (
            "branch_layer",
            "depth",
            "preset",
            "base_model",
            "grid",
            "num_heads",
            "hidden_size",
            "base_fingerprint",
        )
    }
    (folder / "rpn_config.json").write_text(json.dumps(old))
    first = RegionProposalNetwork.load(str(folder), tiny.model).config
    assert first.roi_options == RoiOptions() and first.preprocessing == "pad"

    for field, value, message in (
        ("num_heads", 2, "num_heads=2"),
        ("grid", [8, 8], "grid"),
        ("heads", 4, "unknown fields"),
        ("preprocessing", "stretch", "preprocessing"),
        ("prompt_template", "{question.__class__}", "prompt_template"),
        # Fields that are lists and dicts are typed too (each failed later, or inside torch).
        ("base_fingerprint", None, r"base_fingerprint must be of type list\[float\], got None"),
        ("base_fingerprint", ["a"], r"base_fingerprint\[0\] must be of type float, got 'a'"),
        ("roi", [1], r"roi must be of type dict, got \[1\]"),
        ("task_thresholds", {"textvqa": "x"}, r"task_thresholds\['textvqa'\] must be a threshold in \[-1, 1\]"),
        ("task_thresholds", {"pope": -1.5}, r"task_thresholds\['pope'\] must be a threshold in \[-1, 1\], got -1.5"),
    ):
        (folder / "rpn_config.json").write_text(json.dumps(dict(config, **{field: value})))
        with pytest.raises(ValueError, match=message):
            RegionProposalNetwork.load(str(folder), tiny.model)
    path = folder / "rpn_config.json"
    for text, message in (("[1, 2]", "RPNConfig must be a JSON object, got list"), ("{'a'", "is not valid JSON")):
        path.write_text(text)
        with pytest.raises(ValueError, match=f"{path}:? {message}"):
            RegionProposalNetwork.load(str(folder), tiny.model)
    (folder / "rpn_config.json").write_text(json.dumps(config))
    weights = load_file(str(folder / "rpn.safetensors"))
    good = {k: v.clone() for k, v in weights.items()}
    weights["q_proj.weight"][0, 0] = float("nan")
    save_file(weights, str(folder / "rpn.safetensors"))
    with pytest.raises(ValueError, match=r"NaN or Inf values: \['q_proj.weight'\]"):
        RegionProposalNetwork.load(str(folder), tiny.model)
    # What load refuses is not written in the first place.
    diverged = RegionProposalNetwork.from_llava(tiny.model, branch_layer=1, depth=2)
    with torch.no_grad():
        diverged.norm.weight[3] = float("inf")
    with pytest.raises(
        ValueError, match=rf"NaN or Inf values: \['norm.weight'\]; not saved to {re.escape(str(tmp_path))}/diverged"
    ):
        diverged.save(str(tmp_path / "diverged"))
    assert not (tmp_path / "diverged").exists()
    # Meta tensors (a model built without weights) hold no values to check.
    meta = {
        "w": torch.empty(2, device="meta"),
        "bad": torch.tensor([float("nan")]),
        "ids": torch.zeros(2, dtype=torch.long),
    }
    assert non_finite_tensors(meta) == ["bad"]
    weights["q_proj.weight"] = torch.zeros(3, 3)
    save_file(weights, str(folder / "rpn.safetensors"))
    with pytest.raises(ValueError, match=r"do not fit this model: q_proj.weight \(3, 3\) \(the model's \(64, 64\)\)"):
        RegionProposalNetwork.load(str(folder), tiny.model)
    # A tensor missing, or one the RPN does not have, each alone.
    weights = good
    for changed, message in (
        ({k: v for k, v in weights.items() if k != "k_proj.weight"}, r"missing \['k_proj.weight'\], unexpected \[\]"),
        ({**weights, "extra.weight": torch.zeros(2)}, r"missing \[\], unexpected \['extra.weight'\]"),
    ):
        save_file(changed, str(folder / "rpn.safetensors"))
        with pytest.raises(ValueError, match=f"do not fit: {message}"):
            RegionProposalNetwork.load(str(folder), tiny.model)


def test_from_llava_checks_the_branch(tiny):
    with pytest.raises(ValueError, match=r"K \+ depth <= 4"):
        RegionProposalNetwork.from_llava(tiny.model, branch_layer=2, depth=3)
    with pytest.raises(TypeError, match="model must be a LLaVA model"):
        RegionProposalNetwork.from_llava(None, branch_layer=2, depth=1)
    for value in (2.0, "2", True):
        with pytest.raises(TypeError, match=f"branch_layer must be an int, got {value!r}"):
            RegionProposalNetwork.from_llava(tiny.model, branch_layer=value, depth=1)
    with pytest.raises(ValueError, match="prompt_template must have text after <image>"):
        RegionProposalNetwork.from_llava(tiny.model, branch_layer=2, depth=1, prompt_template="{question} <image>")
    # RoI options as a dict of fields, as SDRPNLlava takes them.
    rpn = RegionProposalNetwork.from_llava(tiny.model, branch_layer=2, depth=1, roi={"threshold": 0.1})
    assert rpn.config.roi_options == RoiOptions(threshold=0.1)


def test_gradient_checkpointing_gives_the_same_gradients(tiny):
    batch = prompt_batch(tiny, seed=4)
    hs = backbone_hidden(tiny, batch)
    pos = position_ids_from_mask(batch.attention_mask)
    visual = batch.input_ids == IMAGE
    grads = []
    for ckpt in (False, True):
        rpn = RegionProposalNetwork.from_llava(tiny.model, branch_layer=K, depth=T).train()
        if ckpt:
            rpn.gradient_checkpointing_enable()
        rpn(hs[K], batch.attention_mask, pos, visual).sum().backward()
        grads.append(rpn.layers[0].mlp.up_proj.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])
