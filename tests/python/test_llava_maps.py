import dataclasses
import json
import os
import re
import weakref

import numpy as np
import pytest
import torch

import sdrpn
from sdrpn.llava import AttentionProbe, HeadSelection, LlavaPreset, attention_maps, get_preset, probe_once
from sdrpn.llava import maps as maps_module
from sdrpn.llava.decode import prefill
from sdrpn.llava.inputs import left_pad, position_ids_from_mask
from sdrpn.llava.maps import answer_queries, attention_maps_on_cache, given_answer_maps, head_maps, image_columns
from tiny_llava import EOS, IMAGE, PAD, make_tiny_llava, prompt_ids, random_tokens, row_slice, teacher_forced_batch

PRESET = LlavaPreset("tiny", grounding=HeadSelection(((2, 1), (2, 3), (1, 0))), sink=HeadSelection(((0, None),)))


@pytest.fixture(scope="module")
def tiny():
    return make_tiny_llava()


def sample_batch(tiny, padding="left", answer_lengths=(5, 1, 3), seed=0):
    gen = torch.Generator().manual_seed(seed)
    questions = [random_tokens(gen, n) for n in (4, 7, 2)][: len(answer_lengths)]
    answers = [random_tokens(gen, n - 1) + [EOS] for n in answer_lengths]
    return teacher_forced_batch(tiny, questions, answers, padding=padding, seed=seed)


def eager_attentions(tiny, batch):
    model = tiny.model
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                pixel_values=batch.pixel_values,
                output_attentions=True,
                position_ids=position_ids_from_mask(batch.attention_mask),
            )
    finally:
        model.set_attn_implementation("sdpa")
    return out.attentions


@pytest.mark.parametrize("padding", ["left", "right"])
def test_attention_rows_equal_eager_output_attentions(tiny, padding):
    batch = sample_batch(tiny, padding)
    attentions = eager_attentions(tiny, batch)
    n = tiny.num_cells
    start = image_columns(batch.input_ids, 3, n)
    positions, _ = answer_queries(batch.answer_start, batch.answer_length)
    captured = probe_once(
        tiny.model,
        [0, 1, 2, 3],
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        pixel_values=batch.pixel_values,
        position_ids=position_ids_from_mask(batch.attention_mask),
    )
    for layer in range(4):
        q, k = captured[layer]
        idx = positions[:, None, :, None].expand(-1, q.shape[1], -1, q.shape[-1])
        rows = sdrpn.ops.attention_rows(
            q.gather(2, idx), k, positions, start, n, key_padding_mask=batch.attention_mask.bool()
        )
        for b in range(batch.input_ids.shape[0]):
            s = int(start[b])
            want = attentions[layer][b][:, positions[b], s : s + n]
            torch.testing.assert_close(rows[b], want, rtol=1e-5, atol=1e-5)


def test_probe_leaves_logits_unchanged(tiny):
    batch = sample_batch(tiny)
    kwargs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixel_values)
    with torch.no_grad():
        plain = tiny.model(**kwargs).logits
        with AttentionProbe(tiny.model, [1, 2]) as probe:
            probed = tiny.model(**kwargs).logits
    assert torch.equal(plain, probed)
    assert sorted(probe.captured) == [1, 2]
    assert tiny.model.get_decoder().config._attn_implementation == "sdpa"


def test_probe_once_stops_at_the_deepest_probed_query_and_key(tiny):
    """probe_once keeps the same q and k as a whole forward, and never runs the deepest
    probed layer's MLP (nor anything after it)."""
    batch = sample_batch(tiny)
    kwargs = dict(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        pixel_values=batch.pixel_values,
        position_ids=position_ids_from_mask(batch.attention_mask),
    )
    with torch.no_grad(), AttentionProbe(tiny.model, [1, 2]) as probe:
        tiny.model(**kwargs)
    layers = tiny.model.get_decoder().layers
    ran = []
    hooks = [layers[i].mlp.register_forward_hook(lambda *_, i=i: ran.append(i)) for i in range(len(layers))]
    try:
        captured = probe_once(tiny.model, [1, 2], **kwargs)
    finally:
        for h in hooks:
            h.remove()
    assert ran == [0, 1]
    for layer in (1, 2):
        for got, want in zip(captured[layer], probe.captured[layer]):
            torch.testing.assert_close(got, want)
    assert tiny.model.get_decoder().config._attn_implementation == "sdpa"
    assert tiny.model.get_decoder().config.num_hidden_layers == len(layers)


