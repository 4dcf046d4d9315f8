"""Predict with a trained student: ``vfmkd predict`` and its Python API.

- :class:`Predictor` (:mod:`vfmkd.inference.predictor`): letterbox, engine, results in
  original pixels; ``Predictor.from_checkpoint(path)``, ``predictor(images)``,
  ``predictor.predict_source(source, out_dir=...)``.
- :func:`predict`: the command in one call.
- :mod:`vfmkd.inference.sources`: images of a source, prompts files.
- :func:`letterbox`: images as the predictor feeds them to its engine (centred, grey 114).
- :mod:`vfmkd.inference.engine`: the model behind a predictor in PyTorch;
  :mod:`vfmkd.inference.onnx_engine`: an exported detector in onnxruntime
  (``Predictor.from_onnx``) and the metadata of exported files;
  :mod:`vfmkd.inference.onnx_segmenter`: the exported image encoder and prompt decoder
  beside it (masks for detections and prompts).
- :mod:`vfmkd.inference.writers`: drawn images (:mod:`vfmkd.utils.visualization`) and COCO results.
"""

from vfmkd.inference.predictor import Prediction, Predictor, PredictSummary, letterbox, predict
from vfmkd.inference.sources import ImagePrompts, PredictError

__all__ = ["ImagePrompts", "PredictError", "Prediction", "PredictSummary", "Predictor", "letterbox", "predict"]
