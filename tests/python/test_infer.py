import dataclasses
import json
import re
import time
import types

import numpy as np
import pytest
import torch
from PIL import Image

from infer_samples import GRID, QUESTIONS, TEMPLATE, blob_logits, images, pipeline
from sdrpn.infer import pass2
from sdrpn.infer.baseline import BaseLlava
from sdrpn.infer.pipeline import SDRPNLlava, Stopwatch
from sdrpn.llava.decode import DecoderPool, greedy_decode, prefill
from sdrpn.llava.geometry import grid_box_to_pixels
from sdrpn.llava.inputs import crop_pixels, left_pad, position_ids_from_mask, preprocess_image
from sdrpn.options import RoiOptions
from sdrpn.rpn.model import RegionProposalNetwork
from tiny_llava import IMAGE, make_tiny_llava, make_tokenizer


@pytest.fixture(scope="module")
def tiny():
    return make_tiny_llava(num_layers=4, grid=GRID)


def pixel_box_to_grid(
    box, grid_h: int, grid_w: int, width: int, height: int, size: int = 336, mode: str = "pad"
) -> tuple[float, float, float, float]:
    """The inverse of grid_box_to_pixels, written out independently: source pixels to
    fractional grid cells."""
    if mode == "pad":
        ratio_x = ratio_y = min(size / width, size / height)
        off_x = (size - int(width * ratio_x)) / 2
        off_y = (size - int(height * ratio_y)) / 2
    else:  # Hugging Face's shortest-edge resize: the long side to int(size * long / short)
        short, long = min(width, height), max(width, height)
        resized_long = int(size * long / short)
        cut = (resized_long - size) // 2
        if width <= height:
            ratio_x, ratio_y, off_x, off_y = size / width, resized_long / height, 0, -cut
        else:
            ratio_x, ratio_y, off_x, off_y = resized_long / width, size / height, -cut, 0
    x0, y0, x1, y1 = box
    return (
        (x0 * ratio_x + off_x) * grid_w / size,
        (y0 * ratio_y + off_y) * grid_h / size,
        (x1 * ratio_x + off_x) * grid_w / size,
        (y1 * ratio_y + off_y) * grid_h / size,
    )


def full_sequence_generate(sdrpn, image, question, crops, max_new_tokens):
    """The answer built from scratch: [prefix, crop image tokens, question] through HF generate."""
    prefix, suffix = sdrpn._split_prompt(question)
    ids = torch.tensor([prefix + [IMAGE] * (16 * len(crops)) + suffix])
    pixels = torch.stack([preprocess_image(image.convert("RGB"), 56)[0]] + crops)
    out = sdrpn.model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        pixel_values=pixels,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=0,
    )
    return out[0, ids.shape[1] :].tolist()


def test_prefix_reuse_equals_full_recompute_for_the_rpn(tiny):
    sd = pipeline(tiny)
    ims = images(2)
    got = sd.predict_rois(ims, QUESTIONS[:2])  # padded
    alone = [sd.predict_rois([im], [q])[0] for im, q in zip(ims, QUESTIONS)]  # not padded
    # From scratch: the whole prompt through the backbone, hidden_states[K] into the RPN.
    for b in range(2):
        prefix, suffix = sd._split_prompt(QUESTIONS[b])
        ids = torch.tensor([prefix + suffix])
        pixels = preprocess_image(ims[b], 56)[0][None]
        with torch.no_grad():
            hs = tiny.model.model(input_ids=ids, pixel_values=pixels, output_hidden_states=True).hidden_states
            mask = torch.ones_like(ids)
            logits = sd.rpn(hs[2], mask, position_ids_from_mask(mask), ids == IMAGE)
        for rois in (got[b], alone[b]):
            torch.testing.assert_close(rois.prob.flatten(), torch.sigmoid(logits[0]), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("group_cost", [10**6, 0], ids=["one_pass2_forward", "pass2_in_groups"])
def test_answer_equals_full_sequence_generate_and_batch_equals_single(tiny, group_cost):
    forced = blob_logits((0, 0, 2, 2), None, (2, 2, 4, 4))
    sd = pipeline(tiny, forced, pass2_group_cost=group_cost)
    ims = images(3, seed=1)
    answers = sd.generate(ims, QUESTIONS, max_new_tokens=5)
    assert [len(a.rois.boxes) for a in answers] == [1, 0, 1]
    for b, ans in enumerate(answers):
        crops = []
        for box in ans.rois.boxes:
            crops.append(crop_pixels(ims[b].convert("RGB"), box, 56))
        assert ans.tokens == full_sequence_generate(sd, ims[b], QUESTIONS[b], crops, 5)
        alone = pipeline(tiny, forced[b : b + 1]).generate([ims[b]], [QUESTIONS[b]], max_new_tokens=5)[0]
        assert alone.tokens == ans.tokens and alone.rois.boxes == ans.rois.boxes


def test_stopwatch_times_cuda_stages_by_events_without_synchronising(monkeypatch):
    """On CUDA a lap records an event on the current stream (stand-ins here) and only
    total() waits, for the last event."""

    class Event:
        clock = 0.0

        def __init__(self, enable_timing):
            assert enable_timing
            self.synced = False

        def record(self, stream):
            assert stream == "current"
            Event.clock += 0.5
            self.at = Event.clock

        def synchronize(self):
            self.synced = True

        def elapsed_time(self, end):  # milliseconds, as CUDA events give them
            return (end.at - self.at) * 1e3

    def no_sync(*_):
        raise AssertionError("a lap must not synchronise the device")

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: "current")
    monkeypatch.setattr(torch.cuda, "synchronize", no_sync)
    clock = Stopwatch(torch.device("cuda", 0))
    clock.lap("prefix")
    clock.lap("rpn")
    assert not clock.marks[-1].synced
    assert clock.total() == {"prefix": 0.5, "rpn": 0.5, "total": 1.0}
    assert clock.marks[-1].synced


