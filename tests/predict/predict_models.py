"""Models and images of the predict tests (fixtures over them in ``conftest.py``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from pycocotools import mask as mask_utils

from vfmkd.core.checkpoint import save_checkpoint
from vfmkd.models import build_model
from vfmkd.models.heads.sam_mask_head import SAMMaskHead

IMG_SIZE = 64
NUM_CLASSES = 6
# (H, W) of the test images: wide, tall; both letterboxed with padding at 64 px.
IMAGE_SIZES = {"wide.png": (48, 100), "sub/tall.jpg": (90, 36)}
BAD_IMAGE = "broken.jpg"


def build_student(*, detection: bool = True, segmentation: bool = False) -> torch.nn.Module:
    """YOLOv8n at random init, its detector made to give many boxes of varied shapes and scores."""
    torch.manual_seed(0)
    heads = {}
    if detection:
        heads["detection"] = {"type": "yolo_head", "num_classes": NUM_CLASSES}
    if segmentation:
        heads["segmentation"] = {"type": "sam_mask_head", "decoder": "sam2", **SAMMaskHead.small_config()}
    model = build_model({"backbone": {"type": "yolov8", "scale": "n"}, "heads": heads})
    if detection:
        with torch.no_grad():
            head = model.heads["detection"]
            for box_branch, class_branch in zip(head.box_branches, head.class_branches):
                box_branch[-1].weight.normal_(0.0, 0.05)
                box_branch[-1].bias.normal_(0.0, 1.0)
                class_branch[-1].bias.zero_()
    return model.eval()


def write_checkpoint(path: Path, model: torch.nn.Module, dataset: str = "shapes") -> Path:
    return save_checkpoint(path, model=model, config_dict={"data": {"dataset": dataset, "img_size": IMG_SIZE}})


def rle_masks(rows: list[dict]) -> np.ndarray:
    """``[N, H, W]`` bool masks of COCO results rows (their RLE ``counts`` as JSON strings)."""
    rles = [{**row["segmentation"], "counts": row["segmentation"]["counts"].encode()} for row in rows]
    return mask_utils.decode(rles).transpose(2, 0, 1).astype(bool)
