"""A vfmkd model as a teacher: a larger student trained here teaches a smaller one.

The checkpoint is either a vfmkd training checkpoint (``runs/<run>/best.pt`` or
``last.pt``, :mod:`vfmkd.core.checkpoint`: the model is rebuilt from its stored config and
loaded with its EMA weights when it has them) or an Ultralytics YOLOv8 detection state
dict (``torch.save(yolo.model.state_dict(), path)``, keys ``model.<N>.*``, renamed by
:mod:`vfmkd.models.ultralytics_compat`; its scale ``n``/``s``/``m``/``l``/``x`` is read
from the stem's width and its ``num_classes`` from the class branches).

Features: any named map of the model (:attr:`~vfmkd.models.unified_model.UnifiedModel.map_dims`):
the neck's ``p3`` / ``p4`` / ``p5``, the backbone's ``backbone.p4`` ..., and the maps the
heads expose (``segmentation.embed``); default: every map (name ``features: [p3, p4, p5]``
to store only the neck's levels).

Input: the student pipeline's own evaluation input at the teacher's size ``S`` (default:
the checkpoint's ``data.img_size``, 640 for an Ultralytics state dict): the image
letterboxed into ``S x S`` (:func:`vfmkd.geometry.letterbox_frame`, aspect kept, content
centred, padding grey 114, bilinear warp of :func:`vfmkd.datasets.warp.warp_image`), RGB
in ``[0, 1]``, no normalisation (vfmkd models normalise their own inputs). A checkpoint
teacher's ``p4`` for an image is therefore exactly that model's ``p4`` under ``vfmkd eval``.

Example (``teachers:`` entry of an experiment config)::

    teachers:
      yolov8s:
        name: vfmkd
        model_path: runs/yolov8s_coco/best.pt
        features: [p3, p4, p5]
        feature_path: teacher_features/yolov8s
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from vfmkd.datasets.warp import PAD_VALUE, warp_image
from vfmkd.geometry import Frame, letterbox_frame
from vfmkd.models import build_model
from vfmkd.models.backbones.yolov8 import YOLOV8_SCALES
from vfmkd.models.ultralytics_compat import convert_ultralytics_state_dict, is_ultralytics_state_dict
from vfmkd.models.unified_model import DETECTION_HEAD, UnifiedModel
from vfmkd.registry import TEACHERS
from vfmkd.teachers.base import BaseTeacher, FeatureSpec
from vfmkd.utils.state_dict import load_state_dict_strict

logger = logging.getLogger(__name__)

__all__ = ["VfmkdTeacher", "ultralytics_model_config"]

ULTRALYTICS_IMAGE_SIZE = 640
_ULTRALYTICS_STEM = "model.0.conv.weight"
_ULTRALYTICS_CLASSES = "model.22.cv3.0.2.weight"


class VfmkdTeacher(BaseTeacher):
    """A frozen vfmkd model producing its named maps (see the module doc).

    Args:
        checkpoint: what the checkpoint file holds: a vfmkd checkpoint dict (``model``,
            ``model_config`` or ``config.model``, optional ``ema``) or an Ultralytics
            YOLOv8 detection state dict.
        features: named maps to extract (default: every map).
        image_size: side of the letterboxed input (default: the checkpoint's training size).

    Raises:
        ValueError: no checkpoint, an unreadable one, or a size that is not a multiple of
            the model's largest stride.
        KeyError: a requested map the model does not have (the message lists its maps).
    """

    name = "vfmkd"

    def __init__(
        self,
        *,
        checkpoint: Mapping[str, Any] | None,
        features: Sequence[str] | None = None,
        image_size: int | None = None,
    ) -> None:
        if checkpoint is None:
            raise ValueError(
                "teacher 'vfmkd' needs model_path: a vfmkd checkpoint (runs/<run>/best.pt) or an Ultralytics "
                "YOLOv8 state dict; it has no architecture of its own to initialise at random"
            )
        model, default_size, weights = _model_from_checkpoint(checkpoint)
        super().__init__(features)
        self.model: UnifiedModel = model.eval()
        self.weights_kind = weights
        self.image_size = int(image_size or default_size)
        largest = max(model.map_strides.values())
        if self.image_size % largest:
            raise ValueError(
                f"teacher 'vfmkd': image_size {self.image_size} must be a multiple of the model's largest "
                f"stride {largest} (e.g. {default_size})"
            )
        # Fail before any work on a map the model does not have.
        self.feature_specs  # noqa: B018

    # ------------------------------------------------------------------ contract
    @property
    def available_specs(self) -> dict[str, FeatureSpec]:
        strides = self.model.map_strides
        specs = {}
        for name, channels in self.model.map_dims.items():
            stride = strides[name]
            grid = self.image_size // stride
            specs[name] = FeatureSpec(name, channels, stride, grid, grid, f"the model's named map '{name}'")
        return specs

    def frame_for(self, image_hw: tuple[int, int]) -> Frame:
        return letterbox_frame(tuple(image_hw), self.image_size, center=True)

    def preprocess_image(self, image: np.ndarray) -> tuple[torch.Tensor, Frame]:
        """RGB uint8 ``[H, W, 3]`` -> letterboxed ``[3, S, S]`` float32 in ``[0, 1]`` and its frame.

        The same warp and grey padding as the student pipeline's evaluation transform.
        """
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"vfmkd teacher: expected an RGB uint8 image [H, W, 3], got {image.dtype} {image.shape}")
        frame = self.frame_for(image.shape[:2])
        canvas = warp_image(image, frame.matrix, frame.input_size, PAD_VALUE)
        pixels = torch.from_numpy(canvas).permute(2, 0, 1).to(torch.float32) / 255.0
        return pixels.contiguous(), frame

    # NOTE: online passes pad with the pipeline's grey, as the student's own inputs are.
    tensor_pad_value = PAD_VALUE / 255.0

    def forward_features(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """``pixels [B, 3, S, S]`` in ``[0, 1]`` -> every named map ``[B, C, S / stride, S / stride]``."""
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, self.image_size, self.image_size):
            raise ValueError(
                f"vfmkd teacher: expected pixels [B, 3, {self.image_size}, {self.image_size}], got {tuple(pixels.shape)}"
            )
        return {name: value.float() for name, value in self.model(pixels)["maps"].items()}

    def preprocessing(self) -> dict[str, Any]:
        return {
            "resize": "letterbox (aspect ratio kept, content centred, bilinear warp)",
            "image_size": self.image_size,
            "input": "RGB uint8 / 255 as float32 (the model normalises its own input)",
            "pad_value": PAD_VALUE,
            "pixel_mean": [0.0, 0.0, 0.0],
            "pixel_std": [1.0, 1.0, 1.0],
            "model": self.model.config,
            "weights": self.weights_kind,
        }


# --------------------------------------------------------------------- loading
def ultralytics_model_config(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The vfmkd model config of an Ultralytics YOLOv8 detection state dict, read from its shapes.

    The scale follows from the stem's output channels (16, 32, 48, 64, 80 for n, s, m, l,
    x) and ``num_classes`` from the first class branch's last convolution.

    Raises:
        ValueError: a key it needs is missing or the stem width matches no YOLOv8 scale.
    """
    missing = [key for key in (_ULTRALYTICS_STEM, _ULTRALYTICS_CLASSES) if key not in state_dict]
    if missing:
        raise ValueError(
            f"Ultralytics state dict without {missing}: only YOLOv8 detection models (yolov8{{n,s,m,l,x}}.yaml) "
            "can be teachers"
        )
    stem = int(state_dict[_ULTRALYTICS_STEM].shape[0])
    scales = [name for name, scale in YOLOV8_SCALES.items() if scale.channels(64) == stem]
    if not scales:
        raise ValueError(f"Ultralytics state dict: stem width {stem} matches no YOLOv8 scale ({', '.join(YOLOV8_SCALES)})")
    return {
        "backbone": {"type": "yolov8", "scale": scales[0]},
        "heads": {DETECTION_HEAD: {"type": "yolo_head", "num_classes": int(state_dict[_ULTRALYTICS_CLASSES].shape[0])}},
    }


def _model_from_checkpoint(checkpoint: Mapping[str, Any]) -> tuple[UnifiedModel, int, str]:
    """The model, its default input size and which weights were loaded (``ema`` / ``model`` / ``ultralytics``)."""
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"teacher 'vfmkd': the checkpoint holds a {type(checkpoint).__name__}, not a dict")
    if is_ultralytics_state_dict(checkpoint):
        model = build_model(ultralytics_model_config(checkpoint))
        load_state_dict_strict(
            model, convert_ultralytics_state_dict(checkpoint, head_name=DETECTION_HEAD),
            source="teacher 'vfmkd' (Ultralytics YOLOv8 state dict)",
        )
        return model, ULTRALYTICS_IMAGE_SIZE, "ultralytics"
    if "model" not in checkpoint:
        raise ValueError(
            "teacher 'vfmkd': the checkpoint is neither a vfmkd checkpoint (a dict with 'model' and "
            "'model_config', as runs/<run>/best.pt) nor an Ultralytics YOLOv8 state dict (keys model.<N>.*); "
            f"its keys: {sorted(checkpoint)[:10]}"
        )
    config = checkpoint.get("config") or {}
    model_config = checkpoint.get("model_config") or config.get("model")
    if model_config is None:
        raise ValueError("teacher 'vfmkd': the checkpoint stores no model config; cannot rebuild the architecture")
    model = build_model(model_config)
    ema = checkpoint.get("ema")
    weights = "ema" if ema else "model"
    load_state_dict_strict(model, ema["module"] if ema else checkpoint["model"], source=f"teacher 'vfmkd' ({weights} weights)")
    image_size = int((config.get("data") or {}).get("img_size") or ULTRALYTICS_IMAGE_SIZE)
    return model, image_size, weights


@TEACHERS.register("vfmkd")
def vfmkd_teacher(
    *, checkpoint: Mapping[str, Any] | None = None, features: Sequence[str] | None = None, image_size: int | None = None
) -> VfmkdTeacher:
    """A vfmkd checkpoint or an Ultralytics YOLOv8 state dict as a teacher (module doc)."""
    return VfmkdTeacher(checkpoint=checkpoint, features=features, image_size=image_size)
