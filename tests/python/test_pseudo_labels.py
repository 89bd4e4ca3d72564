import numpy as np
import pytest
import torch

import reference
import sdrpn
from conftest import DEVICES, FLOAT_DTYPES, needs_cuda
from label_samples import make_label_inputs

GRIDS = [(24, 24), (16, 40), (40, 16), (1, 1), (3, 5), (7, 2)]


def run_both(inputs, **kwargs):
    got = sdrpn.ops.pseudo_labels(inputs.grounding, inputs.sink, inputs.grid_h, inputs.grid_w, **kwargs)
    want = reference.pseudo_labels(inputs.grounding, inputs.sink, inputs.grid_h, inputs.grid_w, **kwargs)
    return got, want


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
@pytest.mark.parametrize("ratios", [{}, {"fg_ratio": 0.25, "bg_ratio": 0.125}], ids=["spec-ratios", "tie-ratios"])
def test_parity_with_reference(device, dtype, strided, ratios):
    total = 0
    for seed, (grid_h, grid_w) in enumerate(GRIDS):
        inputs = make_label_inputs(48, grid_h, grid_w, dtype=dtype, device=device, seed=seed, strided=strided)
        assert inputs.grounding.is_contiguous() != strided
        got, want = run_both(inputs, **ratios)
        assert got.dtype == torch.int64 and got.device.type == device
        torch.testing.assert_close(got.cpu(), want, rtol=0, atol=0)
        total += got.shape[0]
    assert total == 48 * len(GRIDS)


def test_samples_cover_every_label_kind():
    # The generator must produce samples with foreground, background and all-ignore rows,
    # or the parity test proves little.
    inputs = make_label_inputs(256, 24, 24, seed=1)
    stats = sdrpn.ops.pseudo_label_stats(sdrpn.ops.pseudo_labels(inputs.grounding, inputs.sink, 24, 24))
    assert (stats[:, 0] > 0).sum() > 20
    assert (stats[:, 1] > 0).sum() > 20
    assert (stats[:, 2] == 576).sum() > 20


def test_hand_worked_example():
    # 4x4 grid, max after sink removal 1.0 -> fg > 0.2, bg < 0.1 outside the box.
    g = torch.tensor(
        [[0.00, 0.05, 0.00, 0.50], [0.05, 1.00, 0.30, 0.00], [0.00, 0.15, 0.90, 0.00], [0.15, 0.00, 0.00, 0.05]]
    )
    s = torch.zeros(4, 4)
    s[0, 3] = 0.01  # the 0.50 cell is a sink: zeroed before anything else
    labels = sdrpn.ops.pseudo_labels(g.view(1, 16), s.view(1, 16), 4, 4).view(4, 4)
    ig = -100
    expected = torch.tensor([[0, 0, 0, 0], [0, 1, 1, 0], [0, ig, 1, 0], [ig, 0, 0, 0]])
    assert torch.equal(labels, expected)


@pytest.mark.parametrize("device", DEVICES)
def test_threshold_ties_are_strict(device):
    # value == fg_ratio * max is not foreground; value == bg_ratio * max is not background;
    # sink == sink_threshold is a sink.
    g = torch.tensor([[1.0, 0.25, 0.125, 0.0, 0.0, 0.0, 0.0, 0.5]], device=device)
    s = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.25]], device=device)
    labels = sdrpn.ops.pseudo_labels(g, s, 1, 8, fg_ratio=0.25, bg_ratio=0.125, sink_threshold=0.25)
    assert labels.tolist() == [[1, -100, -100, 0, 0, 0, 0, 0]]


@pytest.mark.parametrize("device", DEVICES)
def test_box_fraction_boundary(device):
    n_rows = 12  # 12 x 24 = 288 = 0.5 * 576 cells: exactly at the boundary -> all ignore
    g = torch.zeros(2, 24, 24, device=device)
    g[0, :n_rows, :] = 1.0
    g[1, :n_rows, :23] = 1.0  # 276 cells: just under -> labelled
    labels = sdrpn.ops.pseudo_labels(g.view(2, -1), torch.zeros(2, 576, device=device), 24, 24)
    stats = sdrpn.ops.pseudo_label_stats(labels).tolist()
    assert stats[0] == [0, 0, 576]
    assert stats[1] == [276, 300, 0]


@pytest.mark.parametrize("device", DEVICES)
def test_all_zero_and_all_sink_maps_are_ignored(device):
    g = torch.rand(2, 30, device=device)
    g[0] = 0
    s = torch.zeros(2, 30, device=device)
    s[1] = 1.0
    labels = sdrpn.ops.pseudo_labels(g, s, 5, 6)
    assert (labels == -100).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("where", ["grounding", "sink"])
def test_non_finite_sample_is_ignored_alone(device, bad, where):
    inputs = make_label_inputs(4, 6, 8, device=device, seed=3)
    target = inputs.grounding if where == "grounding" else inputs.sink
    target[2, 5] = bad
    labels = sdrpn.ops.pseudo_labels(inputs.grounding, inputs.sink, 6, 8)
    assert (labels[2] == -100).all()
    keep = [0, 1, 3]
    want = reference.pseudo_labels(inputs.grounding[keep], inputs.sink[keep], 6, 8)
    assert torch.equal(labels[keep].cpu(), want)


