"""Export a trained student: ``vfmkd export --format onnx``.

- :mod:`vfmkd.export.onnx_export`: :func:`export_checkpoint` / :func:`export_model`, the
  command's work: deploy, trace, write metadata, check in onnxruntime.
- :mod:`vfmkd.export.fuse`: the student as deployed (Conv-BN folding, ``fuse()``).
- :mod:`vfmkd.export.graphs`: the detector graph (YOLO, with or without NMS; DETR top-K).
- :mod:`vfmkd.export.segmenter`: promptable segmentation as an image encoder and a prompt decoder.
- :mod:`vfmkd.export.cli`: the ``export`` sub-command.

An exported detector runs behind the predictor with
:class:`~vfmkd.inference.onnx_engine.OnnxEngine` (``vfmkd predict --engine onnxruntime``).
onnx, onnxruntime and onnxscript are the optional extra ``export`` (``pip install "vfmkd[export]"``).
"""

from vfmkd.export.onnx_export import ExportError, ExportSummary, ExportedFile, export_checkpoint, export_model

__all__ = ["ExportError", "ExportSummary", "ExportedFile", "export_checkpoint", "export_model"]
