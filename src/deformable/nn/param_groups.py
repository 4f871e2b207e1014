"""Optimizer parameter groups that give the offset / mask branches their own learning rate."""

from __future__ import annotations

from torch import nn


def param_groups(model: nn.Module, *, lr: float, offset_lr_mult: float = 1.0,
                 weight_decay: float | None = None) -> list[dict]:  # fmt: skip
    """Two parameter groups for ``torch.optim``: everything else at ``lr``, offset branches at
    ``lr * offset_lr_mult``.

    Offset branches are the parameters a module reports through ``offset_parameters()`` (every
    layer of :mod:`deformable.nn` does). The DCN papers train them at the base rate (DCNv1 uses
    0.01x for the fc branch of deformable RoI pooling); a smaller multiplier steadies training
    from pretrained weights. Parameters that do not require grad are left out; a group with no
    parameters is dropped.

    Example:
        >>> import torch
        >>> from deformable.nn import DeformConv2d
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), DeformConv2d(8, 8, 3))
        >>> groups = param_groups(model, lr=0.1, offset_lr_mult=0.1)
        >>> [(g["name"], len(g["params"]), g["lr"]) for g in groups]
        [('base', 4, 0.1), ('offset', 2, 0.010000000000000002)]
        >>> optimizer = torch.optim.SGD(groups, lr=0.1, momentum=0.9)
    """
    if lr <= 0 or offset_lr_mult < 0:
        raise ValueError(f"param_groups: lr must be > 0 and offset_lr_mult >= 0, got {lr}, "
                         f"{offset_lr_mult}")  # fmt: skip
    offset_ids: set[int] = set()
    for module in model.modules():
        if hasattr(module, "offset_parameters"):
            offset_ids.update(id(p) for p in module.offset_parameters())
    base, offset = [], []
    for p in model.parameters():
        if p.requires_grad:
            (offset if id(p) in offset_ids else base).append(p)
    extra = {} if weight_decay is None else {"weight_decay": weight_decay}
    groups = [dict(name="base", params=base, lr=lr, **extra),
              dict(name="offset", params=offset, lr=lr * offset_lr_mult, **extra)]  # fmt: skip
    return [g for g in groups if g["params"]]
