"""DigitNet: the small CNN of the demo, in four variants that differ only in their layer type.

``regular`` (plain convolutions), ``dcnv1`` / ``dcnv2`` (its two last 3x3 convolutions
deformable, without / with modulation) and ``stn`` (a spatial transformer in front of the regular
network). Used by ``deformable demo``, ``deformable train classify --model digitnet-*`` and the
analysis tools alike.
"""

from __future__ import annotations

from torch import Tensor, nn

from deformable.nn import DeformConv2d, SpatialTransformer

__all__ = ["DigitNet", "FEATURE_ORIGIN", "FEATURE_STRIDE", "LABELS", "VARIANTS"]

VARIANTS = ("regular", "dcnv1", "dcnv2", "stn")
LABELS = {"regular": "regular CNN", "dcnv1": "DCNv1 (last 2 layers)",
          "dcnv2": "DCNv2 (last 2 layers)", "stn": "spatial transformer + CNN"}  # fmt: skip
#: image pixels per feature pixel at the deformable layers, and the centre of feature pixel 0
FEATURE_STRIDE, FEATURE_ORIGIN = 4, 1.5


class DigitNet(nn.Module):
    """conv16 - pool - conv32 - pool - conv64 - conv64 - average - fc, in one of ``VARIANTS``.

    The two last 3x3 convolutions are deformable in ``dcnv1`` / ``dcnv2``; ``stn`` puts a
    spatial transformer in front. Everything else is identical across variants.

    Args:
        variant (str): one of ``VARIANTS``.
        num_classes (int): outputs of the classifier. Default: 10.

    Example:
        >>> import torch
        >>> DigitNet("dcnv2")(torch.rand(2, 1, 40, 40)).shape
        torch.Size([2, 10])
    """

    def __init__(self, variant: str, num_classes: int = 10) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"DigitNet: variant must be one of {VARIANTS}, got {variant!r}")
        self.variant = variant
        deform = variant in ("dcnv1", "dcnv2")

        def conv(cin: int, cout: int, deformable: bool) -> nn.Module:
            if deformable:
                return DeformConv2d(cin, cout, 3, padding=1, bias=False,
                                    modulated=variant == "dcnv2")  # fmt: skip
            return nn.Conv2d(cin, cout, 3, padding=1, bias=False)

        def block(cin: int, cout: int, deformable: bool = False) -> list[nn.Module]:
            return [conv(cin, cout, deformable), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.stn = SpatialTransformer(1) if variant == "stn" else None
        self.features = nn.Sequential(
            *block(1, 16), nn.MaxPool2d(2),
            *block(16, 32), nn.MaxPool2d(2),
            *block(32, 64, deform),
            *block(64, 64, deform),
        )  # fmt: skip
        self.classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                        nn.Linear(64, num_classes))  # fmt: skip

    @property
    def last_convs(self) -> tuple[nn.Module, nn.Module]:
        """The two convolutions at feature stride 4 (deformable in the dcn variants)."""
        return self.features[8], self.features[11]

    def forward(self, x: Tensor) -> Tensor:
        if self.stn is not None:
            x = self.stn(x)
        return self.classifier(self.features(x))
