"""The spatial support of detectors: the bins of the box head's RoI pooling (RoIAlign's grid,
moved by known offsets), the FPN paths down to the backbone, a backbone node's regular grid and
its shift by a deformable layer's offset, the per-RoI node's response, receptive field and
saliency region with the RoI held fixed, and the errors."""

import pytest
import torch
from torchvision.ops import roi_align

from deformable.analysis import (detections, effective_receptive_field, fit_image, layer_chain,
                                 node_location, roi_node_receptive_field, roi_node_response,
                                 roi_node_saliency_region, roi_node_sampling_locations,
                                 sampling_locations)  # fmt: skip
from deformable.models.detection import fasterrcnn_resnet18_fpn

SIZE = 64
BOX = (10.0, 12.0, 40.0, 30.0)  # 30 x 18 pixels: pooled from P2 (stride 4)


def build(roi_pool="align", deform_stages=(), size=SIZE):
    torch.manual_seed(0)
    return fasterrcnn_resnet18_fpn(num_classes=3, deform_stages=deform_stages, modulated=False,
                                   roi_pool=roi_pool, min_size=size, max_size=size).eval()  # fmt: skip


@pytest.fixture(scope="module")
def regular():
    return build("align")


@pytest.fixture(scope="module")
def deformable_pooling():
    return build("deform")


@pytest.fixture(scope="module")
def image():
    return torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def roi_align_grid(box, bins=7, samples=2):
    """RoIAlign's sample points (y, x) in image pixels, written out: sample (iy, ix) of bin
    (i, j) at ``y1 + (i + (iy + 0.5) / samples) * height / bins`` (same for x)."""
    x1, y1, x2, y2 = box
    grid = torch.zeros(bins, bins, samples * samples, 2, dtype=torch.float64)
    for i in range(bins):
        for j in range(bins):
            for iy in range(samples):
                for ix in range(samples):
                    grid[i, j, iy * samples + ix] = torch.tensor([
                        y1 + (i + (iy + 0.5) / samples) * (y2 - y1) / bins,
                        x1 + (j + (ix + 0.5) / samples) * (x2 - x1) / bins])  # fmt: skip
    return grid


@pytest.mark.parametrize("pool", ["regular", "deformable_pooling"])
def test_bins_at_zero_offsets_are_roi_aligns_sampling_grid(pool, image, request):
    detector = request.getfixturevalue(pool)
    found = roi_node_sampling_locations(detector, image, BOX, depth=1)
    assert found.level == "0" and found.box == BOX
    assert found.bins.shape == (7, 7, 4, 2)
    assert torch.equal(found.bins, roi_align_grid(BOX).float())  # exactly, to the float32 ulp
    assert torch.allclose(found.bin_weights, torch.full((7, 7, 4), 0.25))
    # and torchvision's roi_align reads there: on a map whose value is its column (row), each
    # bin's output is the mean column (row) of its samples, in P2's pixels (stride 4)
    rows, cols = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    ramps = torch.stack([rows, cols])[None]
    pooled = roi_align(ramps, [torch.tensor([BOX])], 7, spatial_scale=0.25, sampling_ratio=2)
    assert torch.allclose(found.bins.mean(2).permute(2, 0, 1) / 4, pooled[0], atol=1e-5)


def test_known_roi_offsets_move_the_bins_by_gamma_offset_roi_size(image):
    detector = build("mdeform")
    pool = detector.roi_heads.box_roi_pool.pool
    still = roi_node_sampling_locations(detector, image, BOX)
    # modulated pooling weighs every path by its bin's mask (0.5 when fresh)
    assert torch.allclose(still.bin_weights, torch.full((7, 7, 4), 0.5 / 4))
    assert torch.allclose(still.weights, torch.full((len(still.weights),), 0.5 / 4))
    with torch.no_grad():  # every bin: 0.5 of the RoI's width right, 1.0 of its height up
        pool.offset_fc[4].bias.view(2, 49).copy_(torch.tensor([[0.5], [-1.0]]))
    moved = roi_node_sampling_locations(detector, image, BOX).bins
    width, height = BOX[2] - BOX[0], BOX[3] - BOX[1]
    shift = torch.tensor([pool.gamma * -1.0 * height, pool.gamma * 0.5 * width])  # (y, x)
    assert torch.allclose(moved - still.bins, shift.expand_as(moved), atol=1e-5)
    assert torch.allclose(shift, torch.tensor([-1.8, 1.5]))