def test_width_groups():
    widths = [600, 15, 600, 1200]
    # one forward: 4 * 1200 + 256; three: 1200 + 2 * 600 + 15 + 3 * 256, the least
    assert pass2.width_groups(widths, 256) == [[3], [0, 2], [1]]
    assert pass2.width_groups(widths, 10**6) == [[0, 1, 2, 3]]
    assert pass2.width_groups(widths, 0) == [[3], [0, 2], [1]]  # equal widths never part
    assert pass2.width_groups([7], 0) == [[0]]
    assert pass2.width_groups([], 0) == []


@pytest.mark.parametrize("decoder", ["hf", "static"])
def test_pass2_in_groups_leaves_the_cache_and_answers_of_one_padded_forward(tiny, decoder):
    """Mixed widths (two boxes, none, a mask-mode crop, one box): run in groups, pass 2
    leaves the padded forward's logits and, on every unmasked slot, its cache; the answers
    are the same."""
    gen = torch.Generator().manual_seed(3)
    hidden = tiny.model.config.text_config.hidden_size
    prefix = [[1, 5] + [IMAGE] * tiny.num_cells for _ in range(4)]
    pixels = torch.randn(4, 3, tiny.image_size, tiny.image_size, generator=gen)
    parts = [torch.randn(n, hidden, generator=gen) for n in (37, 4, 11, 21)]
    results = {}
    for cost in (10**6, 0):
        ids, prefix_mask = left_pad(prefix, 0)
        cache, _, _, _ = prefill(tiny.model, ids, prefix_mask, pixels)
        cache, logits, mask, positions = pass2.prefill_new_tokens(tiny.model, cache, prefix_mask, parts, cost)
        keep = mask.bool()
        kv = [t.transpose(1, 2)[keep] for layer in cache.layers for t in (layer.keys, layer.values)]
        answers = greedy_decode(tiny.model, cache, logits, mask, positions, 5, -1, decoder, DecoderPool())
        results[cost] = (logits, mask, positions, kv, answers)
    (l1, m1, p1, kv1, a1), (l2, m2, p2, kv2, a2) = results[10**6], results[0]
    assert torch.equal(m1, m2) and torch.equal(p1, p2)
    assert m1.shape[1] == len(prefix[0]) + 37
    torch.testing.assert_close(l2, l1, rtol=1e-4, atol=1e-5)
    for x, y in zip(kv2, kv1):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)
    assert a1 == a2 and all(len(a) == 5 for a in a1)
    with pytest.raises(ValueError, match=r"parts: every sample needs at least one new token, got widths \[37, 0\]"):
        pass2.prefill_new_tokens(tiny.model, cache, prefix_mask[:2], [parts[0], parts[0][:0]])


@pytest.mark.parametrize("seed", range(4))
def test_pass2_groups_match_one_forward_on_random_widths(tiny, seed):
    """Random widths (1 to 40 new tokens, repeats included), left-padded prefixes of other
    lengths and a random group cost: the groups give the one padded forward's logits and
    unmasked cache."""
    gen = torch.Generator().manual_seed(100 + seed)
    hidden = tiny.model.config.text_config.hidden_size
    batch = 1 + seed * 2
    prefix = [[1] * int(torch.randint(1, 4, (1,), generator=gen)) + [IMAGE] * tiny.num_cells for _ in range(batch)]
    pixels = torch.randn(batch, 3, tiny.image_size, tiny.image_size, generator=gen)
    widths = torch.randint(1, 41, (batch,), generator=gen).tolist()
    parts = [torch.randn(n, hidden, generator=gen) for n in widths]
    cost = [0, 8, 4, 0][seed]
    assert batch == 1 or len(pass2.width_groups(widths, cost)) > 1  # the groups path is taken
    got = {}
    for c in (10**6, cost):
        ids, prefix_mask = left_pad(prefix, 0)
        cache, _, _, _ = prefill(tiny.model, ids, prefix_mask, pixels)
        cache, logits, mask, _ = pass2.prefill_new_tokens(tiny.model, cache, prefix_mask, parts, c)
        keep = mask.bool()
        got[c] = (logits, [t.transpose(1, 2)[keep] for layer in cache.layers for t in (layer.keys, layer.values)])
    torch.testing.assert_close(got[cost][0], got[10**6][0], rtol=1e-4, atol=1e-5)
    for x, y in zip(got[cost][1], got[10**6][1]):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)


def test_the_question_may_come_before_the_image(tiny):
    """The question in the prefix (left-padded: prefixes of different lengths) and only
    "ASSISTANT :" after the image: the crops go in between, as generate on the full
    sequence has them."""
    forced = blob_logits((0, 0, 2, 2), None)
    sd = pipeline(tiny, forced)
    sd.template = "USER : {question} <image> ASSISTANT :"
    ims, questions = images(2, seed=3), ["what is the small tag ?", "why ?"]
    answers = sd.generate(ims, questions, max_new_tokens=4)
    assert [len(a.rois.boxes) for a in answers] == [1, 0]
    for b, ans in enumerate(answers):
        crops = [crop_pixels(ims[b].convert("RGB"), box, 56) for box in ans.rois.boxes]
        assert ans.tokens == full_sequence_generate(sd, ims[b], questions[b], crops, 4)
    # With nothing after the image there is no last prompt token for the RPN to read.
    with pytest.raises(
        ValueError, match="prompt_template must have text after <image>, got 'USER : {question} <image> '"
    ):
        pipeline(tiny, forced, prompt_template="USER : {question} <image> ")


