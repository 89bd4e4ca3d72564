"""The static and graph decoders answer token for token as the model's own forward does;
the graph image encoder gives the model's own image features."""

import contextlib
import warnings
from dataclasses import replace

import pytest
import torch
from transformers import MistralConfig

import sdrpn.llava.decode as decode_module
from conftest import needs_cuda
from host_reads import NoHostSync
from infer_samples import QUESTIONS, blob_logits, images, pipeline
from sdrpn.llava.decode import (
    DecoderPool,
    StaticDecoder,
    answer_limits,
    capture_error,
    greedy_answers,
    greedy_decode,
    prefill,
    resolve_decoder,
)
from sdrpn.llava.inputs import left_pad
from sdrpn.llava.vision import GRAPH_MAX_IMAGES, ImageEncoder, image_features
from sdrpn.options import RoiOptions
from tiny_llava import PAD, make_tiny_llava, prompt_ids


@pytest.fixture(scope="module")
def tiny():
    return make_tiny_llava(num_layers=4, grid=4)


def prompt_cache(model, prompts: list[list[int]], pixels=None):
    """Left-padded prompts through the model: (cache, last logits, mask, next positions)."""
    ids, mask = left_pad(prompts, PAD, next(model.parameters()).device)
    return prefill(model, ids, mask, pixels)


PROMPTS = [[1, 9, 17, 33, 40, 5], [1, 11, 12], [1, 7, 7, 21, 60, 61, 62, 63, 8]]


def decode(model, decoder, max_new_tokens=12, eos=-1, pool=None, prompts=PROMPTS):
    cache, logits, mask, nxt = prompt_cache(model, prompts)
    return greedy_decode(model, cache, logits, mask, nxt, max_new_tokens, eos, decoder, pool)


def test_static_decoder_answers_as_the_models_forward(tiny):
    want = decode(tiny.model, "hf")
    assert decode(tiny.model, "static") == want
    assert [len(t) for t in want] == [12] * 3
    assert len({tuple(t) for t in want}) == 3  # the samples differ: a mix-up would show
    # A cache filled to its last slot: 9 prompt positions and 55 fed tokens make 64, one bucket.
    assert decode_module.slot_bucket(9 + 56 - 1) == 64
    assert decode(tiny.model, "static", max_new_tokens=56) == decode(tiny.model, "hf", max_new_tokens=56)


@pytest.mark.parametrize("decoder", ["hf", "static"])
def test_each_answer_stops_at_its_limit(tiny, decoder):
    whole = decode(tiny.model, decoder)
    cache, logits, mask, nxt = prompt_cache(tiny.model, PROMPTS)
    got = greedy_decode(tiny.model, cache, logits, mask, nxt, 12, -1, decoder, limits=[3, 12, 1])
    assert got == [whole[0][:3], whole[1], whole[2][:1]]
    with pytest.raises(ValueError, match=r"limits must hold a count >= 1 per sample of the batch's 3, got \[3, 0, 1\]"):
        greedy_decode(tiny.model, cache, logits, mask, nxt, 12, -1, decoder, limits=[3, 0, 1])
    # A limit past max_new_tokens does not lengthen an answer.
    got = greedy_decode(tiny.model, cache, logits, mask, nxt, 4, -1, decoder, limits=[3, 40, 1])
    assert got == [whole[0][:3], whole[1][:4], whole[2][:1]]
    # A sequence of `length` tokens may be followed by answer tokens up to the context's last
    # position, plus the one answer token that is never read.
    assert answer_limits([500, 512, 100, 513], 20, 512) == [13, 1, 20, 0]
    assert answer_limits([500], 20, None) == [20]


@pytest.mark.parametrize("decoder", ["hf", "static"])
def test_n_tokens_take_n_minus_one_forwards(tiny, decoder, monkeypatch):
    """The prompt's forward gives the first token; no forward runs for a token never read."""
    calls = []
    monkeypatch.setattr(decode_module.StaticDecoder, "step", counted(decode_module.StaticDecoder.step, calls))
    handle = tiny.model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        for n in (1, 2, 5):
            calls.clear()
            cache, logits, mask, nxt = prompt_cache(tiny.model, PROMPTS)
            calls.clear()
            limits = [n, n + 5, 2 * n]  # a limit past n does not ask for more
            got = greedy_decode(tiny.model, cache, logits, mask, nxt, n, -1, decoder, limits=limits)
            assert [len(t) for t in got] == [n] * 3 and len(calls) == n - 1
    finally:
        handle.remove()


