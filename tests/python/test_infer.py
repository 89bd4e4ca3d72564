import dataclasses
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdrpn.infer import pass2
from sdrpn.infer.baseline import BaseLlava
from sdrpn.infer.pipeline import SDRPNLlava, Stopwatch
from sdrpn.llava.decode import DecoderPool, greedy_decode, prefill
from sdrpn.llava.geometry import grid_box_to_pixels
from sdrpn.llava.inputs import crop_pixels, left_pad, position_ids_from_mask, preprocess_image
from sdrpn.options import RoiOptions
from sdrpn.rpn.model import RegionProposalNetwork
from tiny_llava import IMAGE, make_tiny_llava, make_tokenizer

GRID = 4
TEMPLATE = "USER : <image>\n{question} ASSISTANT :"


@pytest.fixture(scope="module")
def tiny():
    return make_tiny_llava(num_layers=4, grid=GRID)


def pipeline(tiny, forced=None, **kwargs):
    rpn = RegionProposalNetwork.from_llava(tiny.model, branch_layer=2, depth=2)
    if forced is not None:
        calls = []

        def forward(hidden, mask, pos, visual):
            calls.append(hidden)
            return forced.to(hidden.device)

        rpn.forward = forward
    return SDRPNLlava(tiny.model, make_tokenizer(), rpn, **{"prompt_template": TEMPLATE, **kwargs})


def pixel_box_to_grid(
    box, grid_h: int, grid_w: int, width: int, height: int, size: int = 336, mode: str = "pad"
) -> tuple[float, float, float, float]:
    """The inverse of grid_box_to_pixels, written out independently: source pixels to
    fractional grid cells."""
    if mode == "pad":
        ratio = min(size / width, size / height)
        off_x = (size - int(width * ratio)) / 2
        off_y = (size - int(height * ratio)) / 2
    else:  # Hugging Face's shortest-edge resize: the long side to int(size * long / short)
        ratio = max(size / width, size / height)
        short, long = min(width, height), max(width, height)
        cut = (int(size * long / short) - size) // 2
        off_x, off_y = (0, -cut) if width <= height else (-cut, 0)
    x0, y0, x1, y1 = box
    return (
        (x0 * ratio + off_x) * grid_w / size,
        (y0 * ratio + off_y) * grid_h / size,
        (x1 * ratio + off_x) * grid_w / size,
        (y1 * ratio + off_y) * grid_h / size,
    )


def blob_logits(*boxes):
    """Logits (B, 16) that are high on the given [r0, c0, r1, c1) regions (None: no box)."""
    out = torch.full((len(boxes), GRID, GRID), -10.0)
    for b, box in enumerate(boxes):
        if box is not None:
            r0, c0, r1, c1 = box
            out[b, r0:r1, c0:c1] = 10.0
    return out.view(len(boxes), -1)


