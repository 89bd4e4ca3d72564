import math

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import DEVICES
from sdrpn.llava.data import SkipSample, parse_entry, resolve_image
from sdrpn.llava.geometry import grid_box_to_pixels
from sdrpn.llava.inputs import (
    CLIP_MEAN,
    PROMPT_TEMPLATE,
    check_template,
    crop_pixels,
    pad_to_square,
    pixel_batch,
    preprocess_image,
    prompt_token_ids,
)
from tiny_llava import IMAGE, make_tokenizer

FILL = tuple(int(round(255 * m)) for m in CLIP_MEAN)


@pytest.mark.parametrize("size,offset", [((80, 40), (0, 20)), ((30, 90), (30, 0)), ((50, 50), (0, 0))])
def test_pad_to_square_centres_the_image(size, offset):
    image = Image.new("RGB", size, (255, 0, 0))
    square = pad_to_square(image, FILL)
    assert square.size == (max(size), max(size))
    assert square.getpixel(offset) == (255, 0, 0)  # the image's top-left corner
    corner = square.getpixel((0, 0))
    assert corner == (FILL if offset != (0, 0) else (255, 0, 0))


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "RGB"])
def test_preprocess_any_mode_and_tiny_images(mode):
    image = Image.new(mode, (1, 1))
    pixels, prep = preprocess_image(image, 28)
    assert pixels.shape == (3, 28, 28) and pixels.dtype == torch.float32
    assert (prep.mode, prep.width, prep.height, prep.size) == ("pad", 1, 1, 28)


def test_the_public_helpers_name_a_bad_argument():
    # Each failed inside: AttributeError on an array, a 1x1 output for size=True, a numpy
    # broadcast error for a crop of a grayscale or RGBA image, ZeroDivisionError.
    with pytest.raises(TypeError, match="image must be a PIL image, got ndarray"):
        preprocess_image(np.zeros((4, 4, 3), dtype=np.uint8), 28)
    for size in (True, 0, 28.0):
        with pytest.raises(ValueError, match=f"size must be an int >= 1, got {size!r}"):
            preprocess_image(Image.new("RGB", (4, 4)), size)
    rgb = Image.fromarray((np.random.default_rng(0).random((30, 40, 3)) * 255).astype(np.uint8))
    box = (5, 5, 20, 25)
    for image in (rgb.convert("RGBA"), rgb.convert("L")):
        assert torch.equal(crop_pixels(image, box, 28), crop_pixels(image.convert("RGB"), box, 28))
    with pytest.raises(ValueError, match="grid_h, grid_w and size must be >= 1, got 0, 4 and 56"):
        grid_box_to_pixels((0, 0, 1, 1), 0, 4, 40, 30, 56)
    with pytest.raises(ValueError, match="image must be at least 1x1 pixels, got 0x30"):
        grid_box_to_pixels((0, 0, 1, 1), 4, 4, 0, 30, 56)
    for mode in ("pad", "crop"):  # a one-cell grid is the whole square
        assert grid_box_to_pixels((0, 0, 1, 1), 1, 1, 30, 30, 30, mode) == (0, 0, 30, 30)
    # Tensor and numpy numbers and infinities map in crop mode as in pad mode.
    for mode in ("pad", "crop"):
        want = grid_box_to_pixels((1, 1, 3, 3), 4, 4, 40, 30, 56, mode)
        assert grid_box_to_pixels(torch.tensor([1, 1, 3, 3]), 4, 4, 40, 30, 56, mode) == want
        assert grid_box_to_pixels(np.array([1, 1, 3, 3], np.float32), 4, 4, 40, 30, 56, mode) == want
        assert all(type(v) is int for v in grid_box_to_pixels(np.array([1, 1, 3, 3]), 4, 4, 40, 30, 56, mode))
        x0, _, x1, _ = grid_box_to_pixels((-math.inf, 0, math.inf, 4), 4, 4, 40, 30, 56, mode)
        assert (x0, x1) == (0, 40)


def test_mean_colour_padding_normalises_to_zero():
    pixels, _ = preprocess_image(Image.new("RGB", (40, 10), FILL), 28)
    assert pixels.abs().max() < 0.02