def test_no_box_is_answered_as_by_the_base_model(tiny):
    sd = pipeline(tiny, blob_logits(None, None))
    ims = images(2, seed=2)
    answers = sd.generate(ims, QUESTIONS[:2], max_new_tokens=6)
    for b, ans in enumerate(answers):
        assert ans.rois.boxes == []
        assert ans.tokens == full_sequence_generate(sd, ims[b], QUESTIONS[b], [], 6)
    assert set(answers[0].timings) >= {"prompt", "rpn", "boxes", "crop_encode", "pass2_decode", "total"}


def test_the_baseline_answers_as_sdrpn_does_without_a_box(tiny):
    ims = images(3, seed=4)
    for preprocessing in ("pad", "crop"):
        sd = pipeline(tiny, blob_logits(None, None, None), preprocessing=preprocessing)
        base = BaseLlava(tiny.model, make_tokenizer(), prompt_template=TEMPLATE, preprocessing=preprocessing)
        expected = [a.text for a in sd.generate(ims, QUESTIONS, max_new_tokens=6)]
        assert base.generate(ims, QUESTIONS, max_new_tokens=6) == expected
    # A question copied from a LLaVA-format file, placeholder and all, is the same question.
    assert [a.text for a in sd.generate(ims, ["<image>\n" + q for q in QUESTIONS], max_new_tokens=6)] == expected
    with pytest.raises(ValueError, match="preprocessing must be one of"):
        BaseLlava(tiny.model, make_tokenizer(), preprocessing="square")
    with pytest.raises(TypeError, match=r"images\[1\] must be a PIL image, got str"):
        base.generate([ims[0], "x.png"], QUESTIONS[:2])
    with pytest.raises(ValueError, match=r"questions\[0\] must be a string with text besides the image placeholder"):
        base.generate(ims[:1], [" "])
    for question in ("what \ud800 ?", "what\x00?"):  # the tokenizer raised a TypeError on the first
        with pytest.raises(ValueError, match=r"questions\[1\] must be valid UTF-8 text without NUL bytes"):
            base.generate(ims[:2], [QUESTIONS[0], question])
    assert base.generate(ims[:1], ["<image>\n" + QUESTIONS[0]], max_new_tokens=6) == expected[:1]


def test_generate_refuses_an_image_too_large_for_its_preprocessing_before_any_work(tiny, monkeypatch):
    # 9460x1 pads to a 9460x9460 canvas and resizes to some 9460 times the input's width
    # squared in crop mode: both over the budget. 400x100 is within it either way.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10**6)
    long, fine = Image.new("RGB", (9460, 1)), Image.new("RGB", (400, 100))
    for preprocessing, reason in (("pad", "too large to pad to a square"), ("crop", "too long to resize its short")):
        for pipe in (
            pipeline(tiny, blob_logits(None, None, None), preprocessing=preprocessing),
            BaseLlava(tiny.model, make_tokenizer(), prompt_template=TEMPLATE, preprocessing=preprocessing),
        ):
            with pytest.raises(ValueError, match=rf"^images\[1\]: 9460x1 is {reason}.* in {preprocessing} mode"):
                pipe.generate([fine, long], QUESTIONS[:2], max_new_tokens=2)
            assert len(pipe.generate([fine], QUESTIONS[:1], max_new_tokens=2)) == 1


def test_centre_crop_preprocessing(tiny):
    sd = pipeline(tiny, blob_logits((0, 0, 4, 4)), preprocessing="crop")
    roi = sd.predict_rois(images(1), QUESTIONS[:1])[0]
    # The whole grid is the centre square of the 120x60 image.
    assert roi.boxes == [(30, 0, 90, 60)]
    with pytest.raises(ValueError, match="preprocessing must be one of"):
        pipeline(tiny, preprocessing="stretch")


def test_two_boxes_and_token_ratio(tiny):
    forced = blob_logits((0, 0, 1, 4), None)
    forced.view(2, 4, 4)[0, 3, :] = 10.0  # a second band: two boxes for sample 0
    # The blur would join the bands at 0.15.
    sd = pipeline(tiny, forced, roi=RoiOptions(token_ratio=0.5, threshold=0.3, crop_mode="bbox"))
    fed = []
    resample = sd._resample
    sd._resample = lambda features, box: fed.append(resample(features, box)) or fed[-1]
    start = time.perf_counter()
    ans = sd.generate(images(2, seed=3), QUESTIONS[:2], max_new_tokens=3)
    took = time.perf_counter() - start
    assert len(ans[0].rois.boxes) == 2 and ans[1].rois.boxes == []
    # Each band is 1 x 4 cells: at half the ratio, 1 x 2 tokens (a side rounds to at least 1).
    assert ans[0].rois.grid_boxes == [(0, 0, 4, 1), (0, 3, 4, 4)] and [f.shape[0] for f in fed] == [2, 2]
    stages = ans[0].timings
    assert all(v >= 0 for v in stages.values()) and sum(v for k, v in stages.items() if k != "total") <= took


