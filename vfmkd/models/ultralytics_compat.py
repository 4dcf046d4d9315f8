"""Load YOLOv8 detection weights saved by Ultralytics into vfmkd's YOLOv8 model.

Ultralytics names parameters by layer index in its model definition (``model.<N>.<path>``);
vfmkd names them by role. This module only renames keys; the tensors are used as they are.
Produce a loadable file from an Ultralytics model with
``torch.save(model.state_dict(), "yolov8n_state_dict.pt")`` (for a ``YOLO("yolov8n.pt")``
object: ``torch.save(yolo.model.state_dict(), ...)``). Full Ultralytics checkpoints
(``yolov8n.pt``) are pickled Python objects and are refused for safety.

Layer mapping (``{head}`` is the detection head's name in the model, ``detection`` by default):

=====  ==========  =================================  ======================================
layer  type        vfmkd prefix                       renamed sub-keys
=====  ==========  =================================  ======================================
0      Conv        ``backbone.stem``                  ``conv.*``, ``bn.*`` unchanged
1      Conv        ``backbone.stage1.downsample``     unchanged
2      C2f         ``backbone.stage1.csp``            ``cv1`` -> ``input_conv``,
                                                      ``cv2`` -> ``output_conv``,
                                                      ``m.K.cvJ`` -> ``bottlenecks.K.convJ``
3      Conv        ``backbone.stage2.downsample``     unchanged
4      C2f         ``backbone.stage2.csp``            as layer 2
5      Conv        ``backbone.stage3.downsample``     unchanged
6      C2f         ``backbone.stage3.csp``            as layer 2
7      Conv        ``backbone.stage4.downsample``     unchanged
8      C2f         ``backbone.stage4.csp``            as layer 2
9      SPPF        ``backbone.stage4.sppf``           ``cv1`` -> ``input_conv``,
                                                      ``cv2`` -> ``output_conv``
10-11  Upsample,   (no parameters)
       Concat
12     C2f         ``neck.top_down_p4``               as layer 2
13-14  Upsample,   (no parameters)
       Concat
15     C2f         ``neck.top_down_p3`` (out ``p3``)  as layer 2
16     Conv        ``neck.downsample_p3``             unchanged
17     Concat      (no parameters)
18     C2f         ``neck.bottom_up_p4`` (out ``p4``) as layer 2
19     Conv        ``neck.downsample_p4``             unchanged
20     Concat      (no parameters)
21     C2f         ``neck.bottom_up_p5`` (out ``p5``) as layer 2
22     Detect      ``heads.{head}``                   ``cv2.L.J`` -> ``box_branches.L.J``,
                                                      ``cv3.L.J`` -> ``class_branches.L.J``,
                                                      ``dfl.conv.weight`` ->
                                                      ``integral.projection``
=====  ==========  =================================  ======================================
"""

from __future__ import annotations

import re
from types import MappingProxyType
from typing import Mapping

import torch

__all__ = ["ULTRALYTICS_YOLOV8_LAYERS", "convert_ultralytics_state_dict", "is_ultralytics_state_dict"]

_CONV = "conv"
_C2F = "c2f"
_SPPF = "sppf"
_DETECT = "detect"

ULTRALYTICS_YOLOV8_LAYERS: Mapping[int, tuple[str, str]] = MappingProxyType(
    {
        0: ("backbone.stem", _CONV),
        1: ("backbone.stage1.downsample", _CONV),
        2: ("backbone.stage1.csp", _C2F),
        3: ("backbone.stage2.downsample", _CONV),
        4: ("backbone.stage2.csp", _C2F),
        5: ("backbone.stage3.downsample", _CONV),
        6: ("backbone.stage3.csp", _C2F),
        7: ("backbone.stage4.downsample", _CONV),
        8: ("backbone.stage4.csp", _C2F),
        9: ("backbone.stage4.sppf", _SPPF),
        12: ("neck.top_down_p4", _C2F),
        15: ("neck.top_down_p3", _C2F),
        16: ("neck.downsample_p3", _CONV),
        18: ("neck.bottom_up_p4", _C2F),
        19: ("neck.downsample_p4", _CONV),
        21: ("neck.bottom_up_p5", _C2F),
        22: ("heads.{head}", _DETECT),
    }
)
"""Ultralytics YOLOv8 layer index -> (vfmkd module prefix, layer type)."""

_RENAMES: Mapping[str, tuple[tuple[re.Pattern[str], str], ...]] = MappingProxyType(
    {
        _CONV: ((re.compile(r"^((?:conv|bn)\..+)$"), r"\1"),),
        _C2F: (
            (re.compile(r"^cv1\.(.+)$"), r"input_conv.\1"),
            (re.compile(r"^cv2\.(.+)$"), r"output_conv.\1"),
            (re.compile(r"^m\.(\d+)\.cv([12])\.(.+)$"), r"bottlenecks.\1.conv\2.\3"),
        ),
        _SPPF: (
            (re.compile(r"^cv1\.(.+)$"), r"input_conv.\1"),
            (re.compile(r"^cv2\.(.+)$"), r"output_conv.\1"),
        ),
        _DETECT: (
            (re.compile(r"^cv2\.(\d+\.\d+\..+)$"), r"box_branches.\1"),
            (re.compile(r"^cv3\.(\d+\.\d+\..+)$"), r"class_branches.\1"),
            (re.compile(r"^dfl\.conv\.weight$"), "integral.projection"),
        ),
    }
)

_ULTRALYTICS_KEY = re.compile(r"^model\.(\d+)\.(.+)$")


def is_ultralytics_state_dict(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """True when every key looks like ``model.<layer index>.<...>``."""
    return bool(state_dict) and all(_ULTRALYTICS_KEY.match(key) for key in state_dict)


def convert_ultralytics_state_dict(
    state_dict: Mapping[str, torch.Tensor], head_name: str = "detection"
) -> dict[str, torch.Tensor]:
    """Rename an Ultralytics YOLOv8 detection state dict to vfmkd's module names.

    Args:
        state_dict: Keys ``model.<N>.<...>`` from ``DetectionModel.state_dict()``.
        head_name: Name of the detection head in ``UnifiedModel.heads``.

    Returns:
        A state dict for ``UnifiedModel`` with backbone ``yolov8``, neck ``yolov8_pafpn`` and
        head ``yolo_head`` (same tensors, new keys).

    Raises:
        ValueError: listing every key that has no vfmkd counterpart (e.g. from a YOLOv8
            segmentation or YOLO11 model).
    """
    converted: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, tensor in state_dict.items():
        new_key = _convert_key(key, head_name)
        if new_key is None:
            unknown.append(key)
        else:
            converted[new_key] = tensor
    if unknown:
        shown = ", ".join(unknown[:20]) + (f", ... ({len(unknown)} in all)" if len(unknown) > 20 else "")
        raise ValueError(
            f"{len(unknown)} Ultralytics keys have no counterpart in vfmkd's YOLOv8 detection model: {shown}. "
            "Only YOLOv8 detection models (yolov8{n,s,m,l,x}.yaml) are supported."
        )
    return converted


def _convert_key(key: str, head_name: str) -> str | None:
    match = _ULTRALYTICS_KEY.match(key)
    if match is None:
        return None
    layer = int(match.group(1))
    if layer not in ULTRALYTICS_YOLOV8_LAYERS:
        return None
    prefix, layer_type = ULTRALYTICS_YOLOV8_LAYERS[layer]
    for pattern, replacement in _RENAMES[layer_type]:
        renamed, count = pattern.subn(replacement, match.group(2))
        if count:
            return f"{prefix.format(head=head_name)}.{renamed}"
    return None