def test_bin_samples_follow_the_fpn_down_every_stage(regular, image):
    """A sample at p of P2 reads C2 at p and, through the top-down path's nearest up-sampling,
    C3..C5 at floor(round(p) / 2), ...; from each, the taps of the stage's last conv."""
    found = roi_node_sampling_locations(regular, image, BOX, depth=1)
    samples = found.bins.reshape(-1, 2).double()
    count = len(samples)
    assert found.points.shape == (count * 4 * 9, 2)  # 4 stages, 9 taps each
    paths = found.points.double().reshape(4, count, 9, 2)
    taps = torch.tensor([[dy, dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1)], dtype=torch.float64)
    position = samples / 4  # P2 pixels
    assert torch.allclose(paths[0], 4 * (position[:, None] + taps), atol=1e-4)  # C2: layer1
    position = position.round()
    for stage, stride in ((1, 8), (2, 16), (3, 32)):
        position = torch.floor(position / 2)
        assert torch.equal(paths[stage], stride * (position[:, None] + taps)), stride
    assert torch.allclose(found.weights, torch.full((len(found.weights),), 0.25))


def test_the_fpn_reads_each_stage_where_the_paths_say(regular):
    """Independent of the analysis: with the FPN's 3x3 output convs cut to their centre tap, the
    gradient of P2 at p reaches each stage C_k at exactly one position, the one the paths use."""
    import copy
    from collections import OrderedDict

    fpn = copy.deepcopy(regular.backbone.fpn)
    with torch.no_grad():
        for block in fpn.layer_blocks:
            conv = block[0]
            centre = conv.weight[:, :, 1, 1].clone()
            conv.weight.zero_()
            conv.weight[:, :, 1, 1] = centre
    stages = OrderedDict((str(i), torch.randn(1, c, s, s, requires_grad=True))
                         for i, (c, s) in enumerate([(64, 16), (128, 8), (256, 4), (512, 2)]))  # fmt: skip
    fpn(stages)["0"][0, :, 5, 9].sum().backward()
    reached = [torch.nonzero(x.grad[0].abs().sum(0)).tolist() for x in stages.values()]
    assert reached == [[[5, 9]], [[2, 4]], [[1, 2]], [[0, 1]]]  # floor(p / 2), again and again


def test_a_large_box_is_pooled_from_a_coarser_level():
    detector = build("align", size=160)
    picture = torch.rand(3, 160, 160)
    found = roi_node_sampling_locations(detector, picture, (5.0, 5.0, 155.0, 155.0), depth=1)
    assert found.level == "1"  # sqrt(area) = 150: floor(4 + log2(150 / 224)) = 3, P3
    assert torch.allclose(found.bins.double(), roi_align_grid((5.0, 5.0, 155.0, 155.0)), atol=1e-4)
    assert found.points.shape == (196 * 3 * 9, 2)  # C3, C4, C5


def counts(points):
    keys, number = torch.unique(points.round().long(), dim=0, return_counts=True)
    return {tuple(k.tolist()): int(n) for k, n in zip(keys, number)}


def grid_counts(centre, spacing, layers=3):
    c = {-3: 1, -2: 3, -1: 6, 0: 7, 1: 6, 2: 3, 3: 1}  # (1, 1, 1) convolved three times
    return {(centre[0] + spacing * dy, centre[1] + spacing * dx): c[dy] * c[dx]
            for dy in c for dx in c}  # fmt: skip


def test_a_regular_backbone_node_reads_the_strided_grid(regular, image):
    chain = [name for name, _ in layer_chain(regular)]
    assert chain[0] == "backbone.body.conv1" and chain[-1] == "backbone.body.layer4.1.bn2"
    found = sampling_locations(regular, image, node=(1, 1), depth=3)
    assert found.points.shape == (729, 2)
    # conv5 (stride 32): its three last 3x3 convs tap -1, 0, 1 conv5 pixels = 32 image pixels
    assert counts(found.points) == grid_counts((32, 32), 32)
    assert node_location(regular, image, node=(1, 1))[0] == (32.0, 32.0)


def test_a_dilated_backbone_node_reads_the_dilated_grid():
    """DeepLab's conv5 keeps stride 8 and dilates by 4: its taps are 32 pixels apart."""
    from deformable.models.segmentation import deeplabv3_resnet18

    model = deeplabv3_resnet18(num_classes=2, deform_stages=()).eval()
    found = sampling_locations(model, torch.rand(3, SIZE, SIZE), node=(3, 5), depth=3)
    assert counts(found.points) == grid_counts((24, 40), 32)


def test_a_constant_offset_in_a_deformable_layer_moves_the_points_by_it(image):
    detector = build("align", deform_stages=(5,))
    layer = detector.backbone.body.layer4[1].conv2
    grid = sampling_locations(detector, image, node=(1, 0), depth=3).points
    before = roi_node_sampling_locations(detector, image, BOX).points.reshape(4, -1, 2)
    with torch.no_grad():  # every tap of conv5's last layer moves by (0.5, -0.25) of its input
        layer.conv_offset.weight.zero_()
        layer.conv_offset.bias.view(-1, 2).copy_(torch.tensor([0.5, -0.25]))
    moved = sampling_locations(detector, image, node=(1, 0), depth=3).points
    # its input is conv5's map (stride 32); the layers below read zero offsets there
    assert torch.allclose(moved - grid, torch.tensor([16.0, -8.0]).expand_as(grid), atol=1e-4)
    # a RoI's paths through conv5 move by the same amount; those through C2..C4 do not
    after = roi_node_sampling_locations(detector, image, BOX).points.reshape(4, -1, 2)
    assert torch.equal(after[:3], before[:3])
    assert torch.allclose(after[3] - before[3], torch.tensor([16.0, -8.0]).expand_as(before[3]),
                          atol=1e-4)  # fmt: skip


