import pytest
import torch

import reference
import sdrpn
from attention_samples import make_attention_inputs
from conftest import DEVICES, FLOAT_DTYPES, needs_cuda

TOLERANCE = {torch.float32: 2e-6, torch.float64: 1e-6, torch.float16: 2e-6, torch.bfloat16: 2e-6}


def check_parity(inputs, **kwargs):
    got = sdrpn.ops.attention_rows(*inputs.args(), key_padding_mask=inputs.key_padding_mask, **kwargs)
    want = reference.attention_rows(*inputs.args(), inputs.key_padding_mask, **kwargs)
    assert got.dtype == torch.float32
    tol = TOLERANCE[inputs.query.dtype]
    torch.testing.assert_close(got.cpu(), want, rtol=tol * 10, atol=tol)
    return got


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("padding", ["none", "left", "right"])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (6, 1)], ids=["mha", "gqa", "mqa"])
def test_parity_with_reference(device, dtype, padding, heads, kv_heads):
    inputs = make_attention_inputs(
        heads=heads, kv_heads=kv_heads, padding=padding, dtype=dtype, device=device, seed=heads * 10 + kv_heads
    )
    got = check_parity(inputs)
    assert (got[0, :, 0] == 0).all()  # position -1 sees no key


@pytest.mark.parametrize("device", DEVICES)
def test_strided_inputs_and_custom_scale(device):
    inputs = make_attention_inputs(device=device, seed=4, strided=True, padding="left")
    assert not inputs.query.is_contiguous() and not inputs.key.is_contiguous()
    check_parity(inputs, scale=0.3)


@pytest.mark.parametrize("device", DEVICES)
def test_whole_row_sums_to_one(device):
    inputs = make_attention_inputs(device=device, seed=5, key_length=23)
    inputs.key_start.zero_()
    out = sdrpn.ops.attention_rows(*inputs.args())
    sums = out.sum(-1)
    seen = inputs.query_positions >= 0
    torch.testing.assert_close(
        sums[seen[:, None].expand_as(sums)].cpu(), torch.ones(int(seen.sum()) * 4), rtol=0, atol=1e-5
    )


@pytest.mark.parametrize("device", DEVICES)
def test_large_scores_do_not_overflow(device):
    inputs = make_attention_inputs(device=device, seed=6)
    inputs.query.mul_(300.0)  # scores in the thousands: float32 keeps ~1e-4 relative
    got = sdrpn.ops.attention_rows(*inputs.args())
    torch.testing.assert_close(got.cpu(), reference.attention_rows(*inputs.args()), rtol=1e-3, atol=1e-5)
    assert torch.isfinite(got).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [dict(batch=0), dict(rows=0), dict(key_length=0)])
def test_empty_outputs(device, shape):
    inputs = make_attention_inputs(device=device, **shape)
    out = sdrpn.ops.attention_rows(*inputs.args())
    assert out.shape == (inputs.query.shape[0], inputs.query.shape[1], inputs.query.shape[2], inputs.key_length)


@pytest.mark.parametrize("device", DEVICES)
def test_zero_head_dim_scores_zero(device):
    # Every score is 0 (an empty GEMM with beta = 0): each row is uniform over its visible keys.
    inputs = make_attention_inputs(device=device, head_dim=0, padding="left", seed=13)
    check_parity(inputs, scale=1.0)
    assert torch.equal(
        sdrpn.ops.attention_rows(*inputs.args(), key_padding_mask=inputs.key_padding_mask),
        sdrpn.ops.attention_rows(*inputs.args(), key_padding_mask=inputs.key_padding_mask, scale=1.0),
    )  # the default scale, 1/sqrt(0), is infinite


