"""YOLOv8's path-aggregation feature pyramid (PAFPN).

PANet-style neck (Liu et al., CVPR 2018) as used by YOLOv8: a top-down path (nearest 2x
upsample, concatenate with the finer backbone level, C2f) followed by a bottom-up path
(3x3 stride-2 convolution, concatenate with the top-down output of the coarser level, C2f).
It corresponds to layers 10-21 of the YOLOv8 model definition; written from that
description, without Ultralytics code.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from vfmkd.models.backbones.yolov8 import C2fBlock, ConvBNAct, get_yolov8_scale
from vfmkd.registry import NECKS

__all__ = ["YOLOv8PAFPN"]

_LEVELS = ("p3", "p4", "p5")


@NECKS.register("yolov8_pafpn")
class YOLOv8PAFPN(nn.Module):
    """Fuse ``p3``, ``p4``, ``p5`` top-down then bottom-up; output the same levels.

    Output channels follow the YOLOv8 scale (``n``: 64, 128, 256); input channels may be
    anything, so the neck also serves non-YOLO backbones with ``p3``-``p5`` at strides that
    double from level to level.

    Args:
        in_channels: Channels of the input levels ``p3``, ``p4``, ``p5``; defaults to the
            YOLOv8 backbone of the same scale.
        in_strides: Strides of the input levels; defaults to 8, 16, 32.
        scale: YOLOv8 variant giving widths and depths, one of ``n``, ``s``, ``m``, ``l``, ``x``.
    """

    def __init__(
        self,
        in_channels: Mapping[str, int] | None = None,
        in_strides: Mapping[str, int] | None = None,
        *,
        scale: str = "n",
    ) -> None:
        super().__init__()
        variant = get_yolov8_scale(scale)
        if in_channels is None:
            in_channels = {"p3": variant.channels(256), "p4": variant.channels(512), "p5": variant.channels(1024)}
        if in_strides is None:
            in_strides = {"p3": 8, "p4": 16, "p5": 32}
        missing = [level for level in _LEVELS if level not in in_channels or level not in in_strides]
        if missing:
            raise ValueError(
                f"yolov8_pafpn needs input levels {list(_LEVELS)}; missing {missing} "
                f"(got channels for {sorted(in_channels)}, strides for {sorted(in_strides)})"
            )
        if in_strides["p4"] != 2 * in_strides["p3"] or in_strides["p5"] != 2 * in_strides["p4"]:
            raise ValueError(
                f"yolov8_pafpn needs strides that double from p3 to p5; got {dict(in_strides)}"
            )
        self.scale = scale
        num_blocks = variant.repeats(3)
        width_p3, width_p4, width_p5 = variant.channels(256), variant.channels(512), variant.channels(1024)
        channels_p3, channels_p4, channels_p5 = in_channels["p3"], in_channels["p4"], in_channels["p5"]

        self.top_down_p4 = C2fBlock(channels_p5 + channels_p4, width_p4, num_blocks, shortcut=False)
        self.top_down_p3 = C2fBlock(width_p4 + channels_p3, width_p3, num_blocks, shortcut=False)
        self.downsample_p3 = ConvBNAct(width_p3, width_p3, 3, stride=2)
        self.bottom_up_p4 = C2fBlock(width_p3 + width_p4, width_p4, num_blocks, shortcut=False)
        self.downsample_p4 = ConvBNAct(width_p4, width_p4, 3, stride=2)
        self.bottom_up_p5 = C2fBlock(width_p4 + channels_p5, width_p5, num_blocks, shortcut=False)

        self.feature_dims: dict[str, int] = {"p3": width_p3, "p4": width_p4, "p5": width_p5}
        self.feature_strides: dict[str, int] = {level: int(in_strides[level]) for level in _LEVELS}

    def forward(self, features: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Fuse the pyramid.

        Args:
            features: ``p3 [B, C3, H3, W3]``, ``p4 [B, C4, H4, W4]``, ``p5 [B, C5, H5, W5]``;
                other keys are ignored.

        Returns:
            ``p3``, ``p4``, ``p5`` with ``feature_dims`` channels and the input sizes.
        """
        p3, p4, p5 = features["p3"], features["p4"], features["p5"]
        # NOTE: upsampling to the skip connection's size equals a nearest 2x upsample when
        # sizes divide evenly, and also keeps inputs whose size is not a multiple of 32 working.
        top_down_p4 = self.top_down_p4(torch.cat((_upsample_to(p5, p4), p4), dim=1))
        out_p3 = self.top_down_p3(torch.cat((_upsample_to(top_down_p4, p3), p3), dim=1))
        out_p4 = self.bottom_up_p4(torch.cat((self.downsample_p3(out_p3), top_down_p4), dim=1))
        out_p5 = self.bottom_up_p5(torch.cat((self.downsample_p4(out_p4), p5), dim=1))
        return {"p3": out_p3, "p4": out_p4, "p5": out_p5}

    def get_feature_dims(self) -> dict[str, int]:
        """Channels of each output level."""
        return dict(self.feature_dims)

    def get_feature_strides(self) -> dict[str, int]:
        """Stride of each output level in input pixels."""
        return dict(self.feature_strides)


def _upsample_to(x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, size=reference.shape[-2:], mode="nearest")
