"""`sdrpn import-checkpoint`: the reference's released RPN checkpoint becomes our RPN folder.

A tiny checkpoint is written in the reference's layout (original LLaVA key names, the twig
beside the backbone, bf16 safetensors shards with an index, twig settings in config.json);
the imported RPN must score visual tokens exactly as the reference's twig forward does,
written out below in plain torch from the same tensors.
"""

import json
import math
import os
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import sdrpn.rpn.import_reference as importer
from sdrpn.cli import entry, main
from sdrpn.llava.inputs import position_ids_from_mask
from sdrpn.llava.loading import load_llava
from sdrpn.rpn.import_reference import ReferenceCheckpointError, import_reference_checkpoint
from sdrpn.rpn.model import CONFIG_NAME, WEIGHTS_NAME, RegionProposalNetwork
from tiny_llava import IMAGE, random_tokens, save_tiny_llava, teacher_forced_batch

K, T = 1, 3  # the tiny model has 4 decoder layers: the twig copies layers 1, 2, 3
HEADS, HEAD_DIM, EPS, ROPE_THETA = 4, 16, 1e-6, 10000.0
PRESET = {"name": "tiny", "grounding": [[0, 0]], "sink": [[0, None]], "branch_layer": K, "depth": T}
SHARDS = [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny llava-hf folder with multi-head attention (as LLaVA-1.5 has) and its preset."""
    folder = str(tmp_path_factory.mktemp("llava_hf"))
    tiny = save_tiny_llava(folder, num_key_value_heads=HEADS)
    with open(os.path.join(folder, "sdrpn_preset.json"), "w") as f:
        json.dump(PRESET, f)
    return folder, tiny


@pytest.fixture(scope="module")
def model(base):
    return load_llava(base[0], "fp32")[0]


# ---- a checkpoint in the reference's layout ----------------------------------------------------
def reference_tensors(tiny, seed=0) -> dict:
    """Every tensor of an original-LLaVA-layout model with a trained twig: the twig starts as
    copies of layers K .. K+T-1 and the final norm, then moves away from them (as training
    would), so a tensor taken from the wrong place changes the scores."""
    gen = torch.Generator().manual_seed(seed)
    hf = tiny.model.state_dict()
    decoder = tiny.model.get_decoder()
    out = {"model.embed_tokens.weight": hf["model.language_model.embed_tokens.weight"]}
    for i, layer in enumerate(decoder.layers):
        out.update({f"model.layers.{i}.{k}": v for k, v in layer.state_dict().items()})
    out["model.norm.weight"] = hf["model.language_model.norm.weight"]
    out["lm_head.weight"] = hf["lm_head.weight"]
    for i, j in ((1, 0), (2, 2)):
        for part in ("weight", "bias"):
            out[f"model.mm_projector.{j}.{part}"] = hf[f"model.multi_modal_projector.linear_{i}.{part}"]
    out["model.vision_tower.vision_tower.vision_model.embeddings.patch_embedding.weight"] = hf[
        "model.vision_tower.embeddings.patch_embedding.weight"
    ]

    def trained(t):
        return t + 0.2 * t.abs().mean() * torch.randn(t.shape, generator=gen)

    for i in range(T):
        for k, v in decoder.layers[K + i].state_dict().items():
            out[f"model.twig_layers.{i}.{k}"] = trained(v)
    out["model.twig_norm.weight"] = trained(hf["model.language_model.norm.weight"])
    out["twig_head.weight"] = hf["lm_head.weight"]  # an unused copy of lm_head
    return {k: v.detach().to(torch.bfloat16).contiguous() for k, v in out.items()}


def shard_of(key: str) -> str:
    """Twig tensors in shards 2 and 3; shards 1 and 4 hold only backbone (and unused) tensors."""
    if key.startswith("model.twig_layers.0."):
        return SHARDS[1]
    if key.startswith(("model.twig_layers.", "model.twig_norm.")):
        return SHARDS[2]
    return SHARDS[0] if key.startswith(("model.embed_tokens.", "model.layers.")) else SHARDS[3]


def reference_config(**overrides) -> dict:
    config = {
        "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llava_llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": HEADS,
        "num_key_value_heads": HEADS,
        "num_hidden_layers": 4,
        "rms_norm_eps": EPS,
        "rope_theta": ROPE_THETA,
        "image_aspect_ratio": "pad",
        "torch_dtype": "bfloat16",
        "enable_twig": True,
        "twig_K": K,
        "twig_T": T,
        "roi_source": "qk",
        "roi_loss": "bce",
        "roi_super_type": "v1",
        "roi_multi_head": True,
    }
    config.update(overrides)
    return {k: v for k, v in config.items() if v is not None}


def write_reference(folder, tensors, config=None, sharded=True) -> str:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config or reference_config(), f)
    if not sharded:
        save_file(tensors, os.path.join(folder, "model.safetensors"))
        return str(folder)
    weight_map = {k: shard_of(k) for k in tensors}
    for shard in SHARDS:
        save_file({k: v for k, v in tensors.items() if weight_map[k] == shard}, os.path.join(folder, shard))
    index = {"metadata": {"total_size": sum(v.numel() * 2 for v in tensors.values())}, "weight_map": weight_map}
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f)
    return str(folder)


# ---- the reference's twig forward, written out -------------------------------------------------
def rms_norm(x, weight):
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS))


def rope(x, positions):
    """x (heads, L, d): the rotation of Llama's rotary embedding."""
    inv_freq = 1.0 / ROPE_THETA ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM)
    angles = positions[:, None].float() * inv_freq[None]
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    half = HEAD_DIM // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos + rotated * sin