def test_prompt_has_system_text_and_contiguous_image_tokens():
    tok = make_tokenizer()
    ids = prompt_token_ids(tok, "what is the tag ?", IMAGE, 16, template="USER : <image>\n{question} ASSISTANT :")
    first = ids.index(IMAGE)
    assert ids[first : first + 16] == [IMAGE] * 16 and ids.count(IMAGE) == 16
    assert ids[0] == tok.bos_token_id
    assert PROMPT_TEMPLATE.startswith("A chat between a curious human")
    with pytest.raises(ValueError, match="prompt_template must hold <image> once"):
        prompt_token_ids(tok, "q", IMAGE, 4, template="{question}")


@pytest.mark.parametrize(
    "template",
    [
        "<image> {question.__class__}",
        "<image> {question} {other}",
        "<image> {question!r}",
        "<image> {0}",
        "<image> {question",
        "<image>",
    ],
)
def test_templates_accept_only_a_plain_question_field(template):
    with pytest.raises(ValueError, match="prompt_template"):
        check_template(template)


def test_parse_entry_and_resolve_image(tmp_path):
    entry = {
        "id": 7,
        "image": "a.png",
        "conversations": [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A cat."}],
    }
    sample = parse_entry(entry, 3)
    assert (sample.id, sample.question, sample.answer, sample.index) == ("7", "What is it?", "A cat.", 3)
    for bad, reason in [
        ([], "not an object"),
        ({"conversations": []}, "no image"),
        ({"image": "a.png"}, "no conversations"),
        ({"image": "a.png", "conversations": [{"from": "gpt", "value": "x"}]}, "no question"),
    ]:
        with pytest.raises(SkipSample, match=reason):
            parse_entry(bad, 0)
    (tmp_path / "a.png").write_bytes(b"x")
    assert resolve_image(str(tmp_path), "a.png") == str((tmp_path / "a.png").resolve())
    with pytest.raises(SkipSample, match="outside"):
        resolve_image(str(tmp_path / "sub"), "../a.png")
    with pytest.raises(SkipSample, match="missing"):
        resolve_image(str(tmp_path), "b.png")


def test_the_answer_is_the_gpt_turn_that_follows_the_first_question():
    """Turns before the first human one (a system preamble) are not the answer, and a second
    human turn before the reply is not either: the pair is the first human turn and the gpt
    turn after it. Turns that are not {from, value: text} are passed over."""
    preamble, question, follow_up = ("gpt", "Hello."), ("human", "<image>\nWhat is it?"), ("human", "And the colour?")
    for turns in ([preamble, question, ("gpt", "A cat.")], [question, follow_up, ("gpt", "A cat.")]):
        entry = {"image": "a.png", "conversations": [{"from": who, "value": text} for who, text in turns]}
        sample = parse_entry(entry, 0)
        assert (sample.question, sample.answer) == ("What is it?", "A cat.")
    turns = ["hi", {"from": "human", "value": None}, {"from": "human", "value": "<image>\nWhat is it?"}]
    turns += [{"from": "gpt", "value": ["x"]}, {"from": "gpt", "value": "A cat."}]
    sample = parse_entry({"image": "a.png", "conversations": turns}, 0)
    assert (sample.question, sample.answer) == ("What is it?", "A cat.")


def test_padding_uses_the_truncated_clip_mean():
    from PIL import Image

    from sdrpn.llava.inputs import mean_fill

    assert mean_fill() == (122, 116, 104)  # int(255 * mean), as LLaVA and HF's do_pad
    padded = pad_to_square(Image.new("RGB", (20, 10), (255, 0, 0)), mean_fill())
    assert padded.getpixel((0, 0)) == (122, 116, 104) and padded.getpixel((10, 5)) == (255, 0, 0)


def test_entries_that_would_break_a_job_are_skipped_with_a_reason(tmp_path):
    import json

    from PIL import Image

    from sdrpn.llava.data import SkipSample, open_image, parse_entry

    turns = [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]
    nul = [{"from": "human", "value": "q\0"}]
    cases = {
        "text not valid UTF-8 or with a NUL byte": {"image": "a.png", "conversations": nul},
        "image path not valid text": {"image": "a\x00.png", "conversations": turns},
        "id not valid UTF-8 or with a NUL byte": {"id": "\udfff", "image": "a.png", "conversations": turns},
        "several images": {"image": ["a.png", "b.png"], "conversations": turns},
        "empty question": {"image": "a.png", "conversations": [{"from": "human", "value": " <image>\n"}]},
    }
    for reason, entry in cases.items():
        if reason == "empty question":  # one placeholder removed, one more made: still empty
            entry = dict(entry, conversations=[{"from": "human", "value": "<im<image>age>"}])
            with pytest.raises(SkipSample, match=reason):
                parse_entry(entry, 0)
        entry = json.loads(json.dumps(entry))  # as a JSON file delivers them
        with pytest.raises(SkipSample, match=reason):
            parse_entry(entry, 0)
    Image.new("RGB", (4, 4)).save(tmp_path / "ok.png")
    Image.new("RGB", (60000, 1)).save(tmp_path / "long.png")  # a tiny file, a 3.6e9-pixel square
    (tmp_path / "bad.png").write_bytes(b"\x89PNG not really")
    assert open_image(str(tmp_path), "ok.png", 336, "pad").size == (4, 4)
    (tmp_path / "sub").mkdir()
    for name, reason in (
        ("long.png", "too large to pad to a square"),
        ("sub", "image path is a folder"),
        ("bad.png", "unreadable"),
        ("a\x00b", "not valid text"),
        (12345, "not valid text"),
        ("../x.png", "outside"),
    ):
        with pytest.raises(SkipSample, match=reason):
            open_image(str(tmp_path), name, 336, "pad")


def test_each_preprocessing_is_held_to_the_pixel_budget_of_what_it_makes(tmp_path, monkeypatch):
    import warnings

    from sdrpn.llava.data import SkipSample, open_image
    from sdrpn.llava.inputs import preprocess_image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 144-pixel images: over it, under PIL's 2x refusal
    for name, size in (("square.png", (12, 12)), ("wide.png", (12, 11)), ("thin.png", (1, 60))):
        Image.new("RGB", size).save(tmp_path / name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        # Pad mode: a square is not padded; 12x11 needs a 12x12 canvas.
        assert open_image(str(tmp_path), "square.png", 8, "pad").size == (12, 12)
        with pytest.raises(SkipSample, match="^image too large to pad to a square$"):
            open_image(str(tmp_path), "wide.png", 8, "pad")
        # Crop mode resizes the short side to 8: 8x8 and 8x480 (over 100) are what it makes.
        assert open_image(str(tmp_path), "wide.png", 8, "crop").size == (12, 11)
        assert open_image(str(tmp_path), "thin.png", 1, "crop").size == (1, 60)  # 1x60: within it
        with pytest.raises(SkipSample, match="^image too long to resize its short side to 8$"):
            open_image(str(tmp_path), "thin.png", 8, "crop")
        # preprocess_image itself refuses, naming the size and the mode, before any canvas is made.
        assert preprocess_image(Image.new("RGB", (12, 11)), 8, mode="crop")[0].shape == (3, 8, 8)
        message = r"^image: 1x60 is too long to resize its short side to 8 in crop mode \(over PIL's 100 pixels\)"
        with pytest.raises(ValueError, match=message):
            preprocess_image(Image.new("RGB", (1, 60)), 8, mode="crop")
        with pytest.raises(ValueError, match=r"^image: 12x11 is too large to pad to a square in pad mode"):
            preprocess_image(Image.new("RGB", (12, 11)), 8, mode="pad")


def test_a_dataset_linked_into_the_image_folder_is_inside_it(tmp_path):
    from sdrpn.llava.data import open_image

    (tmp_path / "elsewhere" / "coco").mkdir(parents=True)
    Image.new("RGB", (4, 3)).save(tmp_path / "elsewhere" / "coco" / "a.png")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "coco").symlink_to(tmp_path / "elsewhere" / "coco")
    assert open_image(str(tmp_path / "folder"), "coco/a.png", 336, "pad").size == (4, 3)
    assert open_image(str(tmp_path / "folder"), "coco/../coco/a.png", 336, "pad").size == (4, 3)
    with pytest.raises(SkipSample, match="outside"):  # the path as written leaves the folder
        open_image(str(tmp_path / "folder"), "../elsewhere/coco/a.png", 336, "pad")


def test_sixteen_bit_images_keep_their_high_byte(tmp_path):
    from sdrpn.llava.inputs import load_rgb, to_rgb

    ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    with Image.open(tmp_path / "ramp.png") as opened:
        assert opened.mode == "I;16"  # Pillow's own convert("RGB") would clip it to white
    rgb = np.asarray(load_rgb(str(tmp_path / "ramp.png")))
    assert rgb.shape == (64, 64, 3) and (rgb == (ramp >> 8)[..., None]).all()
    big_endian = Image.frombytes("I;16B", (64, 64), ramp.astype(">u2").tobytes())
    assert np.array_equal(np.asarray(to_rgb(big_endian)), rgb)
    pixels, _ = preprocess_image(big_endian, 32)
    torch.testing.assert_close(pixels, preprocess_image(Image.fromarray(rgb), 32)[0], rtol=0, atol=0)


def test_every_pillow_mode_becomes_rgb():
    from sdrpn.llava.inputs import to_rgb

    gray = np.arange(48, dtype=np.uint8).reshape(6, 8) * 5
    opaque = Image.merge("LA", (Image.fromarray(gray), Image.new("L", (8, 6), 255)))
    for mode in ("1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "CMYK", "YCbCr", "LAB", "HSV", "I", "F"):
        image = to_rgb((opaque if mode.startswith("L") else opaque.convert("RGB")).convert(mode))
        assert image.mode == "RGB" and image.size == (8, 6), mode
    # Premultiplied with full alpha is the gray itself (Pillow converts La to nothing but LA).
    assert (np.asarray(to_rgb(opaque.convert("La"))) == gray[..., None]).all()


def test_a_question_keeps_no_image_placeholder():
    from sdrpn.llava.inputs import question_text

    assert question_text("<image>\nWhat is written? ") == "What is written?"
    assert question_text("Compare <image> with the text") == "Compare  with the text"
    # A placeholder that removing one makes: none is left, and taking the text again is a no-op.
    assert question_text("<im<image>age>") == "" and question_text("a <im<image>age> b") == "a  b"
    assert question_text(question_text("<<image>image>?")) == question_text("<<image>image>?") == "?"


# (90, 60), (158, 300): sides where int(size * long / short) and a product with the ratio
# size / short differ by one.
@pytest.mark.parametrize("size", [(37, 91), (640, 480), (333, 333), (1001, 17), (1, 5), (90, 60), (158, 300)])
def test_pixels_equal_hugging_face_processors(size):
    # LLaVA-1.5's pad-to-square is LlavaImageProcessor(do_pad=True); the centre crop is
    # CLIPImageProcessor. Pixel for pixel, with PIL doing the resizing on both sides.
    transformers = pytest.importorskip("transformers")
    import numpy as np

    from sdrpn.llava.inputs import CLIP_MEAN, CLIP_STD, preprocess_image

    common = dict(
        size={"shortest_edge": 336},
        crop_size={"height": 336, "width": 336},
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        resample=3,  # bicubic, as CLIP's processor config says
    )
    image = Image.fromarray(np.random.default_rng(sum(size)).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    for mode, processor in (
        ("pad", transformers.LlavaImageProcessorPil(do_pad=True, **common)),
        ("crop", transformers.CLIPImageProcessorPil(**common)),
    ):
        want = torch.from_numpy(processor(image, return_tensors="np")["pixel_values"][0])
        got, record = preprocess_image(image, 336, mode=mode)
        assert record.mode == mode and torch.equal(got, want), mode


def test_answering_normalises_with_the_processors_mean_and_std():
    from types import SimpleNamespace

    from sdrpn.infer.pipeline import SDRPNLlava
    from sdrpn.llava.inputs import CLIP_MEAN, CLIP_STD
    from sdrpn.rpn.model import RegionProposalNetwork
    from tiny_llava import make_tiny_llava, make_tokenizer

    tiny = make_tiny_llava()
    rpn = RegionProposalNetwork.from_llava(tiny.model, branch_layer=2, depth=2)
    template = "USER : <image>\n{question} ASSISTANT :"
    plain = SDRPNLlava(tiny.model, make_tokenizer(), rpn, prompt_template=template)
    assert (plain.mean, plain.std) == (CLIP_MEAN, CLIP_STD)
    processor = SimpleNamespace(
        tokenizer=make_tokenizer(), image_processor=SimpleNamespace(image_mean=[0.5] * 3, image_std=[0.25] * 3)
    )
    custom = SDRPNLlava(tiny.model, processor, rpn, prompt_template=template)
    assert (custom.mean, custom.std) == ((0.5,) * 3, (0.25,) * 3)
    # The pixels the vision tower sees are normalised with them.
    seen = []
    hook = tiny.model.model.vision_tower.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    image = Image.new("RGB", (40, 40), (200, 100, 50))  # square: no padding, whose colour is the mean too
    try:
        plain.predict_rois([image], ["what ?"])
        custom.predict_rois([image], ["what ?"])
    finally:
        hook.remove()
    mean, std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]
    torch.testing.assert_close(seen[1], ((seen[0] * std + mean) - 0.5) / 0.25, atol=1e-5, rtol=0)


def test_a_box_in_the_padding_crops_the_images_edge_at_either_side():
    """A 2000x10 image padded to a square: a grid box in the bottom padding maps to zero
    height at y = 10, one in the top padding to zero height at y = 0. Both crop the
    image's edge row, never the black beyond it."""
    from sdrpn.llava.geometry import grid_box_to_pixels
    from sdrpn.llava.inputs import crop_pixels

    pixels = np.full((10, 2000, 3), 200, np.uint8)
    pixels[0], pixels[-1] = 50, 90  # the edge rows
    image = Image.fromarray(pixels)
    edge_row = {}
    for name, grid_box, row in [("top", (0, 0, 4, 1), 0), ("bottom", (0, 3, 4, 4), 9)]:
        box = grid_box_to_pixels(grid_box, 4, 4, 2000, 10, 56, "pad")
        assert box[1] == box[3] == (0 if name == "top" else 10), box
        crop = crop_pixels(image, box, 56)
        want = crop_pixels(image, (box[0], row, box[2], row + 1), 56)
        edge_row[name] = torch.equal(crop, want)
    assert edge_row == {"top": True, "bottom": True}
    # The same across a 10x2000 image's side padding: its edge columns.
    image = Image.fromarray(np.ascontiguousarray(pixels.transpose(1, 0, 2)))
    for grid_box, column in [((0, 0, 1, 4), 0), ((3, 0, 4, 4), 9)]:
        box = grid_box_to_pixels(grid_box, 4, 4, 10, 2000, 56, "pad")
        want = crop_pixels(image, (column, box[1], column + 1, box[3]), 56)
        assert box[0] == box[2] and torch.equal(crop_pixels(image, box, 56), want), (grid_box, box)


def test_a_data_file_that_is_not_json_is_named(tmp_path):
    from sdrpn.llava.data import load_entries

    for name, payload in [
        ("binary.json", b"\xff\xd8\xff\xe0 not json"),
        ("text.json", b"{oops"),
        ("nested.json", b"[" * 100_000 + b"]" * 100_000),  # a RecursionError traceback
        ("digits.json", b"[" + b"1" * 5000 + b"]"),  # past the digits Python converts
    ]:
        path = tmp_path / name
        path.write_bytes(payload)
        with pytest.raises(ValueError, match=f"--data {path} is not a JSON file"):
            load_entries(str(path))


def test_a_data_file_is_checked_by_its_first_characters(tmp_path):
    from sdrpn.llava.data import check_data_file, load_entries

    for name, payload in [("plain.json", b'\n  [{"id": 1}]'), ("bom.json", b'\xef\xbb\xbf[{"id": 1}]')]:
        (tmp_path / name).write_bytes(payload)
        check_data_file(str(tmp_path / name))
        assert load_entries(str(tmp_path / name)) == [{"id": 1}]
    (tmp_path / "dict.json").write_bytes(b'{"data": []}')
    with pytest.raises(ValueError, match=r"must hold a JSON list of samples, it starts with b'\{\"data\": \[\]\}'"):
        check_data_file(str(tmp_path / "dict.json"))


def test_an_image_folder_is_told_from_another_by_its_images_sizes(tmp_path):
    from sdrpn.llava.data import image_folder_problem

    made, moved, resized = tmp_path / "made", tmp_path / "moved", tmp_path / "resized"
    for folder in (made, moved, resized):
        folder.mkdir()
    rows = []
    for i in range(20):
        Image.new("RGB", (10 + i, 7)).save(made / f"{i}.png")
        Image.new("RGB", (10 + i, 7)).save(moved / f"{i}.png")
        Image.new("RGB", (20 + 2 * i, 14)).save(resized / f"{i}.png")
        rows.append({"image": f"{i}.png", "image_size": [10 + i, 7]})
    assert image_folder_problem(str(made), rows) is None
    # Most images gone or broken, those left the same: skipped samples of the same folder.
    for i in range(13):
        (moved / f"{i}.png").unlink()
    (moved / "13.png").write_bytes(b"no image")
    assert image_folder_problem(str(moved), rows) is None
    problem = image_folder_problem(str(resized), rows)
    assert problem == "16 of 16 images checked are missing or differ, e.g. 0.png is 20x14, not the 10x7 recorded"
    empty = image_folder_problem(str(tmp_path), rows)
    assert empty == "16 of 16 images checked are missing or differ, e.g. 0.png: image missing"
    assert image_folder_problem(str(resized), rows, most=40).startswith("20 of 20")
    unreadable = tmp_path / "unreadable"
    unreadable.mkdir()
    for i in range(20):
        (unreadable / f"{i}.png").write_bytes(b"no image")
    assert image_folder_problem(str(unreadable), rows) == (
        "16 of 16 images checked are missing or differ, e.g. 0.png: image unreadable"
    )
    # As many at their sizes as at others is still the folder; more at others is another.
    half = rows[:2] + [{"image": "0.png", "image_size": [1, 1]}, {"image": "1.png", "image_size": [1, 1]}]
    assert image_folder_problem(str(made), half) is None
    assert image_folder_problem(str(made), half[1:]) == (
        "2 of 3 images checked are missing or differ, e.g. 0.png is 10x7, not the 1x1 recorded"
    )
    # Spread evenly over the rows: 20 rows whose first 16 images are gone still find 4 of theirs.
    for i in range(16):
        (made / f"{i}.png").unlink()
    assert image_folder_problem(str(made), rows) is None
    assert image_folder_problem(str(made), rows[:16]).startswith("16 of 16")
    # Rows that record no image or no well-formed size show nothing; with none, that is the problem.
    malformed = [{"image": "0.png"}, {"image_size": [1, 1]}, "row", None, {"image": "0.png", "image_size": None}]
    malformed += [{"image": "0.png", "image_size": v} for v in ("30x25", [1, 2, 3], [True, 1], [1.5, 2])]
    assert image_folder_problem(str(resized), malformed) == "no finished sample records its image's size to check it by"
    # A long image path is shown cut in the middle.
    long = "d" * 100 + ".png"
    problem = image_folder_problem(str(tmp_path), [{"image": long, "image_size": [1, 1]}])
    assert problem == f"1 of 1 images checked are missing or differ, e.g. {long[:38]}...{long[-39:]}: image missing"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_a_pixel_batch_holds_each_images_values_rounded_as_torch_rounds(device, dtype):
    pixels = [torch.randn(3, 12, 12, generator=torch.Generator().manual_seed(i)) * 3 for i in range(5)]
    got = pixel_batch(pixels, device, dtype)
    assert got.device.type == device and got.dtype == dtype
    assert torch.equal(got.cpu(), torch.stack(pixels).to(dtype))  # round to nearest even, either side
