"""Student backbones; importing this package registers them in ``vfmkd.registry.BACKBONES``."""

from vfmkd.models.backbones.base import BaseBackbone
from vfmkd.models.backbones.yolov8 import YOLOV8_SCALES, YOLOv8Backbone, YOLOv8Scale, get_yolov8_scale

__all__ = ["YOLOV8_SCALES", "BaseBackbone", "YOLOv8Backbone", "YOLOv8Scale", "get_yolov8_scale"]