def counted(fn, calls):
    def wrapper(*args, **kwargs):
        calls.append(1)
        return fn(*args, **kwargs)

    return wrapper


def test_decoding_after_an_image_prompt_answers_as_generate(tiny):
    """What the label job's self answers do: the prompt with its image, then decoding."""
    prompts = [prompt_ids(tiny.num_cells, q) for q in ([9, 17, 33], [11], [7, 21, 60, 61])]
    pixels = torch.randn(3, 3, tiny.image_size, tiny.image_size, generator=torch.Generator().manual_seed(0))
    ids, mask = left_pad(prompts, PAD, "cpu")
    with torch.no_grad():
        out = tiny.model.generate(
            input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=9, do_sample=False, pad_token_id=PAD
        )
    want = out[:, ids.shape[1] :].tolist()
    for decoder in ("hf", "static"):
        assert greedy_answers(tiny.model, ids, mask, pixels, 9, -1, decoder) == want


def test_the_static_decoder_empties_the_prompts_cache_once_copied(tiny, monkeypatch):
    """Nothing reads the prompt's cache after a static decoder has copied it: held on, it
    doubles the decoding memory (7 GiB at 7B and batch 8, with two crops)."""
    caches, real = [], decode_module.prefill

    def recorded(*args):
        caches.append(real(*args))
        return caches[-1]

    monkeypatch.setattr(decode_module, "prefill", recorded)
    ids, mask = left_pad([prompt_ids(tiny.num_cells, [9, 17]), prompt_ids(tiny.num_cells, [11])], PAD, "cpu")
    pixels = torch.randn(2, 3, tiny.image_size, tiny.image_size, generator=torch.Generator().manual_seed(0))
    for decoder in ("static", "hf"):  # the model's forward decodes on the cache itself
        greedy_answers(tiny.model, ids, mask, pixels, 4, -1, decoder)
    assert [len(cache.layers) for cache, *_ in caches] == [0, tiny.model.config.text_config.num_hidden_layers]

    # An answer's pass 2 through the static decoder: its cache is emptied alike.
    import sdrpn.infer.pipeline as pipeline_module

    held, real_decode = [], pipeline_module.greedy_decode

    def decoded(model, cache, *args, **kwargs):
        held.append(cache)
        return real_decode(model, cache, *args, **kwargs)

    monkeypatch.setattr(pipeline_module, "greedy_decode", decoded)
    pipeline(tiny, blob_logits((0, 0, 2, 2), None), decoder="static").generate(
        images(2), QUESTIONS[:2], max_new_tokens=4
    )
    assert [len(cache.layers) for cache in held] == [0]


def test_static_decoder_stops_each_sample_at_its_end_token(tiny):
    free = decode(tiny.model, "hf", max_new_tokens=10)
    eos = free[1][3]  # a token sample 1 reaches at its 4th step stands in for the end token
    want = decode(tiny.model, "hf", max_new_tokens=10, eos=eos)
    assert decode(tiny.model, "static", max_new_tokens=10, eos=eos) == want
    assert want[1] == free[1][: free[1].index(eos) + 1] and len(want[1]) < 10
    for i in (1, 2):
        assert decode(tiny.model, "static", max_new_tokens=i) == [t[:i] for t in free]


def test_sdrpn_answers_alike_with_every_decoder_on_this_device(tiny):
    forced = blob_logits((0, 0, 2, 2), None, (1, 1, 3, 4))
    ims = images(3, seed=1)
    for mode in ("bbox", "mask"):
        sd, ref = pipeline(tiny, forced, decoder="static"), pipeline(tiny, forced, decoder="hf")
        sd.roi = ref.roi = replace(sd.roi, crop_mode=mode)
        want = [a.tokens for a in ref.generate(ims, QUESTIONS, max_new_tokens=7)]
        for _ in range(2):  # the second call reuses the first one's buffers
            assert [a.tokens for a in sd.generate(ims, QUESTIONS, max_new_tokens=7)] == want


