"""ViTDet's simple feature pyramid: a multi-scale pyramid from one plain-ViT feature map.

Li, Mao, Girshick and He, "Exploring Plain Vision Transformer Backbones for Object Detection",
ECCV 2022 (arXiv:2203.16527), section 3 and figure 2(c); reference implementation
``SimpleFeaturePyramid`` in detectron2 (``detectron2/modeling/backbone/vit.py``, Apache-2.0).
Written here from that description: from the last stride-16 map of a ViT, a stride-4 level
comes from two 2x transposed convolutions (with LayerNorm and GELU between them), a stride-8
level from one, a stride-16 level is the map itself and a stride-32 level is a 2x2 max pool;
each level then runs a 1x1 convolution and a 3x3 convolution, each followed by a channel
LayerNorm. No lateral or top-down connections.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LayerNorm2d", "PyramidLevel", "SimpleFeaturePyramid"]

# detectron2's channel LayerNorm uses eps 1e-6.
LAYER_NORM_EPS = 1e-6


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a ``[B, C, H, W]`` map, at every position.

    Args:
        channels: Number of channels ``C``.
        eps: Added to the variance.
    """

    def __init__(self, channels: int, eps: float = LAYER_NORM_EPS) -> None:
        super().__init__(channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise ``[B, C, H, W]`` over ``C``; same shape out."""
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


def _resample(in_channels: int, scale: float) -> tuple[nn.Module, int]:
    """The module taking the input map to ``scale`` times its size, and its output channels."""
    if scale == 4.0:
        upsample = nn.Sequential(
            nn.ConvTranspose2d(in_channels, in_channels // 2, kernel_size=2, stride=2),
            LayerNorm2d(in_channels // 2),
            nn.GELU(),
            nn.ConvTranspose2d(in_channels // 2, in_channels // 4, kernel_size=2, stride=2),
        )
        return upsample, in_channels // 4
    if scale == 2.0:
        return nn.ConvTranspose2d(in_channels, in_channels // 2, kernel_size=2, stride=2), in_channels // 2
    if scale == 1.0:
        return nn.Identity(), in_channels
    # NOTE: ceil_mode keeps an odd-sized map's last row and column (ViTDet floors), so the
    # level has ceil(H / 2) rows like every other backbone's stride-doubling level.
    return nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True), in_channels


class PyramidLevel(nn.Sequential):
    """One pyramid level: resample the input map, then 1x1 conv + LN, 3x3 conv + LN.

    Args:
        in_channels: Channels of the input map.
        out_channels: Channels of the level.
        scale: Output size over input size, one of 4, 2, 1, 0.5.
    """

    def __init__(self, in_channels: int, out_channels: int, scale: float) -> None:
        resample, resampled_channels = _resample(in_channels, scale)
        # The convolutions have no bias since a LayerNorm follows each one (as in ViTDet).
        super().__init__(
            OrderedDict(
                resample=resample,
                reduce_conv=nn.Conv2d(resampled_channels, out_channels, kernel_size=1, bias=False),
                reduce_norm=LayerNorm2d(out_channels),
                output_conv=nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
                output_norm=LayerNorm2d(out_channels),
            )
        )
        self.scale = scale

    def extra_repr(self) -> str:
        return f"scale={self.scale}"


class SimpleFeaturePyramid(nn.Module):
    """Build pyramid levels from one feature map (ViTDet).

    Args:
        in_channels: Channels of the input map; divisible by 4 when a level is 4x finer.
        out_channels: Channels of every output level (ViTDet: 256).
        in_stride: Stride of the input map in image pixels.
        level_strides: Output level name to stride; each stride is ``in_stride`` times 1/4,
            1/2, 1 or 2.

    Example:
        >>> pyramid = SimpleFeaturePyramid(192, 128)
        >>> {k: tuple(v.shape) for k, v in pyramid(torch.zeros(1, 192, 4, 4)).items()}
        {'p3': (1, 128, 8, 8), 'p4': (1, 128, 4, 4), 'p5': (1, 128, 2, 2)}
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int = 256,
        *,
        in_stride: int = 16,
        level_strides: Mapping[str, int] | None = None,
    ) -> None:
        super().__init__()
        if level_strides is None:
            level_strides = {"p3": 8, "p4": 16, "p5": 32}
        levels: dict[str, PyramidLevel] = {}
        for level, stride in level_strides.items():
            scale = in_stride / stride
            if scale not in (4.0, 2.0, 1.0, 0.5):
                raise ValueError(
                    f"simple pyramid level '{level}' has stride {stride}; with an input of stride {in_stride} "
                    f"the strides can be {in_stride // 4}, {in_stride // 2}, {in_stride} or {in_stride * 2}"
                )
            if scale == 4.0 and in_channels % 4:
                raise ValueError(f"a 4x finer level needs in_channels divisible by 4, got {in_channels}")
            levels[level] = PyramidLevel(in_channels, out_channels, scale)
        self.levels = nn.ModuleDict(levels)
        self.feature_dims: dict[str, int] = {level: out_channels for level in level_strides}
        self.feature_strides: dict[str, int] = {level: int(stride) for level, stride in level_strides.items()}
        self._init_weights()

    def _init_weights(self) -> None:
        # NOTE: ViTDet initialises these convolutions like Caffe2's MSRAFill (He normal,
        # fan-out); transposed convolutions keep PyTorch's default.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """Compute every level from one map.

        Args:
            features: ``[B, in_channels, H, W]`` map at ``in_stride``.

        Returns:
            One ``[B, out_channels, H * scale, W * scale]`` map per level (``scale`` =
            ``in_stride / stride``; the 2x max pool rounds odd sizes up).
        """
        return {level: module(features) for level, module in self.levels.items()}
