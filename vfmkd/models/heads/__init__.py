"""Task heads; importing this package registers them in ``vfmkd.registry.HEADS``."""

from vfmkd.models.heads.assigner import Assignment, TaskAlignedAssigner
from vfmkd.models.heads.base import BaseHead
from vfmkd.models.heads.rtdetr_decoder import RTDETR_PRESETS, RTDETRDecoder
from vfmkd.models.heads.rtdetr_head import RTDETRHead
from vfmkd.models.heads.rtdetr_loss import HungarianMatcher, RTDETRLoss
from vfmkd.models.heads.sam_mask_head import SAMMaskHead
from vfmkd.models.heads.yolo_head import DistributionIntegral, YOLOHead
from vfmkd.models.heads.yolo_loss import YOLOv8DetectionLoss, distribution_focal_loss, pad_targets

__all__ = [
    "Assignment",
    "BaseHead",
    "DistributionIntegral",
    "HungarianMatcher",
    "RTDETR_PRESETS",
    "RTDETRDecoder",
    "RTDETRHead",
    "RTDETRLoss",
    "SAMMaskHead",
    "TaskAlignedAssigner",
    "YOLOHead",
    "YOLOv8DetectionLoss",
    "distribution_focal_loss",
    "pad_targets",
]