def _probe_inputs(batch):
    return dict(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        pixel_values=batch.pixel_values,
        position_ids=position_ids_from_mask(batch.attention_mask),
    )


def test_a_reducing_probe_holds_no_probed_layers_query_or_key(tiny):
    """With ``reduce`` the probe keeps what it returns, not the layer's q and k: by the time
    the deepest probed layer runs, the first one's are freed. Without, it keeps (q, k)."""
    alive_at_deepest = []
    refs = {}

    def keep(layer, query, key):
        refs[layer] = weakref.ref(query), weakref.ref(key)
        if layer == 2:
            alive_at_deepest.extend(ref() is not None for ref in refs[0])
        return query.sum()

    inputs = _probe_inputs(sample_batch(tiny))
    with torch.no_grad(), AttentionProbe(tiny.model, [0, 2], reduce=keep) as probe:
        tiny.model(**inputs)
    assert alive_at_deepest == [False, False] and probe.captured[0].dim() == 0
    with torch.no_grad(), AttentionProbe(tiny.model, [0, 2]) as probe:
        tiny.model(**inputs)
    assert [t.dim() for t in probe.captured[0]] == [4, 4]
    assert probe_once(tiny.model, [], **inputs) == {}  # nothing probed: the whole forward, nothing kept


def test_a_batch_beyond_the_pass_tokens_runs_in_slices_with_the_same_maps(tiny, monkeypatch):
    """A batch of more than PASS_TOKENS tokens runs in as few slices of whole samples as fit,
    as even as can be: the same maps and per-head maps as in one forward, no forward of more
    samples than fit, and a bad sample in a later slice named by its place in the batch
    before any slice runs."""
    batch = sample_batch(tiny)
    more = sample_batch(tiny, seed=1)  # the same lengths, so the same width
    five = type(batch)(
        *(torch.cat([getattr(batch, f.name), getattr(more, f.name)[:2]]) for f in dataclasses.fields(batch))
    )
    whole, whole_five = (attention_maps(tiny.model, b, PRESET, tiny.num_cells) for b in (batch, five))
    whole_heads = head_maps(tiny.model, batch, tiny.num_cells)
    width = batch.input_ids.shape[1]
    seen = []
    record = lambda _module, _args, kwargs: seen.append(kwargs["input_ids"].shape[0])  # noqa: E731
    hook = tiny.model.model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        monkeypatch.setattr(maps_module, "PASS_TOKENS", 4 * width + 1)  # four samples a forward
        sliced_five = attention_maps(tiny.model, five, PRESET, tiny.num_cells)
        assert seen == [2, 3]  # not 4 + 1
        seen.clear()
        monkeypatch.setattr(maps_module, "PASS_TOKENS", 2 * width + 1)  # two samples a forward
        sliced = attention_maps(tiny.model, batch, PRESET, tiny.num_cells)
        assert seen == [1, 2]
        torch.testing.assert_close(head_maps(tiny.model, batch, tiny.num_cells), whole_heads)
        seen.clear()
        monkeypatch.setattr(maps_module, "PASS_TOKENS", width + 1)  # a sample wider than half a pass runs alone
        torch.testing.assert_close(attention_maps(tiny.model, batch, PRESET, tiny.num_cells).grounding, whole.grounding)
        assert seen == [1, 1, 1]
        seen.clear()
        bad = dataclasses.replace(batch, answer_length=batch.answer_length.clone())
        bad.answer_length[2] = width
        with pytest.raises(ValueError, match=r"answer_start\[2\] = \d+ and answer_length\[2\] = "):
            attention_maps(tiny.model, bad, PRESET, tiny.num_cells)
        assert seen == []
        empty = dataclasses.replace(batch, **{f.name: getattr(batch, f.name)[:0] for f in dataclasses.fields(batch)})
        with pytest.raises(ValueError, match="the teacher-forced batch must hold at least one sample, got 0"):
            attention_maps(tiny.model, empty, PRESET, tiny.num_cells)
    finally:
        hook.remove()
    for field in ("grounding", "sink", "image_start"):
        torch.testing.assert_close(getattr(sliced, field), getattr(whole, field))
        torch.testing.assert_close(getattr(sliced_five, field), getattr(whole_five, field))


