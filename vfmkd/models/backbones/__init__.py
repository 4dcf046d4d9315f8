"""Student backbones; importing this package registers them in ``vfmkd.registry.BACKBONES``."""

from vfmkd.models.backbones.base import BaseBackbone
from vfmkd.models.backbones.mamba import MambaBackbone  # noqa: F401  (registers "mamba")
from vfmkd.models.backbones.repvit import RepViTBackbone  # noqa: F401  (registers "repvit")
from vfmkd.models.backbones.timm_backbone import TimmBackbone  # noqa: F401  (registers "timm")
from vfmkd.models.backbones.vit import ViTBackbone  # noqa: F401  (registers "vit")
from vfmkd.models.backbones.yolov8 import YOLOV8_SCALES, YOLOv8Backbone, YOLOv8Scale, get_yolov8_scale

__all__ = ["YOLOV8_SCALES", "BaseBackbone", "YOLOv8Backbone", "YOLOv8Scale", "get_yolov8_scale"]
