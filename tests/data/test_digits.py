"""Transformed digits: deterministic, split as documented, transforms within their ranges."""

import pytest
import torch

from deformable.data import DigitTransforms, TransformedDigits


def test_cardinality_and_determinism():
    test = TransformedDigits("test", copies=2)
    assert len(test) == 900 and test.images.shape == (900, 1, 40, 40)
    again = TransformedDigits("test", copies=2)
    assert torch.equal(test.images, again.images) and torch.equal(test.labels, again.labels)
    assert not torch.equal(test.images, TransformedDigits("test", copies=2, seed=1).images)
    assert len(TransformedDigits("train", copies=1)) == 1347


def test_images_hold_the_digit_within_range():
    data = TransformedDigits("train", copies=1, canvas=48)
    assert data.images.min() >= 0 and data.images.max() <= 1
    ink = data.images.sum(dim=(1, 2, 3))
    assert (ink > 1).all(), "every image shows its digit"
    t = DigitTransforms()
    assert data.scale.min() >= t.scale[0] and data.scale.max() <= t.scale[1]
    assert data.angle.abs().max() <= t.rotation
    # a bigger digit covers more pixels: ink grows with scale
    small, large = data.scale < 1.5, data.scale > 2.7
    assert ink[large].mean() > 2 * ink[small].mean()


def test_identity_transform_reproduces_the_digit():
    """Scale 5 on a 40-pixel canvas with no rotation or stretch draws the 8x8 digit 5x larger."""
    from sklearn.datasets import load_digits

    data = TransformedDigits("test", copies=1, transforms=DigitTransforms(scale=(5.0, 5.0),
                                                                         rotation=0.0,
                                                                         aspect=(1.0, 1.0)))  # fmt: skip
    digit = torch.as_tensor(load_digits().images[0], dtype=torch.float32) / 16
    # canvas pixel 5 i + 2 has its centre exactly on digit pixel i (and the shift is 0: no room)
    assert torch.allclose(data.images[0, 0, 2::5, 2::5], digit, atol=1e-5)


@pytest.mark.parametrize("kwargs, match", [(dict(split="val"), "split must be one of"),
                                           (dict(canvas=4), "canvas must be an int >= 8"),
                                           (dict(copies=0), "copies must be a positive int")])
def test_exception(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TransformedDigits(**kwargs)
