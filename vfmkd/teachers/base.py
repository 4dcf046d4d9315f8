"""The teacher contract: a frozen foundation model that turns images into named feature maps.

A teacher owns its geometry (:meth:`BaseTeacher.frame_for`: where each original pixel
lands in the teacher's input), its preprocessing (the same resize and normalisation as
the official predictor), and a declared list of named features, each saying exactly
which tensor it is. The feature store and the distillation sources only use this
interface.
"""

from __future__ import annotations

import abc
import hashlib
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from vfmkd.geometry import Frame
from vfmkd.utils.hashing import json_sha256


@dataclass(frozen=True)
class FeatureSpec:
    """One named teacher feature.

    Attributes:
        name: the feature's name (``embed``, ``hires_s8``, ``patch``, ``cls``).
        channels: ``C`` of the ``[B, C, H, W]`` map.
        stride: input pixels per grid cell (0 for a global vector such as ``cls``, stored
            as ``[B, C, 1, 1]``).
        height: grid height ``H`` at the teacher's input size.
        width: grid width ``W``.
        description: which tensor of the official model this is.
    """

    name: str
    channels: int
    stride: int
    height: int
    width: int
    description: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "FeatureSpec":
        return cls(**{key: data[key] for key in ("name", "channels", "stride", "height", "width")},
                   description=data.get("description", ""))


