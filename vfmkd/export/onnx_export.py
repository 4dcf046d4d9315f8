"""``vfmkd export --format onnx``: a checkpoint's student as ONNX graphs, checked in onnxruntime.

For a checkpoint (its EMA weights when it has them, adapters and distiller left out):

1. the student as deployed (:func:`~vfmkd.export.fuse.deploy_model`): eval, frozen,
   re-parameterised (RepViT), the ViT's position table at the export size, BatchNorm folded;
2. a detection head: ``<out>.onnx``, the detector graph (:mod:`vfmkd.export.graphs`);
   a promptable mask head: ``<stem>_encoder.onnx`` and ``<stem>_decoder.onnx``
   (:mod:`vfmkd.export.segmenter`);
3. each file's ``metadata_props`` (:class:`~vfmkd.inference.onnx_engine.OnnxMetadata`):
   graph, head, input size, letterbox, class names and COCO ids, NMS, vfmkd version;
4. each graph run in onnxruntime on a fixed random input and compared with the PyTorch
   student before deployment (eager, unfused): the largest difference of each output is
   reported (:attr:`ExportedFile.check`).

Exporter: ``torch.onnx.export(..., dynamo=False)``, the TorchScript tracer. It is the one
that exports every student family here reliably and fast (about 1 s for YOLOv8n, where
the dynamo exporter takes 10 s): the tracer records the shape-dependent Python loops of
the Mamba selective scan (:mod:`vfmkd.ops.selective_scan`) as a flat graph for the export
size, and an ``autograd.Function.symbolic`` puts ONNX ``NonMaxSuppression`` in the graph.
Its cost: PyTorch marks it deprecated (a warning) and every graph has a fixed input size;
only the batch can be dynamic (``dynamic``).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from vfmkd.errors import UserError
from vfmkd.export.fuse import deploy_model
from vfmkd.export.graphs import DETECTION_HEADS, DetectorGraph
from vfmkd.export.segmenter import ImageEncoderGraph, PromptDecoderGraph, decoder_example_inputs
from vfmkd.inference.onnx_engine import (
    DECODER_GRAPH,
    DETECTOR_GRAPH,
    ENCODER_GRAPH,
    OnnxMetadata,
    import_optional,
)

__all__ = ["DEFAULT_OPSET", "ExportError", "ExportSummary", "ExportedFile", "export_checkpoint", "export_model"]

logger = logging.getLogger(__name__)

#: LayerNormalization (17) and GridSample (16) are ONNX operators from here on.
DEFAULT_OPSET = 17
FORMATS = ("onnx",)


class ExportError(UserError, RuntimeError):
    """A model that cannot be exported as asked; the message says what and why in one line."""


@dataclass
class ExportedFile:
    """One written graph.

    Attributes:
        path: the ONNX file.
        graph: ``detector``, ``image_encoder`` or ``prompt_decoder``.
        inputs: input names and shapes, e.g. ``images [B, 3, 640, 640]``.
        outputs: output names and shapes.
        check: per output, the largest absolute difference between onnxruntime and the
            PyTorch student on the check input.
        parameters: parameters of the deployed modules the graph runs.
    """

    path: Path
    graph: str
    inputs: list[str]
    outputs: list[str]
    check: dict[str, float] = field(default_factory=dict)
    parameters: int = 0

    @property
    def size_bytes(self) -> int:
        return self.path.stat().st_size


@dataclass
class ExportSummary:
    """What :func:`export_model` wrote, and notes for the user (fixed sizes, NMS)."""

    files: list[ExportedFile] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def export_checkpoint(
    checkpoint: str | Path,
    *,
    out: str | Path | None = None,
    img_size: int | None = None,
    **options: Any,
) -> ExportSummary:
    """Export a training checkpoint's student (EMA weights when present) to ONNX.

    Args:
        checkpoint: a checkpoint written by ``vfmkd train``.
        out: the detector graph's path (default: the checkpoint's, with ``.onnx``); the
            segmenter's two graphs go beside it as ``<stem>_encoder.onnx`` / ``<stem>_decoder.onnx``.
        img_size: input side (default: the training ``data.img_size``, else 640).
        **options: :func:`export_model`'s ``dynamic``, ``opset``, ``nms``, ``max_det``.

    Raises:
        CheckpointError: not a checkpoint; ExportError: the model cannot be exported.
    """
    from vfmkd.core.checkpoint import load_checkpoint, load_model_from_checkpoint
    from vfmkd.inference.classes import checkpoint_classes

    path = Path(checkpoint)
    loaded = load_checkpoint(path)
    model = load_model_from_checkpoint({**loaded, "path": str(path)}, "cpu")
    data = (loaded.get("config") or {}).get("data") or {}
    size = int(img_size or data.get("img_size") or 640)
    detectors = [head for head in model.heads.values() if getattr(head, "predicts_boxes", False)]
    num_classes = int(detectors[0].num_classes) if detectors else 0
    names, category_ids = checkpoint_classes(loaded, num_classes) if num_classes else ([], [])
    target = Path(out) if out is not None else path.with_suffix(".onnx")
    return export_model(
        model, target, img_size=size, names=names, category_ids=category_ids, source=path.name, **options
    )


def export_model(
    model: nn.Module,
    out: str | Path,
    *,
    img_size: int,
    names: Sequence[str] = (),
    category_ids: Sequence[int] | None = None,
    dynamic: bool = False,
    opset: int = DEFAULT_OPSET,
    nms: bool = False,
    max_det: int = 300,
    source: str = "",
) -> ExportSummary:
    """Export a :class:`~vfmkd.models.unified_model.UnifiedModel` (see the module doc).

    Args:
        model: the student (left unchanged).
        out: the detector graph's path; the segmenter's go beside it.
        img_size: side of the square input (a multiple of 32).
        names: class name of each label; ``category_ids``: their COCO ids (default label + 1).
        dynamic: a dynamic batch dimension (else batch 1).
        opset: ONNX opset (17 or later recommended).
        nms: YOLO head: NMS in the graph (else the runtime's, in Python).
        max_det: YOLO NMS graph: boxes per class and image; DETR: the top-K kept.
        source: the checkpoint's name, kept in the metadata.

    Raises:
        ExportError: no exportable head, a bad size, or the exporter failed (the reason).
    """
    _check_options(img_size, opset, max_det)
    for package in ("onnx", "onnxruntime"):
        import_optional(package)
    out = Path(out)
    detection, prompted = _exported_heads(model)
    backbone_config = (getattr(model, "config", None) or {}).get("backbone") or {}
    backbone_type = str(backbone_config.get("type", type(model.backbone).__name__))
    deployed = _deploy(model, img_size, backbone_type)
    reference = copy.deepcopy(model).cpu().eval().requires_grad_(False)
    common = {
        "vfmkd_version": _version(),
        "backbone": backbone_type,
        "source": source,
        "dynamic_batch": str(bool(dynamic)).lower(),
    }
    summary = ExportSummary()
    context = _Context(img_size=img_size, dynamic=dynamic, opset=opset, common=common)
    if detection is not None:
        graphs = [DetectorGraph(network, detection, max_det=max_det, nms=nms) for network in (deployed, reference)]
        head_type = _head_type(model.heads[detection])
        metadata = OnnxMetadata(
            DETECTOR_GRAPH,
            head_type,
            img_size,
            names=list(names),
            category_ids=list(category_ids) if category_ids else list(range(1, len(names) + 1)),
            nms=graphs[0].nms,
            max_det=max_det if (graphs[0].nms or head_type == "rtdetr_head") else 0,
        )
        summary.files.append(_export_detector(graphs, out, metadata, context))
        if head_type == "yolo_head" and not graphs[0].nms:
            summary.notes.append(
                "NMS is left to the runtime (vfmkd predict --engine onnxruntime runs it); --nms puts it in the graph"
            )
    if prompted is not None:
        summary.files += _export_segmenter(deployed, reference, prompted, out, context)
    if backbone_type == "mamba":
        summary.notes.append(
            f"Mamba: the selective scan is unrolled for {img_size} x {img_size} inputs; re-export for another size"
        )
    return summary


def _exported_heads(model: nn.Module) -> tuple[str | None, str | None]:
    """The names of the detection head and of the promptable mask head to export (None: none)."""
    detection = [name for name, head in model.heads.items() if getattr(head, "predicts_boxes", False)]
    prompted = [name for name, head in model.heads.items() if getattr(head, "prompted_by_boxes", False)]
    if not detection and not prompted:
        raise ExportError(
            f"nothing to export: the model's heads {sorted(model.heads) or '(none)'} include no detection head "
            f"({', '.join(DETECTION_HEADS)}) and no promptable mask head (sam_mask_head)"
        )
    for name in detection:
        kind = type(model.heads[name])
        if kind not in DETECTION_HEADS.values():
            known = ", ".join(DETECTION_HEADS)
            raise ExportError(f"heads.{name}: {kind.__name__} has no ONNX detector graph (known: {known})")
    return (detection[0] if detection else None), (prompted[0] if prompted else None)


@dataclass
class _Context:
    img_size: int
    dynamic: bool
    opset: int
    common: dict[str, str]


def _check_options(img_size: int, opset: int, max_det: int) -> None:
    if img_size < 32 or img_size % 32:
        raise ExportError(f"--img-size {img_size}: must be a multiple of 32 (the largest stride), e.g. 640")
    if opset < 11:
        raise ExportError(f"--opset {opset}: too old; use {DEFAULT_OPSET} (the default) or later")
    if max_det < 1:
        raise ExportError(f"--max-det {max_det}: must be at least 1")


def _deploy(model: nn.Module, img_size: int, backbone_type: str) -> nn.Module:
    try:
        return deploy_model(model, img_size)
    except (RuntimeError, ValueError) as error:
        reason = _first_line(error)
        raise ExportError(f"cannot prepare the {backbone_type} student for export at {img_size} px: {reason}") from None


def _head_type(head: nn.Module) -> str:
    for name, head_class in DETECTION_HEADS.items():
        if type(head) is head_class:
            return name
    return "sam_mask_head"


def _export_detector(graphs: list[DetectorGraph], out: Path, metadata: OnnxMetadata, context: _Context) -> ExportedFile:
    deployed, reference = graphs
    batch = 2 if context.dynamic else 1
    images = _check_images(batch, context.img_size)
    inputs: tuple[torch.Tensor, ...] = (images,)
    if deployed.nms:
        inputs += (torch.tensor([0.25]), torch.tensor([0.7]))
    dynamic_axes = {"images": {0: "batch"}} if context.dynamic else None
    if dynamic_axes is not None and not deployed.nms:
        dynamic_axes.update({name: {0: "batch"} for name in deployed.output_names})
    elif dynamic_axes is not None:
        dynamic_axes["detections"] = {0: "detections"}
    what = f"the {metadata.head_type} detector"
    exported = _export_graph(deployed, inputs, out, dynamic_axes, context, what, DETECTOR_GRAPH)
    _write_metadata(out, metadata, context)
    exported.check = _check(out, reference, inputs, deployed.input_names)
    return exported


def _export_segmenter(
    deployed: nn.Module, reference: nn.Module, head_name: str, out: Path, context: _Context
) -> list[ExportedFile]:
    size = context.img_size
    stem = out.with_suffix("")
    encoders = [ImageEncoderGraph(network, head_name) for network in (deployed, reference)]
    images = _check_images(1, size)
    encoder_path = stem.with_name(stem.name + "_encoder.onnx")
    dynamic_axes = {name: {0: "batch"} for name in ["images", *encoders[0].output_names]} if context.dynamic else None
    encoder = _export_graph(
        encoders[0], (images,), encoder_path, dynamic_axes, context, "the image encoder", ENCODER_GRAPH
    )
    head = deployed.heads[head_name]
    extra = {"decoder": head.decoder_type}
    encoder_metadata = OnnxMetadata(ENCODER_GRAPH, "sam_mask_head", size, extra=extra)
    _write_metadata(encoder_path, encoder_metadata, context)
    encoder.check = _check(encoder_path, encoders[1], (images,), ["images"])

    decoders = [PromptDecoderGraph(network.heads[head_name], size) for network in (deployed, reference)]
    with torch.no_grad():
        inputs = decoder_example_inputs(encoders[0](images), size)
    decoder_path = stem.with_name(stem.name + "_decoder.onnx")
    prompt_axes = {0: "prompts", 1: "points"}
    decoder_axes = {
        "point_coords": prompt_axes,
        "point_labels": prompt_axes,
        "mask_input": {0: "prompts"},
        "masks": {0: "prompts", 2: "height", 3: "width"},
        "iou_predictions": {0: "prompts"},
        "low_res_masks": {0: "prompts"},
    }
    decoder = _export_graph(
        decoders[0], inputs, decoder_path, decoder_axes, context, "the prompt decoder", DECODER_GRAPH
    )
    decoder_metadata = OnnxMetadata(DECODER_GRAPH, "sam_mask_head", size, extra=extra)
    _write_metadata(decoder_path, decoder_metadata, context)
    decoder.check = _check(decoder_path, decoders[1], inputs, decoders[0].input_names)
    return [encoder, decoder]


def _export_graph(
    module: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    path: Path,
    dynamic_axes: dict[str, dict[int, str]] | None,
    context: _Context,
    what: str,
    graph: str,
) -> ExportedFile:
    """Trace ``module`` into ``path``; any exporter failure becomes a one-line :class:`ExportError`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    input_names, output_names = module.input_names, module.output_names
    try:
        with torch.no_grad(), warnings.catch_warnings(), _native_stdout_to_log():
            # NOTE: the tracer warns about every Python value taken from a shape; the sizes are fixed by design.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                inputs,
                str(path),
                dynamo=False,
                opset_version=context.opset,
                input_names=input_names,
                output_names=output_names,
                dynamic_axes=dynamic_axes,
                do_constant_folding=True,
            )
    except Exception as error:  # noqa: BLE001 - any exporter failure is reported in one line
        raise ExportError(f"cannot export {what} to ONNX (opset {context.opset}): {_first_line(error)}") from None
    batch = "B" if context.dynamic else None
    return ExportedFile(
        path=path,
        graph=graph,
        inputs=[_describe(name, value, dynamic_axes, batch) for name, value in zip(input_names, inputs)],
        outputs=list(output_names),
        parameters=module.parameter_count(),
    )