def test_mask_mode_feeds_the_kept_tokens_of_one_crop(tiny):
    """Two bands: mask mode takes ONE crop over both and feeds only the tokens its mask keeps;
    the answer equals HF generate on [prefix, kept crop tokens, question] built from scratch,
    and samples with 0 tokens, a partial crop and a whole crop batch together."""
    forced = blob_logits((0, 0, 1, 4), None, (1, 1, 3, 3))
    forced.view(3, 4, 4)[0, 3, :] = 10.0
    sd = pipeline(tiny, forced, roi=RoiOptions(threshold=0.3))
    assert sd.roi.crop_mode == "mask"
    ims = images(3, seed=4)
    answers = sd.generate(ims, QUESTIONS, max_new_tokens=5)
    assert answers[0].rois.grid_boxes == [(0, 0, 4, 4)] and answers[1].rois.boxes == []
    keep = answers[0].rois.keep[0]
    assert keep[[0, 3]].all() and not keep[[1, 2]].any()  # the two bands' tokens only
    assert answers[2].rois.keep[0].all()  # one box: the whole crop
    model = tiny.model
    embed = model.get_input_embeddings()

    def features(pixels):  # (16, D) projected tokens of one image
        out = model.model.get_image_features(pixel_values=pixels[None])
        out = out.pooler_output if hasattr(out, "pooler_output") else out
        return torch.cat(list(out)).reshape(16, -1)

    for b, ans in enumerate(answers):
        prefix, suffix = sd._split_prompt(QUESTIONS[b])
        with torch.no_grad():
            parts = [embed(torch.tensor(prefix))]
            parts[0][-16:] = features(preprocess_image(ims[b].convert("RGB"), 56)[0])
            for box, kept in zip(ans.rois.boxes, ans.rois.keep):
                parts.append(features(crop_pixels(ims[b].convert("RGB"), box, 56))[kept.flatten()])
            parts.append(embed(torch.tensor(suffix)))
            embeds = torch.cat(parts)[None]
            out = model.generate(
                inputs_embeds=embeds,
                attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                max_new_tokens=5,
                do_sample=False,
                pad_token_id=0,
            )
        assert ans.tokens == out[0].tolist(), b


@pytest.mark.parametrize("size", [(800, 400), (300, 900), (500, 500)], ids=["landscape", "portrait", "square"])
@pytest.mark.parametrize("mode", ["pad", "crop"])
def test_box_mapping_round_trips(size, mode):
    w, h = size
    # A box well inside the visible image maps to the grid and back within a pixel.
    box = (w * 0.3, h * 0.4, w * 0.6, h * 0.7)
    g = pixel_box_to_grid(box, 24, 24, w, h, 336, mode)
    back = grid_box_to_pixels(g, 24, 24, w, h, 336, mode)
    for a, b in zip(back, box):
        assert abs(a - b) <= max(w, h) / 336 + 1
    # The whole grid maps to the whole image (pad) or to the centre crop (crop), within
    # the pixel that the reference's truncation can lose.
    x0, y0, x1, y1 = grid_box_to_pixels((0, 0, 24, 24), 24, 24, w, h, 336, mode)
    if mode == "pad":
        assert (x0, y0) == (0, 0) and w - 1 <= x1 <= w and h - 1 <= y1 <= h
    else:
        assert min(w, h) - 1 <= min(x1 - x0, y1 - y0) <= min(w, h)


@pytest.mark.parametrize("short", [19, 79, 158, 285, 316, 336, 1000])
def test_crop_mode_maps_the_whole_grid_to_the_whole_short_side(short):
    # Sides where int(short * 336 / short) is 335 (79, 158, 285, 316) shifted the cut by a
    # pixel; sides where dividing by the ratio falls short (19) lost the last pixel.
    for w, h in ((short, 2 * short + 1), (2 * short + 1, short)):
        x0, y0, x1, y1 = grid_box_to_pixels((0, 0, 24, 24), 24, 24, w, h, 336, "crop")
        assert ((x0, x1) if w < h else (y0, y1)) == (0, short)


@pytest.mark.parametrize(
    "size, box, expected",
    [
        # 335x337 resizes to 336x338 (336 * 337 / 335 = 338.006) and cuts row 1 on: the grid's
        # bottom edge, crop row 336, is source row 337 * 337 / 338 = 336.003.
        ((335, 337), (0, 0, 24, 24), (0, 0, 335, 336)),
        # 2785x2843 resizes to 336x342 (342.997 rounded down), cut from row 3: crop row 336 is
        # source row 339 * 2843 / 342 = 2818.06 (undoing 342 as if it were 342.997 gave 2809).
        ((2785, 2843), (24, 24, 24, 24), (2785, 2818, 2785, 2818)),
        ((2843, 2785), (24, 24, 24, 24), (2818, 2785, 2818, 2785)),
    ],
)
def test_crop_mode_undoes_the_long_sides_rounded_resize(size, box, expected):
    assert grid_box_to_pixels(box, 24, 24, *size, 336, "crop") == expected


def test_one_lazily_opened_image_asked_twice(tiny, tmp_path):
    # Image.open decodes on first use: the preprocessing threads read the one file at once
    # ("image file is truncated", "broken PNG file") unless it is decoded before them.
    arr = (np.random.default_rng(0).random((300, 400, 3)) * 255).astype(np.uint8)
    Image.fromarray(arr).save(tmp_path / "a.png")
    sd = pipeline(tiny, blob_logits(*[(0, 0, 2, 2)] * 3))
    base = BaseLlava(tiny.model, make_tokenizer(), prompt_template=TEMPLATE)
    loaded = Image.open(tmp_path / "a.png").convert("RGB")
    for answerer in (sd, base):
        expected = [a if isinstance(a, str) else a.text for a in answerer.generate([loaded] * 3, QUESTIONS, 3)]
        lazy = Image.open(tmp_path / "a.png")
        got = [a if isinstance(a, str) else a.text for a in answerer.generate([lazy] * 3, QUESTIONS, 3)]
        assert got == expected
    # An image that cannot be decoded is named.
    (tmp_path / "cut.png").write_bytes((tmp_path / "a.png").read_bytes()[:2000])
    with pytest.raises(ValueError, match=r"images\[1\] could not be read: image file is truncated"):
        sd.generate([loaded, Image.open(tmp_path / "cut.png")], QUESTIONS[:2], 2)


