"""Threads that share a model: sdrpn's calls take turns, and their hooks read and stop
their own thread's forwards only, so that every thread gets what it would get alone and
the model is left as it was (sdrpn.llava.turns)."""

import sys
import threading
from contextlib import contextmanager

import pytest
import torch

from infer_samples import QUESTIONS, images, pipeline
from sdrpn.llava import AttentionProbe, EarlyExit, HeadSelection, LlavaPreset, attention_maps, model_turn
from sdrpn.llava.backbone import branch_hidden_states
from tiny_llava import make_tiny_llava, one_thread, teacher_forced_batch

PRESET = LlavaPreset("tiny", grounding=HeadSelection(((2, 1), (1, 0))), sink=HeadSelection(((0, None),)))
ROUNDS = 12


@pytest.fixture(scope="module")
def tiny():
    return make_tiny_llava(num_layers=4, grid=4)


@contextmanager
def switching_often(interval: float = 1e-5):
    """Threads switch every ``interval`` seconds (CPython's default is 5 ms), so that calls
    interleave inside a forward as they would on a busy machine."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(interval)
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


def repeated_together(calls: dict) -> dict[str, list]:
    """Each call ROUNDS times without grad, each name in a thread of its own, all at once:
    the results by name."""
    got = {name: [] for name in calls}

    def repeat(name):
        with torch.no_grad():
            for _ in range(ROUNDS):
                got[name].append(calls[name]())

    run_together(*(lambda name=name: repeat(name) for name in calls))
    return got


@pytest.mark.parametrize("decoder", ["hf", "static"])  # static: the pipeline's kept decoders are shared
def test_threads_sharing_a_pipeline_get_what_each_would_get_alone(tiny, decoder):
    sd = pipeline(tiny, decoder=decoder)
    work = {"a": images(2, seed=1), "b": images(2, seed=7)}
    ask = lambda ims: [a.tokens for a in sd.generate(ims, QUESTIONS[:2], max_new_tokens=4)]  # noqa: E731
    with one_thread():
        rois_alone = [sd.predict_rois([im], QUESTIONS[:1])[0].prob for im in work["a"]]
        answers_alone = {k: ask(ims) for k, ims in work.items()}
    got = {"rois": [], "a": [], "b": []}

    def rois():
        for _ in range(ROUNDS):
            got["rois"].append([sd.predict_rois([im], QUESTIONS[:1])[0].prob for im in work["a"]])

    def answers(name):
        for _ in range(ROUNDS // 3):
            got[name].append(ask(work[name]))

    run_together(rois, lambda: answers("a"), lambda: answers("b"))
    assert len(got["rois"]) == ROUNDS
    for probs in got["rois"]:
        for p, q in zip(probs, rois_alone):
            assert torch.equal(p, q)
    for name in ("a", "b"):
        assert got[name] == [answers_alone[name]] * (ROUNDS // 3)


def test_rpn_training_beside_an_evaluation_leaves_both_as_alone(tiny):
    # The backbone's early exit (RPN training) in one thread, label maps in two others and
    # the model's own forward in a fourth: each as alone, and the model's config as it was.
    batch = teacher_forced_batch(tiny, [[7, 8, 9], [10, 11, 12]], [[13, 14], [15, 16]])
    other = teacher_forced_batch(tiny, [[20, 21], [22, 23, 24, 25]], [[26], [27, 28, 29]], seed=3)
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
    more_maps = lambda: attention_maps(model, other, PRESET, tiny.num_cells).grounding  # noqa: E731
    with one_thread(), torch.no_grad():
        alone = {"forward": forward(), "branch": branch(), "maps": maps(), "more_maps": more_maps()}
    got = repeated_together({"forward": forward, "branch": branch, "maps": maps, "more_maps": more_maps})
    for name, values in got.items():
        assert len(values) == ROUNDS, name
        for value in values:
            torch.testing.assert_close(value, alone[name], rtol=0, atol=0, msg=name)
    assert (config.num_hidden_layers, config._attn_implementation) == settings


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_a_forward_beside_a_probe_keeps_the_models_attention(implementation):
    # Another thread's forward builds its mask while a probe is active and attends after it
    # has left: both by the model's own implementation (eager attention given SDPA's mask,
    # None for "causal", attended to every position).
    tiny = make_tiny_llava(num_layers=4, grid=4, attn_implementation=implementation)
    model = tiny.model
    batch = teacher_forced_batch(tiny, [[7, 8, 9]], [[13, 14]])  # one sample: no padding mask
    forward = lambda: model(input_ids=batch.input_ids, pixel_values=batch.pixel_values).logits  # noqa: E731
    with torch.no_grad():
        alone = forward()
    mask_built, probe_left, got = threading.Event(), threading.Event(), {}

    def wait_for_the_probe(_module, _args):  # the other thread, at its first layer: its mask is built
        if threading.current_thread().name == "other":
            mask_built.set()
            probe_left.wait(timeout=60)

    hook = model.get_decoder().layers[0].register_forward_pre_hook(wait_for_the_probe)
    try:
        with torch.no_grad():
            other = threading.Thread(target=lambda: got.setdefault("logits", forward()), name="other")
            with AttentionProbe(model, [1]):
                other.start()
                assert mask_built.wait(timeout=60)
            probe_left.set()
            other.join(timeout=60)
    finally:
        hook.remove()
    torch.testing.assert_close(got["logits"], alone, rtol=0, atol=0)
    assert model.get_decoder().config._attn_implementation == implementation


def test_one_probe_at_a_time_and_a_failed_start_leaves_the_model_free(tiny, monkeypatch):
    model = tiny.model
    config = model.get_decoder().config
    before = config._attn_implementation
    with AttentionProbe(model, [1]):
        with pytest.raises(RuntimeError, match="an AttentionProbe is active on this model already"):
            with AttentionProbe(model, [2]):
                pass
    assert config._attn_implementation == before

    def interrupted(self, layer, owner):
        raise KeyboardInterrupt

    monkeypatch.setattr(AttentionProbe, "_capturer", interrupted)  # stopped part way through its start
    with pytest.raises(KeyboardInterrupt):
        with AttentionProbe(model, [1]):
            pass
    monkeypatch.undo()
    assert config._attn_implementation == before
    taken = []

    def take_the_turn():  # from another thread: this one's re-entrant hold would pass anyway
        taken.append(model_turn(model).acquire(timeout=5))
        if taken[0]:
            model_turn(model).release()

    free = threading.Thread(target=take_the_turn)
    free.start()
    free.join()
    assert taken == [True]


def test_early_exit_takes_its_turn_beside_rpn_training(tiny):
    # EarlyExit lowers the model's layer count for its forwards: it and the RPN's backbone
    # pass take turns, so that neither runs while the other's count is in force.
    batch = teacher_forced_batch(tiny, [[7, 8, 9], [10, 11, 12]], [[13, 14], [15, 16]])
    model = tiny.model
    config = model.get_decoder().config
    layers = config.num_hidden_layers
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "pixel_values": batch.pixel_values}

    def exited():
        with EarlyExit(model, 1):
            return model.model(**inputs).last_hidden_state

    branch = lambda: branch_hidden_states(model, *inputs.values(), 3)[0]  # noqa: E731
    with one_thread(), torch.no_grad():
        alone = {"exited": exited(), "branch": branch()}
        full = model.model(**inputs, output_hidden_states=True).hidden_states
    torch.testing.assert_close(alone["exited"], model.get_decoder().norm(full[1]), rtol=0, atol=0)
    got = repeated_together({"exited": exited, "branch": branch})
    for name, values in got.items():
        assert len(values) == ROUNDS and all(torch.equal(v, alone[name]) for v in values), name
    assert config.num_hidden_layers == layers


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_a_forward_run_whole_while_a_probe_is_active_keeps_the_models_attention(implementation):
    # The other thread builds its mask and attends while the probe is active: both by the
    # model's own implementation, and the probe reads nothing of it.
    tiny = make_tiny_llava(num_layers=4, grid=4, attn_implementation=implementation)
    model = tiny.model
    batch = teacher_forced_batch(tiny, [[7, 8, 9], [10, 11, 12, 13]], [[13, 14], [15]])
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "pixel_values": batch.pixel_values}
    got = {}
    with torch.no_grad():
        alone = model(**inputs).logits
        with AttentionProbe(model, [1, 2]) as probe:
            other = threading.Thread(target=lambda: got.setdefault("logits", model(**inputs).logits))
            other.start()
            other.join(timeout=60)
    assert not other.is_alive()
    torch.testing.assert_close(got["logits"], alone, rtol=0, atol=0)
    assert probe.captured == {}


def test_the_turn_is_the_text_decoders_whichever_part_of_the_model_is_passed(tiny):
    # A probe entered on the LlavaModel holds the turn sdrpn's calls on the whole model take.
    model = tiny.model
    assert model_turn(model) is model_turn(model.model) is model_turn(model.get_decoder())
    taken = []

    def try_the_turn():
        lock = model_turn(model)
        taken.append(lock.acquire(timeout=0.2))
        if taken[-1]:
            lock.release()

    with AttentionProbe(model.model, [1]):
        other = threading.Thread(target=try_the_turn)
        other.start()
        other.join()
    assert taken == [False]


def test_threads_asking_at_once_for_a_new_models_turn_get_one_lock():
    # Threads switching every microsecond race to make the lock of a model no one has asked
    # about yet: one lock must come out (by chance a broken guard may pass a round; 200 rounds
    # of 8 threads catch it).
    from torch import nn

    with switching_often(1e-6):
        for _ in range(200):
            model, got, start = nn.Linear(1, 1), [], threading.Barrier(8)

            def ask(model=model, got=got, start=start):
                start.wait()
                got.append(model_turn(model))

            threads = [threading.Thread(target=ask) for _ in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert all(lock is got[0] for lock in got)


@pytest.mark.parametrize("decoder", ["hf", "static"])  # static: the pool's kept decoders are shared
def test_threads_answering_for_labels_with_one_decoder_pool_get_what_each_would_get_alone(tiny, decoder):
    # The label job's self answers (prefill, greedy decoding, the maps on the cache) in two
    # threads at once, through one pool of decoders.
    from sdrpn.llava.decode import DecoderPool
    from sdrpn.llava.inputs import left_pad
    from sdrpn.llava.maps import self_answer_maps
    from tiny_llava import PAD, prompt_ids

    pool, gen = DecoderPool(), torch.Generator().manual_seed(0)

    def work(lengths):
        prompts = [prompt_ids(tiny.num_cells, torch.randint(7, 64, (n,), generator=gen).tolist()) for n in lengths]
        ids, mask = left_pad(prompts, PAD)
        pixels = torch.randn(len(lengths), 3, tiny.image_size, tiny.image_size, generator=gen)
        options = {"max_new_tokens": 6, "eos_id": -1, "pad_id": PAD, "decoder": decoder, "pool": pool}
        return lambda: self_answer_maps(tiny.model, ids, mask, pixels, PRESET, tiny.num_cells, **options)

    calls = {"a": work((4, 1, 6)), "b": work((3, 5, 2))}
    with one_thread(), torch.no_grad():
        alone = {name: call() for name, call in calls.items()}
    for name, results in repeated_together(calls).items():
        for answers, maps in results:
            assert answers == alone[name][0], name
            assert torch.equal(maps.grounding, alone[name][1].grounding), name
            assert torch.equal(maps.sink, alone[name][1].sink), name


def test_rois_beside_an_early_exit_are_as_alone(tiny):
    # An EarlyExit in another thread lowers the layer count below the RPN's branch layer (2)
    # only while no RoI pass runs: predict_rois takes the model's turn.
    sd = pipeline(tiny)
    model = tiny.model
    batch = teacher_forced_batch(tiny, [[7, 8, 9]], [[13, 14]])

    def exited():
        with EarlyExit(model, 1):
            return model.model(input_ids=batch.input_ids, pixel_values=batch.pixel_values).last_hidden_state

    rois = lambda: sd.predict_rois(images(1), QUESTIONS[:1])[0].prob  # noqa: E731
    with one_thread(), torch.no_grad():
        alone = {"rois": rois(), "exited": exited()}
    for name, values in repeated_together({"rois": rois, "exited": exited}).items():
        assert all(torch.equal(v, alone[name]) for v in values), name


def test_a_model_dropped_after_taking_its_turn_is_freed():
    # The turns hold their models weakly: sdrpn keeps alive no model its caller dropped.
    import gc
    import weakref

    model = make_tiny_llava(num_layers=2, grid=4).model
    with AttentionProbe(model, [1]):
        pass
    decoder = weakref.ref(model.get_decoder())
    del model
    gc.collect()
    assert decoder() is None
