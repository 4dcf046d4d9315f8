"""Any timm model with intermediate features as a teacher (ConvNeXt, ResNet, ViT, EVA, CLIP / SigLIP towers ...).

Source: timm, https://github.com/huggingface/pytorch-image-models. The architecture is
``timm.create_model(timm_model, pretrained=False)``; ``model_path`` is a state dict in
timm's key names (``torch.save(model.state_dict(), path)`` or a ``.safetensors`` file
from the hub), loaded strictly. Nothing is downloaded.

Features: ``stage<i>``, the ``i``-th entry of the model's ``feature_info`` (timm's
``out_indices`` numbering: ``stage0`` is ResNet's stride-2 ``act1``, ConvNeXt's first stage,
a ViT's first block), taken by the model's own ``forward_intermediates`` (what timm's
``features_only=True`` runs), ``[B, C, H / stride, W / stride]``. Default: every level.

Input: the image resized to the pretrained ``input_size`` (``H x W``; ``image_size`` makes
it ``S x S``) with the pretrained interpolation, aspect ratio not kept, then
``ToTensor`` and the pretrained mean / std -- timm's own eval transform
(``create_transform(**resolve_model_data_config(model), crop_pct=1.0, crop_mode="squash")``),
which :meth:`TimmTeacher.preprocess_image` runs. NOTE: not the centre crop of timm's
classification eval (``crop_pct`` < 1 cuts the borders): a distillation teacher must see the
whole image so that every student cell has a teacher target; the frame is therefore a
plain resize (:func:`vfmkd.geometry.resize_frame`), exact for that transform.

Example (``teachers:`` entry)::

    teachers:
      convnext:
        name: timm
        timm_model: convnext_tiny
        model_path: weights/convnext_tiny.safetensors
        features: [stage1, stage2, stage3]
"""

from __future__ import annotations

import difflib
import logging
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from vfmkd.geometry import Frame, resize_frame
from vfmkd.registry import TEACHERS
from vfmkd.teachers.base import BaseTeacher, FeatureSpec
from vfmkd.utils.state_dict import load_state_dict_strict

logger = logging.getLogger(__name__)

__all__ = ["TimmTeacher", "timm_state_dict"]

_CONTAINER_KEYS = ("state_dict", "model")