def test_a_static_step_never_reads_the_device_on_the_host(tiny):
    cache, logits, mask, nxt = prompt_cache(tiny.model, PROMPTS)
    static = StaticDecoder(tiny.model, 3, 64, graph=False)
    static.load(cache, mask, nxt, logits.argmax(-1), 4)
    with torch.no_grad(), NoHostSync():
        static.step()
        static.step()
    with pytest.raises(AssertionError, match="reads a tensor"), NoHostSync():
        torch.ones(2).sum().item()  # the guard itself catches a sync


def test_the_pool_keeps_a_decoder_per_batch_size_grown_to_the_longest_cache(tiny):
    pool = DecoderPool(sizes=2)
    a = pool.get(tiny.model, 3, 20, graph=False)
    assert a.capacity == 64 and pool.get(tiny.model, 3, 60, graph=False) is a
    b = pool.get(tiny.model, 3, 65, graph=False)
    assert b is not a and b.capacity == 128 and pool.get(tiny.model, 3, 30, graph=False) is b
    c = pool.get(tiny.model, 2, 10, graph=False)
    assert c.batch == 2 and pool.get(tiny.model, 3, 10, graph=False) is b  # two sizes kept
    pool.get(tiny.model, 1, 10, graph=False)  # a third size drops the least recently used (2)
    assert pool.get(tiny.model, 3, 10, graph=False) is b and pool.get(tiny.model, 2, 10, graph=False) is not c
    pool.clear()
    assert pool.get(tiny.model, 3, 10, graph=False) is not b


def test_a_longer_decoder_attends_over_the_bucket_it_needs(tiny):
    """A decoder grown for a long cache answers a short one as the model does."""
    pool = DecoderPool()
    long_prompts = [p * 8 for p in PROMPTS]
    assert decode(tiny.model, "static", pool=pool, prompts=long_prompts) == decode(
        tiny.model, "hf", prompts=long_prompts
    )
    decoder = pool.get(tiny.model, 3, 1, graph=False)
    assert decoder.capacity == 128
    assert decode(tiny.model, "static", pool=pool) == decode(tiny.model, "hf")
    assert decoder.length == 64 and pool.get(tiny.model, 3, 1, graph=False) is decoder


def test_load_refuses_a_cache_that_does_not_fit(tiny):
    cache, logits, mask, nxt = prompt_cache(tiny.model, PROMPTS)
    static = StaticDecoder(tiny.model, 3, 64, graph=False)
    with pytest.raises(ValueError, match="9 cached \\+ 56 new slots exceed the decoder's 64"):
        static.load(cache, mask, nxt, logits.argmax(-1), 56)
    with pytest.raises(ValueError, match="the decoder holds 3 samples, the mask 2"):
        static.load(cache, mask[:2], nxt, logits.argmax(-1), 1)
    with pytest.raises(ValueError, match="capacity must be a multiple of 64, got 12"):
        StaticDecoder(tiny.model, 3, 12, graph=False)
    with pytest.raises(ValueError, match="cache layer 0 holds 9 slots, the mask 8"):
        static.load(cache, mask[:, 1:], nxt, logits.argmax(-1), 1)


def test_resolve_decoder_names_what_is_refused(tiny):
    assert resolve_decoder("auto", tiny.model) == ("graph" if next(tiny.model.parameters()).is_cuda else "hf")
    assert resolve_decoder("static", tiny.model) == "static"
    with pytest.raises(ValueError, match="decoder must be one of .* got 'beam'"):
        resolve_decoder("beam", tiny.model)
    if not next(tiny.model.parameters()).is_cuda:
        with pytest.raises(ValueError, match="decoder 'graph' needs the model on a CUDA device"):
            resolve_decoder("graph", tiny.model)
    with pytest.raises(ValueError, match="decoder must be one of"):
        pipeline(tiny, decoder="fast")
    with pytest.raises(ValueError, match="decoder must be resolved to 'hf', 'static' or 'graph', got 'auto'"):
        decode(tiny.model, "auto")