@contextlib.contextmanager
def _native_stdout_to_log() -> Iterator[None]:
    """Send what native code writes to stdout (the exporter prints its whole graph when it fails)
    to the debug log instead of the terminal."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no file descriptor 1 (an embedded interpreter): nothing to redirect
        yield
        return
    with tempfile.TemporaryFile(mode="w+b") as captured:
        os.dup2(captured.fileno(), 1)
        try:
            yield
        finally:
            os.dup2(saved, 1)
            os.close(saved)
            captured.seek(0)
            text = captured.read().decode(errors="replace")
            if text.strip():
                logger.debug("exporter output:\n%s", text)


def _write_metadata(path: Path, metadata: OnnxMetadata, context: _Context) -> None:
    onnx = import_optional("onnx")
    model = onnx.load(str(path))
    del model.metadata_props[:]
    for key, value in {**metadata.to_props(), **context.common}.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, str(value)
    graph = metadata.graph.replace("_", " ")
    model.doc_string = f"vfmkd {graph} ({metadata.head_type}), input {metadata.input_size} px"
    onnx.save(model, str(path))


def _check(
    path: Path, reference: Callable[..., Any], inputs: tuple[torch.Tensor, ...], names: list[str]
) -> dict[str, float]:
    """Largest |onnxruntime - PyTorch| of each output on ``inputs`` (NaN where the shapes differ)."""
    ort = import_optional("onnxruntime")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    got = session.run(None, {name: value.numpy() for name, value in zip(names, inputs)})
    with torch.no_grad():
        expected = reference(*inputs)
    differences = {}
    for output, value, wanted in zip(session.get_outputs(), got, expected):
        wanted = wanted.numpy()
        same = value.shape == wanted.shape
        difference = float(np.abs(value.astype(np.float64) - wanted).max(initial=0.0)) if same else math.nan
        differences[output.name] = difference
    return differences


def _check_images(batch: int, size: int) -> torch.Tensor:
    """``[batch, 3, size, size]`` fixed smooth random images in ``[0, 1]`` (noise upsampled 8x, closer to
    a photograph than pixel noise)."""
    coarse = torch.rand(batch, 3, max(size // 8, 1), max(size // 8, 1), generator=torch.Generator().manual_seed(0))
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


def _describe(name: str, value: torch.Tensor, dynamic_axes: dict[str, dict[int, str]] | None, batch: str | None) -> str:
    axes = (dynamic_axes or {}).get(name, {})
    dims = [axes.get(index, str(size)) for index, size in enumerate(value.shape)]
    if name == "images" and batch:
        dims[0] = batch
    return f"{name} [{', '.join(dims)}]"


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:300]


def _version() -> str:
    from vfmkd import __version__

    return __version__
