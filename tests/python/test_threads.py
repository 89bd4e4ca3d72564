"""Threads that share a model: sdrpn's calls take turns, and their hooks read and stop
their own thread's forwards only, so that every thread gets what it would get alone and
the model is left as it was (sdrpn.llava.turns)."""

import sys
import threading
from contextlib import contextmanager

import pytest
import torch

from infer_samples import QUESTIONS, images, pipeline
from sdrpn.llava import HeadSelection, LlavaPreset, attention_maps
from sdrpn.llava.backbone import branch_hidden_states
from tiny_llava import make_tiny_llava, one_thread, teacher_forced_batch

PRESET = LlavaPreset("tiny", grounding=HeadSelection(((2, 1), (1, 0))), sink=HeadSelection(((0, None),)))
ROUNDS = 12


@pytest.fixture(scope="module")
def tiny():
    return make_tiny_llava(num_layers=4, grid=4)


@contextmanager
def switching_often():
    """Threads switch every few microseconds (CPython's default is 5 ms), so that calls
    interleave inside a forward as they would on a busy machine."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        yield
    finally:
        sys.setswitchinterval(before)


def run_together(*works) -> None:
    """Each work in a thread of its own, all at once; the first error of any is raised."""
    errors = []

    def guarded(work):
        try:
            work()
        except BaseException as error:  # noqa: BLE001  raised in the test's thread below
            errors.append(error)

    threads = [threading.Thread(target=guarded, args=(w,)) for w in works]
    with one_thread(), switching_often():
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a thread did not finish"
    if errors:
        raise errors[0]


def test_threads_sharing_a_pipeline_get_the_rois_each_would_get_alone(tiny):
    sd = pipeline(tiny)
    work = {"a": images(2, seed=1), "b": images(2, seed=7)}
    with one_thread():
        alone = {k: [sd.predict_rois([im], QUESTIONS[:1])[0].prob for im in ims] for k, ims in work.items()}
        answers_alone = [a.tokens for a in sd.generate(work["a"], QUESTIONS[:2], max_new_tokens=3)]
    got = {"a": [], "b": [], "answers": []}

    def rois(name):
        for _ in range(ROUNDS):
            got[name].append([sd.predict_rois([im], QUESTIONS[:1])[0].prob for im in work[name]])

    def answers():
        for _ in range(ROUNDS // 3):
            got["answers"].append([a.tokens for a in sd.generate(work["a"], QUESTIONS[:2], max_new_tokens=3)])

    run_together(lambda: rois("a"), lambda: rois("b"), answers)
    for name in ("a", "b"):
        assert len(got[name]) == ROUNDS
        for probs in got[name]:
            for p, q in zip(probs, alone[name]):
                assert torch.equal(p, q)
    assert got["answers"] == [answers_alone] * (ROUNDS // 3)


def test_rpn_training_beside_an_evaluation_leaves_both_as_alone(tiny):
    # The backbone's early exit (RPN training) in one thread, label maps in another and the
    # model's own forward in a third: each as alone, and the model's config as it was.
    batch = teacher_forced_batch(tiny, [[7, 8, 9], [10, 11, 12]], [[13, 14], [15, 16]])
    model = tiny.model
    config = model.get_decoder().config
    settings = (config.num_hidden_layers, config._attn_implementation)
    forward = lambda: (
        model(  # noqa: E731
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixel_values
        ).logits
    )
    branch = lambda: branch_hidden_states(  # noqa: E731
        model, batch.input_ids, batch.attention_mask, batch.pixel_values, 2
    )[0]
    maps = lambda: attention_maps(model, batch, PRESET, tiny.num_cells).grounding  # noqa: E731
    with one_thread(), torch.no_grad():
        alone = {"forward": forward(), "branch": branch(), "maps": maps()}
    got = {name: [] for name in alone}

    def repeat(name, fn):
        def work():
            with torch.no_grad():
                for _ in range(ROUNDS):
                    got[name].append(fn())

        return work

    run_together(repeat("forward", forward), repeat("branch", branch), repeat("maps", maps))
    for name, values in got.items():
        assert len(values) == ROUNDS, name
        for value in values:
            torch.testing.assert_close(value, alone[name], rtol=0, atol=0, msg=name)
    assert (config.num_hidden_layers, config._attn_implementation) == settings
