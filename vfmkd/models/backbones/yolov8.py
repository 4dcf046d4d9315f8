"""YOLOv8 CSPDarknet backbone.

Architecture of YOLOv8 (Jocher, Chaurasia and Qiu, Ultralytics, 2023; described in
https://docs.ultralytics.com/models/yolov8 and in "YOLOv8: a detailed explanation",
Terven et al., arXiv:2304.00501): a stride-2 stem, four stages of a stride-2 convolution
followed by a C2f block (a cross-stage-partial block whose bottleneck outputs are all
concatenated), and SPPF pooling after the last stage. Written here from that description;
no Ultralytics code is used. Weights saved from an Ultralytics model load through
:mod:`vfmkd.models.ultralytics_compat`.

Compound scaling (depth multiple, width multiple, max channels) gives the variants
``n, s, m, l, x``; channel counts are rounded up to multiples of 8.
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from types import MappingProxyType
from typing import Any, Mapping

import torch
from torch import nn

from vfmkd.models.backbones.base import BaseBackbone
from vfmkd.registry import BACKBONES

__all__ = [
    "YOLOV8_SCALES",
    "Bottleneck",
    "C2fBlock",
    "ConvBNAct",
    "SPPF",
    "YOLOv8Backbone",
    "YOLOv8Scale",
    "get_yolov8_scale",
]

# NOTE: YOLOv8 trains BatchNorm with eps 1e-3 and momentum 0.03 (PyTorch convention, i.e.
# 0.97 of the running statistics kept per step); official weights assume this eps.
BATCH_NORM_EPS = 1e-3
BATCH_NORM_MOMENTUM = 0.03


@dataclasses.dataclass(frozen=True)
class YOLOv8Scale:
    """Compound-scaling constants of one YOLOv8 variant.

    Attributes:
        depth: Multiplier on the number of bottlenecks per C2f block.
        width: Multiplier on channel counts.
        max_channels: Cap applied to a base channel count before the width multiplier.
    """

    depth: float
    width: float
    max_channels: int

    def channels(self, base_channels: int) -> int:
        """Channels of a layer whose YOLOv8-l channel count is ``base_channels``."""
        return int(math.ceil(min(base_channels, self.max_channels) * self.width / 8) * 8)

    def repeats(self, base_repeats: int) -> int:
        """Bottleneck count of a block with ``base_repeats`` bottlenecks at depth 1."""
        return max(round(base_repeats * self.depth), 1) if base_repeats > 1 else base_repeats


YOLOV8_SCALES: Mapping[str, YOLOv8Scale] = MappingProxyType(
    {
        "n": YOLOv8Scale(depth=0.33, width=0.25, max_channels=1024),
        "s": YOLOv8Scale(depth=0.33, width=0.50, max_channels=1024),
        "m": YOLOv8Scale(depth=0.67, width=0.75, max_channels=768),
        "l": YOLOv8Scale(depth=1.00, width=1.00, max_channels=512),
        "x": YOLOv8Scale(depth=1.00, width=1.25, max_channels=512),
    }
)

# Base (depth 1, width 1) output channels of the stem and the four stages.
_STEM_CHANNELS = 64
_STAGE_CHANNELS = (128, 256, 512, 1024)
_STAGE_REPEATS = (3, 6, 6, 3)


def get_yolov8_scale(scale: str) -> YOLOv8Scale:
    """Look up a YOLOv8 variant by name (``n``, ``s``, ``m``, ``l`` or ``x``)."""
    try:
        return YOLOV8_SCALES[scale]
    except KeyError:
        raise ValueError(f"unknown YOLOv8 scale '{scale}'; choose one of {', '.join(YOLOV8_SCALES)}") from None


class ConvBNAct(nn.Sequential):
    """Convolution without bias, BatchNorm, then SiLU (or no activation).

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        kernel_size: Square kernel size; padding keeps the size at stride 1.
        stride: Convolution stride.
        activation: Apply SiLU after the BatchNorm.
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1, activation: bool = True
    ) -> None:
        super().__init__(
            OrderedDict(
                conv=nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=False),
                bn=nn.BatchNorm2d(out_channels, eps=BATCH_NORM_EPS, momentum=BATCH_NORM_MOMENTUM),
                act=nn.SiLU() if activation else nn.Identity(),
            )
        )


