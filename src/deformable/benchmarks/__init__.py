"""Speed and memory suites, every ratio against an anchor measured in the same run.

- :mod:`~deformable.benchmarks.conv`: ``deform_conv2d`` against ``F.conv2d``, torchvision and
  onnxruntime (``deformable bench``);
- :mod:`~deformable.benchmarks.roi`: deformable RoI pooling against RoIAlign
  (``deformable bench-roi``);
- :mod:`~deformable.benchmarks.deploy`: a DCN ResNet-50 in PyTorch and in onnxruntime
  (``deformable bench-deploy``);
- :mod:`~deformable.benchmarks.timing`: the timing and memory measurement they share.

Each runs as ``python -m deformable.benchmarks.<suite>`` too.
"""