def test_a_rope_that_reads_positions_on_the_host_keeps_the_models_forward(tiny, monkeypatch):
    monkeypatch.setattr(tiny.model.get_decoder().rotary_emb, "rope_type", "dynamic")
    assert resolve_decoder("auto", tiny.model) == "hf"
    with pytest.raises(ValueError, match="decoder 'static' needs a RoPE without host-side updates, got 'dynamic'"):
        resolve_decoder("static", tiny.model)


def test_other_text_models_keep_the_models_forward():
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28
        ),
        text_config=MistralConfig(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
        ),
    )
    model = LlavaForConditionalGeneration(config)
    assert resolve_decoder("auto", model) == "hf"
    with pytest.raises(ValueError, match="decoder .static. needs a Llama text model, got MistralModel"):
        resolve_decoder("static", model)


class FakeStream:
    def wait_stream(self, other):
        pass


def fake_graphs(monkeypatch, fail: bool = False) -> list:
    """CUDA streams and graphs stood in for on the CPU: a capture runs nothing and a replay
    runs the captured step, as on the device; returns the list of captures."""
    captures = []

    def capture(fn, stream, pool=None):
        if fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        captures.append(fn)
        return fn

    monkeypatch.setattr(decode_module, "capture_graph", capture)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    monkeypatch.setattr(decode_module, "capture_stream", lambda device: FakeStream())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: FakeStream())
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    return captures


def test_graph_mode_warms_up_captures_once_per_length_and_replays(tiny, monkeypatch):
    captures = fake_graphs(monkeypatch)
    pool = DecoderPool()
    long_prompts = [p * 8 for p in PROMPTS]
    want_long, want = decode(tiny.model, "hf", prompts=long_prompts), decode(tiny.model, "hf")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="CUDA graph capture failed")
        for _ in range(2):
            assert decode(tiny.model, "graph", pool=pool, prompts=long_prompts) == want_long
            assert decode(tiny.model, "graph", pool=pool) == want
    assert len(captures) == 2  # lengths 128 and 64 on the same buffers, each captured once
    assert pool.graph_counts() == {"graphs": 2, "failed_captures": 0}
    eos = want[1][3]
    assert decode(tiny.model, "graph", eos=eos, pool=pool) == decode(tiny.model, "hf", eos=eos)


def test_kept_decoders_and_image_graphs_follow_a_model_cast_or_moved(monkeypatch):
    """Buffers and graphs hold the weights' dtype and addresses: after ``model.to(...)``
    a kept decoder or graph would read the old ones, so they are made again."""
    captures = fake_graphs(monkeypatch)
    model = make_tiny_llava(num_layers=2, grid=4).model
    pool = DecoderPool()
    decode(model, "static", pool=pool)
    kept = pool.get(model, 3, 1, graph=False)
    model.to(torch.float64)
    assert decode(model, "static", pool=pool) == decode(model, "hf")
    assert pool.get(model, 3, 1, graph=False) is not kept and len(pool._decoders) == 1
    encoder = ImageEncoder(model.float(), graph=True)
    (pixels,) = encoder_inputs(model, [1])
    encoder(pixels)
    model.double().float()  # the same dtype, new tensors
    torch.testing.assert_close(encoder(pixels), image_features(model, pixels), rtol=0, atol=0)
    assert len(captures) == 2 and len(encoder._graphs) == 1


def test_a_failed_capture_warns_and_decodes_without_graphs(tiny, monkeypatch):
    fake_graphs(monkeypatch, fail=True)
    pool = DecoderPool()
    with pytest.warns(UserWarning, match="CUDA graph capture failed, decoding without graphs: operation not") as seen:
        assert decode(tiny.model, "graph", pool=pool) == decode(tiny.model, "hf")
    assert [w.filename for w in seen] == [__file__]  # the line that called into sdrpn
    assert not pool.get(tiny.model, 3, 1, graph=True).use_graph
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="CUDA graph capture failed")  # it warned once
        assert decode(tiny.model, "graph", pool=pool) == decode(tiny.model, "hf")
    assert pool.graph_counts() == {"graphs": 0, "failed_captures": 1}
    pool.get(tiny.model, 3, 10**4, graph=True)  # a longer cache: the failed decoder is replaced
    pool.clear()
    assert pool.graph_counts() == {"graphs": 0, "failed_captures": 1}  # a benchmark still sees it


