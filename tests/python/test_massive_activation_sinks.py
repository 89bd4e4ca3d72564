import pytest
import torch

import reference
import sdrpn
from conftest import DEVICES, FLOAT_DTYPES, needs_cuda
from sink_samples import SINK_DIMS, make_hidden


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
def test_parity_with_reference(device, dtype, strided):
    hidden = make_hidden(3, 37, dtype=dtype, device=device, seed=1, strided=strided)
    assert hidden.is_contiguous() != strided
    got = sdrpn.ops.massive_activation_sinks(hidden, SINK_DIMS)
    want = reference.massive_activation_sinks(hidden, SINK_DIMS)
    assert got.dtype == torch.bool and got.shape == (3, 37)
    assert torch.equal(got.cpu(), want)
    assert 0 < int(want.sum()) < want.numel()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("count", [33, 64])
def test_more_dims_than_a_warp_has_lanes_match_reference(device, count):
    # Past 32 dims a CUDA lane reads a second one: tokens planted there are found too.
    dims = list(range(3, 16 * count, 16))
    hidden = make_hidden(2, 97, dims=dims, device=device, seed=count)
    got = sdrpn.ops.massive_activation_sinks(hidden, dims)
    assert torch.equal(got.cpu(), reference.massive_activation_sinks(hidden.cpu(), dims))
    last = hidden[..., dims[32:]].abs().amax(-1).cpu() > 100  # planted past the first 32
    assert last.any() and got.cpu()[last].all()


@pytest.mark.parametrize("device", DEVICES)
def test_only_the_probed_dims_count(device):
    hidden = torch.randn(1, 4, 1024, device=device)
    hidden[0, 1, 5] = 1000.0
    hidden[0, 2, 6] = 1000.0
    assert sdrpn.ops.massive_activation_sinks(hidden, [5]).tolist() == [[False, True, False, False]]
    assert sdrpn.ops.massive_activation_sinks(hidden, [6, 5]).tolist() == [[False, True, True, False]]


@pytest.mark.parametrize("device", DEVICES)
def test_tau_and_eps(device):
    hidden = make_hidden(2, 16, device=device, seed=2)
    sinks = {}
    for tau in (0.0, 5.0, 20.0, 40.0):
        # eps = 2e3 outweighs the planted tokens' mean square (about 977): 1000 / sqrt(977 + 2e3)
        # = 18.3 falls under tau = 20, where eps = 1e-3 leaves them sinks.
        for eps in (1e-3, 2e3):
            got = sdrpn.ops.massive_activation_sinks(hidden, SINK_DIMS, tau=tau, eps=eps)
            assert torch.equal(got.cpu(), reference.massive_activation_sinks(hidden, SINK_DIMS, tau, eps)), (tau, eps)
            sinks[tau, eps] = got
    assert sinks[20.0, 1e-3].any() and not torch.equal(sinks[20.0, 1e-3], sinks[20.0, 2e3])
    # A zero hidden state is never a sink (0 > tau * sqrt(eps) is false).
    zero = torch.zeros(1, 2, 8, device=device)
    assert not sdrpn.ops.massive_activation_sinks(zero, [0], tau=0.0).any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(0, 5, 8), (2, 0, 8)])
def test_empty_inputs(device, shape):
    out = sdrpn.ops.massive_activation_sinks(torch.empty(shape, device=device), [1])
    assert out.shape == shape[:2] and out.dtype == torch.bool


