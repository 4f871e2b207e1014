"""Error-bounded saliency regions: the smallest growing region that keeps a node's response."""

import pytest
import torch
from torch import nn

from deformable.analysis import saliency_region


def window(shape, top, left, height, width):
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[top : top + height, left : left + width] = True
    return mask


@pytest.mark.parametrize("grow", ["square", "gradient"])
@pytest.mark.parametrize("kernel", [5, 4])
def test_a_node_that_sees_only_a_patch_needs_exactly_that_patch(grow, kernel):
    conv = nn.Conv2d(2, 3, kernel, bias=True)
    with torch.no_grad():  # no weight near zero: every pixel of the patch matters
        conv.weight.copy_(conv.weight.sign() * (0.5 + conv.weight.abs()))
    image = torch.rand(2, 14, 15) + 0.5
    region = saliency_region(nn.Sequential(conv), image, node=(4, 6), error_bound=1e-4,
                             grow=grow, step=1)  # fmt: skip
    # an even kernel has a half-integer centre: the squares have even sides
    assert torch.equal(region.mask, window((14, 15), 4, 6, kernel, kernel))
    assert region.size == kernel * kernel and region.error <= 1e-4 and region.node == (4, 6)


def test_stacked_layers_see_their_combined_patch():
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
    image = torch.rand(1, 16, 16)
    region = saliency_region(net, image, layer="2", node=(8, 8), error_bound=1e-5)
    assert torch.equal(region.mask, window((16, 16), 6, 6, 5, 5))


def test_a_looser_bound_never_needs_a_larger_region_and_fill_mean_works():
    from deformable.models import DigitNet

    model = DigitNet("dcnv1")
    image = torch.rand(1, 40, 40)
    tight = saliency_region(model, image, node=(5, 5), error_bound=0.01)
    loose = saliency_region(model, image, node=(5, 5), error_bound=0.5)
    assert loose.size <= tight.size and tight.error <= 0.01 and loose.error <= 0.5
    mean = saliency_region(model, image, node=(5, 5), fill="mean", grow="gradient")
    assert mean.error <= 0.1 and mean.mask.dtype == torch.bool


def test_the_empty_region_when_the_node_ignores_the_image():
    conv = nn.Conv2d(1, 1, 3)
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.fill_(1.0)
    region = saliency_region(nn.Sequential(conv), torch.rand(1, 6, 6), node=(1, 1))
    assert region.size == 0 and region.error == 0.0


def test_exceptions():
    net = nn.Sequential(nn.Conv2d(1, 1, 3))
    image = torch.rand(1, 6, 6)
    for kwargs, match in [({"error_bound": 1.0}, "error_bound must be a number in"),
                          ({"grow": "disk"}, "grow must be one of"),
                          ({"step": 0}, "step must be a positive int"),
                          ({"fill": "median"}, "fill must be a number or 'mean'"),
                          ({"batch_size": 0}, "batch_size must be a positive int")]:  # fmt: skip
        with pytest.raises(ValueError, match=match):
            saliency_region(net, image, **kwargs)
    with pytest.raises(TypeError, match="fill must be"):
        saliency_region(net, image, fill=None)