def test_prompts_and_answers_past_the_models_context_are_refused(tiny):
    # The tiny model has 512 positions. A static decoder's cache is sized by max_new_tokens
    # (10**8 tried to allocate 12 GB); a longer prompt was answered from unseen positions.
    sd = pipeline(tiny, blob_logits(None))
    base = BaseLlava(tiny.model, make_tokenizer(), prompt_template=TEMPLATE)
    for answerer in (sd, base):
        with pytest.raises(ValueError, match="max_new_tokens must be an int from 1 to the model's context of 512"):
            answerer.generate(images(1), QUESTIONS[:1], max_new_tokens=513)
    wordy = "x " * 500 + "?"
    message = r"questions\[1\] makes a prompt of 522 tokens \(the image's 16 among them\)"
    with pytest.raises(ValueError, match=message + ", past the model's context of 512 positions"):
        base.generate(images(2), [QUESTIONS[0], wordy], 2)
    # With crops: mask mode adds at most one crop, bbox mode max_boxes of them.
    shorter = "x " * 470 + "?"
    assert base.generate(images(1), [shorter], 1) and sd.prompt_too_long(shorter) is None
    with pytest.raises(ValueError, match=r"makes a prompt of 502 tokens .* and up to 16 crop tokens"):
        sd.generate(images(1), ["x " * 480 + "?"], 1)
    bbox = pipeline(tiny, blob_logits(None), roi={"crop_mode": "bbox", "max_boxes": 3})
    assert "and up to 48 crop tokens, past the model's context of 512" in bbox.prompt_too_long(shorter)


def test_a_prompt_that_fills_the_context_exactly_is_answered(tiny):
    # The last position's logits give the answer's first token (decode.answer_limits): a prompt
    # of all 512 positions, with the crop tokens it may get, is answered; one token more is not.
    sd = pipeline(tiny, blob_logits(None))
    base = BaseLlava(tiny.model, make_tokenizer(), prompt_template=TEMPLATE)
    full = "x " * 490 + "?"  # 512 tokens
    assert base.prompt_too_long(full) is None and len(base.generate(images(1), [full], 5)) == 1
    assert "makes a prompt of 513 tokens" in base.prompt_too_long("x " + full)
    with_crop = "x " * 474 + "?"  # 496 tokens, and a mask-mode crop's 16
    assert sd.prompt_too_long(with_crop) is None
    assert re.search(r"prompt of 497 tokens .* and up to 16 crop tokens", sd.prompt_too_long("x " + with_crop))


def test_answers_end_where_the_models_context_does(tiny):
    # A prompt that fits with its crop may still leave fewer positions than max_new_tokens:
    # the answer ends there rather than read tokens at positions the model never saw
    # (it had decoded up to position 607 of 512).
    box = blob_logits((0, 0, 4, 4), (0, 0, 4, 4))  # one whole crop each: 16 more tokens
    sd = pipeline(tiny, box)
    base = BaseLlava(tiny.model, make_tokenizer(), prompt_template=TEMPLATE)
    decoded = []  # BaseLlava returns text: its token rows as they reach the tokenizer
    real_decode = base.tokenizer.batch_decode
    base.tokenizer.batch_decode = lambda rows, **kw: decoded.append(rows) or real_decode(rows, **kw)
    question = "x " * 470 + "?"  # a prompt of 492 tokens
    prompt = len(sd._split_prompt(question)[0]) + len(sd._split_prompt(question)[1])
    for answerer, used in ((sd, prompt + 16), (base, prompt)):
        limit = 512 - used + 1
        runs = []
        for max_new_tokens in (limit, limit + 30):
            answers = answerer.generate(images(2), [question, QUESTIONS[0]], max_new_tokens)
            runs.append([a.tokens for a in answers] if answerer is sd else decoded[-1])
        short, long = runs
        assert long[0] == short[0] and len(long[0]) == limit  # cut at the context
        assert len(long[1]) > limit  # the other row is not


