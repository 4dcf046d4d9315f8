"""A tiny teacher for feature store tests, reachable by name from a fresh process.

Its features are exact in float32 whatever the batch size or summation order: pixels are
multiples of 1/256 (nearest-neighbour resize, ``uint8 / 256``), average pooling sums at
most 256 of them, and the 1x1 projections have weights that are multiples of 1/16, so
every intermediate value is a short dyadic fraction. An interrupted and an uninterrupted
extraction must then agree bit for bit.

``install()`` makes ``vfmkd.features.cli.load_teacher`` build it for the name
``toy_pool``; a subprocess runs::

    python -c "import toy_feature_teacher as t; t.install(); from vfmkd.features.cli import main; main([...])"

``TOY_TEACHER_DELAY`` (seconds per forward) slows it down for kill tests.
"""

from __future__ import annotations

import os
import time
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vfmkd.geometry import Frame, resize_frame
from vfmkd.teachers.base import BaseTeacher, FeatureSpec

TOY_NAME = "toy_pool"


class ToyPoolTeacher(BaseTeacher):
    """Stride-16 and stride-8 average pools, each followed by a fixed 1x1 projection."""

    name = TOY_NAME

    def __init__(self, image_size: int = 32, features: Sequence[str] | None = None, seed: int = 0) -> None:
        super().__init__(features)
        self.image_size = int(image_size)
        generator = torch.Generator().manual_seed(seed)
        self.embed_projection = nn.Conv2d(3, 4, 1, bias=False)
        self.hires_projection = nn.Conv2d(3, 3, 1, bias=False)
        with torch.no_grad():
            for projection in (self.embed_projection, self.hires_projection):
                steps = torch.randint(-16, 17, projection.weight.shape, generator=generator)
                projection.weight.copy_(steps.float() / 16)
        self.random_init = True
        self.freeze()

    @property
    def available_specs(self) -> dict[str, FeatureSpec]:
        size = self.image_size
        return {
            "embed": FeatureSpec("embed", 4, 16, size // 16, size // 16, "pool16 -> 1x1"),
            "hires_s8": FeatureSpec("hires_s8", 3, 8, size // 8, size // 8, "pool8 -> 1x1"),
        }

    def frame_for(self, image_hw: tuple[int, int]) -> Frame:
        return resize_frame(image_hw, (self.image_size, self.image_size))

    def preprocess_image(self, image: np.ndarray) -> tuple[torch.Tensor, Frame]:
        height, width = image.shape[:2]
        size = self.image_size
        rows = np.minimum(((np.arange(size) + 0.5) * height / size).astype(np.int64), height - 1)
        columns = np.minimum(((np.arange(size) + 0.5) * width / size).astype(np.int64), width - 1)
        resized = np.ascontiguousarray(image[rows][:, columns])
        pixels = torch.from_numpy(resized).permute(2, 0, 1).float() / 256.0
        return pixels.contiguous(), self.frame_for((height, width))

    def forward_features(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        delay = float(os.environ.get("TOY_TEACHER_DELAY", "0"))
        if delay:
            time.sleep(delay)
        return {
            "embed": self.embed_projection(F.avg_pool2d(pixels, 16)),
            "hires_s8": self.hires_projection(F.avg_pool2d(pixels, 8)),
        }

    def preprocessing(self) -> dict[str, Any]:
        return {"image_size": self.image_size, "resize": "nearest", "scale": 1 / 256}


def build_toy(
    name: str = TOY_NAME,
    *,
    weights: str | None = None,
    random_init: bool = True,
    seed: int = 0,
    features: Sequence[str] | None = None,
    image_size: int | None = None,
    device: str = "cpu",
    timm_model: str | None = None,
) -> ToyPoolTeacher:
    """The toy teacher with the signature of ``vfmkd.features.cli.load_teacher`` (no timm model)."""
    if timm_model is not None:
        raise ValueError("toy_pool has no timm_model")
    return ToyPoolTeacher(image_size or 32, features, seed).to(device)


def install() -> None:
    """Let the features CLI build ``toy_pool`` (other names go to the real factory)."""
    import vfmkd.features.cli as features_cli

    original = features_cli.load_teacher

    def load_teacher(name: str, **kwargs: Any) -> Any:
        return build_toy(name, **kwargs) if name == TOY_NAME else original(name, **kwargs)

    features_cli.load_teacher = load_teacher


def write_images(folder: Any, count: int, seed: int = 0) -> list[str]:
    """Write ``count`` small PNG images of varied sizes; returns their sample ids."""
    from pathlib import Path

    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ids = []
    for index in range(count):
        height, width = int(rng.integers(20, 48)), int(rng.integers(20, 48))
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{index:03d}.png")
        ids.append(f"img{index:03d}")
    return ids