def heads(x):
    return x.view(x.shape[0], HEADS, HEAD_DIM).transpose(0, 1)


def decoder_layer(h, w, prefix):
    """One Llama decoder layer on one unpadded sequence h (L, D), causal attention."""
    length = h.shape[0]
    positions = torch.arange(length)
    x = rms_norm(h, w[prefix + "input_layernorm.weight"])
    q = rope(heads(x @ w[prefix + "self_attn.q_proj.weight"].T), positions)
    k = rope(heads(x @ w[prefix + "self_attn.k_proj.weight"].T), positions)
    v = heads(x @ w[prefix + "self_attn.v_proj.weight"].T)
    scores = q @ k.transpose(1, 2) / math.sqrt(HEAD_DIM)
    scores = scores.masked_fill(torch.ones(length, length, dtype=torch.bool).triu(1), float("-inf"))
    attended = (scores.softmax(-1) @ v).transpose(0, 1).reshape(length, -1)
    h = h + attended @ w[prefix + "self_attn.o_proj.weight"].T
    x = rms_norm(h, w[prefix + "post_attention_layernorm.weight"])
    mlp = F.silu(x @ w[prefix + "mlp.gate_proj.weight"].T) * (x @ w[prefix + "mlp.up_proj.weight"].T)
    return h + mlp @ w[prefix + "mlp.down_proj.weight"].T


def reference_twig_scores(h, visual, w):
    """The reference's twig (roi_source qk, roi_multi_head, roi_super_type v1) on the hidden
    states entering layer twig_K of one unpadded prompt: twig layers 0 .. T-2, twig_norm,
    then the last twig layer's input norm, q of the last token against k of the visual
    tokens, no RoPE, averaged over heads."""
    w = {k: v.float() for k, v in w.items()}
    for i in range(T - 1):
        h = decoder_layer(h, w, f"model.twig_layers.{i}.")
    h = rms_norm(h, w["model.twig_norm.weight"])
    last = f"model.twig_layers.{T - 1}."
    x = rms_norm(h, w[last + "input_layernorm.weight"])
    q = heads(x[-1:] @ w[last + "self_attn.q_proj.weight"].T)
    k = heads(x[visual] @ w[last + "self_attn.k_proj.weight"].T)
    return (q @ k.transpose(1, 2) / math.sqrt(HEAD_DIM)).mean(0)[0]


def prompt_batch(tiny, seed=0):
    gen = torch.Generator().manual_seed(seed)
    questions = [random_tokens(gen, n) for n in (3, 6, 1)]
    return teacher_forced_batch(tiny, questions, [[], [], []], padding="left", seed=seed)


def branch_states(model, batch):
    with torch.no_grad():
        out = model.model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            pixel_values=batch.pixel_values,
            position_ids=position_ids_from_mask(batch.attention_mask),
            output_hidden_states=True,
        )
    return out.hidden_states[K]


def rpn_logits(rpn, model, batch):
    with torch.no_grad():
        return rpn(
            branch_states(model, batch),
            batch.attention_mask,
            position_ids_from_mask(batch.attention_mask),
            batch.input_ids == IMAGE,
        )