BAD_INPUTS = [
    (lambda i: dict(query=i.query[0]), "query must be (B, H, Q, d), got shape [4, 5, 8]"),
    (lambda i: dict(key=i.key[0]), "key must be (B, Hk, L, d), got shape [2, 23, 8]"),
    (
        lambda i: dict(query=i.query.long(), key=i.key.long()),
        "query must be float32, float64, float16 or bfloat16, got Long",
    ),
    (lambda i: dict(key=i.key.double()), "key must have the dtype of query (Float), got Double"),
    (lambda i: dict(key=i.key[:2]), "key must have the batch size of query (3), got 2"),
    (lambda i: dict(key=i.key[..., :4]), "key must have the head dim of query (8), got 4"),
    (
        lambda i: dict(key=torch.cat([i.key, i.key[:, :1]], 1)),
        "key heads must divide query heads (grouped-query attention), got Hk = 3 for H = 4",
    ),
    (
        lambda i: dict(query_positions=i.query_positions[:, :2]),
        "query_positions must be (B, Q) = (3, 5), got shape [3, 2]",
    ),
    (lambda i: dict(query_positions=i.query_positions.int()), "query_positions must be int64, got Int"),
    (lambda i: dict(key_start=i.key_start[:, None]), "key_start must be (B,) = (3,), got shape [3, 1]"),
    (lambda i: dict(key_start=i.key_start.float()), "key_start must be int64, got Float"),
    (lambda i: dict(key_length=24), "key_length must lie in [0, L] with L = 23, got 24"),
    (
        lambda i: dict(key_start=torch.tensor([0, 15, 2])),
        "key_start + key_length must stay within [0, L] with L = 23, got key_start in [0, 15] and key_length 9",
    ),
    (lambda i: dict(key_start=torch.tensor([-1, 0, 0])), "got key_start in [-1, 0]"),
    # key_start + key_length would wrap past INT64_MAX and pass a naive bounds check.
    (lambda i: dict(key_start=torch.tensor([0, 2**63 - 5, 0])), "got key_start in [0, 9223372036854775803]"),
    (
        lambda i: dict(key_padding_mask=torch.ones(3, 22, dtype=torch.bool)),
        "key_padding_mask must be (B, L) = (3, 23), got shape [3, 22]",
    ),
    (lambda i: dict(key_padding_mask=torch.ones(3, 23)), "key_padding_mask must be bool, got Float"),
    (lambda i: dict(scale=float("nan")), "scale must be finite, got nan"),
    (lambda i: dict(scale=-1e300), "scale must lie within float32's range for Float inputs, got -1e+300"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("change,message", BAD_INPUTS)
def test_bad_inputs_name_the_argument(device, change, message):
    inputs = make_attention_inputs(device=device)
    kwargs = dict(
        query=inputs.query,
        key=inputs.key,
        query_positions=inputs.query_positions,
        key_start=inputs.key_start,
        key_length=inputs.key_length,
    )
    kwargs.update({k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in change(inputs).items()})
    with pytest.raises(RuntimeError) as err:
        sdrpn.ops.attention_rows(**kwargs)
    assert message in str(err.value)


@needs_cuda
def test_inputs_split_between_cuda_and_cpu_are_refused():
    inputs = make_attention_inputs(device="cuda")
    with pytest.raises(RuntimeError, match="key_start must be on the device of query"):
        sdrpn.ops.attention_rows(
            inputs.query, inputs.key, inputs.query_positions, inputs.key_start.cpu(), inputs.key_length
        )
    # The CUDA kernel runs for any input on CUDA: a query on the CPU is named, not the guard's device.
    with pytest.raises(RuntimeError, match=r"key must be on the device of query \(cpu\)"):
        sdrpn.ops.attention_rows(
            inputs.query.cpu(), inputs.key, inputs.query_positions, inputs.key_start, inputs.key_length
        )


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    inputs = make_attention_inputs(device=device, padding="left", seed=7)
    torch.library.opcheck(torch.ops.sdrpn.attention_rows.default, inputs.args() + (inputs.key_padding_mask, None))


@needs_cuda
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_cuda_matches_cpu_on_llava_shapes(dtype):
    inputs = make_attention_inputs(
        batch=2, heads=32, kv_heads=32, rows=16, seq_len=640, head_dim=128, key_length=576, padding="left", dtype=dtype
    )
    cpu = sdrpn.ops.attention_rows(*inputs.args(), key_padding_mask=inputs.key_padding_mask)
    cuda = sdrpn.ops.attention_rows(
        *(t.cuda() if isinstance(t, torch.Tensor) else t for t in inputs.args()),
        key_padding_mask=inputs.key_padding_mask.cuda(),
    )
    torch.testing.assert_close(cuda.cpu(), cpu, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_the_scale_multiplies_the_scores_not_the_query(device):
    # query * scale would overflow float32 (2^100 * 2^29 = 2^129), while each score,
    # (q . k) * scale with keys just above 2^-126, lies within +-64: the GEMM scales its sums.
    g = torch.Generator().manual_seed(12)
    query = (torch.rand(2, 2, 3, 4, generator=g) * 2 - 1) * 2.0**100
    key = (torch.rand(2, 1, 5, 4, generator=g) + 1) * 2.0**-126
    positions = torch.tensor([[4, 2, 0], [3, 4, 1]])
    start = torch.tensor([0, 1])
    args = (query, key, positions, start, 4)
    got = sdrpn.ops.attention_rows(*(t.to(device) if isinstance(t, torch.Tensor) else t for t in args), scale=2.0**29)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.cpu(), reference.attention_rows(*args, scale=2.0**29), rtol=2e-5, atol=2e-6)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_give_the_same_rows_when_tf32_is_allowed(dtype):
    # Training scripts often allow TF32 matmuls. Half-precision values are exact in TF32 and
    # the scale is applied to the GEMM's float32 sums, so the rows change only by the tensor
    # cores' order of summation (a few float32 ulps of a score; the tolerance of the CUDA
    # against CPU test), where a scaled query would round to TF32: about 1e-3 relative.
    inputs = make_attention_inputs(
        batch=2, heads=32, kv_heads=32, rows=16, seq_len=640, head_dim=128, key_length=576,
        padding="left", dtype=dtype, device="cuda",
    )  # fmt: skip
    strict = sdrpn.ops.attention_rows(*inputs.args(), key_padding_mask=inputs.key_padding_mask)
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        tf32 = sdrpn.ops.attention_rows(*inputs.args(), key_padding_mask=inputs.key_padding_mask)
    finally:
        torch.set_float32_matmul_precision(before)
    torch.testing.assert_close(tf32, strict, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_chunks_of_key_heads_match_reference(device):
    # The op's budget is 2^24 scores a chunk: one key head's group of 8 query heads over 256
    # rows and 3072 keys is 6.3 Mi, so 3 key heads run as chunks of 2 and 1, as a 7B label
    # pass does past about 4,096 tokens a slice.
    inputs = make_attention_inputs(
        batch=1, heads=24, kv_heads=3, rows=256, seq_len=3072, head_dim=8, key_length=576,
        padding="left", device=device, seed=11,
    )  # fmt: skip
    check_parity(inputs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("where", ["query", "key"])
def test_non_finite_rows_are_nan_as_in_eager_attention(device, bad, where):
    # A broken model must reach the pseudo labels' NaN guard, not pass as zero attention.
    inputs = make_attention_inputs(device=device, padding="left", seed=3)
    query, key, mask = inputs.query.clone(), inputs.key.clone(), inputs.key_padding_mask
    first_real = int(mask[1].float().argmax())
    if where == "query":
        query[1, 2, int(inputs.query_positions[1].argmax()), 0] = bad  # a row that sees keys
    else:
        key[1, :, first_real, :] = bad
    out = sdrpn.ops.attention_rows(
        query, key, inputs.query_positions, inputs.key_start, inputs.key_length, key_padding_mask=mask
    )
    # Eager attention in float64: causal and padding mask, softmax over what each row sees.
    positions = inputs.query_positions.cpu()
    keys = torch.arange(key.shape[2])
    visible = (keys[None, None, :] <= positions[:, :, None]) & mask.cpu()[:, None, :]  # (B, Q, L)
    scores = torch.einsum("bhqd,bhkd->bhqk", query.cpu().double(), key.cpu().repeat_interleave(2, 1).double())
    scores = scores / query.shape[-1] ** 0.5
    eager = torch.softmax(scores.masked_fill(~visible[:, None], float("-inf")), -1)
    starts = inputs.key_start.tolist()
    window = torch.stack([eager[b, ..., s : s + inputs.key_length] for b, s in enumerate(starts)])
    sees_something = visible.any(-1)[:, None, :, None].expand_as(window)
    window = torch.where(sees_something, window, 0.0)  # the op's documented rows of zeros
    out = out.cpu().double()
    assert window.isnan().any()
    assert torch.equal(out.isnan(), window.isnan())
    torch.testing.assert_close(out[~window.isnan()], window[~window.isnan()], atol=1e-5, rtol=1e-4)


def test_the_rows_are_not_differentiable():
    """Not differentiable, as nms is: the rows never require grad, eager or compiled (torch's
    fallback for ops without autograd would attach a backward that leaves no gradients)."""
    inputs = make_attention_inputs()
    query = inputs.query.clone().requires_grad_(True)

    def rows(q):
        return sdrpn.ops.attention_rows(q, *inputs.args()[1:], key_padding_mask=inputs.key_padding_mask)

    assert not rows(query).requires_grad
    torch._dynamo.reset()
    compiled = torch.compile(rows, fullgraph=True, backend="aot_eager")(query)
    assert not compiled.requires_grad and torch.equal(compiled, rows(query))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("padding", ["left", "right"])
def test_non_contiguous_padding_mask(device, padding):
    inputs = make_attention_inputs(device=device, seed=8, padding=padding)
    mask = inputs.key_padding_mask
    # The same values, every other column of a wider buffer whose other columns are the
    # opposite: reading it as contiguous would see the wrong tokens as padding.
    wide = torch.stack([mask, ~mask], dim=-1).flatten(1)
    strided = wide[:, ::2]
    assert not strided.is_contiguous() and torch.equal(strided, mask)
    got = sdrpn.ops.attention_rows(*inputs.args(), key_padding_mask=strided)
    want = reference.attention_rows(*inputs.args(), mask)
    torch.testing.assert_close(got.cpu(), want, rtol=2e-5, atol=2e-6)
    assert torch.equal(got, sdrpn.ops.attention_rows(*inputs.args(), key_padding_mask=mask))


@pytest.mark.parametrize("device", DEVICES)
def test_float64_scores_are_accumulated_in_float64(device):
    # The first key's score is 1e8 - (1e8 - 1.5) = 1.5 in float64; in float32 its second
    # component rounds to -1e8 and the score to 0. The second key scores 0 either way, so
    # the row is softmax([1.5, 0]) = [0.818, 0.182], not [0.5, 0.5].
    query = torch.ones(1, 1, 1, 2, dtype=torch.float64, device=device)
    key = torch.tensor([[1e8, -1e8 + 1.5], [0.0, 0.0]], dtype=torch.float64, device=device).view(1, 1, 2, 2)
    positions = torch.tensor([[1]], device=device)
    start = torch.tensor([0], device=device)
    got = sdrpn.ops.attention_rows(query, key, positions, start, 2, scale=1.0)
    want = torch.softmax(torch.tensor([1.5, 0.0], dtype=torch.float64), 0).float()
    torch.testing.assert_close(got.view(2).cpu(), want, rtol=1e-6, atol=1e-7)
