"""Bundled and generated data sets (no downloads)."""

from deformable.data.digits import DigitTransforms, TransformedDigits

__all__ = ["DigitTransforms", "TransformedDigits"]
