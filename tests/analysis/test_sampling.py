"""Effective sampling locations: regular grids and their multiplicities, shifts by offsets,
pools, offset groups, spatial transformers, chains of real models and deformable RoI pooling."""

import pytest
import torch
from torch import nn

from deformable.analysis import layer_chain, node_location, roi_sampling_locations, sampling_locations
from deformable.nn import DeformConv2d, DeformRoIPool, SpatialTransformer


def counts(points):
    """{(dy, dx): multiplicity} of integer points."""
    keys, number = torch.unique(points.round().long(), dim=0, return_counts=True)
    return {tuple(k.tolist()): int(n) for k, n in zip(keys, number)}


def one_d(layers):
    """Multiplicities of the sums of ``layers`` values in {-1, 0, 1}: (1, 1, 1) convolved."""
    c = torch.tensor([1.0])
    for _ in range(layers):
        c = torch.nn.functional.conv1d(c[None, None], torch.ones(1, 1, 3), padding=2)[0, 0]
    return c.long().tolist()


@pytest.mark.parametrize("layers, expected", [(2, [1, 2, 3, 2, 1]), (3, [1, 3, 6, 7, 6, 3, 1])])
def test_one_d_multiplicities(layers, expected):
    assert one_d(layers) == expected


@pytest.mark.parametrize("kind", ["deform", "regular"])
@pytest.mark.parametrize("layers", [2, 3])
def test_zero_offsets_give_the_regular_grid_with_multiplicities(kind, layers):
    make = (lambda: DeformConv2d(2, 2, 3, padding=1)) if kind == "deform" else (
        lambda: nn.Conv2d(2, 2, 3, padding=1))
    net = nn.Sequential(*[m for _ in range(layers) for m in (make(), nn.BatchNorm2d(2), nn.ReLU())])
    node = (7, 9)
    points, weights, got_node = sampling_locations(net, torch.rand(2, 16, 20), node=node)
    assert got_node == node
    assert points.shape == (9**layers, 2)
    assert torch.equal(weights, torch.ones(9**layers))
    assert torch.equal(points, points.round())  # exactly on the grid
    c = one_d(layers)
    expected = {(node[0] + dy, node[1] + dx): c[dy + layers] * c[dx + layers]
                for dy in range(-layers, layers + 1) for dx in range(-layers, layers + 1)}
    assert counts(points) == expected
    assert len(expected) == (2 * layers + 1) ** 2
    if layers == 3:
        assert expected[node] == 49 and expected[(node[0] - 3, node[1] - 3)] == 1


def test_modulated_fresh_layers_weigh_every_path_by_the_masks():
    net = nn.Sequential(*[DeformConv2d(1, 1, 3, padding=1, modulated=True) for _ in range(3)])
    _, weights, _ = sampling_locations(net, torch.rand(1, 12, 12), node=(6, 6))
    assert torch.allclose(weights, torch.full((729,), 0.125))


def constant_offset(layer: DeformConv2d, dy: float, dx: float) -> DeformConv2d:
    """Make every tap of ``layer`` move by (dy, dx) everywhere."""
    with torch.no_grad():
        layer.conv_offset.weight.zero_()
        bias = layer.conv_offset.bias.view(-1)
        bias.zero_()
        bias[: layer.offset_channels].view(-1, 2).copy_(torch.tensor([dy, dx]))
    return layer


def test_a_constant_offset_shifts_the_points_by_the_predicted_amount():
    shift = (0.3, -0.7)
    deform = nn.Sequential(*[constant_offset(DeformConv2d(1, 1, 3, padding=1), *shift)
                             for _ in range(3)])
    regular = nn.Sequential(*[nn.Conv2d(1, 1, 3, padding=1) for _ in range(3)])
    image = torch.rand(1, 20, 20)
    moved, _, _ = sampling_locations(deform, image, node=(10, 10))
    grid, _, _ = sampling_locations(regular, image, node=(10, 10))
    # three layers of stride 1: every path moves by 3 * shift
    assert torch.allclose(moved - grid, torch.tensor([3 * shift[0], 3 * shift[1]]), atol=1e-5)


def test_offsets_after_a_stride_are_scaled_by_it():
    # conv stride 2 then a deformable layer moving by (1, 0.5) in its own input's pixels:
    # in image pixels that is 2 * (1, 0.5)
    first = nn.Conv2d(1, 1, 3, stride=2, padding=1)
    second = constant_offset(DeformConv2d(1, 1, 3, padding=1), 1.0, 0.5)
    moved, _, _ = sampling_locations(nn.Sequential(first, second), torch.rand(1, 24, 24),
                                     node=(5, 5))
    plain = nn.Sequential(first, nn.Conv2d(1, 1, 3, padding=1))
    grid, _, _ = sampling_locations(plain, torch.rand(1, 24, 24), node=(5, 5))
    assert torch.allclose(moved - grid, torch.tensor([2.0, 1.0]), atol=1e-5)
    # the grid itself: taps at 2 * (5 + {-1, 0, 1}) + {-1, 0, 1}
    assert sorted({int(v) for v in grid[:, 0]}) == list(range(7, 14))


