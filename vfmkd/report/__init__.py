"""Seeing what the student learned: ``vfmkd report RUN_DIR`` and the pictures behind it.

- :func:`write_report` (:mod:`vfmkd.report.build`): one self-contained HTML page of a run
  (the run at a glance, config and alignment, curves, teacher vs student feature maps,
  predictions beside the ground truth, per-class AP) with its PNGs beside it.
- :mod:`vfmkd.report.pictures`: the feature and prediction pictures, also logged to
  TensorBoard after each evaluation by the hook :class:`TensorBoardPictures`
  (``eval.tensorboard_images``).
- :class:`FeatureProjection` (:mod:`vfmkd.report.pca`): a teacher map's PCA colours,
  shared with the student's map.
"""

from vfmkd.report.build import write_report
from vfmkd.report.hooks import TensorBoardPictures
from vfmkd.report.pca import FeatureProjection

__all__ = ["FeatureProjection", "TensorBoardPictures", "write_report"]
