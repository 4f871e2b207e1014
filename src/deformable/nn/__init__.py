"""Layers built on :mod:`deformable.ops`; each owns the branches that predict its offsets / masks."""

__all__: list[str] = []
