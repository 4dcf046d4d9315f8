"""Small students of every family for the export tests, with trained-like BatchNorm statistics.

At random init a YOLOv8's activations shrink layer after layer (to 1e-9 at 64 px), so
boxes, scores and DETR proposals tie and no comparison means anything. :func:`student`
sets every BatchNorm's running statistics from two batches of random images (as a trained
network has them) and gives a YOLO head boxes of varied sizes and spread-out scores.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from vfmkd.core.checkpoint import save_checkpoint
from vfmkd.models import build_model
from vfmkd.models.heads.rtdetr_head import RTDETRHead
from vfmkd.models.heads.sam_mask_head import SAMMaskHead

IMG_SIZE = 64
NUM_CLASSES = 3
NAMES = ["cat", "dog", "bird"]
CATEGORY_IDS = [17, 18, 16]
#: The smallest student of each family (configs/backbones/, tests/integration/test_student_families.py).
BACKBONES: dict[str, dict[str, Any]] = {
    "yolov8n": {"type": "yolov8", "scale": "n"},
    "vit_tiny": {"type": "vit", "size": "tiny", "img_size": IMG_SIZE},
    "repvit_m0_9": {"type": "repvit", "variant": "m0_9"},
    "timm_resnet18": {"type": "timm", "name": "resnet18"},
    "mamba_nano": {"type": "mamba", "size": "nano"},
}
HEADS: dict[str, dict[str, Any]] = {
    "yolo": {"type": "yolo_head", "num_classes": NUM_CLASSES},
    "detr": {"type": "rtdetr_head", "num_classes": NUM_CLASSES, **RTDETRHead.small_config()},
    "sam2": {"type": "sam_mask_head", "decoder": "sam2", **SAMMaskHead.small_config()},
    "sam": {"type": "sam_mask_head", "decoder": "sam", **SAMMaskHead.small_config()},
}


def images(count: int, size: int = IMG_SIZE, seed: int = 1) -> torch.Tensor:
    """``[count, 3, size, size]`` smooth random images in ``[0, 1]`` (noise upsampled 8x)."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, 3, size // 8, size // 8, generator=generator)
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


@torch.no_grad()
def calibrate(model: nn.Module, size: int = IMG_SIZE) -> nn.Module:
    """Every BatchNorm's running statistics from two random batches; the model back in eval mode."""
    norms = [module for module in model.modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average over the batches
    model.train()
    for seed in (11, 12):
        model(images(4, size, seed))
    for norm in norms:
        norm.momentum = 0.1
    return model.eval()


def student(backbone: str = "yolov8n", heads: tuple[str, ...] = ("yolo",), size: int = IMG_SIZE) -> nn.Module:
    """A calibrated student (eval mode) with the given heads (``detection`` and / or ``segmentation``)."""
    torch.manual_seed(0)
    config = {name: HEADS[name] for name in heads}
    named = {("segmentation" if spec["type"] == "sam_mask_head" else "detection"): spec for spec in config.values()}
    model = build_model({"backbone": dict(BACKBONES[backbone]), "heads": named})
    head = model.heads["detection"] if "detection" in model.heads else None
    model = calibrate(model, size)
    if head is not None and hasattr(head, "class_branches"):
        # NOTE: after calibration: boxes of varied sizes, class probabilities spread over (0, 1).
        with torch.no_grad():
            for box_branch, class_branch in zip(head.box_branches, head.class_branches):
                box_branch[-1].weight.normal_(0.0, 0.02)
                box_branch[-1].bias.normal_(0.0, 1.0)
                class_branch[-1].weight.mul_(0.3)
                class_branch[-1].bias.fill_(-1.0)
    return model


def write_checkpoint(path: Path, model: nn.Module, *, names: bool = True) -> Path:
    """A checkpoint of ``model`` (trained on ``shapes`` at 64 px), with class names unless ``names`` is False."""
    return save_checkpoint(
        path,
        model=model,
        config_dict={"data": {"dataset": "shapes", "img_size": IMG_SIZE}},
        names=NAMES if names else None,
        category_ids=CATEGORY_IDS if names else None,
    )


def write_images(folder: Path, sizes: dict[str, tuple[int, int]]) -> Path:
    """Smooth random images of the given ``(H, W)`` under ``folder``."""
    rng = np.random.default_rng(0)
    for name, (height, width) in sizes.items():
        coarse = rng.integers(0, 256, (max(height // 8, 2), max(width // 8, 2), 3), dtype=np.uint8)
        Image.fromarray(coarse).resize((width, height), Image.BILINEAR).save(folder / name)
    return folder