# ---- tests -------------------------------------------------------------------------------------
def test_imported_rpn_scores_as_the_reference_twig(base, model, tmp_path):
    folder, tiny = base
    tensors = reference_tensors(tiny)
    src = write_reference(tmp_path / "ref", tensors)
    summary = import_reference_checkpoint(src, model, str(tmp_path / "rpn"))
    assert (summary["branch_layer"], summary["depth"], summary["preset"]) == (K, T, "tiny")

    rpn = RegionProposalNetwork.load(str(tmp_path / "rpn"), model).eval()
    assert (rpn.config.branch_layer, rpn.config.depth, rpn.config.preprocessing) == (K, T, "pad")
    batch = prompt_batch(tiny)
    logits = rpn_logits(rpn, model, batch)
    hidden = branch_states(model, batch)
    for b in range(batch.input_ids.shape[0]):
        real = batch.attention_mask[b].bool()
        want = reference_twig_scores(hidden[b, real], batch.input_ids[b, real] == IMAGE, tensors)
        torch.testing.assert_close(logits[b], want, rtol=1e-4, atol=1e-4)
    # The twig moved away from the backbone: an RPN copied from it scores differently.
    untrained = RegionProposalNetwork.from_llava(model, K, T).eval()
    assert not torch.allclose(rpn_logits(untrained, model, batch), logits, atol=1e-2)


def test_weights_are_copied_bit_for_bit_in_their_dtype(base, model, tmp_path):
    tensors = reference_tensors(base[1])
    import_reference_checkpoint(write_reference(tmp_path / "ref", tensors), model, str(tmp_path / "rpn"))
    saved = load_file(str(tmp_path / "rpn" / WEIGHTS_NAME))
    assert len(saved) == 9 * (T - 1) + 4
    for key, value in saved.items():
        assert value.dtype == torch.bfloat16
        assert torch.equal(value, tensors[importer.reference_key(key, T)]), key
    assert torch.equal(saved["head_norm.weight"], tensors["model.twig_layers.2.input_layernorm.weight"])
    assert torch.equal(saved["q_proj.weight"], tensors["model.twig_layers.2.self_attn.q_proj.weight"])
    assert torch.equal(saved["norm.weight"], tensors["model.twig_norm.weight"])


def test_one_unsharded_file_imports_the_same(base, model, tmp_path):
    tensors = reference_tensors(base[1])
    import_reference_checkpoint(write_reference(tmp_path / "a", tensors), model, str(tmp_path / "rpn_a"))
    import_reference_checkpoint(write_reference(tmp_path / "b", tensors, sharded=False), model, str(tmp_path / "rpn_b"))
    a, b = (load_file(str(tmp_path / d / WEIGHTS_NAME)) for d in ("rpn_a", "rpn_b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_only_the_shards_holding_twig_tensors_are_opened(base, model, tmp_path, monkeypatch):
    src = write_reference(tmp_path / "ref", reference_tensors(base[1]))
    for shard in (SHARDS[0], SHARDS[3]):  # unreadable as safetensors: opening one would fail
        with open(os.path.join(src, shard), "wb") as f:
            f.write(b"\xff" * 64)
    opened = []
    real_safe_open = importer.safe_open

    def recording_safe_open(path, *args, **kwargs):
        opened.append(os.path.basename(path))
        return real_safe_open(path, *args, **kwargs)

    monkeypatch.setattr(importer, "safe_open", recording_safe_open)
    summary = import_reference_checkpoint(src, model, str(tmp_path / "rpn"))
    assert sorted(opened) == sorted(summary["files_read"]) == [SHARDS[1], SHARDS[2]]


def test_a_mismatched_shape_is_named(base, model, tmp_path):
    tensors = reference_tensors(base[1])
    tensors["model.twig_layers.1.mlp.up_proj.weight"] = tensors["model.twig_layers.1.mlp.up_proj.weight"][:127]
    src = write_reference(tmp_path / "ref", tensors)
    with pytest.raises(ReferenceCheckpointError, match=r"twig_layers\.1\.mlp\.up_proj\.weight: expected shape "):
        import_reference_checkpoint(src, model, str(tmp_path / "rpn"))
    try:
        import_reference_checkpoint(src, model, str(tmp_path / "rpn"))
    except ReferenceCheckpointError as err:
        assert "expected shape (128, 64), found (127, 64)" in str(err)
    assert not os.path.exists(tmp_path / "rpn")


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"roi_source": "hidden_states"}, r"roi_source must be 'qk', found 'hidden_states'"),
        ({"roi_multi_head": False}, r"roi_multi_head must be True, found False"),
        ({"roi_multi_head": None}, r"roi_multi_head is missing, expected True"),
        ({"roi_super_type": "lazy"}, r"roi_super_type must be 'v1', found 'lazy'"),
        ({"roi_loss": "mse"}, r"roi_loss must be 'bce', found 'mse'"),
        ({"enable_twig": None}, r"enable_twig is missing"),
        ({"twig_K": 2}, r"twig_K=2, twig_T=3 do not fit the target model"),
        ({"twig_T": "3"}, r"twig_T must be an integer, found '3'"),
        ({"twig_T": 2}, r"twig_K=1, twig_T=2, but preset 'tiny' .* expects branch_layer=1, depth=3"),
        ({"num_attention_heads": 8}, r"num_attention_heads is 8, but the target model has num_attention_heads=4"),
        ({"intermediate_size": None}, r"intermediate_size missing, but the target model has intermediate_size=128"),
        ({"rms_norm_eps": 1e-5}, r"rms_norm_eps is 1e-05, but the target model has rms_norm_eps=1e-06"),
        ({"image_aspect_ratio": "anyres"}, r"image_aspect_ratio 'anyres'"),
    ],
)
def test_a_wrong_setting_is_named(base, model, tmp_path, overrides, message):
    src = write_reference(tmp_path / "ref", reference_tensors(base[1]), reference_config(**overrides))
    with pytest.raises(ReferenceCheckpointError, match=message):
        import_reference_checkpoint(src, model, str(tmp_path / "rpn"))


