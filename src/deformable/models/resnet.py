"""ResNets with a per-stage deformable switch, loading torchvision's ImageNet weights.

torchvision's ResNet (v1.5: the stride sits on the 3x3 conv) with every 3x3 convolution of the
chosen stages turned into a :class:`deformable.nn.DeformConv2d` that carries the regular conv's
weight. The offset branches start at zero, so a v1 model loaded from torchvision weights computes
torchvision's output until its offsets train; the modulated (v2) branch starts with masks of 0.5.

Stages are numbered as in the papers: stage 2..5 = conv2_x..conv5_x = torchvision's
``layer1``..``layer4``. DCNv1 makes stage 5 deformable; DCNv2 stages 3-5 (13 layers in
ResNet-50).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Callable

import torch
from torch import nn
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet, conv3x3
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock

from deformable.nn import DeformConv2d

__all__ = [
    "DeformResNet",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "load_torchvision_state_dict",
    "resnet_fpn_backbone",
]

#: Stages that may be deformable, and the torchvision module each one is.
STAGES = {2: "layer1", 3: "layer2", 4: "layer3", 5: "layer4"}


def check_deform_stages(deform_stages, where: str) -> tuple[int, ...]:
    """``deform_stages`` as a sorted tuple of distinct stages in 2..5, or an error naming it."""
    allowed = tuple(STAGES)
    if isinstance(deform_stages, (str, bytes)) or not isinstance(deform_stages, Iterable):
        raise TypeError(
            f"{where}: deform_stages must be a sequence of stages from {allowed} (conv2_x..conv5_x "
            f"= layer1..layer4), e.g. (3, 4, 5), got {deform_stages!r}"
        )
    stages = tuple(deform_stages)
    bad = [s for s in stages if not isinstance(s, int) or isinstance(s, bool) or s not in STAGES]
    if bad or len(set(stages)) != len(stages):
        raise ValueError(
            f"{where}: deform_stages must hold distinct stages from {allowed} (conv2_x..conv5_x = "
            f"layer1..layer4), got {deform_stages!r}"
        )
    return tuple(sorted(stages))


class _BasicBlock(BasicBlock):
    """torchvision's BasicBlock, which may also be dilated (torchvision's raises for dilation > 1).

    Both 3x3 convs use the block's dilation (padding = dilation, so the map keeps its size);
    :meth:`DeformResNet._make_layer` sets the second conv of a stage's first block. The
    parameter names are torchvision's, so its weights load unchanged.
    """

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None, groups: int = 1, base_width: int = 64,
                 dilation: int = 1,
                 norm_layer: Callable[..., nn.Module] | None = None) -> None:  # fmt: skip
        super().__init__(inplanes, planes, stride, downsample, groups, base_width, 1, norm_layer)
        if dilation > 1:
            self.conv1 = conv3x3(inplanes, planes, stride, dilation=dilation)
            self.conv2 = conv3x3(planes, planes, dilation=dilation)


class DeformResNet(ResNet):
    """torchvision's :class:`~torchvision.models.ResNet` with deformable 3x3 convs in some stages.

    Use the builders (:func:`resnet18`, :func:`resnet34`, :func:`resnet50`, :func:`resnet101`);
    see them for the arguments. Built as torchvision builds it (same module and parameter
    names, same initialisation), then every 3x3 conv of ``deform_stages`` is replaced by
    :meth:`DeformConv2d.from_conv2d <deformable.nn.DeformConv2d.from_conv2d>` (stride, padding and
    dilation kept), whose offset branch is named ``<conv>.conv_offset``.

    Attributes:
        deform_stages (Tuple[int, ...]): the deformable stages, sorted.
        modulated (bool): DCNv2 layers (offsets and masks) rather than DCNv1 (offsets).
        offset_groups (int): offset groups of every deformable layer.
        feature_info (List[dict]): one dict per feature map, timm-style: ``num_chs`` (channels),
            ``reduction`` (stride with respect to the input), ``module`` (name of the module whose
            output it is, for forward hooks) and ``stage`` (1 = stem, 2..5 = conv2_x..conv5_x).
            Dilated stages (``replace_stride_with_dilation``) keep the previous reduction.
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: list[int],
        *,
        deform_stages: Iterable[int] = (),
        modulated: bool = False,
        offset_groups: int = 1,
        num_classes: int = 1000,
        zero_init_residual: bool = False,
        replace_stride_with_dilation: list[bool] | tuple[bool, bool, bool] | None = None,
        norm_layer: Callable[..., nn.Module] | None = None,
    ) -> None:
        where = type(self).__name__
        stages = check_deform_stages(deform_stages, where)
        if not isinstance(modulated, bool):
            raise TypeError(f"{where}: modulated must be a bool, got {modulated!r}")
        for name, value in (("offset_groups", offset_groups), ("num_classes", num_classes)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{where}: {name} must be a positive int, got {value!r}")
        if replace_stride_with_dilation is None:
            replace_stride_with_dilation = (False, False, False)
        if (not isinstance(replace_stride_with_dilation, (list, tuple))
                or len(replace_stride_with_dilation) != 3
                or not all(isinstance(d, bool) for d in replace_stride_with_dilation)):  # fmt: skip
            raise ValueError(
                f"{where}: replace_stride_with_dilation must be None or 3 bools (for layer2, "
                f"layer3, layer4), got {replace_stride_with_dilation!r}"
            )
        if block is BasicBlock:
            block = _BasicBlock
        super().__init__(block, list(layers), num_classes=num_classes,
                         zero_init_residual=zero_init_residual,
                         replace_stride_with_dilation=list(replace_stride_with_dilation),
                         norm_layer=norm_layer)  # fmt: skip
        self.deform_stages = stages
        self.modulated = modulated
        self.offset_groups = offset_groups

        # Check every conv first, so a bad offset_groups leaves no half-converted model behind.
        targets = [t for stage in stages for t in self._convs3x3(stage)]
        for _, _, conv in targets:
            if conv.in_channels % offset_groups:
                raise ValueError(
                    f"{where}: offset_groups ({offset_groups}) must divide the input channels of "
                    f"every deformable 3x3 conv; stages {stages} have convs with "
                    f"{sorted({c.in_channels for _, _, c in targets})} input channels"
                )
        for block_module, name, conv in targets:
            layer = DeformConv2d.from_conv2d(conv, offset_groups=offset_groups, modulated=modulated)
            setattr(block_module, name, layer)

        expansion = block.expansion
        self.feature_info = [dict(num_chs=64, reduction=2, module="relu", stage=1)]
        reduction = 4  # conv1 and maxpool
        for i, stage in enumerate(STAGES):
            if i > 0 and not replace_stride_with_dilation[i - 1]:
                reduction *= 2
            self.feature_info.append(dict(num_chs=64 * 2**i * expansion, reduction=reduction,
                                          module=STAGES[stage], stage=stage))  # fmt: skip

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1,
                    dilate: bool = False) -> nn.Sequential:  # fmt: skip
        previous_dilation = self.dilation
        layer = super()._make_layer(block, planes, blocks, stride, dilate)
        if issubclass(block, BasicBlock) and self.dilation != previous_dilation:
            # As torchvision does for Bottleneck: the conv that held the stride keeps the previous
            # dilation; the convs after it read the denser map, so they take the stage's dilation.
            layer[0].conv2 = conv3x3(planes, planes, dilation=self.dilation)
        return layer

    def _convs3x3(self, stage: int):
        for block in getattr(self, STAGES[stage]):
            for name in ("conv1", "conv2", "conv3"):
                conv = getattr(block, name, None)
                if type(conv) is nn.Conv2d and conv.kernel_size == (3, 3):
                    yield block, name, conv