def test_the_roi_node_is_what_the_box_head_computes_for_that_roi(deformable_pooling, image):
    detector = deformable_pooling
    seen = {}
    hook = detector.roi_heads.box_head.register_forward_hook(
        lambda module, args, output: seen.setdefault("output", output))
    try:
        with torch.no_grad():
            images, _ = detector.transform([image])
            features = detector.backbone(images.tensors)
            detector.roi_heads(features, [torch.tensor([BOX])], images.image_sizes)
    finally:
        hook.remove()
    response = roi_node_response(detector, image, BOX)
    assert response.shape == (1, 1024)
    assert torch.allclose(response, seen["output"], atol=1e-5)
    twice = roi_node_response(detector, torch.stack([image, image.flip(-1)]), BOX)
    assert torch.allclose(twice[0], response[0], atol=1e-5)
    assert not torch.allclose(twice[1], response[0], atol=1e-3)


def test_the_roi_nodes_receptive_field_and_saliency_region(regular, image):
    erf = roi_node_receptive_field(regular, image, BOX)
    assert erf.map.shape == (SIZE, SIZE) and erf.node == BOX
    assert float(erf.map.max()) == 1.0 and float(erf.map.min()) >= 0
    # the gradient of the 2fc output with the RoI fixed, summed over outputs
    picture = image.clone().requires_grad_(True)
    roi_node_response(regular, picture, BOX).sum().backward()
    magnitude = picture.grad.abs().sum(0)
    assert torch.allclose(erf.map, magnitude / magnitude.max(), atol=1e-6)

    region = roi_node_saliency_region(regular, image, BOX, error_bound=0.3, step=3)
    assert region.node == BOX and region.error <= 0.3 and region.size == int(region.mask.sum())
    rows, cols = torch.nonzero(region.mask, as_tuple=True)
    if region.size:  # a square around the box's centre (21, 25)
        assert abs((rows.min() + rows.max()) / 2 - 21) <= 1 and abs((cols.min() + cols.max()) / 2 - 25) <= 1
    with torch.no_grad():
        full = roi_node_response(regular, image, BOX)[0]
        kept = roi_node_response(regular, torch.where(region.mask, image, 0.0), BOX)[0]
    assert float((kept - full).norm() / full.norm()) == pytest.approx(region.error, abs=1e-4)


def test_detections_and_fitting(regular):
    picture = torch.rand(3, 100, 50)
    fitted = fit_image(regular, picture)
    assert fitted.shape == (3, 64, 32)
    assert torch.equal(fit_image(regular, fitted), fitted)
    found = detections(regular, fitted)
    assert torch.equal(found.scores, found.scores.sort(descending=True).values)
    assert found.boxes.shape == (len(found.scores), 4)


def test_mask_rcnn_has_a_per_roi_node_too(image):
    from deformable.models.detection import maskrcnn_resnet18_fpn

    torch.manual_seed(0)
    detector = maskrcnn_resnet18_fpn(num_classes=3, min_size=SIZE, max_size=SIZE).eval()
    found = roi_node_sampling_locations(detector, image, BOX)
    assert found.bins.shape == (7, 7, 4, 2) and len(found.points) == 196 * 4 * 9
    assert roi_node_response(detector, image, BOX).shape == (1, 1024)


def test_exceptions(regular, image):
    with pytest.raises(ValueError, match=r"resizes a 100x50 image to 64x32; pass the image at that size"):
        roi_node_sampling_locations(regular, torch.rand(3, 100, 50), BOX)
    with pytest.raises(ValueError, match=r"resizes a 32x32 image to 64x64"):
        effective_receptive_field(regular, torch.rand(3, 32, 32))
    with pytest.raises(ValueError, match=r"box \(10, 12, 70, 30\) is not inside the 64x64 image"):
        roi_node_receptive_field(regular, image, (10, 12, 70, 30))
    with pytest.raises(ValueError, match=r"box \(40, 12, 10, 30\) is not inside"):
        roi_node_response(regular, image, (40, 12, 10, 30))
    with pytest.raises(TypeError, match="box must be 4 numbers"):
        roi_node_saliency_region(regular, image, (1, 2, 3))
    with pytest.raises(ValueError, match="depth must be a positive int"):
        roi_node_sampling_locations(regular, image, BOX, depth=0)
    with pytest.raises(ValueError, match="max_points"):
        roi_node_sampling_locations(regular, image, BOX, depth=3, max_points=10_000)
    with pytest.raises(TypeError, match="expected a Faster / Mask R-CNN"):
        roi_node_response(torch.nn.Conv2d(3, 3, 1), image, BOX)
