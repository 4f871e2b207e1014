"""DigitNet: the four variants differ only in their layer type."""

import pytest
import torch

from deformable.models import DigitNet
from deformable.models.digitnet import VARIANTS
from deformable.nn import DeformConv2d, SpatialTransformer


def test_variants_share_everything_but_the_layer_type():
    torch.manual_seed(0)
    regular = DigitNet("regular")
    for variant in VARIANTS:
        model = DigitNet(variant)
        assert model(torch.rand(3, 1, 40, 40)).shape == (3, 10)
        deformable = [m for m in model.last_convs if isinstance(m, DeformConv2d)]
        assert len(deformable) == (2 if variant in ("dcnv1", "dcnv2") else 0)
        assert all(m.modulated == (variant == "dcnv2") for m in deformable)
        assert isinstance(model.stn, SpatialTransformer) == (variant == "stn")
        # a fresh DCNv1 variant loads the regular weights and computes the regular network
        if variant == "dcnv1":
            model.load_state_dict(regular.state_dict(), strict=False)
            x = torch.rand(2, 1, 40, 40)
            assert torch.allclose(model.eval()(x), regular.eval()(x), atol=1e-5)


def test_bad_variant():
    with pytest.raises(ValueError, match="variant must be one of"):
        DigitNet("dcnv3")