def _builder(block, layers, arch: str):
    def build(
        *,
        deform_stages: Iterable[int] = (),
        modulated: bool = False,
        offset_groups: int = 1,
        num_classes: int = 1000,
        zero_init_residual: bool = False,
        replace_stride_with_dilation: list[bool] | tuple[bool, bool, bool] | None = None,
        norm_layer: Callable[..., nn.Module] | None = None,
    ) -> DeformResNet:
        return DeformResNet(block, layers, deform_stages=deform_stages, modulated=modulated,
                            offset_groups=offset_groups, num_classes=num_classes,
                            zero_init_residual=zero_init_residual,
                            replace_stride_with_dilation=replace_stride_with_dilation,
                            norm_layer=norm_layer)  # fmt: skip

    build.__name__ = build.__qualname__ = arch
    title = arch.replace("resnet", "ResNet-")
    build.__doc__ = f"""torchvision's {title} with deformable 3x3 convs in ``deform_stages``.

    No weights are downloaded: load torchvision's with :func:`load_torchvision_state_dict`.

    Args:
        deform_stages (Sequence[int]): stages whose 3x3 convs are deformable, from 2..5
            (conv2_x..conv5_x = ``layer1``..``layer4``); DCNv1 uses ``(5,)``, DCNv2
            ``(3, 4, 5)``. Default: ``()`` (torchvision's network).
        modulated (bool): DCNv2 layers (offsets and masks) instead of DCNv1. Default: False.
        offset_groups (int): offset groups of each deformable layer; must divide its input
            channels. Default: 1.
        num_classes (int): outputs of the final fc layer. Default: 1000.
        zero_init_residual (bool): as torchvision's. Default: False.
        replace_stride_with_dilation (Sequence[bool], optional): three flags, for ``layer2``..
            ``layer4``: replace the stage's stride 2 by dilation (as in DeepLab). Default: None.
        norm_layer (Callable[[int], nn.Module], optional): normalisation layer, e.g.
            ``torchvision.ops.FrozenBatchNorm2d``. Default: ``nn.BatchNorm2d``.

    Example:
        >>> model = {arch}(deform_stages=(3, 4, 5), num_classes=10).eval()
        >>> model(torch.rand(1, 3, 64, 64)).shape
        torch.Size([1, 10])
        >>> [(f["module"], f["num_chs"], f["reduction"]) for f in model.feature_info][-1]
        ('layer4', {512 * block.expansion}, 32)
    """
    return build


