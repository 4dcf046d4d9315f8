"""The ``vfmkd export`` sub-command::

    vfmkd export --checkpoint CKPT --format onnx [--img-size N] [--dynamic] [--opset N] [--out FILE] [--nms]
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any

__all__ = ["add_export_command"]


def add_export_command(commands: Any) -> None:
    """Register ``export`` on the ``vfmkd`` sub-command parser."""
    from vfmkd.export.onnx_export import DEFAULT_OPSET

    export = commands.add_parser(
        "export", help="a checkpoint's student as ONNX graphs (detector; image encoder + prompt decoder)"
    )
    export.add_argument("--checkpoint", required=True, help="a training checkpoint (best.pt, last.pt)")
    export.add_argument("--format", default="onnx", help="onnx (the only format for now)")
    export.add_argument("--img-size", type=int, default=None, help="input side (default: the training data.img_size)")
    export.add_argument("--dynamic", action="store_true", help="a dynamic batch dimension (default: batch 1)")
    export.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    export.add_argument(
        "--out", default=None, help="the detector graph's file (default: the checkpoint's path with .onnx)"
    )
    export.add_argument("--nms", action="store_true", help="YOLO head: NMS in the graph (ONNX NonMaxSuppression)")
    export.add_argument(
        "--max-det", type=int, default=300, help="DETR: pairs kept; YOLO --nms: boxes per class and image (300)"
    )
    export.set_defaults(handler=_cmd_export)


def _cmd_export(args: argparse.Namespace) -> int:
    from vfmkd.export.onnx_export import FORMATS, ExportError, export_checkpoint

    if args.format not in FORMATS:
        raise ExportError(f"--format {args.format}: unknown; choose one of {', '.join(FORMATS)}")
    summary = export_checkpoint(
        args.checkpoint,
        out=args.out,
        img_size=args.img_size,
        dynamic=args.dynamic,
        opset=args.opset,
        nms=args.nms,
        max_det=args.max_det,
    )
    for exported in summary.files:
        _say(f"wrote {exported.path} ({exported.graph.replace('_', ' ')}, {exported.size_bytes / 2**20:.1f} MiB, "
             f"{exported.parameters / 1e6:.2f} M parameters)")
        _say(f"  in:  {', '.join(exported.inputs)}")
        _say(f"  out: {', '.join(exported.outputs)}")
        checks = ", ".join(f"{name} {_difference(value)}" for name, value in exported.check.items())
        _say(f"  onnxruntime vs PyTorch, largest |difference|: {checks}")
    for note in summary.notes:
        _say(f"note: {note}")
    return 0


def _difference(value: float) -> str:
    return "shapes differ" if math.isnan(value) else f"{value:.2g}"


def _say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()