def test_maps_match_a_hand_average_of_eager_attention(tiny):
    batch = sample_batch(tiny, "left")
    maps = attention_maps(tiny.model, batch, PRESET, tiny.num_cells)
    attentions = eager_attentions(tiny, batch)
    n = tiny.num_cells
    positions, valid = answer_queries(batch.answer_start, batch.answer_length)
    for b in range(3):
        pos = positions[b][valid[b]]
        s = int(maps.image_start[b])
        g = torch.stack(
            [attentions[layer][b, head][pos, s : s + n].mean(0) for layer, head in ((2, 1), (2, 3), (1, 0))]
        ).mean(0)
        sink = attentions[0][b][:, pos, s : s + n].mean((0, 1))
        torch.testing.assert_close(maps.grounding[b], g, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(maps.sink[b], sink, rtol=1e-5, atol=1e-6)


def test_batch_with_padding_equals_one_sample_at_a_time(tiny):
    for padding in ("left", "right"):
        batch = sample_batch(tiny, padding, seed=3)
        maps = attention_maps(tiny.model, batch, PRESET, tiny.num_cells)
        for b in range(3):
            alone = attention_maps(tiny.model, row_slice(batch, b), PRESET, tiny.num_cells)
            torch.testing.assert_close(maps.grounding[b], alone.grounding[0], rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(maps.sink[b], alone.sink[0], rtol=1e-4, atol=1e-6)


def test_self_generated_answer_maps_equal_step_by_step_generate(tiny):
    # The reference reads output_attentions while decoding: the rows of each fed-back
    # answer token a_0 .. a_{n-2}. One teacher-forced pass must give the same maps.
    gen = torch.Generator().manual_seed(11)
    question = random_tokens(gen, 5)
    prompt = torch.tensor([prompt_ids(tiny.num_cells, question)])
    pixels = torch.randn(1, 3, tiny.image_size, tiny.image_size, generator=gen)
    model = tiny.model
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model.generate(
                input_ids=prompt,
                pixel_values=pixels,
                max_new_tokens=6,
                min_new_tokens=6,
                do_sample=False,
                output_attentions=True,
                return_dict_in_generate=True,
            )
    finally:
        model.set_attn_implementation("sdpa")
    answer = out.sequences[0, prompt.shape[1] :]
    s, n = 2, tiny.num_cells
    steps = out.attentions[1 : len(answer)]  # decoding steps fed a_0 .. a_{n-2}
    g = torch.stack(
        [
            torch.stack([step[layer][0, head, -1, s : s + n] for step in steps]).mean(0)
            for layer, head in ((2, 1), (2, 3), (1, 0))
        ]
    ).mean(0)
    batch = sdrpn.llava.TeacherForcedBatch(
        torch.cat([prompt[0], answer])[None],
        torch.ones(1, prompt.shape[1] + len(answer), dtype=torch.long),
        pixels,
        torch.tensor([prompt.shape[1]]),
        torch.tensor([len(answer)]),
    )
    maps = attention_maps(model, batch, PRESET, n)
    torch.testing.assert_close(maps.grounding[0], g, rtol=1e-4, atol=1e-6)


def test_maps_on_the_prompt_cache_equal_the_whole_sequence_pass(tiny):
    """The label job's self answers: the maps from [last prompt token, answer] on top of the
    prompt's cache equal one pass over [prompt, answer], for answers of 1 to 5 tokens."""
    gen = torch.Generator().manual_seed(5)
    prompts = [prompt_ids(tiny.num_cells, random_tokens(gen, n)) for n in (4, 7, 2, 3)]
    answers = [random_tokens(gen, n - 1) + [EOS] for n in (5, 1, 3, 2)]
    pixels = torch.randn(4, 3, tiny.image_size, tiny.image_size, generator=gen)
    ids, mask = left_pad(prompts, PAD)
    cache, _, _, _ = prefill(tiny.model, ids, mask, pixels)
    with pytest.raises(ValueError, match="need one non-empty answer per prompt, got lengths \\[5, 0, 3, 2\\]"):
        attention_maps_on_cache(tiny.model, cache, ids, mask, [answers[0], [], *answers[2:]], PRESET, 16, PAD)
    got = attention_maps_on_cache(tiny.model, cache, ids, mask, answers, PRESET, tiny.num_cells, PAD)
    want = given_answer_maps(tiny.model, prompts, answers, pixels, PRESET, tiny.num_cells, PAD)
    torch.testing.assert_close(got.grounding, want.grounding, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got.sink, want.sink, rtol=1e-4, atol=1e-6)
    assert cache.get_seq_length() == ids.shape[1] - 1 + 5  # cut to W - 1, then the longest answer
    again = attention_maps_on_cache(tiny.model, cache, ids, mask, answers, PRESET, tiny.num_cells, PAD)
    torch.testing.assert_close(again.grounding, got.grounding)  # a spent cache is cut back to W - 1 again
    cache.crop(-6)
    with pytest.raises(ValueError, match="cache layer 0 holds 24 slots, fewer than the prompts' 26"):
        attention_maps_on_cache(tiny.model, cache, ids, mask, answers, PRESET, tiny.num_cells, PAD)


def test_given_answer_maps_equal_a_right_padded_batch(tiny):
    """The label job's given answers: left-padded [prompt, answer] from token lists gives
    the maps of the same samples padded on the right."""
    gen = torch.Generator().manual_seed(6)
    questions = [random_tokens(gen, n) for n in (3, 6, 1)]
    answers = [random_tokens(gen, n) + [EOS] for n in (2, 0, 4)]
    batch = teacher_forced_batch(tiny, questions, answers, padding="right", seed=6)
    want = attention_maps(tiny.model, batch, PRESET, tiny.num_cells)
    prompts = [prompt_ids(tiny.num_cells, q) for q in questions]
    got = given_answer_maps(tiny.model, prompts, answers, batch.pixel_values, PRESET, tiny.num_cells, PAD)
    torch.testing.assert_close(got.grounding, want.grounding, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got.sink, want.sink, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match=r"prompts \(3\), answers \(2\) and pixels \(3\)"):
        given_answer_maps(tiny.model, prompts, answers[:2], batch.pixel_values, PRESET, tiny.num_cells, PAD)
    with pytest.raises(ValueError, match="answers: every answer needs at least one token"):
        given_answer_maps(tiny.model, prompts, [[], *answers[1:]], batch.pixel_values, PRESET, tiny.num_cells, PAD)
    vocab = tiny.model.get_input_embeddings().num_embeddings
    not_ids = rf"holds token ids that are not ints in \[0, {vocab}\)"
    with pytest.raises(ValueError, match=rf"answers\[1\] {not_ids}: \[{vocab}\]"):
        given_answer_maps(tiny.model, prompts, [answers[0], [vocab], answers[2]], batch.pixel_values, PRESET,
                          tiny.num_cells, PAD)  # fmt: skip
    with pytest.raises(ValueError, match=rf"prompts\[0\] {not_ids}: \[tensor\("):
        given_answer_maps(tiny.model, [torch.tensor(prompts[0]), *prompts[1:]], answers, batch.pixel_values, PRESET,
                          tiny.num_cells, PAD)  # fmt: skip
    with pytest.raises(ValueError, match=r"answers\[2\] holds the image token \(id 3\): only the prompt may"):
        given_answer_maps(tiny.model, prompts, [*answers[:2], [5, IMAGE, 2]], batch.pixel_values, PRESET,
                          tiny.num_cells, PAD)  # fmt: skip
    with pytest.raises(ValueError, match="pixels must be a \\(B, 3, S, S\\) tensor, got list"):
        given_answer_maps(tiny.model, prompts, answers, list(batch.pixel_values), PRESET, tiny.num_cells, PAD)
    with pytest.raises(ValueError, match=rf"pad_id must be a token id in \[0, {vocab}\), got None"):
        given_answer_maps(tiny.model, prompts, answers, batch.pixel_values, PRESET, tiny.num_cells, None)


def test_answer_queries():
    positions, valid = answer_queries(torch.tensor([10, 7, 4]), torch.tensor([4, 1, 2]))
    assert positions.tolist() == [[10, 11, 12], [6, 6, 6], [4, 4, 4]]
    assert valid.tolist() == [[True, True, True], [True, False, False], [True, False, False]]


def test_a_teacher_forced_batch_of_wrong_shapes_is_refused_naming_the_field(tiny):
    batch = sample_batch(tiny)
    fields = dict(vars(batch))
    cases = [
        (dict(input_ids=batch.input_ids[0]), r"input_ids must be \(B, L\), got shape \[\d+\]"),
        (dict(attention_mask=batch.attention_mask[:2]), r"attention_mask must be 2-D with the batch's 3 rows"),
        (dict(attention_mask=batch.attention_mask[:, 1:]), r"attention_mask must match input_ids' shape"),
        (dict(pixel_values=batch.pixel_values[0]), r"pixel_values must be 4-D with the batch's 3 rows"),
        (dict(answer_start=batch.answer_start[None]), r"answer_start must be 1-D with the batch's 3 rows"),
        (dict(answer_length=batch.answer_length.float()), r"answer_length must hold integers, got torch.float32"),
    ]
    for change, message in cases:
        with pytest.raises(ValueError, match=message):
            sdrpn.llava.TeacherForcedBatch(**{**fields, **change})


def _edited(batch, **fields):
    """The batch with some fields replaced (tensors are cloned first, then edited in place by
    the callables given)."""
    values = {k: v.clone() for k, v in vars(batch).items()}
    for name, edit in fields.items():
        edit(values[name])
    return sdrpn.llava.TeacherForcedBatch(**values)


def _set(i, value):
    def edit(t):
        t[i] = value

    return edit


def test_answers_outside_the_sequence_or_on_padding_are_refused_before_the_model_runs(tiny):
    left = sample_batch(tiny)  # rows 1 and 2 are left-padded: [pad, BOS, a token, the image, question, answer]
    right = sample_batch(tiny, padding="right")
    width = left.input_ids.shape[1]
    starts, lengths = left.answer_start.tolist(), left.answer_length.tolist()
    pad = width - int(left.attention_mask[2].sum())
    image_end_2 = pad + 2 + tiny.num_cells
    at = "answer_start\\[{i}\\] = {s} and answer_length\\[{i}\\] = {n}"
    inside = " must place a non-empty answer after the first token, inside the sequence's {L} tokens"
    on_padding = ": the answer's tokens and its first query .* must be real tokens .* which end at position {e}"
    cases = [
        (_edited(left, answer_length=_set(1, 0)), (at + inside).format(i=1, s=starts[1], n=0, L=width)),
        (_edited(left, answer_start=_set(2, 0)), (at + inside).format(i=2, s=0, n=lengths[2], L=width)),
        (_edited(left, answer_start=_set(1, -4)), (at + inside).format(i=1, s=-4, n=lengths[1], L=width)),
        (
            _edited(left, answer_length=_set(0, width - starts[0] + 1)),
            (at + inside).format(i=0, s=starts[0], n=width - starts[0] + 1, L=width),
        ),
        # counted on the unpadded prompt: the queries land on image tokens
        (
            _edited(left, answer_start=_set(2, starts[2] - pad)),
            (at + on_padding).format(i=2, s=starts[2] - pad, n=lengths[2], e=image_end_2),
        ),
        # inside the left padding
        (_edited(left, answer_start=_set(2, 1)), (at + on_padding).format(i=2, s=1, n=lengths[2], e=image_end_2)),
        # a right-padded answer running into the padding
        (
            _edited(right, answer_length=_set(2, lengths[2] + 2)),
            (at + on_padding).format(i=2, s=int(right.answer_start[2]), n=lengths[2] + 2, e=".*"),
        ),
        (
            _edited(right, answer_length=_set(2, lengths[2] + 1)),  # by one token
            (at + on_padding).format(i=2, s=int(right.answer_start[2]), n=lengths[2] + 1, e=".*"),
        ),
        # a one-token answer right after the image: its query, the token before it, is an image token
        (
            _edited(left, answer_start=_set(2, image_end_2), answer_length=_set(2, 1)),
            (at + on_padding).format(i=2, s=image_end_2, n=1, e=image_end_2),
        ),
        (_edited(left, attention_mask=lambda m: m[2].zero_()), "answer_start\\[2\\] .* must be real tokens"),
        (_edited(left, attention_mask=lambda m: m[0].mul_(2)), "attention_mask\\[0\\] must hold only 0s and 1s"),
        (_edited(left, input_ids=_set((2, -2), 64)), "input_ids\\[2\\] holds token ids outside \\[0, 64\\)"),
    ]
    for bad, message in cases:
        with pytest.raises(ValueError, match=message):
            attention_maps(tiny.model, bad, PRESET, tiny.num_cells)
    # Two tokens there are one query, the first of them: taken.
    attention_maps(tiny.model, _edited(left, answer_start=_set(2, image_end_2), answer_length=_set(2, 2)), PRESET, 16)
    for cells in (float(tiny.num_cells), 0):
        with pytest.raises(ValueError, match=f"num_cells must be an int >= 1, got {cells}"):
            attention_maps(tiny.model, left, PRESET, cells)
    with pytest.raises(ValueError, match="input_ids must hold integers, got torch.float32"):
        sdrpn.llava.TeacherForcedBatch(**{**vars(left), "input_ids": left.input_ids.float()})
    # A boolean mask is a mask of 0s and 1s.
    as_bool = sdrpn.llava.TeacherForcedBatch(**{**vars(left), "attention_mask": left.attention_mask.bool()})
    torch.testing.assert_close(
        attention_maps(tiny.model, as_bool, PRESET, tiny.num_cells).grounding,
        attention_maps(tiny.model, left, PRESET, tiny.num_cells).grounding,
    )


def test_image_columns_errors():
    ids = torch.tensor([[1, 3, 3, 3, 3, 5], [1, 3, 3, 5, 3, 3]])
    assert image_columns(ids[:1], 3, 4).tolist() == [1]
    with pytest.raises(ValueError, match="image tokens of a sample must be contiguous"):
        image_columns(ids, 3, 4)
    with pytest.raises(ValueError, match=r"grid_h \* grid_w = 6 image tokens"):
        image_columns(ids, 3, 6)


def test_presets_and_head_selection():
    p7 = get_preset("llava15-7b")
    assert p7.grounding.heads_of(14, 32) == [13, 24, 26]
    assert p7.sink.heads_of(2, 32) == list(range(32))
    assert p7.probed_layers == (2, 14)
    assert get_preset("llava15-13b").grounding.count(40) == 7
    with pytest.raises(ValueError, match=r"preset must be one of \[.*\] or a JSON file, got 'llava-2'"):
        get_preset("llava-2")
    with pytest.raises(ValueError, match=r"preset must be one of \[.*\] or a JSON file, got 'auto'"):
        get_preset("auto")  # resolve_preset's: the refusal listed it as valid
    for path in ("/no/such/preset.json", "mine.json", os.path.join("presets", "mine")):  # meant as files
        with pytest.raises(ValueError, match=f"preset file {re.escape(path)}: no such file"):
            get_preset(path)
    with pytest.raises(ValueError, match=r"preset file \.: is a folder \(name a preset's JSON file\)"):
        get_preset(".")
    with pytest.raises(TypeError, match="preset must be a name or a JSON file's path, got NoneType"):
        get_preset(None)
    with pytest.raises(ValueError, match="head 40 of layer 13 does not exist"):
        HeadSelection(((13, 40),)).heads_of(13, 40)
    with pytest.raises(ValueError, match="layers must lie in"):
        AttentionProbe(make_tiny_llava(num_layers=3).model, [3])


def test_a_models_own_preset_is_its_folders_file_else_llava15s_of_its_depth(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from sdrpn.llava.presets import LLAVA15_7B, PRESET_FILE, model_preset, resolve_preset

    def model(name, layers=32):
        text = SimpleNamespace(num_hidden_layers=layers)
        return SimpleNamespace(config=SimpleNamespace(_name_or_path=name, get_text_config=lambda: text))

    stray = {"name": "stray", "grounding": [[1, 0]], "sink": [[0, None]], "branch_layer": 1, "depth": 2}
    (tmp_path / PRESET_FILE).write_text(json.dumps(stray))
    monkeypatch.chdir(tmp_path)  # a preset file in the working directory is no model's
    for name in ("", None, "llava-hf/llava-1.5-7b-hf"):
        assert model_preset(model(name)) is LLAVA15_7B
    assert model_preset(model(str(tmp_path))).name == "stray"  # the model's own folder
    assert model_preset(model("", layers=5)) is None
    with pytest.raises(ValueError, match=r"preset must be one of \[.*\], 'auto' or a JSON file, got 'no-such'"):
        resolve_preset("no-such", model(""))


def test_presets_built_in_python_check_their_fields():
    # Each was a silent cut (head 1.5 read head 1) or an error from deep inside.
    pair_message = r"a head selection's pairs must be \(int layer, int head or None\), got "
    for pairs, got in (
        (((1, 1.5),), r"\(1, 1.5\)"),
        (((1.0, 1),), r"\(1.0, 1\)"),
        ((("1", 0),), r"\('1', 0\)"),
        (((1, 0, 2),), r"\(1, 0, 2\)"),
        (((True, 0),), r"\(True, 0\)"),
        ((1, 0), "1"),
    ):
        with pytest.raises(ValueError, match=pair_message + got):
            HeadSelection(pairs)
    with pytest.raises(ValueError, match="needs at least one"):
        HeadSelection(())
    assert HeadSelection([[1, 0], [2, None]]) == HeadSelection(((1, 0), (2, None)))  # JSON-like lists
    numpy_made = LlavaPreset("n", HeadSelection(((np.int64(1), np.int64(0)),)), HeadSelection(((0, None),)),
                             np.int64(2), np.int64(1), np.float32(0.01))  # fmt: skip
    json.dumps(numpy_made.to_dict())  # recorded as JSON: numpy's numbers had failed there
    sel = HeadSelection(((0, None),))
    for change, error, message in (
        (dict(grounding=[(1, 0)]), TypeError, "grounding must be a HeadSelection, got list"),
        (dict(sink=None), TypeError, "sink must be a HeadSelection, got NoneType"),
        (dict(roi={"threshold": 0.1}), TypeError, r"roi must be a RoiOptions \(from_dict takes a dict\), got dict"),
        (dict(sink_threshold="0.1"), TypeError, "sink_threshold must be a number, got '0.1'"),
        (dict(branch_layer=2.0), TypeError, "branch_layer must be an int, got 2.0"),
        (dict(name=None), TypeError, "name must be a string, got None"),
    ):
        with pytest.raises(error, match=message):
            LlavaPreset(**{"name": "t", "grounding": sel, "sink": sel, "branch_layer": 2, "depth": 1, **change})


@pytest.mark.parametrize(
    "content, message",
    [
        # Values of another JSON type were taken by int() and float() silently.
        (
            '{"grounding": [[1, 0]], "sink": [[0, null]], "branch_layer": "1"}',
            "branch_layer must be a whole number, got '1'",
        ),
        ('{"grounding": [[true, 1]], "sink": [[0, null]]}', "grounding layer must be a whole number, got True"),
        ('{"grounding": [[1, 0.5]], "sink": [[0, null]]}', "grounding head must be a whole number, got 0.5"),
        ('{"grounding": [[1, 0]], "sink": [[0, null]], "depth": 1e400}', "depth must be a whole number, got inf"),
        ('{"grounding": [[1, 0]], "sink": [[0, null]], "sink_threshold": "0.1"}', "sink_threshold must be a number"),
        (
            '{"grounding": [[1, 0]], "sink": [[0, null]], "sink_threshold": 1e400}',
            "must be a finite number > 0, got inf",
        ),
        ('{"grounding": [1, 0], "sink": [[0, null]]}', r"grounding must be a list of \[layer, head\] pairs"),
        ('{"grounding": [[1, 0]]}', r"lacks \['sink'\]"),
        ('{"grounding": [[1, 0]], "sink": [[0, null]], "prompt_template": 3}', "prompt_template must be a string"),
        ("[]", "a custom preset must be a JSON object, got list"),
        ("", "Expecting value"),
        ("\udcff", "codec can't decode"),
    ],
)
def test_a_preset_file_of_wrong_types_is_refused_naming_it(tmp_path, content, message):
    path = tmp_path / "preset.json"
    path.write_bytes(content.encode("utf-8", "surrogateescape"))
    with pytest.raises(ValueError, match=f"preset file {path}: .*{message}"):
        get_preset(str(path))


def test_a_preset_a_model_cannot_take_is_named():
    preset = LlavaPreset("mine", HeadSelection(((1, 9),)), HeadSelection(((0, None),)), branch_layer=1, depth=1)
    with pytest.raises(ValueError, match="preset 'mine': head 9 of layer 1 does not exist: the model has 4 heads"):
        preset.check_fits(make_tiny_llava().model.config)


def test_maps_label_on_a_non_square_grid(tiny):
    # The maps never assume a square grid: the same 16 image tokens read as a 2x8 grid
    # label exactly like the reference labels them.
    import reference

    batch = sample_batch(tiny, "left", seed=5)
    maps = attention_maps(tiny.model, batch, PRESET, 16)
    # Ratios under which every sample has foreground and background cells (SPEC's leave the
    # tiny model's maps all ignored: their foreground box covers over half the grid).
    ratios = {"sink_threshold": 0.2, "fg_ratio": 0.8, "bg_ratio": 0.5}
    labels = sdrpn.ops.pseudo_labels(maps.grounding, maps.sink, 2, 8, **ratios)
    assert torch.equal(labels, reference.pseudo_labels(maps.grounding, maps.sink, 2, 8, **ratios))
    stats = sdrpn.ops.pseudo_label_stats(labels)
    assert (stats[:, 0] > 0).all() and (stats[:, 1] > 0).all(), stats.tolist()
    # The grid's shape decides these labels: read as 8x2, the same maps label otherwise.
    assert not torch.equal(labels, reference.pseudo_labels(maps.grounding, maps.sink, 8, 2, **ratios))
