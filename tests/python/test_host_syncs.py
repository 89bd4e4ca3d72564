"""How often each op makes the host wait for the GPU: what the README promises (none for
the per-sample ops, one read of a size or bound for the others), counted by torch's sync
debug mode, which warns at every synchronising CUDA call. A batch of images goes over
without a wait too."""

import warnings

import pytest
import torch

import sdrpn
from attention_samples import make_attention_inputs
from conftest import needs_cuda
from label_samples import make_label_inputs
from rpn_samples import make_rpn_inputs
from sdrpn.llava.inputs import pixel_batch
from sink_samples import SINK_DIMS, make_hidden


def _calls():
    labels = make_label_inputs(8, 24, 24, device="cuda")
    hidden = make_hidden(2, 40, device="cuda")
    rows = make_attention_inputs(padding="left", device="cuda")
    rpn_args, rpn_kwargs = make_rpn_inputs(device="cuda")
    prob = torch.rand(8, 24, 24, device="cuda") ** 4
    images = [torch.rand(3, 336, 336) for _ in range(4)]
    return {
        "pixel_batch": (0, lambda: pixel_batch(images, "cuda", torch.float16)),
        "pseudo_labels": (0, lambda: sdrpn.ops.pseudo_labels(labels.grounding, labels.sink, 24, 24)),
        "massive_activation_sinks": (0, lambda: sdrpn.ops.massive_activation_sinks(hidden, SINK_DIMS)),
        "rpn_scores": (0, lambda: sdrpn.ops.rpn_scores(*rpn_args, **rpn_kwargs)),
        "attention_rows": (
            1,
            lambda: sdrpn.ops.attention_rows(*rows.args(), key_padding_mask=rows.key_padding_mask),
        ),
        "roi_boxes": (1, lambda: sdrpn.ops.roi_boxes(prob)),
        "roi_crops mask": (1, lambda: sdrpn.ops.roi_crops(prob, mode="mask")),
        "roi_crops bbox": (1, lambda: sdrpn.ops.roi_crops(prob, mode="bbox")),
    }


@needs_cuda
@pytest.mark.parametrize(
    "op",
    [
        "pixel_batch",
        "pseudo_labels",
        "massive_activation_sinks",
        "rpn_scores",
        "attention_rows",
        "roi_boxes",
        "roi_crops mask",
        "roi_crops bbox",
    ],
)
def test_cuda_host_synchronisations_per_call(op):
    want, call = _calls()[op]
    call()  # the libraries' first-use set-up is not the op's
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            call()
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == want, [str(w.message) for w in syncs]