@pytest.mark.parametrize("device", DEVICES)
def test_single_cell_grid(device):
    g = torch.tensor([[0.7], [0.0]], device=device)
    s = torch.zeros(2, 1, device=device)
    assert sdrpn.ops.pseudo_labels(g, s, 1, 1).tolist() == [[-100], [-100]]
    # A fraction above 1 switches the box-size rule off.
    assert sdrpn.ops.pseudo_labels(g, s, 1, 1, max_box_fraction=2.0).tolist() == [[1], [-100]]


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device):
    g = torch.empty(0, 576, device=device)
    labels = sdrpn.ops.pseudo_labels(g, g, 24, 24)
    assert labels.shape == (0, 576) and labels.dtype == torch.int64


def test_custom_ignore_index_and_stats():
    inputs = make_label_inputs(16, 8, 8, seed=5)
    labels = sdrpn.ops.pseudo_labels(inputs.grounding, inputs.sink, 8, 8, ignore_index=-1)
    want = reference.pseudo_labels(inputs.grounding, inputs.sink, 8, 8, ignore_index=-1)
    assert torch.equal(labels, want)
    stats = sdrpn.ops.pseudo_label_stats(labels, ignore_index=-1)
    assert stats.shape == (16, 3)
    assert torch.equal(stats.sum(1), torch.full((16,), 64))
    assert torch.equal(stats[:, 0], (labels == 1).sum(1))