def test_the_pipelines_objects_are_checked(tiny):
    # Each was an AttributeError on None, or silently used.
    tok, rpn = make_tokenizer(), RegionProposalNetwork.from_llava(tiny.model, branch_layer=2, depth=2)
    kw = {"prompt_template": TEMPLATE}
    with pytest.raises(TypeError, match="rpn must be a RegionProposalNetwork, got NoneType"):
        SDRPNLlava(tiny.model, tok, None, **kw)
    with pytest.raises(TypeError, match="model must be a LLaVA model"):
        SDRPNLlava(None, tok, rpn, **kw)
    # The text model alone is a module too, but sees no image: named here, not an AttributeError on its config.
    with pytest.raises(TypeError, match=r"model must be a LLaVA model \(load_llava's\), got LlamaModel"):
        BaseLlava(tiny.model.get_decoder(), tok, **kw)
    with pytest.raises(TypeError, match="processor must be a Hugging Face processor or tokenizer, got NoneType"):
        BaseLlava(tiny.model, None, **kw)
    # A LLaVA that feeds the class token beside the patches has one image token more than its
    # grid: named, where it failed on a tensor size deep in the first answer.
    tiny.model.config.vision_feature_select_strategy = "full"
    try:
        for make in (
            lambda: RegionProposalNetwork.from_llava(tiny.model, branch_layer=2, depth=2),
            lambda: SDRPNLlava(tiny.model, tok, rpn, **kw),
            lambda: BaseLlava(tiny.model, tok, **kw),
        ):
            with pytest.raises(ValueError, match="vision_feature_select_strategy 'full' is not supported"):
                make()
    finally:
        tiny.model.config.vision_feature_select_strategy = "default"
    # Half a tokenizer is none: a call without decode (an image processor's), decode without a call.
    for half, name in ((lambda text: text, "function"), (types.SimpleNamespace(decode=str), "SimpleNamespace")):
        with pytest.raises(TypeError, match=f"processor must be a Hugging Face processor or tokenizer, got {name}"):
            BaseLlava(tiny.model, half, **kw)
    # An RPN holds copies of its base model's layers: on another model it reads states it
    # never trained on.
    other = make_tiny_llava(num_layers=4, grid=GRID, seed=1)
    with pytest.raises(ValueError, match=r"rpn was made on another base model than model \(the same architecture"):
        SDRPNLlava(other.model, tok, rpn, **kw)
    # An empty string is not "the RPN's own" (None is).
    for field in ("prompt_template", "preprocessing"):
        with pytest.raises(ValueError, match=field):
            SDRPNLlava(tiny.model, tok, rpn, **{**kw, field: ""})
    with pytest.raises(ValueError, match="task must be one of"):
        SDRPNLlava(tiny.model, tok, rpn, task="", **kw)

    class Processor:
        tokenizer = tok

        class image_processor:  # noqa: N801 (a processor's attribute)
            image_mean, image_std = [0.5, 0.5, 0.5], [0.2, 0.0, 0.2]

    with pytest.raises(ValueError, match=r"image_std must be > 0 per channel, got \(0.2, 0.0, 0.2\)"):
        BaseLlava(tiny.model, Processor(), **kw)
    Processor.image_processor.image_mean = [0.5]
    with pytest.raises(ValueError, match=r"image_mean must be three finite numbers \(R, G, B\), got \[0.5\]"):
        BaseLlava(tiny.model, Processor(), **kw)
    bare = make_tokenizer()
    bare.pad_token = bare.eos_token = None
    with pytest.raises(ValueError, match="has neither a pad nor an end-of-sequence token"):
        BaseLlava(tiny.model, bare, **kw)


def test_an_rpn_that_can_answer_nothing_is_refused(tiny):
    """An RPN with non-finite weights would find no region anywhere, and a crop budget that
    fills the context would refuse every question: each is refused when the pipeline is made."""
    rpn = RegionProposalNetwork.from_llava(tiny.model, branch_layer=2, depth=2)
    with torch.no_grad():
        rpn.q_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"rpn's weights hold NaN or Inf values: \['q_proj.weight'\]"):
        SDRPNLlava(tiny.model, make_tokenizer(), rpn, prompt_template=TEMPLATE)
    broken = [name for name, _ in rpn.named_parameters()][:5]
    with torch.no_grad():  # every name is listed, as save and load list them
        for name in broken:
            rpn.get_parameter(name).view(-1)[0] = float("inf")
    every = sorted({"q_proj.weight", *broken})
    with pytest.raises(ValueError, match=re.escape(f"rpn's weights hold NaN or Inf values: {every}")):
        SDRPNLlava(tiny.model, make_tokenizer(), rpn, prompt_template=TEMPLATE)
    rpn = RegionProposalNetwork.from_llava(tiny.model, branch_layer=2, depth=2)
    cells = GRID * GRID  # the tiny model's context is 512 positions
    fits = 512 // cells - 2  # with the image's cells, one crop short of filling it
    make = lambda boxes, ratio=-1.0: SDRPNLlava(  # noqa: E731
        tiny.model, make_tokenizer(), rpn, prompt_template=TEMPLATE,
        roi={"crop_mode": "bbox", "max_boxes": boxes, "token_ratio": ratio},
    )  # fmt: skip
    make(fits)
    refusal = (
        rf"max_boxes={fits + 1} crops of up to {cells} tokens and the image's {cells} take 512 of the model's 512 "
    )
    with pytest.raises(ValueError, match=refusal + r"positions: no question could be answered \(lower max_boxes\)"):
        make(fits + 1)
    # Resampled to half a side, a crop is at most 2 x 2 tokens: four times the crops fit.
    assert make(4 * fits + 3, 0.5).most_crop_tokens() == 4 * (4 * fits + 3)
    with pytest.raises(ValueError, match=rf"max_boxes={4 * fits + 4} crops of up to 4 tokens"):
        make(4 * fits + 4, 0.5)