def test_fractional_points_read_interpolated_offsets():
    # layer 2 moves its taps by half a pixel, so layer 1's offsets (which vary along x) are read
    # between positions; a field linear in x gives exactly the linear interpolation
    first = DeformConv2d(1, 1, 1)  # 1x1: one tap, easy to predict
    with torch.no_grad():
        first.conv_offset.weight.zero_()
        first.conv_offset.bias.zero_()
        first.conv_offset.weight[1, 0, 0, 0] = 1.0  # dx = the input pixel's value
    second = constant_offset(DeformConv2d(1, 1, 1), 0.0, 0.5)
    image = torch.arange(8.0).repeat(8, 1)[None] / 10  # value x / 10 at column x
    points, _, _ = sampling_locations(nn.Sequential(first, second), image, node=(3, 2))
    # second: (3, 2.5); first's dx there = 0.25 (between 0.2 and 0.3)
    assert torch.allclose(points, torch.tensor([[3.0, 2.75]]))


def test_pools_map_to_their_window_centre_or_to_the_whole_window():
    net = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1), nn.MaxPool2d(2), nn.Conv2d(1, 1, 1))
    image = torch.rand(1, 8, 8)
    centre, _, _ = sampling_locations(net, image, node=(1, 2))
    window, _, _ = sampling_locations(net, image, node=(1, 2), pool="window")
    assert centre.shape == (9, 2) and window.shape == (36, 2)
    assert torch.allclose(centre.mean(0), torch.tensor([2.5, 4.5]))
    assert counts(window)[(2, 4)] == 4  # each of the 4 window pixels reaches it once
    assert node_location(net, image, layer="2", node=(1, 2))[0] == (2.5, 4.5)
    avg = nn.Sequential(nn.AvgPool2d(3, stride=2, padding=1), nn.Conv2d(1, 1, 1))
    assert node_location(avg, image, node=(2, 3))[0] == (4.0, 6.0)


def test_offset_groups_give_a_point_per_group_weighted_one_over_groups():
    layer = DeformConv2d(2, 2, 3, padding=1, offset_groups=2)
    with torch.no_grad():
        layer.conv_offset.weight.zero_()
        layer.conv_offset.bias.view(2, 9, 2).copy_(torch.tensor([[0.0, 0.0], [2.0, 0.0]])[:, None])
    points, weights, _ = sampling_locations(nn.Sequential(layer), torch.rand(2, 10, 10),
                                            node=(4, 4))
    assert points.shape == (18, 2) and torch.allclose(weights, torch.full((18,), 0.5))
    assert torch.allclose(points[9:] - points[:9], torch.tensor([2.0, 0.0]))


def test_a_spatial_transformer_maps_points_through_its_transform():
    stn = SpatialTransformer(1)
    with torch.no_grad():  # translate by +0.25 (normalised) in x: +2.5 pixels on a 20 px width
        stn.fc_theta.bias.copy_(torch.tensor([1.0, 0, 0.25, 0, 1, 0]))
    conv = nn.Conv2d(1, 1, 3, padding=1)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stn, self.features = stn, nn.Sequential(conv)

        def forward(self, x):
            return self.features(self.stn(x))

    net = Net()
    assert [n for n, _ in layer_chain(net)] == ["stn", "features.0"]
    image = torch.rand(1, 16, 20)
    warped, _, _ = sampling_locations(net, image, node=(8, 8))
    plain, _, _ = sampling_locations(nn.Sequential(conv), image, node=(8, 8))
    assert torch.allclose(warped - plain, torch.tensor([0.0, 2.5]), atol=1e-5)


def test_the_demo_draws_with_it():
    """The demo's figure is these sampling locations at its last ReLU, two layers deep."""
    from deformable.experiments import digits
    from deformable.models import DigitNet

    model = DigitNet("dcnv2")
    with torch.no_grad():
        for conv in model.last_convs:
            conv.conv_offset.weight.normal_(0, 0.3)
    image = torch.rand(1, 40, 40)
    points, weights, unit = digits.sampling_locations(model, image)
    ours, our_weights, node = sampling_locations(model, image, "features.11", unit, depth=2)
    assert node == unit and points.shape == (81, 2)
    assert torch.allclose(ours, points, atol=1e-5) and torch.allclose(our_weights, weights)
    assert len(set(map(tuple, points.round(decimals=3).tolist()))) > 9  # really deformed