BAD_INPUTS = [
    (lambda g, s: (g[0], s[0], 4, 6, {}), "grounding must be (B, N)"),
    (lambda g, s: (g, s[:, None], 4, 6, {}), "sink must be (B, N)"),
    (lambda g, s: (g.long(), s.long(), 4, 6, {}), "grounding must be float32, float64, float16 or bfloat16, got Long"),
    (lambda g, s: (g, s.double(), 4, 6, {}), "sink must have the dtype of grounding (Float), got Double"),
    (lambda g, s: (g, s[:1], 4, 6, {}), "sink must have the shape of grounding"),
    (lambda g, s: (g, s, 5, 6, {}), "grounding has N = 24 cells but grid_h * grid_w = 5 * 6 = 30"),
    (lambda g, s: (g, s, 0, 6, {}), "grid_h must be >= 1, got 0"),
    (lambda g, s: (g, s, 4, -6, {}), "grid_w must be >= 1, got -6"),
    (lambda g, s: (g, s, 4, 6, {"fg_ratio": -0.2}), "fg_ratio must be a finite, non-negative number, got -0.2"),
    (lambda g, s: (g, s, 4, 6, {"bg_ratio": float("nan")}), "bg_ratio must be a finite, non-negative number, got nan"),
    (lambda g, s: (g, s, 4, 6, {"max_box_fraction": 0.0}), "max_box_fraction must be a finite number > 0, got 0"),
    (lambda g, s: (g, s, 4, 6, {"sink_threshold": float("inf")}), "sink_threshold must be finite, got inf"),
    # 2**62 + 6 times 4 wraps to 24 in int64: a naive product check would accept it.
    (lambda g, s: (g, s, 2**62 + 6, 4, {}), "grid_h * grid_w = 4611686018427387910 * 4 overflows int64"),
    (lambda g, s: (g, s, 4, 6, {"ignore_index": 0}), "ignore_index must differ from the labels 0 and 1, got 0"),
    (lambda g, s: (g, s, 4, 6, {"ignore_index": 1}), "ignore_index must differ from the labels 0 and 1, got 1"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("make,message", BAD_INPUTS)
def test_bad_inputs_name_the_argument(device, make, message):
    g = torch.rand(3, 24, device=device)
    s = torch.zeros(3, 24, device=device)
    *args, kwargs = make(g, s)
    with pytest.raises(RuntimeError) as err:
        sdrpn.ops.pseudo_labels(*args, **kwargs)
    assert message in str(err.value)


@needs_cuda
def test_inputs_split_between_cuda_and_cpu_are_refused():
    with pytest.raises(RuntimeError, match="sink must be on the device of grounding"):
        sdrpn.ops.pseudo_labels(torch.rand(2, 4, device="cuda"), torch.zeros(2, 4), 2, 2)


def test_stats_rejects_bad_rank():
    with pytest.raises(ValueError, match=r"labels must be \(B, N\), got shape \(4,\)"):
        sdrpn.ops.pseudo_label_stats(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="labels must be an integer tensor, got torch.float32"):
        sdrpn.ops.pseudo_label_stats(torch.rand(2, 4))
    with pytest.raises(ValueError, match=r"labels must hold 1, 0 and ignore_index=-100 only, got \[5\] in labels\[1\]"):
        sdrpn.ops.pseudo_label_stats(torch.tensor([[0, 1], [5, -100]]))
    with pytest.raises(ValueError, match=r"ignore_index=-1 only, got \[-100\]"):  # another ignore value
        sdrpn.ops.pseudo_label_stats(torch.tensor([[0, -100]]), ignore_index=-1)
    with pytest.raises(TypeError, match="labels must be a tensor, got ndarray"):
        sdrpn.ops.pseudo_label_stats(np.zeros((2, 4), dtype=np.int64))
    for bad in (None, "x", True, 2**70):
        with pytest.raises(ValueError, match=f"ignore_index must be an int of 64 bits, got {bad!r}"):
            sdrpn.ops.pseudo_label_stats(torch.zeros(2, 4, dtype=torch.long), ignore_index=bad)
    assert sdrpn.ops.pseudo_label_stats(torch.zeros(0, 4, dtype=torch.long)).shape == (0, 3)
    assert sdrpn.ops.pseudo_label_stats(torch.tensor([[1, 0, -100, 1]], dtype=torch.int32)).tolist() == [[2, 1, 1]]


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    inputs = make_label_inputs(5, 4, 6, device=device, seed=7)
    torch.library.opcheck(
        torch.ops.sdrpn.pseudo_labels.default,
        (inputs.grounding, inputs.sink, 4, 6),
        {"fg_ratio": 0.25, "bg_ratio": 0.125},
    )


def test_torch_compile_fullgraph():
    inputs = make_label_inputs(6, 4, 6, seed=8)

    def label(g, s):
        return sdrpn.ops.pseudo_labels(g * 1.0, s, 4, 6)

    compiled = torch.compile(label, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(inputs.grounding, inputs.sink), label(inputs.grounding, inputs.sink))


@needs_cuda
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_cuda_matches_cpu_on_a_large_batch(dtype):
    inputs = make_label_inputs(4096, 24, 24, dtype=dtype, seed=9)
    cpu = sdrpn.ops.pseudo_labels(inputs.grounding, inputs.sink, 24, 24)
    cuda = sdrpn.ops.pseudo_labels(inputs.grounding.cuda(), inputs.sink.cuda(), 24, 24)
    assert torch.equal(cpu, cuda.cpu())


def labelled_sample(device):
    """A 4x4 map whose foreground is one cell: labelled (1 FG, 15 BG), not all-ignore."""
    g = torch.zeros(1, 16, device=device)
    g[0, 5] = 1.0
    s = torch.zeros(1, 16, device=device)
    return g, s


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_sink_value_ignores_a_labelled_sample(device, bad):
    g, s = labelled_sample(device)
    assert (sdrpn.ops.pseudo_labels(g, s, 4, 4) != -100).any()
    s[0, 10] = bad  # a cell that is background when the sink map is finite
    assert (sdrpn.ops.pseudo_labels(g, s, 4, 4) == -100).all()


@pytest.mark.parametrize("device", DEVICES)
def test_negative_maps_take_their_own_maximum(device):
    # All values negative: m = max(Gs) = -1, so fg_ratio 1.5 puts the threshold at -1.5
    # (foreground: the -1 cell) and bg_ratio 3 at -3 (background: the -4 cells outside the
    # box; the -2 cell is neither).
    g = torch.tensor([[-1.0, -2.0, -4.0, -4.0, -4.0, -4.0, -4.0, -4.0, -4.0]], device=device)
    s = torch.zeros_like(g)
    kwargs = dict(fg_ratio=1.5, bg_ratio=3.0, max_box_fraction=1.0)
    got = sdrpn.ops.pseudo_labels(g, s, 3, 3, **kwargs)
    want = reference.pseudo_labels(g, s, 3, 3, **kwargs)
    assert torch.equal(got.cpu(), want)
    assert got.tolist() == [[1, -100, 0, 0, 0, 0, 0, 0, 0]]


@pytest.mark.parametrize("device", DEVICES)
def test_a_tie_with_the_foreground_threshold_stays_out_of_the_box(device):
    # (0, 0) is the only foreground cell; (3, 3) equals fg_ratio * max exactly, so it is not
    # foreground and must not stretch the box over the whole grid (which would make the
    # box too large and the sample all-ignore).
    g = torch.zeros(1, 16, device=device)
    g[0, 0] = 1.0
    g[0, 15] = 0.25
    s = torch.zeros_like(g)
    got = sdrpn.ops.pseudo_labels(g, s, 4, 4, fg_ratio=0.25, bg_ratio=0.125)
    want = reference.pseudo_labels(g, s, 4, 4, fg_ratio=0.25, bg_ratio=0.125)
    assert torch.equal(got.cpu(), want)
    assert got[0, 0] == 1 and got[0, 15] == -100 and (got[0, 1:15] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("ratios", [dict(fg_ratio=0.0), dict(bg_ratio=0.0)], ids=["fg0", "bg0"])
def test_zero_ratios_are_accepted(device, ratios):
    # The ratios must be finite and non-negative: 0 itself is allowed.
    g = torch.zeros(1, 16, device=device)
    g[0, 5] = 1.0
    g[0, 6] = 0.5
    s = torch.zeros_like(g)
    got = sdrpn.ops.pseudo_labels(g, s, 4, 4, **ratios)
    assert torch.equal(got.cpu(), reference.pseudo_labels(g, s, 4, 4, **ratios))