def test_a_failed_capture_names_the_error_inside_it():
    """The capture's end raises its own error; the one an op raised inside is its context."""
    try:
        try:
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore")
        except RuntimeError:
            raise RuntimeError("operation failed due to a previous error during capture")  # noqa: B904
    except RuntimeError as error:
        assert capture_error(error) == (
            "operation failed due to a previous error during capture <- "
            "CUDA error: operation not permitted when stream is capturing"
        )


def test_a_cache_keeps_only_the_layers_its_caller_reads_once_copied(tiny):
    want = decode(tiny.model, "hf")
    cache, logits, mask, nxt = prompt_cache(tiny.model, PROMPTS)
    got = greedy_decode(tiny.model, cache, logits, mask, nxt, 12, -1, "static", keep_layers=0)
    assert got == want and len(cache.layers) == 0
    cache, logits, mask, nxt = prompt_cache(tiny.model, PROMPTS)
    first = cache.layers[0]
    assert greedy_decode(tiny.model, cache, logits, mask, nxt, 12, -1, "static", keep_layers=2) == want
    assert len(cache.layers) == 2 and cache.layers[0] is first
    cache, logits, mask, nxt = prompt_cache(tiny.model, PROMPTS)
    greedy_decode(tiny.model, cache, logits, mask, nxt, 12, -1, "static")
    assert len(cache.layers) == len(tiny.model.get_decoder().layers)  # the caller's, kept
    cache, logits, mask, nxt = prompt_cache(tiny.model, PROMPTS)
    assert greedy_decode(tiny.model, cache, logits, mask, nxt, 12, -1, "hf", keep_layers=0) == want
    assert len(cache.layers) == len(tiny.model.get_decoder().layers)  # decoded on: every layer


def encoder_inputs(model, counts, seed=0):
    gen = torch.Generator().manual_seed(seed)
    size = model.config.vision_config.image_size
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    return [torch.randn(n, 3, size, size, generator=gen).to(device, dtype) for n in counts]


def test_image_encoder_replays_a_graph_per_small_batch(tiny, monkeypatch):
    captures = fake_graphs(monkeypatch)
    encoder = ImageEncoder(tiny.model, graph=True)
    counts = [1, 2, 1, 2, GRAPH_MAX_IMAGES + 1]
    runs = []
    tower = tiny.model.model.vision_tower
    for pixels in encoder_inputs(tiny.model, counts):
        want = image_features(tiny.model, pixels)
        assert want.shape == (pixels.shape[0], tiny.num_cells, tiny.model.config.text_config.hidden_size)
        hook = tower.register_forward_hook(lambda *_: runs.append(1))
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="CUDA graph capture failed")
            torch.testing.assert_close(encoder(pixels), want, rtol=0, atol=0)
        hook.remove()
    assert len(captures) == 2 and sorted(shape[0] for shape, _ in encoder._graphs) == [1, 2]  # none above 4
    assert len(runs) == len(counts)  # a capture's first call answers with its warm-up run
    encoder.clear()
    assert not encoder._graphs


def test_a_failed_image_encoder_capture_warns_and_encodes_eagerly(tiny, monkeypatch):
    fake_graphs(monkeypatch, fail=True)
    encoder = ImageEncoder(tiny.model, graph=True)
    first, second = encoder_inputs(tiny.model, [2, 2])
    with pytest.warns(UserWarning, match="capture failed, encoding images without graphs: operation") as seen:
        torch.testing.assert_close(encoder(first), image_features(tiny.model, first), rtol=0, atol=0)
    assert [w.filename for w in seen] == [__file__]
    assert not encoder.use_graph and encoder.graph_counts() == {"graphs": 0, "failed_captures": 1}
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="CUDA graph capture failed")  # it warned once
        torch.testing.assert_close(encoder(second), image_features(tiny.model, second), rtol=0, atol=0)


