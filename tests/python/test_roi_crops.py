import pytest
import torch

import reference
import sdrpn
from conftest import DEVICES, FLOAT_DTYPES, needs_cuda
from test_roi_boxes import BAD as BOX_RULES_BAD
from test_roi_boxes import blob_maps


def crop_maps(h, w, seed):
    """One blob, several separate blobs (mask mode), touching blobs, empty, all-on, speckle
    and smooth random maps."""
    gen = torch.Generator().manual_seed(seed)

    def randint(lo, hi):
        return int(torch.randint(lo, hi, (1,), generator=gen))

    maps = []
    one = torch.zeros(h, w)
    one[h // 4 : h // 4 + max(1, h // 4), w // 3 : w // 3 + max(1, w // 4)] = 0.9
    maps.append(one)
    for count in (2, 3, 5):
        blobs = torch.zeros(h, w)
        for _ in range(count):
            y, x, sy, sx = randint(0, h), randint(0, w), randint(1, 4), randint(1, 4)
            blobs[y : y + sy, x : x + sx] = float(torch.rand(1, generator=gen)) * 0.6 + 0.4
        maps.append(blobs)
    corners = torch.zeros(h, w)
    corners[:2, :2] = 1.0
    corners[-2:, -2:] = 1.0
    maps.append(corners)
    maps.append(torch.zeros(h, w))
    maps.append(torch.ones(h, w))
    maps.append((torch.rand(h, w, generator=gen) > 0.8).float())
    maps.append(torch.rand(h, w, generator=gen) ** 3)
    return torch.stack(maps)


GRIDS = [(24, 24), (8, 8), (16, 16), (12, 20), (20, 12)]
SETTINGS = [
    {},
    {"threshold": -0.5},
    {"threshold": 0.05, "max_boxes": 3},
    {"drop_singletons": False, "min_area": 6, "max_area": 20},
    {"reference_clamp": False, "sigma": 0.7, "threshold": 0.3},
]
SETTING_IDS = ["spec", "relative", "lenient", "areas", "no-clamp"]


def check(prob, **kwargs):
    boxes, index, keep = sdrpn.ops.roi_crops(prob, **kwargs)
    want_boxes, want_index, want_keep = reference.roi_crops(prob, **kwargs)
    assert boxes.dtype == index.dtype == torch.long and keep.dtype == torch.bool
    assert torch.equal(boxes.cpu(), want_boxes), (boxes, want_boxes)
    assert torch.equal(index.cpu(), want_index), (index, want_index)
    assert torch.equal(keep.cpu(), want_keep)
    return boxes, index, keep


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grid", GRIDS, ids=[f"{h}x{w}" for h, w in GRIDS])
@pytest.mark.parametrize("settings", SETTINGS, ids=SETTING_IDS)
@pytest.mark.parametrize("mode", ["mask", "bbox"])
def test_parity_with_reference(device, grid, settings, mode):
    check(crop_maps(*grid, seed=grid[0] * 100 + grid[1]).to(device), mode=mode, **settings)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("grid", [(24, 24), (12, 20)], ids=["24x24", "12x20"])
def test_random_maps_all_dtypes(device, dtype, grid):
    gen = torch.Generator().manual_seed(11)
    prob = (torch.rand(32, *grid, generator=gen) ** 4).to(device, dtype)
    boxes, index, keep = check(prob, threshold=0.3)
    assert boxes.shape[0] == index.shape[0] == keep.shape[0]
    assert torch.all(index[1:] > index[:-1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grid", GRIDS, ids=[f"{h}x{w}" for h, w in GRIDS])
@pytest.mark.parametrize("settings", SETTINGS, ids=SETTING_IDS)
def test_bbox_mode_is_roi_boxes(device, grid, settings):
    prob = crop_maps(*grid, seed=grid[0] + grid[1]).to(device)
    boxes, index, keep = sdrpn.ops.roi_crops(prob, mode="bbox", **settings)
    want_boxes, want_index, _ = sdrpn.ops.roi_boxes(prob, **settings)
    assert torch.equal(boxes, want_boxes) and torch.equal(index, want_index)
    assert keep.shape == (len(boxes), *grid) and bool(keep.all())


def test_mask_mode_known_crop():
    # Two 3x3 blobs: two boxes, so one crop over both, with the gap between them dropped.
    prob = torch.zeros(1, 24, 24)
    prob[0, 10:13, 2:5] = 1.0
    prob[0, 10:13, 18:21] = 1.0
    boxes, index, keep = sdrpn.ops.roi_crops(prob)
    assert index.tolist() == [0]
    assert boxes.tolist() == [[1, 9, 22, 14]]
    assert bool(keep[0, :, 1:5].all()) and bool(keep[0, :, 19:23].all())
    assert not bool(keep[0, :, 6:18].any()) and int(keep.sum()) == 244
    # bbox mode gives the two boxes, every token kept; three blobs give none in bbox mode,
    # one crop in mask mode.
    assert sdrpn.ops.roi_crops(prob, mode="bbox")[0].shape == (2, 4)
    prob[0, 10:13, 10:13] = 1.0
    assert sdrpn.ops.roi_crops(prob, mode="bbox")[0].shape == (0, 4)
    assert sdrpn.ops.roi_crops(prob)[0].tolist() == [[1, 9, 22, 14]]


def test_one_box_keeps_every_token():
    prob = torch.zeros(2, 24, 24)
    prob[1, 5:9, 10:16] = 1.0
    boxes, index, keep = sdrpn.ops.roi_crops(prob)
    assert index.tolist() == [1] and boxes.tolist() == [[9, 4, 17, 10]]
    assert bool(keep.all())


def test_only_dropped_components_give_no_crop():
    # Two singletons: both dropped, so 0 boxes and no crop although the mask is not empty.
    prob = torch.zeros(1, 24, 24)
    prob[0, 4, 4] = 1.0
    prob[0, 16, 16] = 1.0
    assert sdrpn.ops.roi_crops(prob)[0].shape == (0, 4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["mask", "bbox"])
def test_empty_batch(device, mode):
    boxes, index, keep = sdrpn.ops.roi_crops(torch.empty(0, 12, 20, device=device), mode=mode)
    assert boxes.shape == (0, 4) and index.shape == (0,) and keep.shape == (0, 12, 20)


# roi_crops checks its box rules as roi_boxes does: every case of roi_boxes, and its own.
BAD = BOX_RULES_BAD + [
    (dict(threshold=float("inf")), "threshold must be finite, got inf"),
    (dict(mode="boxes"), 'mode must be "mask" or "bbox", got "boxes"'),
    (dict(sigma=-1.0), "sigma must be a finite number > 0, got -1"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("change,message", BAD)
def test_bad_inputs_name_the_argument(device, change, message):
    kwargs = dict(prob=torch.rand(2, 4, 4))
    kwargs.update(change)
    prob = kwargs.pop("prob").to(device)
    with pytest.raises(RuntimeError) as err:
        sdrpn.ops.roi_crops(prob, **kwargs)
    assert message in str(err.value)


@pytest.mark.parametrize("mode", ["mask", "bbox"])
def test_opcheck(mode):
    torch.library.opcheck(
        torch.ops.sdrpn.roi_crops.default,
        (crop_maps(8, 8, seed=1),),
        {"mode": mode},
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )


@needs_cuda
@pytest.mark.parametrize("mode", ["mask", "bbox"])
def test_cuda_matches_cpu_on_a_large_batch(mode):
    prob = blob_maps(512, 24, 24, seed=3)
    cpu = sdrpn.ops.roi_crops(prob, threshold=0.3, mode=mode)
    assert cpu[1].unique().numel() >= 256  # crops to compare (random maps to a power give no bbox)
    cuda = sdrpn.ops.roi_crops(prob.cuda(), threshold=0.3, mode=mode)
    for a, b in zip(cpu, cuda):
        assert torch.equal(b.cpu(), a)


@needs_cuda
def test_cuda_rounds_as_the_cpu_at_thresholds_on_blurred_values():
    """Both devices blur one rounding at a time (the GPU would fuse a * b + c into an FMA,
    one ulp off in a fifth of the taps), so a threshold equal to a cell's blurred value
    leaves that cell on the same side on both: the same blurred maps, boxes and masks."""
    gen = torch.Generator().manual_seed(0)
    prob = torch.rand(64, 24, 24, generator=gen) ** 4
    blurred = sdrpn.ops.roi_boxes(prob)[2]
    assert torch.equal(sdrpn.ops.roi_boxes(prob.cuda())[2].cpu(), blurred)
    for threshold in blurred[0].flatten().topk(24).values.tolist():  # the strongest blob's rim
        for mode in ("mask", "bbox"):
            cpu = sdrpn.ops.roi_crops(prob, threshold=threshold, mode=mode)
            cuda = sdrpn.ops.roi_crops(prob.cuda(), threshold=threshold, mode=mode)
            for a, b in zip(cpu, cuda):
                assert torch.equal(b.cpu(), a), (threshold, mode)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grid", [(24, 24), (12, 20), (16, 16)], ids=["24x24", "12x20", "16x16"])
def test_mask_resize_matches_interpolate_for_every_cut_size(device, grid):
    # sigma 0.1 leaves the map unblurred (the side weight exp(-50) rounds away), so the masks
    # are the random ones drawn here: cuts of every size, some with a token whose exact
    # bilinear value is 0.5, where float32 rounding as torch does it decides the side.
    h, w = grid
    gen = torch.Generator().manual_seed(h * w)
    maps = []
    for i in range(96):
        ch, cw = 1 + i % h, 1 + (i * 7) % w
        y, x = (
            int(torch.randint(0, h - ch + 1, (1,), generator=gen)),
            int(torch.randint(0, w - cw + 1, (1,), generator=gen)),
        )
        m = torch.zeros(h, w)
        m[y : y + ch, x : x + cw] = (torch.rand(ch, cw, generator=gen) > 0.5).float()
        m[y, x] = m[y + ch - 1, x + cw - 1] = 1.0
        maps.append(m)
    prob = torch.stack(maps).to(device)
    settings = dict(sigma=0.1, threshold=0.5, drop_singletons=False, min_area=0, max_area=h * w)
    _, _, keep = check(prob, **settings)
    assert keep.shape[0] > 48


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("faint", [(2, 12), (11, 12)], ids=["above-the-blobs", "between-them"])
def test_a_cell_exactly_at_the_threshold_is_not_above_it(device, faint):
    # Two 3x3 blobs (two boxes: mask mode's union crop) and one faint cell whose blurred value
    # is the threshold itself. Above the blobs, it must not stretch the tight box; between
    # them, inside the box, the resized mask reads it as 0 and keeps no crop token near it.
    prob = torch.zeros(1, 24, 24)
    prob[0, 10:13, 2:5] = 1.0
    prob[0, 10:13, 18:21] = 1.0
    prob[0, faint[0], faint[1]] = 0.3
    prob = prob.to(device)
    blurred = sdrpn.ops.roi_boxes(prob)[2]  # this device's own blur
    threshold = float(blurred[0, faint[0], faint[1]])
    assert float(blurred[0, 9, 3]) > threshold
    boxes, index, keep = sdrpn.ops.roi_crops(prob, threshold=threshold)
    want_boxes, _, want_keep = reference.roi_crops(prob.cpu(), threshold=threshold)
    assert index.tolist() == [0] and boxes.tolist() == [[1, 9, 22, 14]]
    assert torch.equal(boxes.cpu(), want_boxes) and torch.equal(keep.cpu(), want_keep)
    if faint == (11, 12):
        assert not bool(keep[0, :, 8:16].any())
