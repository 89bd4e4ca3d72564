"""The lmms-eval model's arguments and decoding (sdrpn.integrations.eval_options), without lmms-eval."""

import pytest

from sdrpn.integrations.eval_options import Decoding, EvalModelOptions, benchmark_of, decoding_of


def options(**args) -> EvalModelOptions:
    return EvalModelOptions.from_model_args(args)


def test_model_args_as_lmms_eval_parses_them():
    opts = options(pretrained="m", rpn="r", roi=True, threshold=0, batch_size=8, dtype="float16", crop_mode="bbox")
    assert (opts.threshold, opts.batch_size, opts.dtype, opts.crop_mode) == (0.0, 8, "fp16", "bbox")
    assert options(pretrained="m", roi="false").roi is False  # the baseline row needs no RPN
    assert options(pretrained="m", rpn="r", batch_size="4", max_new_tokens="16").max_new_tokens == 16
    assert options(rpn="r").pretrained == "llava-hf/llava-1.5-7b-hf"
    assert options(rpn="r", device="cuda:1").resolved_device(cuda_available=True) == "cuda:1"
    assert options(rpn="r").resolved_device(cuda_available=False) == "cpu"


@pytest.mark.parametrize(
    "args, message",
    [
        ({"rpn": "r", "treshold": 0.1}, r"unknown model_args \['treshold'\]"),
        ({}, "rpn is required"),
        ({"rpn": "r", "roi": "maybe"}, "roi must be true or false, got 'maybe'"),
        ({"roi": False, "threshold": 0.1}, r"roi=false answers without crops, so \['threshold'\]"),
        ({"rpn": "r", "threshold": 0.1, "task_preset": "pope"}, "give threshold or task_preset, not both"),
        ({"rpn": "r", "task_preset": "textvqa_val"}, "task_preset must be 'auto' or one of"),
        ({"rpn": "r", "threshold": "high"}, "threshold must be a number, got 'high'"),
        ({"rpn": "r", "threshold": 2}, r"threshold must lie in \[-1, 1\], got 2.0"),
        ({"rpn": "r", "crop_mode": "box"}, "crop_mode must be one of"),
        ({"rpn": "r", "dtype": "int8"}, "dtype must be one of .*got 'int8'"),
        ({"rpn": "r", "batch_size": "auto"}, "batch_size must be a positive integer, got 'auto'"),
        ({"rpn": "r", "batch_size": 0}, "batch_size must be a positive integer, got 0"),
        ({"rpn": "r", "max_new_tokens": True}, "max_new_tokens must be a positive integer, got True"),
        # Python's isdigit takes "²", and int() refuses more than 4300 digits: named instead.
        ({"rpn": "r", "batch_size": "\u00b2"}, "batch_size must be a positive integer, got '\u00b2'"),
        ({"rpn": "r", "batch_size": "9" * 5000}, "batch_size must be a positive integer, got '999"),
        ({"rpn": "r", "threshold": True}, "threshold must be a number, got True"),
    ],
)
def test_bad_model_args_are_refused_by_name(args, message):
    with pytest.raises(ValueError, match=message):
        options(**args)


def test_task_preset_auto_follows_the_task_name():
    names = {"textvqa_val": "textvqa", "vstar_bench": "vstar", "hrbench8k": "hrbench", "pope_adv": "pope"}
    assert {task: benchmark_of(task) for task in names} == names
    assert benchmark_of("mmmu_val") is None
    opts = options(rpn="r", task_preset="auto")
    assert opts.preset_for("docvqa_val") == "docvqa"
    with pytest.raises(ValueError, match="no threshold for the lmms-eval task 'mmmu_val'"):
        opts.preset_for("mmmu_val")
    assert options(rpn="r", task_preset="pope").preset_for("anything") == "pope"
    assert options(rpn="r").preset_for("anything") is None  # the RPN folder's threshold


def test_greedy_generation_kwargs():
    vstar = {"max_new_tokens": 16, "temperature": 0, "top_p": 1.0, "num_beams": 1, "do_sample": False}
    assert decoding_of(vstar, 128) == Decoding(16, ())
    assert decoding_of({"until": "ASSISTANT:"}, 128) == Decoding(128, ("ASSISTANT:",))
    assert decoding_of({"until": ["\n\n", "Q:"], "top_p": 0.9}, 32) == Decoding(32, ("\n\n", "Q:"))
    assert decoding_of(None, 7).max_new_tokens == 7


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": 0.2}, "decodes greedily.*temperature=0.2"),
        ({"do_sample": True}, "do_sample=True"),
        ({"num_beams": 4}, "num_beams=4"),
        ({"max_new_tokens": 0}, "max_new_tokens must be a positive integer, got 0"),
        ({"until": 3}, "until must be a string or a list of strings, got 3"),
        ({"repetition_penalty": 1.2}, "does not know the generation kwargs {'repetition_penalty': 1.2}"),
    ],
)
def test_other_decoding_is_refused_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        decoding_of(kwargs, 16)


def test_answers_are_cut_before_the_earliest_stop_string():
    decoding = Decoding(8, ("Q:", "\n\n", ""))
    assert decoding.cut("Paris\n\nQ: next") == "Paris"
    assert decoding.cut("Paris Q:\n\n") == "Paris "
    assert decoding.cut("Paris") == "Paris"
