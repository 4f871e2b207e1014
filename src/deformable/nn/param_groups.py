"""Optimizer parameter groups that give the offset / mask branches their own learning rate."""

from __future__ import annotations

from torch import nn


def param_groups(model: nn.Module, *, lr: float, offset_lr_mult: float = 1.0,
                 roi_offset_lr_mult: float = 0.01,
                 weight_decay: float | None = None) -> list[dict]:  # fmt: skip
    """Parameter groups for ``torch.optim``: everything else at ``lr``, the offset / mask branches
    of deformable convolutions at ``lr * offset_lr_mult``, those of deformable RoI pooling at
    ``lr * roi_offset_lr_mult``.

    Offset branches are the parameters a module reports through ``offset_parameters()`` (every
    layer of :mod:`deformable.nn` does); modules whose ``offset_group`` attribute is
    ``"roi_offset"`` (the RoI pooling layers and the R-FCN head) go to the RoI group. The
    defaults are DCNv1's (§4): offsets of the convolutions at the base rate, the fc offset branch
    of deformable RoI pooling at 0.01x. A smaller ``offset_lr_mult`` steadies training from
    pretrained weights. Parameters that do not require grad are left out; a group with no
    parameters is dropped. Learning-rate schedulers must keep the ratios: give
    ``OneCycleLR`` / ``CyclicLR`` a ``max_lr`` per group (``[g["lr"] for g in groups]``), not
    one number, which would set every group to it.

    Example:
        >>> import torch
        >>> from deformable.nn import DeformConv2d, DeformRoIPool
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), DeformConv2d(8, 8, 3))
        >>> groups = param_groups(model, lr=0.1, offset_lr_mult=0.1)
        >>> [(g["name"], len(g["params"]), g["lr"]) for g in groups]
        [('base', 4, 0.1), ('offset', 2, 0.010000000000000002)]
        >>> optimizer = torch.optim.SGD(groups, lr=0.1, momentum=0.9)
        >>> _ = model.append(DeformRoIPool(7, in_channels=8, hidden_channels=16))
        >>> [(g["name"], len(g["params"]), g["lr"]) for g in param_groups(model, lr=0.1)]
        [('base', 4, 0.1), ('offset', 2, 0.1), ('roi_offset', 6, 0.001)]
    """
    if not lr > 0 or not offset_lr_mult >= 0 or not roi_offset_lr_mult >= 0:
        raise ValueError(f"param_groups: lr must be > 0 and offset_lr_mult, roi_offset_lr_mult >= 0, "
                         f"got {lr}, {offset_lr_mult}, {roi_offset_lr_mult}")  # fmt: skip
    kinds: dict[int, str] = {}
    for module in model.modules():
        if hasattr(module, "offset_parameters"):
            kind = getattr(module, "offset_group", "offset")
            for p in module.offset_parameters():
                if kinds.get(id(p)) != "roi_offset":  # a RoI module's claim wins over a container's
                    kinds[id(p)] = kind
    members: dict[str, list] = {"base": [], "offset": [], "roi_offset": []}
    for p in model.parameters():
        if p.requires_grad:
            members[kinds.get(id(p), "base")].append(p)
    extra = {} if weight_decay is None else {"weight_decay": weight_decay}
    rates = {"base": lr, "offset": lr * offset_lr_mult, "roi_offset": lr * roi_offset_lr_mult}
    return [dict(name=name, params=params, lr=rates[name], **extra)
            for name, params in members.items() if params]  # fmt: skip