class BaseTeacher(nn.Module, abc.ABC):
    """A frozen teacher. Subclasses set ``name``, build ``self.model`` and implement the hooks.

    Subclasses implement:
        ``frame_for(image_hw) -> Frame``: original image -> teacher input.
        ``preprocess_image(image) -> (pixels [3, S, S] float32, Frame)``: CPU, numpy RGB
            uint8 ``[H, W, 3]`` in; the official predictor's resize, normalisation and pad.
            Runs in DataLoader workers, so it must not touch the GPU.
        ``forward_features(pixels [B, 3, S, S]) -> dict[str, Tensor]``: every feature in
            ``available_specs``, as ``[B, C, H, W]``.
        ``preprocessing() -> dict``: what decides the input (sizes, mean/std, resize
            method), JSON-able; part of the fingerprint.

    Args:
        features: names of the features to extract (default: all available).
    """

    name: str = "teacher"
    # The padding :meth:`preprocess_tensor` puts around the content, in normalised units.
    tensor_pad_value: float = 0.0

    def __init__(self, features: Sequence[str] | None = None) -> None:
        super().__init__()
        self._requested = list(features) if features is not None else None
        self.weights_sha256: str | None = None
        self.random_init = False

    # ------------------------------------------------------------------ contract
    @property
    @abc.abstractmethod
    def available_specs(self) -> dict[str, FeatureSpec]:
        """Every feature this teacher can produce, by name."""

    @abc.abstractmethod
    def frame_for(self, image_hw: tuple[int, int]) -> Frame:
        """The frame mapping an original image of size ``(H, W)`` into the teacher input."""

    @abc.abstractmethod
    def preprocess_image(self, image: np.ndarray) -> tuple[torch.Tensor, Frame]:
        """RGB uint8 ``[H, W, 3]`` -> teacher input ``[3, S, S]`` float32 and its frame."""

    @abc.abstractmethod
    def forward_features(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every available feature of ``pixels [B, 3, S, S]`` as ``[B, C, H, W]``."""

    @abc.abstractmethod
    def preprocessing(self) -> dict[str, Any]:
        """JSON-able description of the preprocessing (part of the fingerprint)."""

    # ------------------------------------------------------------- shared behaviour
    @property
    def feature_specs(self) -> dict[str, FeatureSpec]:
        """The requested features' specs, in request order."""
        available = self.available_specs
        names = self._requested if self._requested is not None else list(available)
        unknown = [name for name in names if name not in available]
        if unknown:
            raise KeyError(
                f"teacher '{self.name}' has no feature(s) {unknown}; available: {', '.join(available)}"
            )
        return {name: available[name] for name in names}

    def train(self, mode: bool = True) -> "BaseTeacher":
        # NOTE: a teacher is always in eval mode, whatever the caller asks.
        return super().train(False)

    def freeze(self) -> "BaseTeacher":
        for parameter in self.parameters():
            parameter.requires_grad_(False)
        return self.eval()

    def preprocess(self, images: Sequence[np.ndarray]) -> tuple[torch.Tensor, list[Frame]]:
        """Batch of :meth:`preprocess_image`: ``[B, 3, S, S]`` and one frame per image."""
        results = [self.preprocess_image(image) for image in images]
        return torch.stack([pixels for pixels, _ in results]), [frame for _, frame in results]

    def input_mean_std(self) -> tuple[list[float], list[float]]:
        """Normalisation mean and std per RGB channel, for images in ``[0, 1]``.

        Read from :meth:`preprocessing` (``pixel_mean`` / ``pixel_std``); values given in
        0-255 units (SAM's) are scaled down.
        """
        settings = self.preprocessing()
        mean = [float(value) for value in settings["pixel_mean"]]
        std = [float(value) for value in settings["pixel_std"]]
        if max(mean) > 1.5:
            mean, std = [value / 255.0 for value in mean], [value / 255.0 for value in std]
        return mean, std

    def preprocess_tensor(self, images: torch.Tensor) -> tuple[torch.Tensor, list[Frame]]:
        """Teacher input from a batch of images already on the device (online distillation).

        The geometry is :meth:`frame_for` of the batch's size (a resize and a pad); the
        resize is bilinear with antialiasing, the padding is :attr:`tensor_pad_value` after
        normalisation (zero unless a teacher says otherwise).
        It follows the official preprocessing up to resampling details, since the
        official code runs on decoded uint8 images instead.

        Args:
            images: ``[B, 3, H, W]`` float in ``[0, 1]``.

        Returns:
            ``[B, 3, S, S]`` normalised teacher input and B frames (image -> teacher input).
        """
        height, width = images.shape[-2:]
        frame = self.frame_for((int(height), int(width)))
        matrix = frame.matrix
        if abs(matrix[0, 1]) > 1e-9 or abs(matrix[1, 0]) > 1e-9 or matrix[0, 0] <= 0 or matrix[1, 1] <= 0:
            raise ValueError(f"{self.name}: preprocess_tensor handles resize-and-pad frames only, got {matrix.tolist()}")
        x0, y0, x1, y1 = frame.valid
        left, top = int(round(x0)), int(round(y0))
        content_w, content_h = int(round(x1)) - left, int(round(y1)) - top
        resized = torch.nn.functional.interpolate(
            images.float(), size=(content_h, content_w), mode="bilinear", align_corners=False,
            antialias=content_h < height or content_w < width,
        )
        mean, std = self.input_mean_std()
        mean_tensor = torch.tensor(mean, device=images.device).view(1, 3, 1, 1)
        std_tensor = torch.tensor(std, device=images.device).view(1, 3, 1, 1)
        resized = (resized - mean_tensor) / std_tensor
        out_h, out_w = frame.input_size
        pixels = resized.new_full((images.shape[0], 3, out_h, out_w), float(self.tensor_pad_value))
        pixels[:, :, top : top + content_h, left : left + content_w] = resized
        return pixels, [frame] * images.shape[0]

    @torch.inference_mode()
    def extract(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """The requested features of preprocessed ``pixels [B, 3, S, S]``."""
        features = self.forward_features(pixels)
        return {name: features[name] for name in self.feature_specs}

    def fingerprint(self) -> str:
        """SHA-256 of the weights, the preprocessing and the feature specs.

        Two stores with the same fingerprint hold interchangeable features.
        """
        return json_sha256(self.fingerprint_fields())

    def fingerprint_fields(self) -> dict[str, Any]:
        """The fields the fingerprint hashes; a mismatch is reported field by field."""
        return {
            "teacher": self.name,
            "weights_sha256": self.weights_sha256 or self.state_dict_sha256(),
            "random_init": self.random_init,
            "preprocessing": self.preprocessing(),
            "features": {name: spec.to_dict() for name, spec in self.feature_specs.items()},
        }

    def state_dict_sha256(self) -> str:
        """Hash of the loaded parameters and buffers (for weights without a file hash)."""
        digest = hashlib.sha256()
        for key, value in sorted(self.state_dict().items()):
            digest.update(key.encode())
            digest.update(value.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        self.weights_sha256 = digest.hexdigest()
        return self.weights_sha256
