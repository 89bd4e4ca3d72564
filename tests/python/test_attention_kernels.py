"""Every path of sdrpn that runs the model's attention runs it with cuDNN's SDPA backend off
(sdrpn.llava.attention_kernels says why), and gives the caller's setting back. The flag is
read inside each SDPA call, so this holds on the CPU as on a GPU."""

import threading

import pytest
import torch

from infer_samples import QUESTIONS, TEMPLATE, blob_logits, images, pipeline
from sdrpn.infer.baseline import BaseLlava
from sdrpn.llava import HeadSelection, LlavaPreset
from sdrpn.llava.attention_kernels import without_cudnn_attention
from sdrpn.llava.backbone import branch_hidden_states
from sdrpn.llava.inputs import left_pad
from sdrpn.llava.maps import given_answer_maps, self_answer_maps
from sdrpn.llava.vision import ImageEncoder
from sdrpn.rpn.model import RegionProposalNetwork, rpn_loss
from tiny_llava import EOS, IMAGE, PAD, make_tiny_llava, make_tokenizer, prompt_ids, random_tokens

PRESET = LlavaPreset("tiny", grounding=HeadSelection(((2, 1), (1, 0))), sink=HeadSelection(((0, None),)))


@pytest.fixture(scope="module")
def tiny():
    return make_tiny_llava()


@pytest.fixture
def sdpa_calls(monkeypatch):
    """Whether cuDNN attention was enabled at each SDPA call, with torch's default (on)
    outside sdrpn; on exit, that the default is back."""
    seen = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append(torch.backends.cuda.cudnn_sdp_enabled())
        return real(*args, **kwargs)

    before = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(True)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    try:
        yield seen
        assert torch.backends.cuda.cudnn_sdp_enabled(), "the caller's setting was not given back"
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)


def _no_cudnn(seen):
    assert seen, "no SDPA call was seen"
    assert not any(seen), f"{sum(seen)} of {len(seen)} SDPA calls ran with cuDNN attention enabled"


@pytest.mark.parametrize("decoder", ["static", "hf"])
def test_answering_with_and_without_crops(tiny, sdpa_calls, decoder):
    ims = images(2)
    forced = pipeline(tiny, blob_logits((0, 0, 2, 2), None), decoder=decoder)  # crops, pass 2
    forced.generate(ims, QUESTIONS[:2], max_new_tokens=3)
    rpn = RegionProposalNetwork.from_llava(tiny.model, branch_layer=2, depth=2)
    real = pipeline(tiny, decoder=decoder)  # the RPN's own layers
    real.rpn = rpn.eval()
    real.generate(ims, QUESTIONS[:2], max_new_tokens=3)
    BaseLlava(tiny.model, make_tokenizer(), prompt_template=TEMPLATE).generate(ims, QUESTIONS[:2], 3)
    _no_cudnn(sdpa_calls)


def test_image_encoder(tiny, sdpa_calls):
    ImageEncoder(tiny.model, graph=False)(torch.randn(2, 3, tiny.image_size, tiny.image_size))
    _no_cudnn(sdpa_calls)


def test_label_maps_with_given_and_self_answers(tiny, sdpa_calls):
    gen = torch.Generator().manual_seed(0)
    prompts = [prompt_ids(tiny.num_cells, random_tokens(gen, n)) for n in (4, 2)]
    answers = [random_tokens(gen, 2) + [EOS], [EOS]]
    pixels = torch.randn(2, 3, tiny.image_size, tiny.image_size, generator=gen)
    given_answer_maps(tiny.model, prompts, answers, pixels, PRESET, tiny.num_cells, PAD)
    ids, mask = left_pad(prompts, PAD)
    for decoder in ("static", "hf"):
        self_answer_maps(
            tiny.model, ids, mask, pixels, PRESET, tiny.num_cells, max_new_tokens=3, eos_id=EOS, pad_id=PAD,
            decoder=decoder,
        )  # fmt: skip
    _no_cudnn(sdpa_calls)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_rpn_training_step(tiny, sdpa_calls, checkpointing):
    """The backward's kernel is the forward's, and a checkpointed layer runs its forward
    again inside backward(), after the RPN's call has returned."""
    gen = torch.Generator().manual_seed(1)
    ids, mask = left_pad([prompt_ids(tiny.num_cells, random_tokens(gen, n)) for n in (5, 1)], PAD)
    pixels = torch.randn(2, 3, tiny.image_size, tiny.image_size, generator=gen)
    rpn = RegionProposalNetwork.from_llava(tiny.model, branch_layer=2, depth=2).train()
    if checkpointing:
        rpn.gradient_checkpointing_enable()
    hidden, pos = branch_hidden_states(tiny.model, ids, mask, pixels, 2)
    logits = rpn(hidden, mask, pos, ids == IMAGE)
    forward_calls = len(sdpa_calls)
    rpn_loss(logits, (torch.rand(logits.shape, generator=gen) > 0.5).long()).backward()
    assert (len(sdpa_calls) > forward_calls) == checkpointing  # the recomputation was seen
    _no_cudnn(sdpa_calls)


def test_the_callers_setting_is_kept_inside_out():
    before = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        for setting in (True, False):
            torch.backends.cuda.enable_cudnn_sdp(setting)
            with without_cudnn_attention():
                assert not torch.backends.cuda.cudnn_sdp_enabled()
                with without_cudnn_attention():  # nested
                    pass
                assert not torch.backends.cuda.cudnn_sdp_enabled()
            assert torch.backends.cuda.cudnn_sdp_enabled() is setting
        torch.backends.cuda.enable_cudnn_sdp(True)
        with pytest.raises(RuntimeError), without_cudnn_attention():
            raise RuntimeError("out of memory")
        assert torch.backends.cuda.cudnn_sdp_enabled()  # given back on an error too
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)


def test_threads_inside_at_once_keep_it_off_until_the_last_leaves():
    """Two threads' calls overlapping (A in, B in, A out, B out): B runs its part after A
    left without cuDNN still, and the setting found before A is back after B."""
    before = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(True)
    b_inside, a_left = threading.Event(), threading.Event()
    seen = {}

    def a():
        with without_cudnn_attention():
            b_inside.wait(10)
        a_left.set()

    def b():
        with without_cudnn_attention():
            b_inside.set()
            a_left.wait(10)
            seen["b after a left"] = torch.backends.cuda.cudnn_sdp_enabled()

    try:
        threads = [threading.Thread(target=a), threading.Thread(target=b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        assert seen == {"b after a left": False}
        assert torch.backends.cuda.cudnn_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)


def test_the_synthetic_tasks_training_and_answers(tmp_path, sdpa_calls):
    from sdrpn.synth.evaluate import answer_with_views
    from sdrpn.synth.model import TinyLlavaSpec
    from sdrpn.synth.task import make_sample
    from sdrpn.synth.train_base import BaseTrainConfig, BaseTrainer, make_batch

    spec = TinyLlavaSpec(vision_layers=1, text_layers=2, vision_hidden=32, text_hidden=32)
    cfg = BaseTrainConfig(out=str(tmp_path / "b"), steps=4, encoder_steps=0, batch_size=2, spec=spec, bf16=False)
    trainer = BaseTrainer(cfg)
    trainer.step(make_batch(0, cfg, trainer.tok, trainer.image_id))
    answer_with_views(trainer.model, trainer.tok, [make_sample(s) for s in range(2)], "gt", max_new_tokens=2)
    _no_cudnn(sdpa_calls)