@needs_cuda
def test_image_encoder_graphs_on_cuda():
    model = make_tiny_llava(num_layers=2, grid=4).model.cuda()
    encoder = ImageEncoder(model, graph=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="CUDA graph capture failed")
        outs = [(encoder(p), image_features(model, p)) for p in encoder_inputs(model, [1, 3, 1, 3, 1])]
    assert sorted(shape[0] for shape, _ in encoder._graphs) == [1, 3]
    for got, want in outs:  # each call's features are its own, not the graph's output buffer
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.equal(outs[0][0], outs[2][0])


@needs_cuda
def test_graph_decoder_answers_as_the_models_forward_on_cuda():
    tiny = make_tiny_llava(num_layers=4, grid=4)
    model = tiny.model.cuda()
    want = decode(model, "hf")
    pool = DecoderPool()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="CUDA graph capture failed")  # here it is a failure
        first = decode(model, "graph", pool=pool)
        decoder = pool.get(model, 3, 1, graph=True)
        replays = dict(decoder._graphs)
        again = decode(model, "graph", pool=pool)  # replayed from the first call's capture
    assert len(replays) == 1 and decoder._graphs == replays and decoder.use_graph
    assert first == want and again == want
    eos = want[1][3]
    assert decode(model, "graph", eos=eos, pool=pool) == decode(model, "hf", eos=eos)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_graph_decoder_in_half_precision_on_cuda(dtype):
    """The dtypes a GPU runs LLaVA in: replays give the static steps' tokens exactly (the
    same kernels). In float16 the model's own forward agrees but for a near tie; bfloat16's
    8-bit mantissa makes ties on this tiny random model common, so there a NaN (argmax
    picks it: token 0 throughout) is what is ruled out."""
    model = make_tiny_llava(num_layers=4, grid=4).model.to("cuda", dtype)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="CUDA graph capture failed")
        graph = decode(model, "graph", pool=DecoderPool())
    static, hf = decode(model, "static"), decode(model, "hf")
    assert graph == static
    assert any(t != 0 for answer in static for t in answer)
    if dtype == torch.float16:
        assert sum(a == b for a, b in zip(static, hf)) >= 2, (static, hf)


