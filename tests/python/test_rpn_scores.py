import pytest
import torch

import reference
import sdrpn
from conftest import DEVICES, needs_cuda
from rpn_samples import make_rpn_inputs

LAYOUTS = [dict(heads=4, kv_heads=4), dict(heads=4, kv_heads=2), dict(heads=6, kv_heads=1)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS, ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("mask", [False, True], ids=["no-mask", "mask"])
def test_forward_matches_naive_projection(device, layout, bias, mask):
    args, kwargs = make_rpn_inputs(bias=bias, mask=mask, device=device, **layout)
    got = sdrpn.ops.rpn_scores(*args, **kwargs)
    want = reference.rpn_scores(*args, **kwargs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if mask:
        assert torch.isneginf(got[~kwargs["visual_mask"]]).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_matches_naive_in_float32(device, dtype):
    args, kwargs = make_rpn_inputs(hidden=64, heads=8, kv_heads=8, head_dim=8, dtype=dtype, device=device)
    got = sdrpn.ops.rpn_scores(*args, **kwargs).float()
    f32 = [a.float() if isinstance(a, torch.Tensor) else a for a in args]
    want = reference.rpn_scores(*f32, **{k: (v.float() if v is not None else None) for k, v in kwargs.items()})
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS, ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("bias,mask", [(True, True), (False, False)])
def test_gradcheck_float64(device, layout, bias, mask):
    args, kwargs = make_rpn_inputs(
        batch=2,
        cells=5,
        hidden=6,
        head_dim=3,
        bias=bias,
        mask=mask,
        dtype=torch.float64,
        device=device,
        requires_grad=True,
        **layout,
    )
    if mask:
        # -inf outputs have no finite difference: compare on the real cells only.
        m = kwargs["visual_mask"]
        fn = lambda *a: sdrpn.ops.rpn_scores(*a[:4], a[4], q_bias=a[5], k_bias=a[6], visual_mask=m)[m]  # noqa: E731
    else:
        fn = lambda *a: sdrpn.ops.rpn_scores(*a[:4], a[4], q_bias=a[5], k_bias=a[6])  # noqa: E731
    assert torch.autograd.gradcheck(fn, (*args, kwargs["q_bias"], kwargs["k_bias"]))


@pytest.mark.parametrize("device", DEVICES)
def test_gradients_match_naive_projection(device):
    args, kwargs = make_rpn_inputs(mask=True, device=device, requires_grad=True, seed=3)
    m = kwargs["visual_mask"]
    upstream = torch.randn(3, 7, device=device)
    inputs = [args[0], args[1], args[2], args[3], kwargs["q_bias"], kwargs["k_bias"]]
    ours = torch.autograd.grad((sdrpn.ops.rpn_scores(*args, **kwargs)[m] * upstream[m]).sum(), inputs)
    naive = torch.autograd.grad((reference.rpn_scores(*args, **kwargs)[m] * upstream[m]).sum(), inputs)
    for a, b in zip(ours, naive):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bias", [False, True])
def test_opcheck(device, bias):
    args, kwargs = make_rpn_inputs(bias=bias, mask=True, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.sdrpn.rpn_scores.default, tuple(args), {k: v for k, v in kwargs.items()})


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [dict(batch=0), dict(cells=0)])
def test_empty_inputs_and_their_gradients(device, shape):
    args, kwargs = make_rpn_inputs(device=device, requires_grad=True, **shape)
    out = sdrpn.ops.rpn_scores(*args, **kwargs)
    assert out.shape == (args[1].shape[0], args[1].shape[1])
    out.sum().backward()
    assert args[2].grad is not None and (args[2].grad == 0).all()


def test_torch_compile_fullgraph_with_backward():
    args, kwargs = make_rpn_inputs(requires_grad=True, seed=4)

    def loss(*a):
        return sdrpn.ops.rpn_scores(*a, **kwargs).square().sum()

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    g1 = torch.autograd.grad(compiled(*args), args[:4])
    g2 = torch.autograd.grad(loss(*args), args[:4])
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_fake_backward_layout_matches_the_kernels(device):
    """Compiled code takes its buffers' layout from the fake kernel: for transposed weights
    and permuted visual states it must give the real gradients' (contiguous) strides."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    args, kwargs = make_rpn_inputs(device=device)
    query, visual, q_weight, k_weight, heads = args
    visual = visual.transpose(0, 1).contiguous().transpose(0, 1)
    q_weight, k_weight = q_weight.t().contiguous().t(), k_weight.t().contiguous().t()
    grad = torch.randn(visual.shape[:2], device=device)
    inputs = (grad, query, visual, q_weight, k_weight, heads, kwargs["q_bias"], kwargs["k_bias"], None)
    real = torch.ops.sdrpn.rpn_scores_backward.default(*inputs)
    with FakeTensorMode() as mode:
        fake_inputs = [mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in inputs]
        fake = torch.ops.sdrpn.rpn_scores_backward.default(*fake_inputs)
    assert [t.shape for t in fake] == [t.shape for t in real]
    assert [t.stride() for t in fake] == [t.stride() for t in real]


@pytest.mark.parametrize("device", DEVICES)
def test_backward_takes_a_grad_of_another_float_dtype(device):
    """Called directly, the backward casts grad to the inputs' dtype (autograd would)."""
    args, kwargs = make_rpn_inputs(device=device)
    grad = torch.randn(args[1].shape[:2], device=device)
    rest = (*args, kwargs["q_bias"], kwargs["k_bias"], None)
    want = torch.ops.sdrpn.rpn_scores_backward.default(grad, *rest)
    got = torch.ops.sdrpn.rpn_scores_backward.default(grad.double(), *rest)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b)
    with pytest.raises(RuntimeError, match="grad must be float32, float64, float16 or bfloat16, got Long"):
        torch.ops.sdrpn.rpn_scores_backward.default(grad.long(), *rest)