class TimmTeacher(BaseTeacher):
    """A frozen timm model producing its ``feature_info`` levels (see the module doc).

    Args:
        timm_model: timm architecture name (``convnext_atto``, ``vit_base_patch16_clip_224``).
        checkpoint: a timm state dict (or a dict holding one under ``state_dict`` /
            ``model``); None keeps timm's random init (seed torch first).
        features: ``stage<i>`` names to extract (default: all).
        image_size: side of a square input (default: the pretrained ``input_size``).

    Raises:
        ValueError: no ``timm_model``, or an unknown one (with the closest timm names).
        KeyError: a requested level the model does not have (the message lists them).
    """

    name = "timm"

    def __init__(
        self,
        *,
        timm_model: str | None = None,
        checkpoint: Mapping[str, Any] | None = None,
        features: Sequence[str] | None = None,
        image_size: int | None = None,
    ) -> None:
        super().__init__(features)
        import timm
        from timm.data import create_transform, resolve_model_data_config

        self.timm_model = _checked_model_name(timm, timm_model)
        options = {"img_size": int(image_size)} if image_size and _takes_img_size(timm, self.timm_model) else {}
        self.model = timm.create_model(self.timm_model, pretrained=False, **options)
        if not hasattr(self.model, "forward_intermediates"):
            raise ValueError(
                f"teacher 'timm': {self.timm_model} has no forward_intermediates in timm {timm.__version__}; "
                "pick a model with intermediate features (ConvNeXt, ResNet, ViT, EVA, ...)"
            )
        if checkpoint is not None:
            load_state_dict_strict(self.model, timm_state_dict(checkpoint), source=f"teacher 'timm' ({self.timm_model})")
        data_config = resolve_model_data_config(self.model)
        if image_size:
            data_config["input_size"] = (3, int(image_size), int(image_size))
        self.input_hw = (int(data_config["input_size"][1]), int(data_config["input_size"][2]))
        self.interpolation = str(data_config["interpolation"])
        self.mean = [float(value) for value in data_config["mean"]]
        self.std = [float(value) for value in data_config["std"]]
        self.transform = create_transform(
            input_size=data_config["input_size"], interpolation=self.interpolation, mean=tuple(self.mean),
            std=tuple(self.std), crop_pct=1.0, crop_mode="squash",
        )
        self.levels = {f"stage{index}": info for index, info in enumerate(self.model.feature_info)}
        self.feature_specs  # noqa: B018  (fail on an unknown level before any work)
        self.eval()

    @property
    def image_size(self) -> int:
        """Side of the input when square, else its height."""
        return self.input_hw[0]

    # ------------------------------------------------------------------ contract
    @property
    def available_specs(self) -> dict[str, FeatureSpec]:
        height, width = self.input_hw
        specs = {}
        for name, info in self.levels.items():
            stride = int(info["reduction"])
            specs[name] = FeatureSpec(
                name, int(info["num_chs"]), stride, height // stride, width // stride,
                f"timm {self.timm_model} forward_intermediates output of '{info['module']}'",
            )
        return specs

    def frame_for(self, image_hw: tuple[int, int]) -> Frame:
        return resize_frame(tuple(image_hw), self.input_hw)

    def preprocess_image(self, image: np.ndarray) -> tuple[torch.Tensor, Frame]:
        """RGB uint8 ``[H, W, 3]`` -> ``[3, H_in, W_in]`` float32 through timm's own eval transform."""
        from PIL import Image

        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"timm teacher: expected an RGB uint8 image [H, W, 3], got {image.dtype} {image.shape}")
        pixels = self.transform(Image.fromarray(np.ascontiguousarray(image)))
        return pixels.to(torch.float32).contiguous(), self.frame_for(image.shape[:2])

    def forward_features(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """``pixels [B, 3, H_in, W_in]`` -> every level ``[B, C, H_in / stride, W_in / stride]``."""
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, *self.input_hw):
            raise ValueError(f"timm teacher: expected pixels [B, 3, {self.input_hw[0]}, {self.input_hw[1]}], got {tuple(pixels.shape)}")
        outputs = self.model.forward_intermediates(pixels, indices=list(range(len(self.levels))), intermediates_only=True)
        return {name: output.float() for name, output in zip(self.levels, outputs, strict=True)}

    def preprocessing(self) -> dict[str, Any]:
        return {
            "resize": "plain resize to the input size (aspect ratio not kept; timm eval transform, crop_pct 1.0, squash)",
            "image_size": self.image_size,
            "input_size": list(self.input_hw),
            "input": "RGB uint8 through PIL resize, ToTensor",
            "interpolation": self.interpolation,
            "pixel_mean": self.mean,
            "pixel_std": self.std,
            "timm_model": self.timm_model,
        }


def timm_state_dict(checkpoint: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors of a timm state dict file, unwrapped from ``state_dict`` / ``model`` and ``module.``."""
    for key in _CONTAINER_KEYS:
        inner = checkpoint.get(key)
        if isinstance(inner, Mapping):
            checkpoint = inner
    state_dict = {}
    for key, value in checkpoint.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"teacher 'timm': checkpoint entry '{key}' is a {type(value).__name__}, not a tensor")
        state_dict[key.removeprefix("module.")] = value
    return state_dict


def _checked_model_name(timm: Any, timm_model: str | None) -> str:
    if not timm_model:
        raise ValueError("teacher 'timm' needs timm_model: the timm architecture name (e.g. timm_model: convnext_tiny)")
    name = timm_model.split(".")[0]
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5)
        raise ValueError(
            f"teacher 'timm': unknown timm_model '{timm_model}'"
            + (f"; closest: {', '.join(close)}" if close else "")
            + " (timm.list_models() lists them all)"
        )
    return timm_model


def _takes_img_size(timm: Any, timm_model: str) -> bool:
    """Whether the model is built for a fixed input size (ViT-style: a position table)."""
    config = timm.get_pretrained_cfg(timm_model.split(".")[0]) if "." not in timm_model else timm.get_pretrained_cfg(timm_model)
    return bool(getattr(config, "fixed_input_size", False))


@TEACHERS.register("timm")
def timm_teacher(
    *,
    timm_model: str | None = None,
    checkpoint: Mapping[str, Any] | None = None,
    features: Sequence[str] | None = None,
    image_size: int | None = None,
) -> TimmTeacher:
    """Any timm model with intermediate features (module doc); ``timm_model`` names it."""
    return TimmTeacher(timm_model=timm_model, checkpoint=checkpoint, features=features, image_size=image_size)
