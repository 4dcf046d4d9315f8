"""The contract every student backbone follows."""

from __future__ import annotations

import abc
from typing import Any

import torch
from torch import nn

__all__ = ["BaseBackbone"]


class BaseBackbone(nn.Module, abc.ABC):
    """A backbone maps images to a dict of named feature maps.

    Subclasses declare, in ``__init__``, the channels and stride of every level they return
    (``feature_dims`` and ``feature_strides``, keyed by level name such as ``p3``), so that
    necks, heads and adapters can be built without a dummy forward. A generic test checks
    every registered backbone's outputs against its declaration.

    Args:
        feature_dims: Channels of each returned level, e.g. ``{"p3": 64, "p4": 128, "p5": 256}``.
        feature_strides: Stride in input pixels of each returned level, same keys.
    """

    def __init__(self, feature_dims: dict[str, int], feature_strides: dict[str, int]) -> None:
        super().__init__()
        if set(feature_dims) != set(feature_strides):
            raise ValueError(
                f"feature_dims levels {sorted(feature_dims)} differ from feature_strides levels "
                f"{sorted(feature_strides)}"
            )
        self.feature_dims: dict[str, int] = dict(feature_dims)
        self.feature_strides: dict[str, int] = dict(feature_strides)

    @abc.abstractmethod
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Compute the declared feature levels.

        Args:
            images: ``[B, 3, H, W]`` normalised images.

        Returns:
            One ``[B, feature_dims[level], H / stride, W / stride]`` map per declared level
            (sizes rounded up for inputs not divisible by the stride).
        """

    def get_feature_dims(self) -> dict[str, int]:
        """Channels of each output level (a copy of ``feature_dims``)."""
        return dict(self.feature_dims)

    def get_feature_strides(self) -> dict[str, int]:
        """Stride of each output level in input pixels (a copy of ``feature_strides``)."""
        return dict(self.feature_strides)

    def default_neck_config(self) -> dict[str, Any] | None:
        """The neck config used when a model config names none; ``None`` means no neck."""
        return None