def test_self_answer_maps_through_the_static_decoder_keep_only_the_probed_layers(tiny, monkeypatch):
    """The label job's self answers through a static decoder: the prompt's cache keeps the
    layers the maps read (up to the deepest probed one) while decoding, and the answers and
    maps are the model's own forward's."""
    import sdrpn.llava.maps as maps_module
    from sdrpn.llava import HeadSelection, LlavaPreset

    preset = LlavaPreset("tiny", grounding=HeadSelection(((1, 1), (1, 0))), sink=HeadSelection(((0, None),)))
    gen = torch.Generator().manual_seed(0)
    prompts = [prompt_ids(tiny.num_cells, torch.randint(7, 64, (n,), generator=gen).tolist()) for n in (4, 1, 6)]
    pixels = torch.randn(3, 3, tiny.image_size, tiny.image_size, generator=gen)
    ids, mask = left_pad(prompts, PAD)
    options = {"max_new_tokens": 6, "eos_id": -1, "pad_id": PAD}
    caches, real = [], maps_module.prefill

    def recorded(*args):
        caches.append(real(*args))
        return caches[-1]

    monkeypatch.setattr(maps_module, "prefill", recorded)
    want, want_maps = maps_module.self_answer_maps(tiny.model, ids, mask, pixels, preset, 16, decoder="hf", **options)
    got, maps = maps_module.self_answer_maps(tiny.model, ids, mask, pixels, preset, 16, decoder="static", **options)
    assert got == want
    torch.testing.assert_close(maps.grounding, want_maps.grounding, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(maps.sink, want_maps.sink, rtol=1e-4, atol=1e-6)
    assert [len(cache.layers) for cache, *_ in caches] == [4, 2]


@needs_cuda
def test_self_answer_maps_with_graphs_on_cuda():
    """The label job's self answers: decoded through graphs on the prompt's cache, then
    mapped on that same cache, as through the model's own forward."""
    from sdrpn.llava import HeadSelection, LlavaPreset
    from sdrpn.llava.maps import self_answer_maps

    tiny = make_tiny_llava(num_layers=4, grid=4)
    model = tiny.model.cuda()
    preset = LlavaPreset("tiny", grounding=HeadSelection(((2, 1), (1, 0))), sink=HeadSelection(((0, None),)))
    gen = torch.Generator().manual_seed(0)
    prompts = [prompt_ids(tiny.num_cells, torch.randint(7, 64, (n,), generator=gen).tolist()) for n in (4, 1, 6)]
    pixels = torch.randn(3, 3, tiny.image_size, tiny.image_size, generator=gen).cuda()
    ids, mask = left_pad(prompts, PAD, "cuda")
    options = {"max_new_tokens": 6, "eos_id": -1, "pad_id": PAD}
    want, want_maps = self_answer_maps(model, ids, mask, pixels, preset, 16, decoder="hf", **options)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="CUDA graph capture failed")
        got, maps = self_answer_maps(
            model, ids, mask, pixels, preset, 16, decoder="graph", pool=DecoderPool(), **options
        )
    assert got == want
    torch.testing.assert_close(maps.grounding, want_maps.grounding, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(maps.sink, want_maps.sink, rtol=1e-4, atol=1e-6)


@needs_cuda
def test_sdrpn_answers_alike_with_graphs_on_cuda():
    tiny = make_tiny_llava(num_layers=4, grid=4)
    tiny.model.cuda()
    forced = blob_logits((0, 0, 2, 2), None, (1, 1, 3, 4))
    ims = images(3, seed=1)
    want = [a.tokens for a in pipeline(tiny, forced, decoder="hf").generate(ims, QUESTIONS, max_new_tokens=7)]
    sd = pipeline(tiny, forced)
    assert sd.decoder == "graph"
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="CUDA graph capture failed")
        for _ in range(2):
            assert [a.tokens for a in sd.generate(ims, QUESTIONS, max_new_tokens=7)] == want


@needs_cuda
def test_mask_crops_pass2_groups_and_stage_timings_on_cuda():
    """On CUDA: mask-mode crops (kept tokens picked by indices sent ahead), pass 2 in
    groups, graphs, against one padded pass 2 through the model's own forward; the stage
    timings come from events."""
    tiny = make_tiny_llava(num_layers=4, grid=4)
    tiny.model.cuda()
    forced = blob_logits((0, 0, 1, 4), None, (1, 1, 3, 3))
    forced.view(3, 4, 4)[0, 3, :] = 10.0  # two bands: one crop keeping 8 of its 16 tokens
    ims = images(3, seed=2)
    roi = RoiOptions(threshold=0.3)
    want = pipeline(tiny, forced, decoder="hf", roi=roi, pass2_group_cost=10**9).generate(ims, QUESTIONS, 6)
    got = pipeline(tiny, forced, roi=roi, pass2_group_cost=0).generate(ims, QUESTIONS, 6)
    assert [a.tokens for a in got] == [a.tokens for a in want]
    assert [[int(k.sum()) for k in a.rois.keep] for a in got] == [[8], [], [16]]
    timings = got[0].timings
    assert set(timings) == {"prompt", "rpn", "boxes", "crop_encode", "pass2_decode", "total"}
    assert all(v >= 0 for v in timings.values()) and timings["pass2_decode"] > 0


@needs_cuda
def test_every_capture_on_a_device_runs_on_one_stream():
    """Graphs share a memory pool only when captured on one stream; each stream would also
    keep a cuBLAS workspace of its own."""
    here = torch.cuda.current_device()
    stream = decode_module.capture_stream(torch.device("cuda"))
    assert decode_module.capture_stream(torch.device("cuda", here)) is stream
    assert stream.device == torch.device("cuda", here) and stream != torch.cuda.current_stream()
