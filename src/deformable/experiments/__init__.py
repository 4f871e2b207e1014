"""What the commands run, as library functions a user can call from Python too.

- :mod:`~deformable.experiments.runs`: one training run described by plain data (model spec,
  data source, :class:`~deformable.engine.TrainConfig`), and the evaluation of its checkpoint;
- :mod:`~deformable.experiments.digits`: the demo, four DigitNet variants on transformed digits;
- :mod:`~deformable.experiments.detection`: DCNv2's ablation of Faster / Mask R-CNN at CPU scale;
- :mod:`~deformable.experiments.segmentation`: semantic segmentation runs (DeepLabV3) and DCNv1's
  DeepLab ablation at CPU scale.

They sit above :mod:`deformable.engine`, :mod:`deformable.models` and :mod:`deformable.data`
and below :mod:`deformable.commands`, which only parse arguments and call them.
"""