resnet18 = _builder(BasicBlock, [2, 2, 2, 2], "resnet18")
resnet34 = _builder(BasicBlock, [3, 4, 6, 3], "resnet34")
resnet50 = _builder(Bottleneck, [3, 4, 6, 3], "resnet50")
resnet101 = _builder(Bottleneck, [3, 4, 23, 3], "resnet101")

_BUILDERS = {"resnet18": resnet18, "resnet34": resnet34, "resnet50": resnet50,
             "resnet101": resnet101}  # fmt: skip


def offset_branch_keys(model: nn.Module) -> list[str]:
    """State-dict keys of the parameters ``model``'s layers report via ``offset_parameters()``."""
    ids = {id(p) for m in model.modules() if hasattr(m, "offset_parameters")
           for p in m.offset_parameters()}  # fmt: skip
    return [k for k, v in model.state_dict(keep_vars=True).items() if id(v) in ids]


def _short(keys: list[str], limit: int = 8) -> str:
    return repr(keys[:limit])[:-1] + (f", ... ({len(keys)} in all)]" if len(keys) > limit else "]")


def load_torchvision_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], *,
                                load_fc: bool = True) -> list[str]:  # fmt: skip
    """Load a regular network's state dict (e.g. ``torchvision.models.resnet50().state_dict()``)
    into its deformable twin, and return the keys it could not fill: the offset / mask branches.

    A deformable layer keeps the name and parameters of the conv it replaces, so every key of
    the regular network has a home; only the layers' ``conv_offset`` branches stay as they are
    (zero-initialised). Any other missing key, any unexpected key or any shape mismatch is a
    ValueError listing them, and nothing is loaded. ``num_batches_tracked`` entries are ignored
    when the model has no such buffer (``FrozenBatchNorm2d``).

    Args:
        model (nn.Module): the deformable network, e.g. ``deformable.models.resnet50(...)``.
        state_dict (Mapping[str, Tensor]): the regular network's parameters and buffers.
        load_fc (bool): load the classifier ``fc.*`` too. With False, ``fc.*`` entries of
            ``state_dict`` are ignored and the model's ``fc`` is left as it is (for another
            ``num_classes``, or a state dict without a classifier). Default: True.

    Returns:
        List[str]: the model's keys left unloaded (exactly the offset / mask branches), in the
        model's order.

    Example:
        >>> import torchvision
        >>> model = resnet18(deform_stages=(5,))
        >>> missing = load_torchvision_state_dict(model, torchvision.models.resnet18().state_dict())
        >>> missing[:2]
        ['layer4.0.conv1.conv_offset.weight', 'layer4.0.conv1.conv_offset.bias']
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"load_torchvision_state_dict: state_dict must be a mapping of names to "
                        f"tensors, got {type(state_dict).__name__}")  # fmt: skip
    own = model.state_dict()
    offset_keys = set(offset_branch_keys(model))
    given = dict(state_dict)
    if not load_fc:
        given = {k: v for k, v in given.items() if not k.startswith("fc.")}
    given = {k: v for k, v in given.items()
             if k in own or not k.endswith("num_batches_tracked")}  # fmt: skip
    skipped = offset_keys | ({k for k in own if k.startswith("fc.")} if not load_fc else set())
    missing = [k for k in own if k not in given and k not in skipped]
    unexpected = [k for k in given if k not in own]
    mismatched = [f"{k}: model {tuple(own[k].shape)}, state_dict {tuple(v.shape)}"
                  for k, v in given.items() if k in own and own[k].shape != v.shape]  # fmt: skip
    if missing or unexpected or mismatched:
        problems = []
        if missing:
            problems.append(f"missing keys (besides the offset / mask branches) {_short(missing)}")
        if unexpected:
            problems.append(f"unexpected keys {_short(unexpected)}")
        if mismatched:
            problems.append(f"shape mismatches {_short(mismatched)}")
        hint = (" (for another num_classes, pass load_fc=False)"
                if any(m.startswith("fc.") for m in mismatched) else "")  # fmt: skip
        raise ValueError("load_torchvision_state_dict: state_dict does not fit the model: "
                         + "; ".join(problems) + hint)  # fmt: skip
    result = model.load_state_dict(given, strict=False)
    if result.unexpected_keys or set(result.missing_keys) - skipped:  # pragma: no cover
        raise RuntimeError(f"load_torchvision_state_dict: unexpected load result {result}")
    return [k for k in own if k in offset_keys and k not in given]


def trainable_layer_names(where: str, arg: str, value, stages: tuple[int, ...]) -> list[str]:
    """The ResNet modules that train when ``value`` (0..5, the argument named ``arg``) stages
    train from ``layer4`` down, as torchvision's detection builders count them. A ValueError
    names ``arg`` if ``value`` is not an int in 0..5, or if a deformable stage would be frozen
    (its zero-initialised offset branch would never learn)."""
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 5:
        raise ValueError(f"{where}: {arg} must be an int in 0..5, got {value!r}")
    names = ["layer4", "layer3", "layer2", "layer1", "conv1"][:value]
    if value == 5:
        names.append("bn1")
    frozen = [s for s in stages if STAGES[s] not in names]
    if frozen:
        raise ValueError(f"{where}: deform_stages {frozen} would be frozen with {arg}={value} (their "
                         f"offset branches would stay at zero); raise {arg} to at least "
                         f"{6 - min(frozen)} or drop those stages")  # fmt: skip
    return names


def resnet_fpn_backbone(
    name: str,
    *,
    deform_stages: Iterable[int],
    modulated: bool,
    offset_groups: int = 1,
    trainable_layers: int = 3,
    returned_layers: list[int] | None = None,
    weights_state_dict: Mapping[str, torch.Tensor] | None = None,
    norm_layer: Callable[..., nn.Module] = FrozenBatchNorm2d,
    extra_blocks: ExtraFPNBlock | None = None,
) -> BackboneWithFPN:
    """A deformable ResNet + FPN, as torchvision's detectors take it (``BackboneWithFPN``).

    What ``torchvision.models.detection.backbone_utils.resnet_fpn_backbone`` builds, over
    :class:`DeformResNet`: layers outside ``trainable_layers`` are frozen, the returned layers
    feed an FPN with 256 channels (plus a max-pooled level ``"pool"`` by default). The result
    has ``out_channels`` and plugs into ``torchvision.models.detection.FasterRCNN`` /
    ``MaskRCNN``.

    Args:
        name (str): ``"resnet18"``, ``"resnet34"``, ``"resnet50"`` or ``"resnet101"``.
        deform_stages (Sequence[int]): deformable stages, from 2..5 (= ``layer1``..``layer4``).
            Each must be trainable: a frozen offset branch stays at zero.
        modulated (bool): DCNv2 layers (offsets and masks) instead of DCNv1.
        offset_groups (int): offset groups of each deformable layer. Default: 1.
        trainable_layers (int): 0..5, how many of ``layer4``, ``layer3``, ``layer2``,
            ``layer1``, ``conv1`` (from the top) train, as torchvision's. Default: 3.
        returned_layers (List[int], optional): which of torchvision's ``layer1``..``layer4``
            (numbered 1..4, as torchvision does) feed the FPN. Default: ``[1, 2, 3, 4]``.
        weights_state_dict (Mapping[str, Tensor], optional): a torchvision ResNet state dict
            (classifier optional), loaded with :func:`load_torchvision_state_dict`. Default: None
            (torchvision's random initialisation).
        norm_layer (Callable[[int], nn.Module]): the backbone's normalisation layer.
            Default: ``torchvision.ops.FrozenBatchNorm2d`` (as torchvision's detectors).
        extra_blocks (ExtraFPNBlock, optional): extra FPN levels. Default: ``LastLevelMaxPool``.

    Example:
        >>> backbone = resnet_fpn_backbone("resnet18", deform_stages=(5,), modulated=True)
        >>> {k: tuple(v.shape) for k, v in backbone(torch.rand(1, 3, 64, 64)).items()}["3"]
        (1, 256, 2, 2)
    """
    where = "resnet_fpn_backbone"
    if name not in _BUILDERS:
        raise ValueError(f"{where}: name must be one of {sorted(_BUILDERS)}, got {name!r}")
    stages = check_deform_stages(deform_stages, where)
    layers_to_train = trainable_layer_names(where, "trainable_layers", trainable_layers, stages)
    if returned_layers is None:
        returned_layers = [1, 2, 3, 4]
    if (not isinstance(returned_layers, (list, tuple)) or not returned_layers
            or any(not isinstance(k, int) or k not in (1, 2, 3, 4) for k in returned_layers)
            or list(returned_layers) != sorted(set(returned_layers))):  # fmt: skip
        raise ValueError(f"{where}: returned_layers must be increasing, distinct values from "
                         f"[1, 2, 3, 4] (layer1..layer4), got {returned_layers!r}")  # fmt: skip

    backbone = _BUILDERS[name](deform_stages=stages, modulated=modulated,
                               offset_groups=offset_groups, norm_layer=norm_layer)  # fmt: skip
    if weights_state_dict is not None:
        load_torchvision_state_dict(backbone, weights_state_dict, load_fc=False)
    for param_name, parameter in backbone.named_parameters():
        if not any(param_name.startswith(layer) for layer in layers_to_train):
            parameter.requires_grad_(False)

    channels = {info["module"]: info["num_chs"] for info in backbone.feature_info}
    return_layers = {f"layer{k}": str(i) for i, k in enumerate(returned_layers)}
    in_channels_list = [channels[f"layer{k}"] for k in returned_layers]
    return BackboneWithFPN(backbone, return_layers, in_channels_list, 256,
                           extra_blocks=extra_blocks)  # fmt: skip
