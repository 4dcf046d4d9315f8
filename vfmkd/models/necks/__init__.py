"""Necks that fuse backbone levels; importing this package registers them in ``vfmkd.registry.NECKS``."""

from vfmkd.models.necks.yolov8_pafpn import YOLOv8PAFPN

__all__ = ["YOLOv8PAFPN"]
