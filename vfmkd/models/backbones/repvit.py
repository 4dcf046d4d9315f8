"""RepViT backbone, built from timm's implementation.

RepViT (Wang, Chen, Lin, Han and Ding, "RepViT: Revisiting Mobile CNN From ViT Perspective",
CVPR 2024, arXiv:2307.09283; official code https://github.com/THU-MIG/RepViT) is a mobile
CNN redesigned with the macro and micro choices of lightweight ViTs: a separate token mixer
(a RepVGG-style 3x3 depthwise convolution with 1x1 and identity branches, plus squeeze-excite
in every other block) and channel mixer (a 1x1 expansion MLP), and a deeper downsampling
layer. It is the encoder family that RepViT-SAM and EdgeSAM distil SAM into.

The network itself is timm's ``RepVit`` (``timm/models/repvit.py``, adapted by timm from
the official code); this module only picks the outputs, declares them, loads checkpoints
and re-parameterises for deployment:

- Outputs ``p3``, ``p4``, ``p5`` are timm's stages 1, 2 and 3 (strides 8, 16, 32), the same
  taps the official detection and segmentation backbones use (``out_indices`` 2, 6, 20, 24
  for M1.1 include a stride-4 tap, which is dropped here). Channels come from timm's
  ``feature_info``, which the constructor fills from the variant definition.
- :meth:`RepViTBackbone.fuse` folds every Conv-BN pair and every RepVGG depthwise block
  (3x3, 1x1 and identity branches plus the BatchNorm after them) into single convolutions
  with timm's own ``reparameterize_model`` (which calls the modules' ``fuse()`` methods),
  exactly what the official ``utils.replace_batchnorm`` does before reporting parameters.
- Checkpoints: official RepViT training checkpoints (``features.N...`` keys under
  ``model``) or timm checkpoints (``stem...``, ``stages...``). timm ships no key filter for
  RepViT, so :func:`checkpoint_filter_fn` maps official keys here.

Published parameter counts (official README) are of the fused model with its 1000-class
classifier: 5.1 / 6.8 / 8.2 / 14.0 / 22.9 M for M0.9 / M1.0 / M1.1 / M1.5 / M2.3, which
timm's model reproduces (5.07 / 6.81 / 8.24 / 14.05 / 22.93 M). Without the classifier (one
fused ``Linear(C5, 1000)``), the fused backbone here has 4.68 / 6.36 / 7.73 / 13.54 /
22.29 M; before fusion 4.72 / 6.40 / 7.77 / 13.62 / 22.40 M.
"""

from __future__ import annotations

import difflib
import logging
import re
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

import torch
from torch import nn

from vfmkd.models.backbones.base import BaseBackbone
from vfmkd.registry import BACKBONES
from vfmkd.utils.state_dict import load_state_dict_strict

__all__ = ["REPVIT_VARIANTS", "RepViTBackbone", "checkpoint_filter_fn", "normalize_variant_name"]

logger = logging.getLogger(__name__)

# Variant name -> YOLOv8 scale of the default PAFPN neck.
# NOTE: the scale whose PAFPN widths (p3/p4/p5: s 128/256/512, m 192/384/576) are nearest to
# the backbone's; M0.9 (96/192/384) sits halfway between n and s and is rounded up.
REPVIT_VARIANTS: Mapping[str, str] = MappingProxyType(
    {"m0_9": "s", "m1_0": "s", "m1_1": "s", "m1_5": "s", "m2_3": "m"}
)

_LEVEL_STRIDES: Mapping[str, int] = MappingProxyType({"p3": 8, "p4": 16, "p5": 32})
_CLASSIFIER_PREFIXES = ("head.", "classifier.")

# Official stride-1 block parts -> timm ``RepViTBlock`` parts.
_OFFICIAL_BLOCK_PARTS = (
    ("token_mixer.0.", "token_mixer."),
    ("token_mixer.1.", "se."),
    ("channel_mixer.m.0.", "channel_mixer.conv1."),
    ("channel_mixer.m.2.", "channel_mixer.conv2."),
)
# Official stride-2 block parts -> timm ``RepVitDownsample`` parts (without its pre-block).
_OFFICIAL_DOWNSAMPLE_PARTS = (
    ("token_mixer.0.", "spatial_downsample."),
    ("token_mixer.2.", "channel_downsample."),
    ("channel_mixer.m.0.", "ffn.conv1."),
    ("channel_mixer.m.2.", "ffn.conv2."),
)
_OFFICIAL_STEM_PARTS = (("0.", "stem.conv1."), ("2.", "stem.conv2."))
_OFFICIAL_KEY = re.compile(r"^features\.(\d+)\.(.+)$")