def test_bad_inputs(tiny):
    sd = pipeline(tiny, blob_logits(None))
    with pytest.raises(ValueError, match=r"questions\[1\] must be a string with text besides the image placeholder"):
        sd.predict_rois(images(2), [QUESTIONS[0], "<image>\n "])
    with pytest.raises(ValueError, match=r"questions\[0\] must be a string with text besides the image placeholder"):
        sd.predict_rois(images(1), [None])
    with pytest.raises(ValueError, match="images and questions must pair up"):
        sd.predict_rois(images(2), QUESTIONS[:1])
    with pytest.raises(TypeError, match=r"images\[0\] must be a PIL image"):
        sd.predict_rois([torch.zeros(3, 4, 4)], QUESTIONS[:1])
    with pytest.raises(NotImplementedError, match="only greedy decoding is supported, .* got {'do_sample': True}"):
        sd.generate(images(1), QUESTIONS[:1], do_sample=True)
    with pytest.raises(NotImplementedError, match=r"end-of-sequence token; .* got {'eos_token_id': 5}"):
        sd.generate(images(1), QUESTIONS[:1], eos_token_id=5)
    with pytest.raises(TypeError, match=r"generate\(\) got unexpected keyword arguments \['max_tokens'\]"):
        sd.generate(images(1), QUESTIONS[:1], max_tokens=3)  # a typo, not a decoding choice
    with pytest.raises(NotImplementedError, match="only greedy decoding is supported, .* got {'streamer': 1}"):
        sd.generate(images(1), QUESTIONS[:1], streamer=1)  # generate's own argument, not a config field
    for length in (0, 2.5, "3", True):
        with pytest.raises(
            ValueError,
            match=f"max_new_tokens must be an int from 1 to the model's context of 512 positions, got {length!r}",
        ):
            sd.generate(images(1), QUESTIONS[:1], max_new_tokens=length)
        with pytest.raises(
            ValueError,
            match=f"max_new_tokens must be an int from 1 to the model's context of 512 positions, got {length!r}",
        ):
            BaseLlava(tiny.model, make_tokenizer(), prompt_template=TEMPLATE).generate(images(1), QUESTIONS[:1], length)
    assert len(sd.generate(images(1), QUESTIONS[:1], max_new_tokens=np.int64(2))[0].tokens) <= 2
    # Options from a dict or a JSON file: a value of another type is named, not compared;
    # numpy's numbers are taken as Python's.
    roi = {"threshold": np.float32(0.25), "min_area": np.int64(3), "drop_singletons": np.bool_(False)}
    taken = SDRPNLlava(tiny.model, make_tokenizer(), sd.rpn, prompt_template=TEMPLATE, roi=roi).roi
    assert (taken.threshold, taken.min_area, taken.drop_singletons) == (0.25, 3, False)
    assert json.dumps(taken.to_dict())
    for field, value, declared in (
        ("threshold", "0.1", "float"),
        ("min_area", 4.5, "int"),
        ("drop_singletons", 1, "bool"),
    ):
        with pytest.raises(ValueError, match=f"{field} must be of type {declared}, got {value!r}"):
            SDRPNLlava(tiny.model, make_tokenizer(), sd.rpn, prompt_template=TEMPLATE, roi={field: value})
    # Infinity and ints beyond 64 bits failed inside the ops, or named nothing.
    for field, value, message in (
        ("sigma", float("inf"), "sigma must be a finite number, got inf"),
        ("token_ratio", float("inf"), "token_ratio must be a finite number, got inf"),
        ("max_boxes", 2**63, "max_boxes must fit in 64 bits"),
    ):
        with pytest.raises(ValueError, match=message):
            SDRPNLlava(tiny.model, make_tokenizer(), sd.rpn, prompt_template=TEMPLATE, roi={field: value})
    # An empty batch answers nothing; an unpaired one is still refused.
    assert sd.generate([], []) == [] and sd.predict_rois([], []) == []
    assert BaseLlava(tiny.model, make_tokenizer(), prompt_template=TEMPLATE).generate([], []) == []
    with pytest.raises(ValueError, match="images and questions must pair up, got 0 and 1"):
        sd.generate([], QUESTIONS[:1])
    # One sample is a batch of one: a bare image or string is named, not counted.
    with pytest.raises(TypeError, match=r"images must be a list of PIL images, got Image: pass \[image\]"):
        sd.generate(images(1)[0], QUESTIONS[:1])
    with pytest.raises(TypeError, match=r"questions must be a list of strings, got str: pass \[question\]"):
        sd.predict_rois(images(1), QUESTIONS[0])
    assert len(sd.generate(images(1), QUESTIONS[:1], max_new_tokens=1, do_sample=False)[0].tokens) == 1
    assert len(sd.generate(images(1), QUESTIONS[:1], max_new_tokens=1, temperature=0.0)[0].tokens) == 1
    assert len(sd.generate(images(1), QUESTIONS[:1], max_new_tokens=1, temperature=None, top_p=None)[0].tokens) == 1
    with pytest.raises(NotImplementedError, match="only greedy decoding is supported, .* got {'temperature': 0.7}"):
        sd.generate(images(1), QUESTIONS[:1], temperature=0.7)
    with pytest.raises(ValueError, match="mode must be one of"):
        grid_box_to_pixels((0, 0, 1, 1), 4, 4, 10, 10, mode="stretch")
    with pytest.raises(ValueError, match="pass2_group_cost must be an int >= 0, got -1"):
        pipeline(tiny, pass2_group_cost=-1)


@pytest.mark.parametrize(
    "image",
    [
        Image.new("L", (40, 30), 100),
        Image.new("RGBA", (30, 40)),
        Image.new("RGB", (1, 1)),
        Image.new("RGB", (4000, 30)),
    ],
    ids=["grayscale", "rgba", "one-pixel", "huge-strip"],
)
def test_odd_images_are_handled(tiny, image):
    sd = pipeline(tiny, blob_logits((1, 1, 3, 3)))
    ans = sd.generate([image], QUESTIONS[:1], max_new_tokens=2)[0]
    assert len(ans.tokens) >= 1
    for x0, y0, x1, y1 in ans.rois.boxes:
        assert 0 <= x0 <= x1 <= image.width and 0 <= y0 <= y1 <= image.height