def test_twig_layers_must_agree_with_twig_T(base, model, tmp_path):
    tensors = reference_tensors(base[1])
    tensors["model.twig_layers.3.input_layernorm.weight"] = tensors["model.twig_norm.weight"].clone()
    src = write_reference(tmp_path / "ref", tensors)
    with pytest.raises(ReferenceCheckpointError, match=r"twig_T=3, expected twig layers \[0, 1, 2\], found .*3\]"):
        import_reference_checkpoint(src, model, str(tmp_path / "rpn"))


def test_an_index_pointing_outside_the_folder_is_refused(base, model, tmp_path):
    src = write_reference(tmp_path / "ref", reference_tensors(base[1]))
    path = os.path.join(src, "model.safetensors.index.json")
    with open(path) as f:
        index = json.load(f)
    index["weight_map"]["model.twig_norm.weight"] = "../elsewhere.safetensors"
    with open(path, "w") as f:
        json.dump(index, f)
    with pytest.raises(ReferenceCheckpointError, match=r"not a file name in the folder"):
        import_reference_checkpoint(src, model, str(tmp_path / "rpn"))


def test_broken_index_config_and_shards_are_named(base, model, tmp_path):
    # Each had been a traceback (an AttributeError) or a message without the file's name.
    src = write_reference(tmp_path / "ref", reference_tensors(base[1]))
    index = os.path.join(src, "model.safetensors.index.json")
    good = open(index).read()
    with open(index, "w") as f:
        json.dump({"weight_map": [1]}, f)
    with pytest.raises(ReferenceCheckpointError, match=r"index.json: weight_map must map names to files, got list"):
        import_reference_checkpoint(src, model, str(tmp_path / "rpn"))
    with open(index, "wb") as f:
        f.write(b'{"weight_map": "\xe9"}')
    with pytest.raises(ReferenceCheckpointError, match=r"index.json is not valid JSON: 'utf-8' codec"):
        import_reference_checkpoint(src, model, str(tmp_path / "rpn"))
    with open(index, "w") as f:
        f.write("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ReferenceCheckpointError, match=r"index.json is not valid JSON: maximum recursion depth"):
        import_reference_checkpoint(src, model, str(tmp_path / "rpn"))
    with open(index, "w") as f:
        f.write(good)
    shard = os.path.join(src, SHARDS[2])
    with open(shard, "r+b") as f:
        f.truncate(100)
    with pytest.raises(ReferenceCheckpointError, match=rf"{re.escape(shard)} cannot be read as safetensors"):
        import_reference_checkpoint(src, model, str(tmp_path / "rpn"))
    with pytest.raises(ReferenceCheckpointError, match=r"config.json is not a folder: give the reference"):
        import_reference_checkpoint(os.path.join(src, "config.json"), model, str(tmp_path / "rpn"))
    # A folder of another kind (a base model, an sdrpn RPN) is named as not a reference checkpoint.
    other = tmp_path / "base"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llava", "hidden_size": 64}))
    with pytest.raises(
        ReferenceCheckpointError, match=rf"{re.escape(str(other))} is not a reference SD-RPN checkpoint"
    ):
        import_reference_checkpoint(str(other), model, str(tmp_path / "rpn"))
    assert not os.path.exists(tmp_path / "rpn")


class Payload:
    """An object only a full unpickler would rebuild (and could run code through)."""


def write_pickle_reference(folder, state) -> str:
    os.makedirs(folder)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(reference_config(), f)
    torch.save(state, os.path.join(folder, "pytorch_model.bin"))
    return str(folder)


def test_a_pickle_needing_more_than_weights_only_is_refused(base, model, tmp_path):
    state = {**reference_tensors(base[1]), "extra": Payload()}
    src = write_pickle_reference(tmp_path / "ref", state)
    with pytest.raises(ReferenceCheckpointError, match=r"refusing .*pytorch_model\.bin.*weights_only=True"):
        import_reference_checkpoint(src, model, str(tmp_path / "rpn"))
    assert not os.path.exists(tmp_path / "rpn")


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_a_weights_only_pickle_is_imported(base, model, tmp_path, zip_format):
    # The legacy format (torch.save before 1.6) cannot be memory-mapped: mmap=True raised.
    tensors = reference_tensors(base[1])
    src = write_pickle_reference(tmp_path / "ref", tensors)
    torch.save(tensors, os.path.join(src, "pytorch_model.bin"), _use_new_zipfile_serialization=zip_format)
    import_reference_checkpoint(src, model, str(tmp_path / "rpn"))
    saved = load_file(str(tmp_path / "rpn" / WEIGHTS_NAME))
    assert all(torch.equal(v, tensors[importer.reference_key(k, T)]) for k, v in saved.items())


def test_a_pickle_cut_short_or_of_another_kind_is_named(base, model, tmp_path):
    # Each fails somewhere else in torch's reader (RuntimeError, IndexError, struct.error,
    # KeyError): one line naming the file, never a traceback.
    tensors = reference_tensors(base[1])
    src = write_pickle_reference(tmp_path / "ref", tensors)
    path = os.path.join(src, "pytorch_model.bin")
    unreadable = "pytorch_model.bin cannot be read as a torch weights file"
    for zip_format, cut in ((True, 300), (False, 30), (False, 1000)):
        torch.save(tensors, path, _use_new_zipfile_serialization=zip_format)
        with open(path, "rb") as f:
            head = f.read(cut)
        with open(path, "wb") as f:
            f.write(head)
        with pytest.raises(ReferenceCheckpointError, match=unreadable):
            import_reference_checkpoint(src, model, str(tmp_path / "rpn"))
    with open(path, "w") as f:
        f.write("hello\n")
    with pytest.raises(ReferenceCheckpointError, match=unreadable):
        import_reference_checkpoint(src, model, str(tmp_path / "rpn"))
    torch.save({1: torch.zeros(1)}, path)
    with pytest.raises(ReferenceCheckpointError, match="must hold a dict of tensors by name"):
        import_reference_checkpoint(src, model, str(tmp_path / "rpn"))


def test_cli_end_to_end(base, model, tmp_path, capsys):
    folder, tiny = base
    src = write_reference(tmp_path / "ref", reference_tensors(tiny))
    out = str(tmp_path / "rpn")
    assert main(["import-checkpoint", src, "--model", folder, "--out", out]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["files_read"] == [SHARDS[1], SHARDS[2]] and summary["tensors"] == 9 * (T - 1) + 4
    assert {WEIGHTS_NAME, CONFIG_NAME} <= set(os.listdir(out))
    with open(os.path.join(out, CONFIG_NAME)) as f:
        recorded = json.load(f)
    assert (recorded["branch_layer"], recorded["depth"], recorded["preset"]) == (K, T, "tiny")
    assert recorded["base_model"] == folder and recorded["grid"] == [tiny.grid, tiny.grid]
    # Loaded in bf16 for the import, the folder still loads onto (and fits) the fp32 model.
    rpn = RegionProposalNetwork.load(out, model)
    assert rpn_logits(rpn, model, prompt_batch(tiny)).shape == (3, tiny.num_cells)

    with pytest.raises(OSError, match=r"exists and is not an empty folder"):
        main(["import-checkpoint", src, "--model", folder, "--out", out])
    bad = write_reference(tmp_path / "bad", reference_tensors(tiny), reference_config(roi_source="hidden_states"))
    # Through the command: one line naming the setting, exit status 2.
    assert entry(["import-checkpoint", bad, "--model", folder, "--out", str(tmp_path / "rpn2")]) == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]  # after transformers' loading bar
    assert re.match(r"sdrpn import-checkpoint: error: .*roi_source must be 'qk'", last_line)
    assert not os.path.exists(tmp_path / "rpn2")


def test_an_empty_out_folder_is_filled(base, model, tmp_path):
    os.makedirs(tmp_path / "rpn")
    src = write_reference(tmp_path / "ref", reference_tensors(base[1]))
    import_reference_checkpoint(src, model, str(tmp_path / "rpn"))
    assert {WEIGHTS_NAME, CONFIG_NAME} <= set(os.listdir(tmp_path / "rpn"))
    assert not os.path.exists(str(tmp_path / "rpn") + ".tmp")
