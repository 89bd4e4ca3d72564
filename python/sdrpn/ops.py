"""Typed wrappers, fake kernels and helpers for the ops under ``torch.ops.sdrpn``.

Every op runs on CPU and CUDA, for float32, float64, float16 and bfloat16 inputs,
batched over the leading dimension; thresholds are applied in the input's math type
(float32 for float16/bfloat16, the input type otherwise), except that roi_boxes and
roi_crops blur and threshold in float32 whatever the input (their blurred maps are float32).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from . import _C  # noqa: F401  (registers the ops)

__all__ = [
    "pseudo_labels",
    "pseudo_label_stats",
    "massive_activation_sinks",
    "attention_rows",
    "rpn_scores",
    "roi_boxes",
    "roi_crops",
]

# The label of cells that carry no signal (PyTorch's loss convention), and tau_sink: from
# this sink-probe value a token is an attention sink (SPEC Stage 1). Every layer of the
# package takes these two from here.
IGNORE_INDEX = -100
SINK_THRESHOLD = 1e-3


def pseudo_labels(
    grounding: Tensor,
    sink: Tensor,
    grid_h: int,
    grid_w: int,
    *,
    sink_threshold: float = SINK_THRESHOLD,
    fg_ratio: float = 0.2,
    bg_ratio: float = 0.1,
    max_box_fraction: float = 0.5,
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """Denoised pseudo labels from attention maps (SPEC Stage 1, "Labelling").

    Per sample: zero the cells whose sink map is ``>= sink_threshold``; with ``m`` the
    maximum of what is left, foreground is ``value > fg_ratio * m``; the box is the tight
    grid box of the foreground (the whole grid when there is none); background is
    ``value < bg_ratio * m`` outside the box; a box of ``>= max_box_fraction * N`` cells
    makes the sample all-ignore, and so does any NaN or Inf in either map.

    Args:
        grounding: (B, N) grounding attention map, N == grid_h * grid_w, row-major cells.
            float32, float64, float16 or bfloat16.
        sink: (B, N) sink-probe attention map, same dtype and device as ``grounding``.
        grid_h: grid rows.
        grid_w: grid columns.
        sink_threshold: sink map value from which a cell is a sink (tau_sink).
        fg_ratio: foreground ratio alpha (>= 0).
        bg_ratio: background ratio beta (>= 0).
        max_box_fraction: rho (> 0); values above 1 turn the box-size rule off.
        ignore_index: label of cells that carry no signal.

    Returns:
        (B, N) int64: 1 foreground, 0 background, ``ignore_index`` elsewhere.
    """
    return torch.ops.sdrpn.pseudo_labels.default(
        grounding,
        sink,
        grid_h,
        grid_w,
        sink_threshold,
        fg_ratio,
        bg_ratio,
        max_box_fraction,
        ignore_index,
    )


def pseudo_label_stats(labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Per-sample label counts.

    Args:
        labels: (B, N) int64 labels from :func:`pseudo_labels`.
        ignore_index: the value used for ignored cells.

    Returns:
        (B, 3) int64: foreground, background and ignored cells of each sample.

    Labels other than 1, 0 and ``ignore_index`` are refused, so that the counts add up to N
    (one host synchronisation).
    """
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a tensor, got {type(labels).__name__}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int) or not -(2**63) <= ignore_index < 2**63:
        raise ValueError(f"ignore_index must be an int of 64 bits, got {ignore_index!r}")
    if labels.dim() != 2:
        raise ValueError(f"labels must be (B, N), got shape {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    stats = torch.stack([(labels == 1).sum(1), (labels == 0).sum(1), (labels == ignore_index).sum(1)], dim=1)
    counted = stats.sum(1) != labels.shape[1]
    if bool(counted.any()):
        sample = int(counted.nonzero()[0, 0])
        others = sorted({int(v) for v in labels[sample].unique()} - {0, 1, ignore_index})
        raise ValueError(
            f"labels must hold 1, 0 and ignore_index={ignore_index} only, got {others[:5]} in labels[{sample}]"
        )
    return stats


def massive_activation_sinks(hidden: Tensor, dims: Sequence[int], *, tau: float = 20.0, eps: float = 1e-6) -> Tensor:
    """Sink tokens by massive activations (the VisAttnSink detector), in one pass.

    A token is a sink where ``max_{d in dims} |h_d| / sqrt(mean(h^2) + eps) > tau``. A token
    whose hidden state holds NaN is never a sink (the comparison is false): flagging it would
    zero its grounding value and hide the fault, while left alone its NaN reaches the
    attention maps, where the pseudo labels ignore the whole sample.

    Args:
        hidden: (B, L, D) hidden states entering a decoder layer; float32, float64,
            float16 or bfloat16.
        dims: the sink dimensions, e.g. (2533, 1415) for LLaMA-2-7B, (2100, 4743) for 13B;
            at most 64 (the CUDA kernel takes them as launch arguments, with no copy).
        tau: threshold on the RMS-normalised activation.
        eps: added to the mean square, as in RMSNorm.

    Returns:
        (B, L) bool.
    """
    return torch.ops.sdrpn.massive_activation_sinks.default(hidden, list(dims), tau, eps)


def attention_rows(
    query: Tensor,
    key: Tensor,
    query_positions: Tensor,
    key_start: Tensor,
    key_length: int,
    *,
    key_padding_mask: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """Softmax attention rows of selected queries, kept on a window of key columns.

    The attention weights that eager attention would return for these rows, without
    materialising them for every query: the softmax runs over ALL visible keys, and only
    columns ``key_start[b] .. key_start[b] + key_length - 1`` are kept (no
    renormalisation). Scores are accumulated in float32 (float64 for float64 inputs) and
    the softmax runs on float32 scores for every input dtype: float64 inputs get float32
    attention, and a score beyond float32's range makes its row NaN. The scale multiplies
    the GEMM's sums, not the query, so float16 and bfloat16 inputs lose nothing when TF32
    matmuls are allowed (their values are exact in TF32).

    Args:
        query: (B, H, Q, d) post-RoPE queries of the wanted rows.
        key: (B, Hk, L, d) post-RoPE keys of the whole sequence; Hk divides H (GQA).
        query_positions: (B, Q) int64 sequence position of each query; key j is visible
            to it iff ``j <= position`` and ``key_padding_mask[b, j]``.
        key_start: (B,) int64 first kept column of each sample (moves with left padding).
        key_length: number of kept columns.
        key_padding_mask: optional (B, L) bool, True for real tokens.
        scale: score scale, default ``1 / sqrt(d)``; finite, and within float32's range
            for inputs other than float64.

    Returns:
        (B, H, Q, key_length) float32; 0 for columns a query cannot see.
    """
    return torch.ops.sdrpn.attention_rows.default(
        query, key, query_positions, key_start, key_length, key_padding_mask, scale
    )


def _check_same_device(ref_name: str, ref: Tensor, **tensors: Tensor | None) -> None:
    """The kernels' device check, for the fake kernels: mixing meta tensors with real ones
    dispatches here, where an unchecked result would be uninitialised memory."""
    for name, t in tensors.items():
        if t is not None:
            torch._check(
                t.device == ref.device,
                lambda: f"{name} must be on the device of {ref_name} ({ref.device}), got {t.device}",  # noqa: B023
            )


@torch.library.register_fake("sdrpn::attention_rows")
def _attention_rows_fake(query, key, query_positions, key_start, key_length, key_padding_mask=None, scale=None):
    torch._check(query.dim() == 4, lambda: f"query must be (B, H, Q, d), got {query.shape}")
    torch._check(key.dim() == 4, lambda: f"key must be (B, Hk, L, d), got {key.shape}")
    _check_same_device(
        "query", query, key=key, query_positions=query_positions, key_start=key_start, key_padding_mask=key_padding_mask
    )
    b, h, q, _ = query.shape
    return query.new_empty((b, h, q, key_length), dtype=torch.float32)


@torch.library.register_fake("sdrpn::pseudo_labels")
def _pseudo_labels_fake(
    grounding,
    sink,
    grid_h,
    grid_w,
    sink_threshold=SINK_THRESHOLD,
    fg_ratio=0.2,
    bg_ratio=0.1,
    max_box_fraction=0.5,
    ignore_index=IGNORE_INDEX,
):
    torch._check(grounding.dim() == 2, lambda: f"grounding must be (B, N), got {grounding.shape}")
    torch._check(sink.shape == grounding.shape, lambda: "sink must have the shape of grounding")
    _check_same_device("grounding", grounding, sink=sink)
    torch._check(
        grounding.shape[1] == grid_h * grid_w,
        lambda: f"grounding has N = {grounding.shape[1]} cells but grid is {grid_h}x{grid_w}",
    )
    return grounding.new_empty(grounding.shape, dtype=torch.long)


@torch.library.register_fake("sdrpn::massive_activation_sinks")
def _massive_activation_sinks_fake(hidden, dims, tau=20.0, eps=1e-6):
    torch._check(hidden.dim() == 3, lambda: f"hidden must be (B, L, D), got {hidden.shape}")
    return hidden.new_empty(hidden.shape[:2], dtype=torch.bool)


def rpn_scores(
    query_states: Tensor,
    visual_states: Tensor,
    q_weight: Tensor,
    k_weight: Tensor,
    num_heads: int,
    *,
    q_bias: Tensor | None = None,
    k_bias: Tensor | None = None,
    visual_mask: Tensor | None = None,
) -> Tensor:
    """RPN head scores of the visual tokens against the last prompt token, differentiable.

    ``score_i = mean_h (q_h . k_{h,i}) / sqrt(d) = ((Wq x + bq) . (Wk v_i + bk)) / (H sqrt(d))``,
    computed as ``u = Wk^T qg``, ``score_i = (u . v_i + qg . bk) / (H sqrt(d))`` (qg: the
    query heads sharing a key head, summed), so the visual tokens are never projected.

    Args:
        query_states: (B, D) normalised hidden state of the last prompt token.
        visual_states: (B, N, D) normalised hidden states of the visual tokens.
        q_weight: (H*d, D) query projection, as in ``nn.Linear``.
        k_weight: (Hk*d, D) key projection; Hk divides H (grouped-query attention).
        num_heads: H.
        q_bias: optional (H*d,).
        k_bias: optional (Hk*d,).
        visual_mask: optional (B, N) bool; False cells (padding of a smaller grid) score
            -inf and receive no gradient.

    Returns:
        (B, N) scores (logits) in the input dtype.
    """
    return torch.ops.sdrpn.rpn_scores.default(
        query_states, visual_states, q_weight, k_weight, num_heads, q_bias, k_bias, visual_mask
    )


@torch.library.register_fake("sdrpn::rpn_scores")
def _rpn_scores_fake(
    query_states, visual_states, q_weight, k_weight, num_heads, q_bias=None, k_bias=None, visual_mask=None
):
    torch._check(visual_states.dim() == 3, lambda: f"visual_states must be (B, N, D), got {visual_states.shape}")
    _check_same_device(
        "query_states", query_states, visual_states=visual_states, q_weight=q_weight, k_weight=k_weight,
        q_bias=q_bias, k_bias=k_bias, visual_mask=visual_mask,
    )  # fmt: skip
    return visual_states.new_empty(visual_states.shape[:2])


@torch.library.register_fake("sdrpn::rpn_scores_backward")
def _rpn_scores_backward_fake(
    grad, query_states, visual_states, q_weight, k_weight, num_heads, q_bias, k_bias, visual_mask
):
    # The kernel's gradients are contiguous whatever the inputs' layout (empty_like would
    # copy a transposed weight's strides, and compiled code trusts these).
    _check_same_device(
        "query_states", query_states, grad=grad, visual_states=visual_states, q_weight=q_weight, k_weight=k_weight,
        q_bias=q_bias, k_bias=k_bias, visual_mask=visual_mask,
    )  # fmt: skip

    def like(t):
        return t.new_empty(t.shape)

    return (
        like(query_states),
        like(visual_states),
        like(q_weight),
        like(k_weight),
        like(q_bias) if q_bias is not None else query_states.new_empty(0),
        like(k_bias) if k_bias is not None else query_states.new_empty(0),
    )


# The ops' autograd (rpn_scores' backward; attention_rows and roi_boxes not differentiable)
# is registered in C++ (csrc/ops/autograd.cpp), for C++ callers of libsdrpn as for Python.


def roi_boxes(
    prob: Tensor,
    *,
    threshold: float = 0.15,
    sigma: float = 1.0,
    min_area: int = 4,
    max_area: int = 225,
    max_boxes: int = 2,
    drop_singletons: bool = True,
    reference_clamp: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """RoI boxes from RPN probabilities (SPEC Stage 3, step 2), for every sample at once.

    Per sample: 3x3 Gaussian blur (reflect padding); cells with blurred value above
    ``threshold`` (a negative threshold is relative: above ``max * |threshold|``); their
    8-connected components in the row-major order of their first cell; singletons dropped,
    components under ``min_area`` cells grown around their centre to at least 3 cells a
    side (the reference's arithmetic, including its clamp of the exclusive end to size - 1
    unless ``reference_clamp=False``), components over ``max_area`` cells dropped; a sample
    left with 0 or more than ``max_boxes`` boxes gets none.

    Args:
        prob: (B, H, W) probabilities (sigmoid already applied), any floating dtype.

    Returns:
        boxes: (M, 4) int64 ``[x0, y0, x1, y1)`` in grid cells.
        batch_index: (M,) int64 sample of each box.
        blurred: (B, H, W) float32 blurred maps.
    """
    return torch.ops.sdrpn.roi_boxes.default(
        prob, threshold, sigma, min_area, max_area, max_boxes, drop_singletons, reference_clamp
    )


@torch.library.register_fake("sdrpn::roi_boxes")
def _roi_boxes_fake(
    prob, threshold=0.15, sigma=1.0, min_area=4, max_area=225, max_boxes=2, drop_singletons=True, reference_clamp=True
):
    torch._check(prob.dim() == 3, lambda: f"prob must be (B, H, W), got {prob.shape}")
    count = torch.library.get_ctx().new_dynamic_size()
    boxes = prob.new_empty((count, 4), dtype=torch.long)
    return boxes, prob.new_empty((count,), dtype=torch.long), prob.new_empty(prob.shape, dtype=torch.float32)


def roi_crops(
    prob: Tensor,
    *,
    threshold: float = 0.15,
    mode: str = "mask",
    sigma: float = 1.0,
    min_area: int = 4,
    max_area: int = 225,
    max_boxes: int = 2,
    drop_singletons: bool = True,
    reference_clamp: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """RoI crops and their kept tokens (SPEC Stage 3, steps 2 and 2b), for every sample at once.

    The components and box rules are those of :func:`roi_boxes`. ``mode="bbox"``: exactly
    its boxes (0 or more than ``max_boxes`` boxes: none for that sample), every token kept.
    ``mode="mask"`` (the mode of the published numbers): 0 kept boxes give no crop, 1 gives
    that box with every token kept; 2 or more (no upper cap: ``max_boxes`` plays no part)
    give ONE crop, the tight box of all cells whose blurred value passes the threshold (none
    when there are none), whose tokens are kept where that binary mask, cut to the box and
    resized bilinearly (``align_corners=False``, as ``torch.nn.functional.interpolate``) to
    the (H, W) grid, is above 0.5.

    Args:
        prob: (B, H, W) probabilities (sigmoid already applied), any floating dtype.
        mode: ``"mask"`` or ``"bbox"``.

    Returns:
        boxes: (M, 4) int64 ``[x0, y0, x1, y1)`` in grid cells.
        batch_index: (M,) int64 sample of each crop, ascending.
        keep: (M, H, W) bool, the crop's tokens to keep on its (H, W) token grid.
    """
    return torch.ops.sdrpn.roi_crops.default(
        prob, threshold, mode, sigma, min_area, max_area, max_boxes, drop_singletons, reference_clamp
    )


@torch.library.register_fake("sdrpn::roi_crops")
def _roi_crops_fake(
    prob,
    threshold=0.15,
    mode="mask",
    sigma=1.0,
    min_area=4,
    max_area=225,
    max_boxes=2,
    drop_singletons=True,
    reference_clamp=True,
):
    torch._check(prob.dim() == 3, lambda: f"prob must be (B, H, W), got {prob.shape}")
    count = torch.library.get_ctx().new_dynamic_size()
    return (
        prob.new_empty((count, 4), dtype=torch.long),
        prob.new_empty((count,), dtype=torch.long),
        prob.new_empty((count, prob.shape[1], prob.shape[2]), dtype=torch.bool),
    )