def test_an_image_with_no_pixels_is_refused_naming_it(tiny):
    # A crop of zero width or height (image.crop((5, 0, 5, 10))) is a PIL image: either side at 0 is named.
    sd = pipeline(tiny, blob_logits(None))
    for width, height in ((0, 10), (10, 0)):
        with pytest.raises(ValueError, match=rf"images\[1\] must be at least 1x1 pixels, got {width}x{height}"):
            sd.predict_rois([*images(1), Image.new("RGB", (width, height))], QUESTIONS[:2])


def test_accepts_a_processor_holding_the_tokenizer(tiny):
    class Processor:
        tokenizer = make_tokenizer()

    rpn = RegionProposalNetwork.from_llava(tiny.model, branch_layer=2, depth=2)
    sd = SDRPNLlava(tiny.model, Processor(), rpn, prompt_template=TEMPLATE)
    assert sd.tokenizer is Processor.tokenizer
    assert len(sd.predict_rois(images(1), QUESTIONS[:1])) == 1


def test_resampled_crops_keep_their_aspect():
    from sdrpn.infer.pipeline import resampled_grid

    assert resampled_grid(4, 2, 2.0, 24, 24) == (8, 4)
    assert resampled_grid(20, 10, 2.0, 24, 24) == (24, 12)  # one factor: the longer side fits
    assert resampled_grid(3, 30, 1.0, 24, 24) == (2, 24)  # the per-side clamp would give (3, 24)
    assert resampled_grid(1, 1, 0.1, 24, 24) == (1, 1)
    assert resampled_grid(10, 10, 3.0, 8, 16) == (8, 8)  # a non-square grid caps each side
    assert resampled_grid(20, 10, 1e308, 24, 24) == (24, 12)  # box * ratio would overflow to inf


def test_benchmark_thresholds_by_name(tiny):
    assert pipeline(tiny).roi.threshold == 0.15
    assert pipeline(tiny, task="docvqa").roi.threshold == 0.10
    with pytest.raises(ValueError, match="task must be one of"):
        pipeline(tiny, task="nope")


def test_roi_arguments_change_the_rpn_folders_options_field_by_field(tiny):
    recorded = RoiOptions(threshold=0.3, sigma=0.5, min_area=1, max_area=16, crop_mode="bbox", drop_singletons=False)
    rpn = RegionProposalNetwork.from_llava(tiny.model, branch_layer=2, depth=2, roi=recorded)
    pipe = SDRPNLlava(tiny.model, make_tokenizer(), rpn, prompt_template=TEMPLATE, roi={"token_ratio": 0.5})
    assert pipe.roi == dataclasses.replace(recorded, token_ratio=0.5)
    pipe = SDRPNLlava(tiny.model, make_tokenizer(), rpn, prompt_template=TEMPLATE, task="docvqa", roi={"sigma": 2.0})
    assert pipe.roi == dataclasses.replace(recorded, threshold=0.10, sigma=2.0)
    whole = RoiOptions(threshold=0.2)
    assert SDRPNLlava(tiny.model, make_tokenizer(), rpn, prompt_template=TEMPLATE, roi=whole).roi == whole
    with pytest.raises(ValueError, match="task='docvqa' sets the threshold and roi=RoiOptions"):
        SDRPNLlava(tiny.model, make_tokenizer(), rpn, prompt_template=TEMPLATE, task="docvqa", roi=whole)
    with pytest.raises(ValueError, match=r"RoiOptions has unknown fields \['treshold'\]"):
        SDRPNLlava(tiny.model, make_tokenizer(), rpn, prompt_template=TEMPLATE, roi={"treshold": 0.1})
    with pytest.raises(ValueError, match="sigma must be > 0"):
        SDRPNLlava(tiny.model, make_tokenizer(), rpn, prompt_template=TEMPLATE, roi={"sigma": 0})
    # None leaves a field as recorded, as flags left out do.
    unset = {"threshold": None, "drop_singletons": None, "token_ratio": None}
    assert SDRPNLlava(tiny.model, make_tokenizer(), rpn, prompt_template=TEMPLATE, roi=unset).roi == recorded
    with pytest.raises(TypeError, match="roi must be a RoiOptions, a dict of its fields or None, got float"):
        SDRPNLlava(tiny.model, make_tokenizer(), rpn, prompt_template=TEMPLATE, roi=0.1)
    # SPEC resamples whole bbox-mode crops only: a mask-mode one-box crop kept its 576 tokens
    # in the reference, and the token ratio fed it fewer here.
    message = "token_ratio resamples bbox-mode crops only, got token_ratio=0.5 with crop_mode='mask'"
    with pytest.raises(ValueError, match=message):
        SDRPNLlava(
            tiny.model, make_tokenizer(), rpn, prompt_template=TEMPLATE, roi={"token_ratio": 0.5, "crop_mode": "mask"}
        )
    with pytest.raises(ValueError, match=message):
        RoiOptions(token_ratio=0.5).check_crop_mode()
    with pytest.raises(ValueError, match=message):
        RegionProposalNetwork.from_llava(tiny.model, branch_layer=2, depth=2, roi={"token_ratio": 0.5})


def test_decoding_runs_one_forward_per_answer_token(tiny):
    # max_new_tokens answers cost exactly that many forwards after pass 1 (the first
    # feeds [crop tokens, question], each later one a token), none for a token never read.
    sdrpn = pipeline(tiny, forced=blob_logits((0, 0, 2, 2)))
    sdrpn.eos_id = -1  # never produced: every answer runs to max_new_tokens
    seen = []
    hook = tiny.model.register_forward_hook(lambda module, args, output: seen.append(1))
    try:
        (answer,) = sdrpn.generate(images(1), QUESTIONS[:1], max_new_tokens=5)
    finally:
        hook.remove()
    assert len(answer.tokens) == 5
    assert len(seen) == 5
