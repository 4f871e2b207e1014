"""Bundled and generated data sets (no downloads)."""

from deformable.data.digits import DigitTransforms, TransformedDigits
from deformable.data.folder import DataError, ImageFolderSplit

__all__ = ["DataError", "DigitTransforms", "ImageFolderSplit", "TransformedDigits"]
