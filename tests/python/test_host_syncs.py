"""How often each op makes the host wait for the GPU: what the README promises (none for
the per-sample ops, one read of a size or bound for the others), counted by torch's sync
debug mode, which warns at every synchronising CUDA call. A batch of images goes over
without a wait too, and the label pass's rows of a subset of heads wait only in
attention_rows."""

import warnings

import pytest
import torch

import sdrpn
from attention_samples import make_attention_inputs
from conftest import needs_cuda
from label_samples import make_label_inputs
from rpn_samples import make_rpn_inputs
from sdrpn.llava.inputs import pixel_batch
from sdrpn.llava.maps import AnswerRows, _rows_on_image
from sink_samples import SINK_DIMS, make_hidden


def _calls():
    labels = make_label_inputs(8, 24, 24, device="cuda")
    hidden = make_hidden(2, 40, device="cuda")
    rows = make_attention_inputs(padding="left", device="cuda")
    rpn_args, rpn_kwargs = make_rpn_inputs(device="cuda")
    prob = torch.rand(8, 24, 24, device="cuda") ** 4
    images = [torch.rand(3, 336, 336) for _ in range(4)]
    # A probed layer's q (every position) and k: some heads' rows of it wait only in attention_rows.
    probed = make_attention_inputs(heads=8, kv_heads=4, padding="left", device="cuda")
    full_query = torch.randn(*probed.key.shape[:1], 8, *probed.key.shape[2:], device="cuda")
    positions = probed.query_positions.clamp(min=0)
    answer_rows = AnswerRows(8, positions, positions >= 0, probed.key_start, probed.key_length, probed.key_padding_mask)
    return {
        "pixel_batch": (0, lambda: pixel_batch(images, "cuda", torch.float16)),
        "rows of some heads": (1, lambda: _rows_on_image(full_query, probed.key, [1, 2, 7], answer_rows)),
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
        "rows of some heads",
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