class Bottleneck(nn.Module):
    """Two 3x3 ConvBNAct layers with an optional residual connection.

    Args:
        channels: Input and output channels.
        shortcut: Add the input to the output.
    """

    def __init__(self, channels: int, shortcut: bool = True) -> None:
        super().__init__()
        self.conv1 = ConvBNAct(channels, channels, 3)
        self.conv2 = ConvBNAct(channels, channels, 3)
        self.shortcut = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``[B, C, H, W]`` to ``[B, C, H, W]``."""
        out = self.conv2(self.conv1(x))
        return x + out if self.shortcut else out

    def extra_repr(self) -> str:
        return f"shortcut={self.shortcut}"


class C2fBlock(nn.Module):
    """YOLOv8's cross-stage-partial block with two convolutions ("C2f").

    A 1x1 convolution doubles into two halves; the second half runs through ``num_blocks``
    bottlenecks in sequence, and both halves plus every bottleneck output are concatenated
    and fused by a second 1x1 convolution.

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        num_blocks: Number of bottlenecks.
        shortcut: Residual connections inside the bottlenecks.
        expansion: Hidden channels as a fraction of ``out_channels``.
    """

    def __init__(
        self, in_channels: int, out_channels: int, num_blocks: int = 1, shortcut: bool = False, expansion: float = 0.5
    ) -> None:
        super().__init__()
        self.hidden_channels = int(out_channels * expansion)
        self.input_conv = ConvBNAct(in_channels, 2 * self.hidden_channels, 1)
        self.output_conv = ConvBNAct((2 + num_blocks) * self.hidden_channels, out_channels, 1)
        self.bottlenecks = nn.ModuleList(Bottleneck(self.hidden_channels, shortcut) for _ in range(num_blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``[B, in_channels, H, W]`` to ``[B, out_channels, H, W]``."""
        parts = list(self.input_conv(x).chunk(2, dim=1))
        for bottleneck in self.bottlenecks:
            parts.append(bottleneck(parts[-1]))
        return self.output_conv(torch.cat(parts, dim=1))


class SPPF(nn.Module):
    """Spatial pyramid pooling, fast: three chained 5x5 max pools (receptive fields 5, 9, 13).

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        kernel_size: Max-pool kernel size.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 5) -> None:
        super().__init__()
        hidden_channels = in_channels // 2
        self.input_conv = ConvBNAct(in_channels, hidden_channels, 1)
        self.output_conv = ConvBNAct(hidden_channels * 4, out_channels, 1)
        self.pool = nn.MaxPool2d(kernel_size, stride=1, padding=kernel_size // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``[B, in_channels, H, W]`` to ``[B, out_channels, H, W]``."""
        pooled = [self.input_conv(x)]
        for _ in range(3):
            pooled.append(self.pool(pooled[-1]))
        return self.output_conv(torch.cat(pooled, dim=1))


def _stage(in_channels: int, out_channels: int, num_blocks: int, with_sppf: bool = False) -> nn.Sequential:
    layers: OrderedDict[str, nn.Module] = OrderedDict(
        downsample=ConvBNAct(in_channels, out_channels, 3, stride=2),
        csp=C2fBlock(out_channels, out_channels, num_blocks, shortcut=True),
    )
    if with_sppf:
        layers["sppf"] = SPPF(out_channels, out_channels, kernel_size=5)
    return nn.Sequential(layers)


@BACKBONES.register("yolov8")
class YOLOv8Backbone(BaseBackbone):
    """YOLOv8 CSPDarknet with outputs ``p3``, ``p4``, ``p5`` at strides 8, 16, 32.

    ``p5`` is taken after SPPF. For ``n``: channels 64, 128, 256.

    Args:
        scale: Variant, one of ``n``, ``s``, ``m``, ``l``, ``x``.
        in_channels: Channels of the input images.

    Example:
        >>> backbone = YOLOv8Backbone(scale="n")
        >>> {k: v.shape[1] for k, v in backbone(torch.zeros(1, 3, 64, 64)).items()}
        {'p3': 64, 'p4': 128, 'p5': 256}
    """

    def __init__(self, scale: str = "n", in_channels: int = 3) -> None:
        variant = get_yolov8_scale(scale)
        stem_channels = variant.channels(_STEM_CHANNELS)
        stage_channels = [variant.channels(c) for c in _STAGE_CHANNELS]
        stage_repeats = [variant.repeats(n) for n in _STAGE_REPEATS]
        super().__init__(
            feature_dims={"p3": stage_channels[1], "p4": stage_channels[2], "p5": stage_channels[3]},
            feature_strides={"p3": 8, "p4": 16, "p5": 32},
        )
        self.scale = scale
        self.stem = ConvBNAct(in_channels, stem_channels, 3, stride=2)
        self.stage1 = _stage(stem_channels, stage_channels[0], stage_repeats[0])
        self.stage2 = _stage(stage_channels[0], stage_channels[1], stage_repeats[1])
        self.stage3 = _stage(stage_channels[1], stage_channels[2], stage_repeats[2])
        self.stage4 = _stage(stage_channels[2], stage_channels[3], stage_repeats[3], with_sppf=True)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Compute the three pyramid levels.

        Args:
            images: ``[B, in_channels, H, W]`` RGB images scaled to ``[0, 1]``.

        Returns:
            ``p3 [B, C3, H/8, W/8]``, ``p4 [B, C4, H/16, W/16]``, ``p5 [B, C5, H/32, W/32]``
            (sizes rounded up).
        """
        p3 = self.stage2(self.stage1(self.stem(images)))
        p4 = self.stage3(p3)
        p5 = self.stage4(p4)
        return {"p3": p3, "p4": p4, "p5": p5}

    def default_neck_config(self) -> dict[str, Any]:
        """YOLOv8's own PAFPN at the same scale."""
        return {"type": "yolov8_pafpn", "scale": self.scale}
