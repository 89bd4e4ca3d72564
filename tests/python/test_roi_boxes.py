import pytest
import torch

import reference
import sdrpn
from conftest import DEVICES, FLOAT_DTYPES, needs_cuda


def structured_maps(h, w, seed):
    """Blobs, touching diagonals, border blobs, empty, all-on and speckle maps."""
    gen = torch.Generator().manual_seed(seed)
    maps = []
    blob = torch.zeros(h, w)
    for _ in range(3):
        y, x = int(torch.randint(0, h, (1,), generator=gen)), int(torch.randint(0, w, (1,), generator=gen))
        sy, sx = int(torch.randint(1, 4, (1,), generator=gen)), int(torch.randint(1, 4, (1,), generator=gen))
        blob[y : y + sy, x : x + sx] = 0.9
    maps.append(blob)
    diag = torch.zeros(h, w)
    for i in range(min(h, w)):
        diag[i, i] = 1.0  # one 8-connected component, no 4-connected one
    maps.append(diag)
    border = torch.zeros(h, w)
    border[0, :2] = 1.0
    border[-1, -2:] = 1.0
    maps.append(border)
    maps.append(torch.zeros(h, w))
    maps.append(torch.ones(h, w))
    maps.append((torch.rand(h, w, generator=gen) > 0.8).float())
    maps.append(torch.rand(h, w, generator=gen) ** 3)
    return torch.stack(maps)


GRIDS = [(24, 24), (16, 40), (7, 3), (1, 6), (1, 1), (5, 1)]
SETTINGS = [
    {},
    {"threshold": -0.5},
    {"threshold": 0.05, "max_boxes": 3},
    {"drop_singletons": False, "min_area": 6, "max_area": 20},
    {"reference_clamp": False, "sigma": 0.7},
]


def check(prob, **kwargs):
    boxes, index, blurred = sdrpn.ops.roi_boxes(prob, **kwargs)
    want_boxes, want_index, want_blurred = reference.roi_boxes(prob, **kwargs)
    torch.testing.assert_close(blurred.cpu(), want_blurred, rtol=1e-6, atol=1e-6)
    assert torch.equal(boxes.cpu(), want_boxes), (boxes, want_boxes)
    assert torch.equal(index.cpu(), want_index)
    return boxes, index


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grid", GRIDS, ids=[f"{h}x{w}" for h, w in GRIDS])
@pytest.mark.parametrize("settings", SETTINGS, ids=["spec", "relative", "lenient", "areas", "no-clamp"])
def test_parity_with_bfs_reference(device, grid, settings):
    check(structured_maps(*grid, seed=grid[0] * 100 + grid[1]).to(device), **settings)


def blob_maps(batch, h, w, seed):
    """One blob in even samples, two in odd ones, each 2 to 5 cells a side, over noise that
    stays under the default threshold once blurred: every sample has boxes to compare."""
    gen = torch.Generator().manual_seed(seed)
    prob = torch.rand(batch, h, w, generator=gen) ** 6 * 0.1
    for b in range(batch):
        for _ in range(1 + b % 2):
            bh, bw = (int(torch.randint(2, 6, (1,), generator=gen)) for _ in range(2))
            y, x = (
                int(torch.randint(0, h - bh + 1, (1,), generator=gen)),
                int(torch.randint(0, w - bw + 1, (1,), generator=gen)),
            )
            prob[b, y : y + bh, x : x + bw] = 0.9
    return prob


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_blob_maps_give_the_references_boxes_in_every_dtype(device, dtype):
    boxes, index = check(blob_maps(32, 24, 24, seed=7).to(device, dtype))
    assert boxes.shape[0] == index.shape[0]
    # Boxes were compared, not two empty lists: most samples keep one or two (blobs that
    # touch merge; three or more components give none).
    assert index.unique().numel() >= 16, index.tolist()