BAD = [
    (lambda a, k: ((a[0][0],) + tuple(a[1:]), k), "query_states must be (B, D), got shape [16]"),
    (
        lambda a, k: ((a[0].long(),) + tuple(a[1:]), k),
        "query_states must be float32, float64, float16 or bfloat16, got Long",
    ),
    (
        lambda a, k: ((a[0], a[1][:, :, :8]) + tuple(a[2:]), k),
        "visual_states must be (B, N, D) = (3, N, 16), got shape [3, 7, 8]",
    ),
    (
        lambda a, k: ((a[0], a[1].double()) + tuple(a[2:]), k),
        "visual_states must have the dtype of query_states (Float), got Double",
    ),
    (lambda a, k: (tuple(a[:4]) + (0,), k), "num_heads must be >= 1, got 0"),
    (
        lambda a, k: (tuple(a[:4]) + (5,), k),
        "q_weight must be (num_heads * head_dim, D) = (5 * d, 16), got shape [16, 16]",
    ),
    (
        lambda a, k: (tuple(a[:3]) + (a[3][:6],) + (4,), k),
        "k_weight must be (kv_heads * 4, 16) with kv_heads dividing num_heads = 4, got shape [6, 16]",
    ),
    (
        lambda a, k: (tuple(a[:3]) + (torch.cat([a[3], a[3][:4]]),) + (4,), k),
        "with kv_heads dividing num_heads = 4, got shape [12, 16]",
    ),
    (lambda a, k: (tuple(a), dict(k, q_bias=k["q_bias"][:3])), "q_bias must be (16,), got shape [3]"),
    (
        lambda a, k: (tuple(a), dict(k, k_bias=k["k_bias"].half())),
        "k_bias must have the dtype of query_states (Float), got Half",
    ),
    (
        lambda a, k: (tuple(a), dict(k, visual_mask=torch.ones(3, 6, dtype=torch.bool))),
        "visual_mask must be (B, N) = (3, 7), got shape [3, 6]",
    ),
    (lambda a, k: (tuple(a), dict(k, visual_mask=torch.ones(3, 7))), "visual_mask must be bool, got Float"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("change,message", BAD)
def test_bad_inputs_name_the_argument(device, change, message):
    args, kwargs = make_rpn_inputs(device=device)
    args, kwargs = change(args, kwargs)
    kwargs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    with pytest.raises(RuntimeError) as err:
        sdrpn.ops.rpn_scores(*args, **kwargs)
    assert message in str(err.value)


@needs_cuda
def test_inputs_split_between_cuda_and_cpu_are_refused_naming_the_argument():
    # The CUDA kernels run for any input on CUDA, the query on the CPU included.
    args, kwargs = make_rpn_inputs(device="cuda")
    query, rest = args[0].cpu(), args[1:]
    message = r"visual_states must be on the device of query_states \(cpu\)"
    with pytest.raises(RuntimeError, match=message):
        sdrpn.ops.rpn_scores(query, *rest, **kwargs)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.sdrpn.rpn_scores_backward(torch.ones(args[1].shape[:2], device="cuda"), query, *rest, **kwargs)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_cpu_on_llava_shapes(dtype):
    args, kwargs = make_rpn_inputs(
        batch=2, cells=576, hidden=4096, heads=32, kv_heads=32, head_dim=128, dtype=dtype, bias=False
    )
    cpu = sdrpn.ops.rpn_scores(*args, **kwargs).float()
    cuda_args = [a.cuda() if isinstance(a, torch.Tensor) else a for a in args]
    cuda = sdrpn.ops.rpn_scores(*cuda_args).float().cpu()
    tol = 1e-3 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(cuda, cpu, rtol=tol, atol=tol)


def test_a_second_order_gradient_is_refused():
    """First-order gradients only: a gradient of the gradients raises instead of coming back
    wrong or None."""
    args, kwargs = make_rpn_inputs(batch=2, cells=5, hidden=6, head_dim=3, dtype=torch.float64, requires_grad=True)
    scores = sdrpn.ops.rpn_scores(*args, **kwargs)
    (gq,) = torch.autograd.grad(scores.pow(2).sum(), args[0], create_graph=True)
    with pytest.raises(RuntimeError, match="derivative for sdrpn::rpn_scores_backward is not implemented"):
        gq.sum().backward()


@pytest.mark.parametrize("device", DEVICES)
def test_masked_cells_pass_no_gradient(device):
    gen = torch.Generator().manual_seed(0)
    batch, cells, hidden, heads, head_dim = 2, 5, 8, 2, 4
    query = torch.randn(batch, hidden, generator=gen, dtype=torch.float64)
    visual = torch.randn(batch, cells, hidden, generator=gen, dtype=torch.float64)
    q_weight = torch.randn(heads * head_dim, hidden, generator=gen, dtype=torch.float64)
    k_weight = torch.randn(heads * head_dim, hidden, generator=gen, dtype=torch.float64)
    mask = torch.tensor([[True, True, False, True, False], [True, True, True, True, True]], device=device)
    tensors = [t.to(device).requires_grad_() for t in (query, visual, q_weight, k_weight)]
    out = sdrpn.ops.rpn_scores(*tensors, heads, visual_mask=mask)
    assert torch.isneginf(out[~mask]).all()
    # Every cell gets an upstream gradient of 1, the masked ones included.
    got = torch.autograd.grad(out, tensors, torch.ones_like(out))
    # The same scores with the masked cells' gradient cut: only the real cells count.
    want = torch.autograd.grad(sdrpn.ops.rpn_scores(*tensors, heads, visual_mask=mask)[mask].sum(), tensors)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    assert (got[1][~mask] == 0).all()  # the masked cells' visual states receive nothing