def images(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    sizes = [(120, 60), (50, 100), (80, 80), (33, 71)]
    return [Image.fromarray((torch.rand(h, w, 3, generator=gen) * 255).byte().numpy()) for w, h in sizes[:n]]


QUESTIONS = ["what is the tag ?", "what colour is it ?", "is the tag red ?"]


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
    got = sd.predict_rois(ims, QUESTIONS[:2])
    # From scratch: the whole prompt through the backbone, hidden_states[K] into the RPN.
    for b in range(2):
        prefix, suffix = sd._split_prompt(QUESTIONS[b])
        ids = torch.tensor([prefix + suffix])
        pixels = preprocess_image(ims[b], 56)[0][None]
        with torch.no_grad():
            hs = tiny.model.model(input_ids=ids, pixel_values=pixels, output_hidden_states=True).hidden_states
            mask = torch.ones_like(ids)
            logits = sd.rpn(hs[2], mask, position_ids_from_mask(mask), ids == IMAGE)
        torch.testing.assert_close(got[b].prob.flatten(), torch.sigmoid(logits[0]), rtol=1e-4, atol=1e-5)


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
    ans = sd.generate(images(2, seed=3), QUESTIONS[:2], max_new_tokens=3)
    assert len(ans[0].rois.boxes) == 2 and ans[1].rois.boxes == []


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
    with pytest.raises(NotImplementedError, match="only greedy decoding is supported, got {'do_sample': True}"):
        sd.generate(images(1), QUESTIONS[:1], do_sample=True)
    with pytest.raises(TypeError, match=r"generate\(\) got unexpected keyword arguments \['max_tokens'\]"):
        sd.generate(images(1), QUESTIONS[:1], max_tokens=3)  # a typo, not a decoding choice
    with pytest.raises(NotImplementedError, match="only greedy decoding is supported, got {'streamer': 1}"):
        sd.generate(images(1), QUESTIONS[:1], streamer=1)  # generate's own argument, not a config field
    for length in (0, 2.5, "3", True):
        with pytest.raises(ValueError, match=f"max_new_tokens must be an int >= 1, got {length!r}"):
            sd.generate(images(1), QUESTIONS[:1], max_new_tokens=length)
        with pytest.raises(ValueError, match=f"max_new_tokens must be an int >= 1, got {length!r}"):
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
    assert "answer:" in capsys.readouterr().out


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
    assert (
        infer_cli(
            infer_ws,
            "--data",
            str(infer_ws / "data.json"),
            "--image-folder",
            str(infer_ws / "images"),
            "--out",
            str(out),
            "--limit",
            "2",
            "--batch-size",
            "2",
        )
        == 0
    )
    first = [json.loads(line)["id"] for line in open(out)]
    assert first == ["q0"]
    with open(out, "a") as f:
        f.write('{"id": "q1", "ans')  # a crash mid-line
    assert (
        infer_cli(
            infer_ws,
            "--data",
            str(infer_ws / "data.json"),
            "--image-folder",
            str(infer_ws / "images"),
            "--out",
            str(out),
            "--batch-size",
            "2",
        )
        == 0
    )
    ids = [json.loads(line)["id"] for line in open(out)]
    assert ids == ["q0", "q1", "q2"]
    summary = json.loads((tmp_path / "answers.jsonl.summary.json").read_text())
    assert summary == {
        "answered": 2,
        "already_done": 1,
        "skipped": 4,
        "skipped_by_reason": {
            "image missing": 1,
            "text not valid UTF-8": 1,
            "image path not valid text": 1,
            "image too large to pad to a square": 1,
        },
    }
    with pytest.raises(ValueError, match="either --image and --question, or --data"):
        infer_cli(infer_ws)


def test_infer_file_answers_alike_with_or_without_loader_threads(infer_ws, tmp_path):
    import json

    rows = {}
    for workers in ("0", "2"):
        out = tmp_path / f"answers{workers}.jsonl"
        args = ["--data", str(infer_ws / "data.json"), "--image-folder", str(infer_ws / "images"), "--out", str(out)]
        assert infer_cli(infer_ws, *args, "--batch-size", "2", "--workers", workers) == 0
        rows[workers] = [{k: v for k, v in json.loads(line).items() if k != "timings_s"} for line in open(out)]
        summary = json.loads((tmp_path / f"answers{workers}.jsonl.summary.json").read_text())
        assert summary["answered"] == 3 and summary["skipped"] == 4
    assert rows["0"] == rows["2"] and [r["id"] for r in rows["0"]] == ["q0", "q1", "q2"]


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
    assert any("another rank stopped" in line for line in errors), done.stderr[-3000:]
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
    with pytest.raises(ValueError, match="world_size=2 needs torch.distributed's process group started"):
        answer_file(None, InferFileConfig(**files, rank=1, world_size=2))
    assert not list(tmp_path.iterdir())
    monkeypatch.setenv("WORLD_SIZE", "2")  # one question under torchrun: refused before the model loads
    with pytest.raises(ValueError, match="--image answers one question on one process: run it without torchrun"):
        infer_cli(infer_ws, "--image", str(infer_ws / "images" / "0.png"), "--question", "q", "--model", "none")


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


def test_answer_file_refuses_to_mix_settings(infer_ws, tmp_path):
    out = tmp_path / "answers.jsonl"
    data = ("--data", str(infer_ws / "data.json"), "--image-folder", str(infer_ws / "images"), "--out", str(out))
    assert infer_cli(infer_ws, *data, "--max-new-tokens", "2") == 0
    rows = out.read_text()
    with pytest.raises(ValueError, match=r"other settings \(max_new_tokens: 2 -> 3; roi\.threshold: -0\.9 -> 0\.3\)"):
        infer_cli(infer_ws, *data, "--max-new-tokens", "3", "--threshold", "0.3")
    assert out.read_text() == rows  # nothing touched
    assert infer_cli(infer_ws, *data, "--max-new-tokens", "2") == 0  # the same settings resume
    # Another RPN of the same configuration, trained apart: only its weights differ.
    from safetensors.torch import load_file, save_file

    other = tmp_path / "other-rpn"
    shutil.copytree(infer_ws / "rpn", other)
    weights = load_file(other / "rpn.safetensors")
    save_file({k: v + 0.01 if v.is_floating_point() else v for k, v in weights.items()}, other / "rpn.safetensors")
    with pytest.raises(ValueError, match=r"other settings \(rpn_weights: "):
        infer_cli(infer_ws, *data, "--max-new-tokens", "2", "--rpn", str(other))
    # Answers recorded before the weights were: they resume with the RPN named.
    settings_file = tmp_path / "answers.jsonl.settings.json"
    settings = json.loads(settings_file.read_text())
    del settings["rpn_weights"]
    settings_file.write_text(json.dumps(settings))
    assert infer_cli(infer_ws, *data, "--max-new-tokens", "2") == 0
    assert infer_cli(infer_ws, *data, "--max-new-tokens", "3", "--restart") == 0
    summary = json.loads((tmp_path / "answers.jsonl.summary.json").read_text())
    assert summary["already_done"] == 0 and summary["answered"] == 3


def test_the_command_reports_user_mistakes_in_one_line(infer_ws, tmp_path, capsys):
    from sdrpn.cli import entry

    missing = str(tmp_path / "nowhere")
    image = str(infer_ws / "images" / "0.png")
    assert entry(["infer", "--model", missing, "--rpn", missing, "--image", image, "--question", "q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sdrpn infer: error: ") and "nowhere" in err and len(err.splitlines()) == 1
    with pytest.raises((OSError, ValueError)):
        entry(["infer", "--debug", "--model", missing, "--rpn", missing, "--image", image, "--question", "q"])
    # The flags and the image are checked before the model loads (the model is missing too).
    for flags, message in [
        (["--image", str(tmp_path / "x.png"), "--question", "q"], "--image " + str(tmp_path / "x.png")),
        (["--image", str(infer_ws / "data.json"), "--question", "q"], "cannot read it as an image"),
        (["--image", image], "--image and --question go together"),
        (["--data", str(infer_ws / "data.json")], "--data needs --image-folder and --out"),
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
    with pytest.raises(ValueError, match=r"no sample of .* could be answered: all 7 were skipped \(5 image missing"):
        infer_cli(infer_ws, *data, "--image-folder", str(tmp_path / "empty"))
    assert json.loads((tmp_path / "answers.jsonl.summary.json").read_text())["answered"] == 0


def test_infer_file_resumes_with_the_same_model_by_another_path(infer_ws, tmp_path):
    import json

    out = tmp_path / "answers.jsonl"
    data = ("--data", str(infer_ws / "data.json"), "--image-folder", str(infer_ws / "images"), "--out", str(out))
    assert infer_cli(infer_ws, *data, "--max-new-tokens", "2", "--limit", "3") == 0
    assert infer_cli(infer_ws, *data, "--max-new-tokens", "2", "--model", str(infer_ws / "model") + "/") == 0
    recorded = json.loads((tmp_path / "answers.jsonl.settings.json").read_text())["model"]["name"]
    assert recorded == str(infer_ws / "model")  # the first name is kept
