"""Plain Vision Transformer student with ViTDet's simple feature pyramid.

ViT: Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021 (arXiv:2010.11929);
Tiny/Small widths from Touvron et al., "Training data-efficient image transformers" (DeiT),
ICML 2021. The transformer is timm's ``VisionTransformer`` (``vit_tiny_patch16_224``,
``vit_small_patch16_224``, ``vit_base_patch16_224``; https://github.com/huggingface/pytorch-image-models),
always built at random init (``pretrained=False``) without a classifier.

Multi-scale outputs come from ViTDet's simple feature pyramid (Li et al., ECCV 2022,
arXiv:2203.16527; :mod:`vfmkd.models.necks.simple_pyramid`) on the last block's stride-16
tokens after the ViT's final LayerNorm: ``p3`` (stride 8) by a 2x transposed convolution,
``p4`` (stride 16) as is, ``p5`` (stride 32) by a 2x2 max pool.

Inputs are RGB in ``[0, 1]``, normalised inside with the mean and std of timm's default
weights for the size (0.5 and 0.5 for all three) unless ``pixel_mean`` / ``pixel_std`` say
otherwise (e.g. ImageNet statistics for DeiT or DINO weights) or ``normalize_input`` is off.

Input sizes: the position table is made for ``img_size`` (default 640, a 40 x 40 grid) and
timm resamples it on the fly (bicubic) for other sizes (``dynamic_img_size``); inputs not
divisible by 16 are zero-padded at the bottom and right (``dynamic_img_pad``).

Optional ``checkpoint``: a local timm or original ViT weights file (e.g. timm's
``vit_small_patch16_224.augreg_in21k_ft_in1k`` safetensors), converted by timm's
``checkpoint_filter_fn`` (which also resamples its position table to ``img_size``) and
loaded strictly except for the classifier head.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from vfmkd.models.backbones.base import BaseBackbone
from vfmkd.models.backbones.timm_backbone import load_timm_checkpoint
from vfmkd.models.necks.simple_pyramid import SimpleFeaturePyramid
from vfmkd.registry import BACKBONES

__all__ = ["VIT_SIZES", "ViTBackbone", "ViTSize", "get_vit_size"]

PATCH_SIZE = 16


@dataclasses.dataclass(frozen=True)
class ViTSize:
    """One ViT variant.

    Attributes:
        timm_name: timm architecture.
        embed_dim: Token width of the transformer.
        out_channels: Default channels of the pyramid levels.
        neck_scale: YOLOv8 PAFPN scale of the default neck.
    """

    timm_name: str
    embed_dim: int
    out_channels: int
    neck_scale: str


# NOTE: ViTDet uses 256 pyramid channels for every size; the smaller students get narrower
# levels (about 2/3 and 1/2 of the token width) to keep the pyramid's share of the cost small.
VIT_SIZES: Mapping[str, ViTSize] = MappingProxyType(
    {
        "tiny": ViTSize("vit_tiny_patch16_224", embed_dim=192, out_channels=128, neck_scale="n"),
        "small": ViTSize("vit_small_patch16_224", embed_dim=384, out_channels=192, neck_scale="s"),
        "base": ViTSize("vit_base_patch16_224", embed_dim=768, out_channels=256, neck_scale="m"),
    }
)


def get_vit_size(size: str) -> ViTSize:
    """Look up a ViT variant by name (``tiny``, ``small`` or ``base``)."""
    try:
        return VIT_SIZES[size]
    except KeyError:
        raise ValueError(f"unknown ViT size '{size}'; choose one of {', '.join(VIT_SIZES)}") from None


@BACKBONES.register("vit")
class ViTBackbone(BaseBackbone):
    """ViT-Tiny/Small/Base patch 16 with outputs ``p3``, ``p4``, ``p5`` at strides 8, 16, 32.

    Args:
        size: ``tiny``, ``small`` or ``base``.
        img_size: Side the position table is made for; a multiple of 16. Other input sizes
            work too (the table is resampled on the fly).
        drop_path_rate: Stochastic depth rate of the last block (timm's linear schedule).
        grad_checkpointing: Recompute each block in the backward pass to save memory.
        checkpoint: Local ViT weights file (timm or original keys); ``None`` for random init.
        out_channels: Channels of the pyramid levels; ``None`` for the size's default
            (tiny 128, small 192, base 256).
        normalize_input: Map ``[0, 1]`` RGB to ``(x - pixel_mean) / pixel_std`` inside the
            backbone; turn off for inputs that are already normalised.
        pixel_mean: Per-channel mean; ``None`` for the one of timm's default weights.
        pixel_std: Per-channel std; ``None`` for the one of timm's default weights.

    Example:
        >>> backbone = ViTBackbone("tiny", img_size=64)
        >>> {k: tuple(v.shape) for k, v in backbone(torch.zeros(1, 3, 64, 64)).items()}
        {'p3': (1, 128, 8, 8), 'p4': (1, 128, 4, 4), 'p5': (1, 128, 2, 2)}
    """

    def __init__(
        self,
        size: str = "small",
        img_size: int = 640,
        drop_path_rate: float = 0.0,
        grad_checkpointing: bool = False,
        checkpoint: str | Path | None = None,
        out_channels: int | None = None,
        normalize_input: bool = True,
        pixel_mean: Sequence[float] | None = None,
        pixel_std: Sequence[float] | None = None,
    ) -> None:
        variant = get_vit_size(size)
        if img_size % PATCH_SIZE:
            raise ValueError(f"ViT img_size must be a multiple of the patch size {PATCH_SIZE}, got {img_size}")
        out_channels = variant.out_channels if out_channels is None else out_channels
        strides = {"p3": 8, "p4": 16, "p5": 32}
        super().__init__(feature_dims={level: out_channels for level in strides}, feature_strides=strides)
        self.size = size
        self.img_size = img_size
        self.vit = _create_vit(variant.timm_name, img_size, drop_path_rate)
        if grad_checkpointing:
            self.vit.set_grad_checkpointing(True)
        if checkpoint is not None:
            load_timm_checkpoint(self.vit, checkpoint, description=f"ViT backbone '{size}'")
        self.normalize_input = normalize_input
        pretrained_cfg = self.vit.pretrained_cfg
        mean = pretrained_cfg["mean"] if pixel_mean is None else pixel_mean
        std = pretrained_cfg["std"] if pixel_std is None else pixel_std
        self.register_buffer("pixel_mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.pyramid = SimpleFeaturePyramid(
            variant.embed_dim, out_channels, in_stride=PATCH_SIZE, level_strides=strides
        )

    @classmethod
    def small_config(cls) -> dict[str, Any]:
        """Constructor kwargs of a small instance (for contract tests and examples)."""
        return {"size": "tiny", "img_size": 64}

    @property
    def grad_checkpointing(self) -> bool:
        """Whether the transformer blocks are recomputed in the backward pass."""
        return bool(self.vit.grad_checkpointing)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Compute the three pyramid levels.

        Args:
            images: ``[B, 3, H, W]`` RGB in ``[0, 1]`` (already normalised when
                ``normalize_input`` is off), any size.

        Returns:
            ``p3 [B, C, ceil(H/8), ceil(W/8)]``, ``p4 [B, C, ceil(H/16), ceil(W/16)]``,
            ``p5 [B, C, ceil(H/32), ceil(W/32)]`` with ``C = feature_dims[level]``.
        """
        height, width = images.shape[-2:]
        if self.normalize_input:
            images = (images - self.pixel_mean.to(images.dtype)) / self.pixel_std.to(images.dtype)
        # Last block's patch tokens after the final norm, as [B, embed_dim, H/16, W/16].
        (tokens,) = self.vit.forward_intermediates(
            images, indices=1, norm=True, output_fmt="NCHW", intermediates_only=True
        )
        levels = self.pyramid(tokens)
        # NOTE: after padding to a multiple of 16, the 2x upsampled p3 can be one row or column
        # longer than ceil(side / 8); that extra line lies wholly in the padding.
        stride = self.feature_strides["p3"]
        levels["p3"] = levels["p3"][..., : math.ceil(height / stride), : math.ceil(width / stride)]
        return levels

    def set_input_size(self, img_size: int) -> None:
        """Make the position table for ``img_size`` (resampled once, bicubic, as timm does on the fly).

        Inputs of that size then use the table as it is, with no resampling in the forward
        (what an exported graph wants); other sizes still work.
        """
        if img_size % PATCH_SIZE:
            raise ValueError(f"ViT input size must be a multiple of the patch size {PATCH_SIZE}, got {img_size}")
        self.vit.set_input_size(img_size=(img_size, img_size))
        self.img_size = img_size

    def default_neck_config(self) -> dict[str, Any]:
        """YOLOv8's PAFPN on top of the pyramid: scale ``n``, ``s``, ``m`` for tiny, small, base."""
        return {"type": "yolov8_pafpn", "scale": VIT_SIZES[self.size].neck_scale}

    def extra_repr(self) -> str:
        return f"size={self.size!r}, img_size={self.img_size}, normalize_input={self.normalize_input}"


def _create_vit(timm_name: str, img_size: int, drop_path_rate: float) -> nn.Module:
    import timm
    from timm.models.vision_transformer import VisionTransformer

    model = timm.create_model(
        timm_name,
        pretrained=False,
        num_classes=0,
        img_size=img_size,
        dynamic_img_size=True,
        dynamic_img_pad=True,
        drop_path_rate=drop_path_rate,
    )
    if not isinstance(model, VisionTransformer):
        raise TypeError(
            f"timm built {type(model).__name__} for '{timm_name}', not a VisionTransformer; "
            "unset TIMM_USE_NAFLEX / TIMM_USE_NAFLEXVIT"
        )
    return model