def test_known_boxes():
    prob = torch.zeros(1, 24, 24)
    prob[0, 5:9, 10:16] = 1.0  # 4x6 blob: blurred spreads one cell, box grows by one
    boxes, index, blurred = sdrpn.ops.roi_boxes(prob)
    assert index.tolist() == [0]
    x0, y0, x1, y1 = boxes[0].tolist()
    assert (x0, y0, x1, y1) == (9, 4, 17, 10)
    # A single hot cell: only its centre stays above 0.15 after the blur (0.452^2 = 0.204,
    # the neighbours 0.452 * 0.274 = 0.124): a singleton, dropped as noise or a sink.
    prob = torch.zeros(1, 24, 24)
    prob[0, 12, 12] = 1.0
    assert sdrpn.ops.roi_boxes(prob)[0].tolist() == []
    assert sdrpn.ops.roi_boxes(prob, drop_singletons=False)[0].tolist() == [[11, 11, 14, 14]]
    # Three separate blobs: more than max_boxes, so none.
    prob = torch.zeros(1, 24, 24)
    for x in (2, 10, 18):
        prob[0, 10:13, x : x + 3] = 1.0
    assert sdrpn.ops.roi_boxes(prob)[0].shape == (0, 4)
    assert sdrpn.ops.roi_boxes(prob, max_boxes=3)[0].shape == (3, 4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", ["roi_boxes", "roi_crops"])
def test_huge_max_boxes_acts_as_the_grid_size(device, op):
    # A grid holds at most H * W boxes: max_boxes beyond that changes nothing, and sizes no
    # buffer (3e9 once asked for 96 GB, 2**63 - 1 wrapped max_boxes + 1).
    prob = torch.zeros(2, 24, 24, device=device)
    for x in (2, 10, 18):
        prob[0, 10:13, x : x + 3] = 1.0
    kwargs = {"mode": "bbox"} if op == "roi_crops" else {}
    want = getattr(sdrpn.ops, op)(prob, max_boxes=576, **kwargs)
    for max_boxes in (3 * 10**9, 2**62, 2**63 - 1):
        got = getattr(sdrpn.ops, op)(prob, max_boxes=max_boxes, **kwargs)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert want[0].shape == (3, 4)


def test_small_component_growth_follows_the_reference():
    # Two cells survive the threshold (0.452 * (0.452 + 0.274) = 0.328): area 2 < 4, grown
    # around the centre (5, 4.5) to 3x3.
    prob = torch.zeros(1, 10, 10)
    prob[0, 4, 4:6] = 1.0
    boxes, _, _ = sdrpn.ops.roi_boxes(prob, threshold=0.3)
    want, _, _ = reference.roi_boxes(prob, threshold=0.3)
    assert torch.equal(boxes, want)
    assert boxes.tolist() == [[3, 3, 6, 6]]


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device):
    boxes, index, blurred = sdrpn.ops.roi_boxes(torch.empty(0, 24, 24, device=device))
    assert boxes.shape == (0, 4) and index.shape == (0,) and blurred.shape == (0, 24, 24)


BAD = [
    (dict(prob=torch.rand(24, 24)), "prob must be (B, H, W), got shape [24, 24]"),
    (dict(prob=torch.ones(1, 4, 4, dtype=torch.long)), "prob must be float32, float64, float16 or bfloat16, got Long"),
    (dict(prob=torch.rand(1, 0, 4)), "prob's grid must be at least 1x1, got 0x4"),
    (dict(prob=torch.rand(1, 4, 0)), "prob's grid must be at least 1x1, got 4x0"),
    # An empty batch of a grid over 2^30 cells: refused before any buffer is sized by it.
    (dict(prob=torch.empty(0, 2**30 + 1, 1)), "prob's grid must have at most 2^30 cells, got 1073741825x1"),
    (dict(prob=torch.empty(0, 2**31 - 200, 1)), "prob's grid must have at most 2^30 cells, got 2147483448x1"),
    (dict(threshold=float("nan")), "threshold must be finite, got nan"),
    (dict(sigma=0.0), "sigma must be a finite number > 0, got 0"),
    (dict(min_area=-1), "min_area must be >= 0, got -1"),
    (dict(max_area=0), "max_area must be >= 1, got 0"),
    (dict(max_boxes=0), "max_boxes must be >= 1, got 0"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("change,message", BAD)
def test_bad_inputs_name_the_argument(device, change, message):
    kwargs = dict(prob=torch.rand(2, 4, 4))
    kwargs.update(change)
    prob = kwargs.pop("prob").to(device)
    with pytest.raises(RuntimeError) as err:
        sdrpn.ops.roi_boxes(prob, **kwargs)
    assert message in str(err.value)


def test_opcheck():
    prob = structured_maps(8, 8, seed=1)
    torch.library.opcheck(
        torch.ops.sdrpn.roi_boxes.default,
        (prob,),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )


@needs_cuda
def test_cuda_matches_cpu_on_a_large_batch():
    prob = blob_maps(512, 24, 24, seed=3)
    cpu = sdrpn.ops.roi_boxes(prob)
    assert cpu[1].unique().numel() >= 256  # boxes to compare (random maps to a power give none)
    cuda = sdrpn.ops.roi_boxes(prob.cuda())
    for a, b in zip(cpu, cuda):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-6, atol=1e-6)


def test_the_blurred_map_is_not_differentiable():
    prob = torch.rand(2, 6, 6, requires_grad=True)
    assert not any(t.requires_grad for t in sdrpn.ops.roi_boxes(prob))
