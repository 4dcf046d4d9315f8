"""An exactly covariant toy teacher: a fixed stride-16 average pool then a fixed 1x1 conv.

Its features of a scaled, flipped or shifted image are (up to pooling-window and
interpolation error) the scaled, flipped or shifted features, so it tells whether
offline features warped into an augmented frame match a live pass on that frame.
Registered as ``covariant_probe`` when this module is imported.

``chiral=True`` adds the pooled horizontal gradient through a second fixed 1x1 conv: its
sign turns under a left-right flip, like the channels of a real CNN teacher that are
not mirror-symmetric, so warping alone cannot serve a flipped sample.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from vfmkd.geometry import Frame, resize_frame
from vfmkd.registry import TEACHERS
from vfmkd.teachers.base import BaseTeacher, FeatureSpec

STRIDE = 16
CHANNELS = 8


class CovariantTeacher(BaseTeacher):
    name = "covariant_probe"

    def __init__(self, features: Sequence[str] | None = None, image_size: int = 256, chiral: bool = False) -> None:
        super().__init__(features)
        self.image_size = image_size
        self.chiral = chiral
        self.projection = nn.Conv2d(3, CHANNELS, 1)
        self.gradient = nn.Conv2d(3, CHANNELS, 1, bias=False)
        generator = torch.Generator().manual_seed(1234)
        with torch.no_grad():
            self.projection.weight.copy_(torch.randn(CHANNELS, 3, 1, 1, generator=generator))
            self.projection.bias.copy_(torch.randn(CHANNELS, generator=generator))
            # d/dx per image width, so the term is about as large as the first.
            self.gradient.weight.copy_(torch.randn(CHANNELS, 3, 1, 1, generator=generator) * image_size)
        self.freeze()

    @property
    def available_specs(self) -> dict[str, FeatureSpec]:
        cells = self.image_size // STRIDE
        return {"embed": FeatureSpec("embed", CHANNELS, STRIDE, cells, cells, "avgpool16 -> 1x1 conv")}

    def frame_for(self, image_hw: tuple[int, int]) -> Frame:
        return resize_frame(image_hw, (self.image_size, self.image_size))

    def preprocessing(self) -> dict[str, Any]:
        return {"resize": "square bilinear antialias", "image_size": self.image_size,
                "pixel_mean": [0.5, 0.5, 0.5], "pixel_std": [0.5, 0.5, 0.5]}

    def preprocess_image(self, image: np.ndarray) -> tuple[torch.Tensor, Frame]:
        tensor = torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1)[None].float() / 255
        pixels, frames = self.preprocess_tensor(tensor)
        return pixels[0], frames[0]

    def forward_features(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        embed = self.projection(nn.functional.avg_pool2d(pixels, STRIDE))
        if self.chiral:
            padded = nn.functional.pad(pixels, (0, 1, 0, 0), mode="replicate")
            embed = embed + self.gradient(nn.functional.avg_pool2d(padded[..., 1:] - padded[..., :-1], STRIDE))
        return {"embed": embed}


def covariant_probe(*, checkpoint: Any = None, features: Sequence[str] | None = None,
                    image_size: int | None = None) -> CovariantTeacher:
    teacher = CovariantTeacher(features, image_size or 256)
    if checkpoint is not None:
        teacher.load_state_dict(checkpoint)
    return teacher


if "covariant_probe" not in TEACHERS:
    TEACHERS.register("covariant_probe")(covariant_probe)