BAD_INPUTS = [
    (lambda h: (h[0], [1], {}), "hidden must be (B, L, D), got shape [4, 8]"),
    (lambda h: (h.int(), [1], {}), "hidden must be float32, float64, float16 or bfloat16, got Int"),
    (lambda h: (h, [], {}), "dims must name at least one hidden dimension"),
    (lambda h: (h, [1, 8], {}), "dims must lie in [0, D) with D = 8, got 8"),
    (lambda h: (h, [0] * 65, {}), "dims may name at most 64 hidden dimensions, got 65"),
    (lambda h: (h, [-1], {}), "dims must lie in [0, D) with D = 8, got -1"),
    (lambda h: (h, [1], {"tau": -1.0}), "tau must be a finite number >= 0, got -1"),
    (lambda h: (h, [1], {"eps": float("nan")}), "eps must be a finite number >= 0, got nan"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("make,message", BAD_INPUTS)
def test_bad_inputs_name_the_argument(device, make, message):
    hidden = torch.randn(2, 4, 8, device=device)
    h, dims, kwargs = make(hidden)
    with pytest.raises(RuntimeError) as err:
        sdrpn.ops.massive_activation_sinks(h, dims, **kwargs)
    assert message in str(err.value)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    hidden = make_hidden(2, 6, hidden_size=1024, device=device, seed=3)
    torch.library.opcheck(torch.ops.sdrpn.massive_activation_sinks.default, (hidden, list(SINK_DIMS)))


def test_torch_compile_fullgraph():
    hidden = make_hidden(2, 6, seed=4)
    fn = lambda h: sdrpn.ops.massive_activation_sinks(h + 0.0, SINK_DIMS)  # noqa: E731
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(hidden), fn(hidden))


@needs_cuda
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_cuda_matches_cpu_on_llama_shapes(dtype):
    hidden = make_hidden(2, 640, hidden_size=4096, dims=(2533, 1415), dtype=dtype, seed=5)
    cpu = sdrpn.ops.massive_activation_sinks(hidden, (2533, 1415))
    cuda = sdrpn.ops.massive_activation_sinks(hidden.cuda(), (2533, 1415))
    assert torch.equal(cpu, cuda.cpu())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_a_token_holding_nan_is_never_a_sink(device, dtype):
    h = torch.randn(2, 6, 1024)
    h[:, :, 3] = 500.0  # every token a sink (500 / rms 16 > 20) ...
    h[0, 2, 10] = float("nan")  # ... except those whose state is broken
    h[1, 4, 3] = float("nan")
    sinks = sdrpn.ops.massive_activation_sinks(h.to(device, dtype), [3])
    expected = torch.ones(2, 6, dtype=torch.bool)
    expected[0, 2] = expected[1, 4] = False
    assert torch.equal(sinks.cpu(), expected)


@pytest.mark.parametrize("device", DEVICES)
def test_eps_is_added_to_the_mean_square(device):
    # h = (1, 0, 0, 0): mean(h^2) = 0.25. Without eps, |h_0| / rms = 2 > 1.9: a sink. With
    # eps = 1 the rms is sqrt(1.25) and the ratio 0.89: not a sink.
    hidden = torch.tensor([[[1.0, 0.0, 0.0, 0.0]]], device=device)
    assert sdrpn.ops.massive_activation_sinks(hidden, [0], tau=1.9, eps=0.0).tolist() == [[True]]
    assert sdrpn.ops.massive_activation_sinks(hidden, [0], tau=1.9, eps=1.0).tolist() == [[False]]
    assert torch.equal(
        sdrpn.ops.massive_activation_sinks(hidden, [0], tau=1.9, eps=1.0).cpu(),
        reference.massive_activation_sinks(hidden, [0], 1.9, 1.0),
    )


LAYOUTS = {
    # The float64 and non-contiguous rows take one summation, contiguous float32, float16 and
    # bfloat16 rows another (vectorised where the CPU allows).
    "float64": (torch.float64, False),
    "strided": (torch.float32, True),
    "float32": (torch.float32, False),
    "float16": (torch.float16, False),
    "bfloat16": (torch.bfloat16, False),
}
# (D, position of the second value): the eighth lane of a group of 8, past every group of 8,
# the last quarter of a group of 32, past every group of 32.
POSITIONS = [(8, 7), (9, 8), (40, 27), (33, 32)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("size,last", POSITIONS, ids=["lane8", "tail8", "quarter32", "tail32"])
def test_every_element_of_a_row_counts_squared(device, layout, size, last):
    # h = (3, 0, ..., 0, 3): |h_0| / rms = sqrt(D / 2). Leaving the second 3 out gives
    # sqrt(D), adding it unsquared sqrt(3 D / 4); tau = sqrt(0.6 D) lies between.
    dtype, strided = LAYOUTS[layout]
    row = torch.zeros(size, dtype=torch.float64)
    row[0] = 3.0
    row[last] = 3.0
    if strided:
        wide = torch.zeros(1, 1, 2 * size, dtype=dtype)
        wide[..., ::2] = row.to(dtype)
        hidden = wide[..., ::2]
        assert hidden.stride(2) == 2
    else:
        hidden = row.to(dtype).view(1, 1, size)
    hidden = hidden.to(device)
    tau = (0.6 * size) ** 0.5
    got = sdrpn.ops.massive_activation_sinks(hidden, [0], tau=tau, eps=0.0)
    assert got.tolist() == [[False]]
    assert torch.equal(got.cpu(), reference.massive_activation_sinks(hidden, [0], tau, 0.0))


@pytest.mark.parametrize("device", DEVICES)
def test_the_mean_square_divides_by_the_hidden_size(device):
    # h = (30, 0, 0, 0): rms = sqrt(900 / 4) = 15, normalised 2 (dividing by 3 would give 1.73).
    hidden = torch.tensor([[[30.0, 0.0, 0.0, 0.0]]], device=device)
    assert sdrpn.ops.massive_activation_sinks(hidden, [0], tau=1.9, eps=0.0).tolist() == [[True]]
