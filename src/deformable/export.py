"""Export models that use deformable convolution to ONNX, as the standard ``DeformConv`` node.

ONNX has had ``DeformConv`` since opset 19 (onnxruntime runs it on the CPU), and its semantics
are those of :func:`deformable.ops.deform_conv2d`: same offset layout ((dy, dx) per tap, offset
groups outermost), same optional mask and bias. So the exported graph needs no custom operator
and no plugin. Deformable RoI pooling has no standard ONNX operator: a model that uses it is
refused with an error that says so, never exported to a graph a standard runtime cannot load.

Needs the ``onnx`` and ``onnxscript`` packages (``pip install "deformable[onnx]"``).
"""

from __future__ import annotations

import os
from typing import Any

import torch

__all__ = ["export_onnx"]

#: The first ONNX opset with a standard DeformConv operator.
MIN_OPSET = 19


def _deform_conv2d_to_onnx(input, offset, weight, bias, stride, padding, dilation, mask):
    """Translation of ``deformable::deform_conv2d`` into ONNX's DeformConv (onnxscript)."""
    from onnxscript import opset19 as op

    kh, kw = weight.shape[2], weight.shape[3]
    return op.DeformConv(
        input, weight, offset, bias, mask,
        kernel_shape=[kh, kw],
        strides=list(stride),
        pads=[padding[0], padding[1], padding[0], padding[1]],
        dilations=list(dilation),
        group=input.shape[1] // weight.shape[1],
        offset_group=offset.shape[1] // (2 * kh * kw),
    )  # fmt: skip


def _unsupported_ops(program: torch.export.ExportedProgram) -> list[str]:
    supported = {torch.ops.deformable.deform_conv2d.default}
    found = []
    for node in program.graph.nodes:
        target = node.target
        if node.op == "call_function" and isinstance(target, torch._ops.OpOverload):
            if target.namespace == "deformable" and target not in supported:
                found.append(str(target))
    return sorted(set(found))


def _batch_of_two(x: Any, index: int) -> Any:
    """An example tensor of batch size 1 repeated to 2 (what torch.export keeps dynamic)."""
    if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[0] >= 2:
        return x
    if x.shape[0] == 0:
        raise ValueError(f"export_onnx: example_inputs[{index}] has an empty batch (shape "
                         f"{list(x.shape)}); give an example of batch size 1 or more")  # fmt: skip
    return x.expand(2, *x.shape[1:]).contiguous()


def export_onnx(model: torch.nn.Module, example_inputs: tuple[Any, ...] | torch.Tensor,
                path: str | os.PathLike, *, opset: int = MIN_OPSET,
                dynamic_batch: bool = True) -> str:  # fmt: skip
    """Export ``model`` (in eval mode) to an ONNX file at ``path``; returns the path.

    Every ``deformable.nn.DeformConv2d`` / ``deformable.ops.deform_conv2d`` (v1 and v2, weight
    groups, offset groups, stride, padding, dilation) becomes one standard ``DeformConv`` node;
    the rest of the graph is exported by ``torch.onnx.export`` as usual. The file passes
    ``onnx.checker``.

    Args:
        model (nn.Module): the model; it is switched to eval mode for the export.
        example_inputs (Tensor or tuple): inputs of one forward call.
        path (str or PathLike): where to write the ``.onnx`` file.
        opset (int): ONNX opset, at least 19 (the first with DeformConv). Default: 19.
        dynamic_batch (bool): make dimension 0 of every tensor input dynamic, so the file runs at
            any batch size. An example of batch size 1 is fine: ``torch.export`` would specialise
            a size of 1, so the export traces the example repeated to a batch of 2 (the model is
            in eval mode: its items do not interact). Default: True.

    Raises:
        ValueError: ``opset`` below 19, an example with an empty batch (``dynamic_batch``), or
            the model uses an operator of this library that has no standard ONNX counterpart
            (deformable RoI pooling).
        ImportError: ``onnx`` / ``onnxscript`` not installed.

    Example:
        >>> import tempfile, os, torch
        >>> from deformable.nn import DeformConv2d
        >>> layer = DeformConv2d(3, 8, 3, padding=1, modulated=True)
        >>> path = export_onnx(layer, torch.rand(1, 3, 16, 16), os.path.join(tempfile.mkdtemp(), "dcn.onnx"))
        >>> import onnx; [n.op_type for n in onnx.load(path).graph.node if n.op_type == "DeformConv"]
        ['DeformConv']
    """
    try:
        import onnx
        import onnxscript  # noqa: F401  (the dynamo exporter needs it)
    except ImportError as exc:
        raise ImportError(
            "export_onnx needs the 'onnx' and 'onnxscript' packages: "
            "pip install onnx onnxscript (or deformable[onnx])"
        ) from exc
    if not isinstance(opset, int) or opset < MIN_OPSET:
        raise ValueError(
            f"export_onnx: opset must be >= {MIN_OPSET} (the first ONNX opset with DeformConv), "
            f"got {opset!r}"
        )
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, tuple):
        raise TypeError(
            f"export_onnx: example_inputs must be a Tensor or a tuple, got {type(example_inputs).__name__}"
        )
    model = model.eval()
    dynamic_shapes = None
    if dynamic_batch:
        example_inputs = tuple(_batch_of_two(x, i) for i, x in enumerate(example_inputs))
        batch = torch.export.Dim("batch")
        dynamic_shapes = tuple({0: batch} if isinstance(x, torch.Tensor) and x.dim() > 0 else None
                               for x in example_inputs)  # fmt: skip
    program = torch.export.export(model, example_inputs, dynamic_shapes=dynamic_shapes)
    unsupported = _unsupported_ops(program)
    if unsupported:
        raise ValueError(
            f"export_onnx: {', '.join(unsupported)} has no standard ONNX operator (only "
            "deform_conv2d maps to ONNX DeformConv); a graph with it would not load in a standard "
            "runtime, so it is not exported"
        )
    onnx_program = torch.onnx.export(
        program, dynamo=True, opset_version=opset, verbose=False,
        custom_translation_table={torch.ops.deformable.deform_conv2d.default: _deform_conv2d_to_onnx},
    )  # fmt: skip
    path = os.fspath(path)
    onnx_program.save(path)
    onnx.checker.check_model(path)
    return path