def normalize_variant_name(variant: str) -> str:
    """Canonical variant name: ``"M1.1"``, ``"m1.1"`` and ``"m1_1"`` all give ``"m1_1"``.

    Raises:
        ValueError: for an unknown variant, listing the known ones.
    """
    name = variant.strip().lower().replace(".", "_")
    if name.startswith("repvit_"):
        name = name[len("repvit_") :]
    if name not in REPVIT_VARIANTS:
        close = difflib.get_close_matches(name, list(REPVIT_VARIANTS), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ValueError(f"unknown RepViT variant '{variant}'.{hint} Choose one of {', '.join(REPVIT_VARIANTS)}")
    return name


def _official_block_paths(model: nn.Module) -> list[tuple[str, bool]]:
    """timm module path of each official ``features.N`` block (N = 1, 2, ...), in order.

    The official network is a flat list of blocks; timm groups it into stages and moves the
    last stride-1 block before each downsampling into ``stages.i.downsample.pre_block``.

    Returns:
        ``(path, is_downsample)`` for official blocks 1, 2, ...
    """
    from timm.models.repvit import RepVitDownsample

    paths: list[tuple[str, bool]] = []
    for stage_index, stage in enumerate(model.stages):
        if isinstance(stage.downsample, RepVitDownsample):
            paths.append((f"stages.{stage_index}.downsample.pre_block", False))
            paths.append((f"stages.{stage_index}.downsample", True))
        paths.extend((f"stages.{stage_index}.blocks.{block_index}", False) for block_index in range(len(stage.blocks)))
    return paths


def _rename_part(rest: str, parts: tuple[tuple[str, str], ...], where: str) -> str:
    for official, timm_name in parts:
        if rest.startswith(official):
            return timm_name + rest[len(official) :]
    raise KeyError(f"official RepViT key '{where}' has no counterpart in timm's RepVit")


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Turn an official or timm RepViT state dict into ``model``'s keys, without the classifier.

    Official checkpoints (https://github.com/THU-MIG/RepViT, keys ``features.N...``) are
    renamed block by block; timm checkpoints (``stem...``, ``stages...``) pass through. The
    classifier (official ``classifier.*``, timm ``head.*``) is dropped.

    Args:
        state_dict: Parameter name to tensor, as saved by the official code or by timm.
        model: The timm ``RepVit`` the keys are meant for (unfused).

    Returns:
        Parameter name to tensor in ``model``'s naming.
    """
    block_paths: list[tuple[str, bool]] | None = None
    filtered: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.startswith(_CLASSIFIER_PREFIXES):
            continue
        match = _OFFICIAL_KEY.match(key)
        if match is None:
            filtered[key] = value
            continue
        index, rest = int(match.group(1)), match.group(2)
        if index == 0:
            filtered[_rename_part(rest, _OFFICIAL_STEM_PARTS, key)] = value
            continue
        if block_paths is None:
            block_paths = _official_block_paths(model)
        if index > len(block_paths):
            raise KeyError(
                f"official RepViT key '{key}' refers to block {index}, but this variant has {len(block_paths)} "
                "blocks; the checkpoint is of another variant"
            )
        path, is_downsample = block_paths[index - 1]
        parts = _OFFICIAL_DOWNSAMPLE_PARTS if is_downsample else _OFFICIAL_BLOCK_PARTS
        filtered[f"{path}.{_rename_part(rest, parts, key)}"] = value
    return filtered


@BACKBONES.register("repvit")
class RepViTBackbone(BaseBackbone):
    """RepViT with outputs ``p3``, ``p4``, ``p5`` at strides 8, 16, 32.

    Channels per variant: M0.9 96/192/384, M1.0 112/224/448, M1.1 and M1.5 128/256/512,
    M2.3 160/320/640.

    Args:
        variant: ``m0_9``, ``m1_0``, ``m1_1``, ``m1_5`` or ``m2_3`` (``M1.1`` style accepted).
        checkpoint: Optional local checkpoint, official RepViT (``features.N...``) or timm
            (``stem...``/``stages...``) keys, read with ``weights_only=True``; a training
            checkpoint's ``state_dict`` or ``model`` entry is used (not ``model_ema``, as the
            official evaluation does). Loaded strictly apart from the classifier.
        in_channels: Channels of the input images.
        normalize_input: Map ``[0, 1]`` RGB to ImageNet mean/std inside the backbone, as the
            ImageNet checkpoints expect; turn off for inputs that are already normalised.

    Example:
        >>> backbone = RepViTBackbone("m0_9")
        >>> {k: v.shape[1] for k, v in backbone(torch.zeros(1, 3, 64, 64)).items()}
        {'p3': 96, 'p4': 192, 'p5': 384}
    """

    def __init__(
        self,
        variant: str = "m1_1",
        checkpoint: str | Path | None = None,
        in_channels: int = 3,
        normalize_input: bool = True,
    ) -> None:
        import timm
        from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

        name = normalize_variant_name(variant)
        if normalize_input and in_channels != 3:
            raise ValueError(f"normalize_input needs RGB images (in_channels=3), got in_channels={in_channels}")
        # NOTE: num_classes=0 leaves the classifier without parameters; the stages run
        # through timm's forward_intermediates, so the network keeps timm's module names
        # and timm checkpoints load without renaming.
        repvit = timm.create_model(f"repvit_{name}", pretrained=False, num_classes=0, in_chans=in_channels)
        stage_of_stride = {int(info["reduction"]): index for index, info in enumerate(repvit.feature_info)}
        missing = [stride for stride in _LEVEL_STRIDES.values() if stride not in stage_of_stride]
        if missing:
            raise ValueError(f"timm's repvit_{name} has no stage at strides {missing}: {repvit.feature_info}")
        stage_indices = {level: stage_of_stride[stride] for level, stride in _LEVEL_STRIDES.items()}
        super().__init__(
            feature_dims={
                level: int(repvit.feature_info[index]["num_chs"]) for level, index in stage_indices.items()
            },
            feature_strides=dict(_LEVEL_STRIDES),
        )
        self.variant = name
        self.is_fused = False
        self.normalize_input = normalize_input
        self.repvit = repvit
        self._stage_indices = stage_indices
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1), persistent=False)
        if checkpoint is not None:
            self.load_checkpoint(checkpoint)

    @classmethod
    def small_config(cls) -> dict[str, Any]:
        """Constructor kwargs of a small instance (for contract tests and examples)."""
        return {"variant": "m0_9"}

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Compute the three pyramid levels.

        Args:
            images: ``[B, in_channels, H, W]`` RGB in ``[0, 1]`` (or already normalised when
                ``normalize_input`` is off).

        Returns:
            ``p3 [B, C3, H/8, W/8]``, ``p4 [B, C4, H/16, W/16]``, ``p5 [B, C5, H/32, W/32]``
            (sizes rounded up).
        """
        if self.normalize_input:
            images = (images - self.pixel_mean.to(images.dtype)) / self.pixel_std.to(images.dtype)
        indices = sorted(set(self._stage_indices.values()))
        stage_outputs = self.repvit.forward_intermediates(images, indices=indices, intermediates_only=True)
        by_stage = dict(zip(indices, stage_outputs))
        return {level: by_stage[index] for level, index in self._stage_indices.items()}

    @torch.no_grad()
    def fuse(self) -> RepViTBackbone:
        """Re-parameterise for deployment, in place; a second call does nothing.

        Every Conv-BN pair becomes one biased convolution, and every RepVGG depthwise token
        mixer (3x3 and 1x1 depthwise branches, identity, BatchNorm after the sum) becomes one
        3x3 depthwise convolution, using timm's ``reparameterize_model``. In eval mode the
        fused backbone computes the same features as before (up to float rounding) with
        fewer parameters. The state dict's keys change, so save fused weights separately
        from training checkpoints.

        Returns:
            ``self``.
        """
        if self.is_fused:
            return self
        from timm.utils import reparameterize_model

        parameters_before = sum(parameter.numel() for parameter in self.parameters())
        reparameterize_model(self.repvit, inplace=True)
        self.is_fused = True
        logger.info(
            "fused RepViT %s: %d -> %d parameters",
            self.variant,
            parameters_before,
            sum(parameter.numel() for parameter in self.parameters()),
        )
        return self

    def load_checkpoint(self, path: str | Path) -> None:
        """Load official RepViT or timm weights into the (unfused) network, strictly.

        Args:
            path: A ``.pth``/``.pt`` file (read with ``weights_only=True``) or ``.safetensors``.

        Raises:
            FileNotFoundError: when ``path`` is not a file.
            RuntimeError: when the backbone is already fused.
            ValueError: listing missing, unexpected and shape-mismatched keys.
        """
        from timm.models import load_state_dict

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"RepViT checkpoint not found: {path} (resolved to {path.resolve()})")
        if self.is_fused:
            raise RuntimeError("load RepViT checkpoints before fuse(); the fused network has other parameters")
        try:
            state_dict = checkpoint_filter_fn(load_state_dict(str(path), use_ema=False, weights_only=True), self.repvit)
        except KeyError as error:
            raise ValueError(f"RepViT checkpoint {path}: {error.args[0]}") from error
        load_state_dict_strict(
            self.repvit,
            state_dict,
            source=f"RepViT checkpoint {path} for variant '{self.variant}'",
            hint="Is it another variant, or a fused/deployed model?",
        )
        logger.info("loaded RepViT %s weights from %s (%d tensors)", self.variant, path, len(state_dict))

    def default_neck_config(self) -> dict[str, Any]:
        """YOLOv8's PAFPN at the scale whose widths are nearest the variant's (``s``; ``m`` for M2.3)."""
        return {"type": "yolov8_pafpn", "scale": REPVIT_VARIANTS[self.variant]}

    def extra_repr(self) -> str:
        return f"variant={self.variant}, fused={self.is_fused}, normalize_input={self.normalize_input}"