def test_resnet_main_path():
    from deformable.models import resnet18

    net = resnet18(deform_stages=(5,), modulated=True, num_classes=4)
    names = [n for n, _ in layer_chain(net)]
    assert names[:4] == ["conv1", "bn1", "relu", "maxpool"]
    assert "layer4.1.conv2" in names and not any("downsample" in n for n in names)
    image = torch.rand(3, 64, 64)
    points, weights, node = sampling_locations(net, image, "layer4.1.conv2", (1, 1), depth=3)
    assert points.shape == (729, 2) and torch.allclose(weights, torch.full((729,), 0.125))
    # odd kernels padded by half their size keep centres aligned: node (1, 1) at stride 32
    location, _ = node_location(net, image, "layer4.1.conv2", (1, 1))
    assert location == (32.0, 32.0)
    with pytest.raises(ValueError, match="max_points.*depth"):
        sampling_locations(net, image, "layer4.1.conv2", (1, 1))


def test_depth_counts_convolutions_with_more_than_one_tap():
    """A bottleneck's 1x1 convs keep points where they are: depth 3 of a ResNet-50's conv5 node
    is its three last 3x3 convs (729 points), not conv3, conv2 and conv1 of its last block."""
    from deformable.models import resnet50

    net = resnet50(deform_stages=(5,), num_classes=2)
    assert [n for n, _ in layer_chain(net)][-2:] == ["layer4.2.conv3", "layer4.2.bn3"]
    points, _, _ = sampling_locations(net, torch.rand(3, 64, 64), node=(1, 1), depth=3)
    assert points.shape == (729, 2)
    # two stride-1 3x3 convs on conv5's map (32 pixels apart), then layer4.0.conv2, which holds
    # the stride (torchvision's v1.5): its taps are on conv4's map, 16 pixels apart
    assert counts(points)[(32, 32)] == 9
    assert points.min().item() == 32 - 2 * 32 - 16 and points.max().item() == 32 + 2 * 32 + 16


def test_exceptions():
    net = nn.Sequential(nn.Conv2d(1, 1, 3), nn.Upsample(scale_factor=2), nn.Conv2d(1, 1, 3))
    image = torch.rand(1, 10, 10)
    with pytest.raises(ValueError, match=r"layer 'nope' is not in .*valid names: 0, 1, 2"):
        sampling_locations(net, image, layer="nope")
    with pytest.raises(ValueError, match="layer '1' is a Upsample"):
        sampling_locations(net, image, node=(0, 0))
    with pytest.raises(ValueError, match="layer '1' is a Upsample"):
        sampling_locations(net, image, node=(0, 0), depth=1)  # still needed to place the points
    with pytest.raises(ValueError, match=r"node \(30, 0\) is outside the layer's 8x8"):
        sampling_locations(net, image, layer="0", node=(30, 0))
    with pytest.raises(TypeError, match="node must be a"):
        sampling_locations(net, image, layer="0", node=(1.5, 0))
    with pytest.raises(ValueError, match="pool must be one of"):
        sampling_locations(net, image, pool="max")
    with pytest.raises(ValueError, match="depth must be a positive int"):
        sampling_locations(net, image, depth=0)
    with pytest.raises(ValueError, match=r"image must be \[C, H, W\]"):
        sampling_locations(net, torch.rand(2, 1, 10, 10))
    with pytest.raises(TypeError, match="cannot resolve the layer chain of a Linear"):
        layer_chain(nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"chain names \['x'\]"):
        layer_chain(net, ["0", "x"])


def test_explicit_chain():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(1, 1, 3, padding=1), nn.Conv2d(1, 1, 3, padding=1)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    points, _, _ = sampling_locations(Two(), torch.rand(1, 9, 9), "b", (4, 4), chain=["a", "b"])
    assert points.shape == (81, 2)


@pytest.mark.parametrize("aligned", [False, True])
def test_roi_pool_samples_are_roi_align_grid_then_shifted(aligned):
    pool = DeformRoIPool(3, 0.5, 2, in_channels=2, hidden_channels=8, modulated=True,
                         aligned=aligned)
    features = torch.rand(1, 2, 16, 16)
    boxes = torch.tensor([[0, 4.0, 2.0, 16.0, 14.0]])
    points, weights = roi_sampling_locations(pool, features, boxes)
    assert points.shape == (1, 3, 3, 4, 2)
    assert torch.allclose(weights.sum(-1), torch.full((1, 3, 3), 0.5))  # fresh mask: 0.5
    # box 12 x 12 image pixels, 3 bins of 4, 2 samples per bin at 1 and 3 px into the bin
    # (exact for aligned; without it the feature grid's origin is at 0, same numbers here)
    assert torch.allclose(points[0, 0, 0], torch.tensor([[3.0, 5], [3, 7], [5, 5], [5, 7]]))
    with torch.no_grad():  # a constant normalised offset (0.5 right, -1 down)
        pool.offset_fc[4].bias.view(2, 9).copy_(torch.tensor([[0.5], [-1.0]]))
    moved, _ = roi_sampling_locations(pool, features, boxes)
    # gamma * offset * roi size (6 feature px) / spatial_scale: (-0.6, 0.3) * 2
    assert torch.allclose(moved - points, torch.tensor([-1.2, 0.6]), atol=1e-5)
