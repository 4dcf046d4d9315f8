"""SAM 2 and SAM 2.1 teachers (Hiera T, S, B+, L) through the official ``sam2`` package.

Paper: Ravi et al., "SAM 2: Segment Anything in Images and Videos", 2024.
Source: https://github.com/facebookresearch/sam2

The model is the official ``SAM2Base`` built by ``sam2.build_sam.build_sam2`` from the
package's own configs (``configs/sam2/...`` and ``configs/sam2.1/...``), with the official
checkpoint's ``{"model": state_dict}`` loaded strictly under its own key names. The
features are the three maps ``SAM2ImagePredictor.set_image`` stores for the mask decoder:

- ``embed`` (256 channels, stride 16): ``_features["image_embed"]``, the FPN's stride-16
  level plus ``no_mem_embed``;
- ``hires_s8`` (64 channels, stride 8): ``_features["high_res_feats"][1]``, after the mask
  decoder's ``conv_s1``;
- ``hires_s4`` (32 channels, stride 4): ``_features["high_res_feats"][0]``, after
  ``conv_s0``.

Other input sizes than 1024 px set ``model.image_size`` through the config, which also
sizes the prompt encoder (``image_size // backbone_stride``); Hiera interpolates its
windowed position embedding to any grid, and no parameter changes shape.

``sam2`` (and with it hydra and omegaconf) is imported inside the functions that need it;
importing ``sam2`` initialises hydra's global config module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import torch

from vfmkd.geometry import Frame, resize_frame
from vfmkd.ops.prompt_decoder import PromptDecoder
from vfmkd.registry import TEACHERS
from vfmkd.teachers.base import BaseTeacher, FeatureSpec
from vfmkd.teachers.sam_teacher import check_rgb_image, load_official_state_dict, prompt_count, unwrap_state_dict

if TYPE_CHECKING:
    from sam2.modeling.sam2_base import SAM2Base

__all__ = [
    "SAM2_VARIANTS",
    "SAM2Teacher",
    "Sam2Variant",
    "build_sam2_model",
    "create_sam2_teacher",
    "sam2_1_hiera_b_plus",
    "sam2_1_hiera_l",
    "sam2_1_hiera_s",
    "sam2_1_hiera_t",
    "sam2_hiera_b_plus",
    "sam2_hiera_l",
    "sam2_hiera_s",
    "sam2_hiera_t",
]

DEFAULT_IMAGE_SIZE = 1024
# Hiera's coarsest stage has stride 32 and the FPN doubles it back to 16.
SIZE_MULTIPLE = 32
# The values of sam2.utils.transforms.SAM2Transforms (ImageNet mean and std on [0, 1]).
PIXEL_MEAN = (0.485, 0.456, 0.406)
PIXEL_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Sam2Variant:
    """One official SAM 2 / SAM 2.1 model.

    Attributes:
        name: registry name (``sam2.1_hiera_b+``).
        config_file: the config inside the ``sam2`` package.
        checkpoint_file: the official checkpoint file of these weights.
    """

    name: str
    config_file: str
    checkpoint_file: str


# As in sam2.build_sam.HF_MODEL_ID_TO_FILENAMES.
SAM2_VARIANTS: dict[str, Sam2Variant] = {
    variant.name: variant
    for variant in (
        Sam2Variant("sam2_hiera_t", "configs/sam2/sam2_hiera_t.yaml", "sam2_hiera_tiny.pt"),
        Sam2Variant("sam2_hiera_s", "configs/sam2/sam2_hiera_s.yaml", "sam2_hiera_small.pt"),
        Sam2Variant("sam2_hiera_b+", "configs/sam2/sam2_hiera_b+.yaml", "sam2_hiera_base_plus.pt"),
        Sam2Variant("sam2_hiera_l", "configs/sam2/sam2_hiera_l.yaml", "sam2_hiera_large.pt"),
        Sam2Variant("sam2.1_hiera_t", "configs/sam2.1/sam2.1_hiera_t.yaml", "sam2.1_hiera_tiny.pt"),
        Sam2Variant("sam2.1_hiera_s", "configs/sam2.1/sam2.1_hiera_s.yaml", "sam2.1_hiera_small.pt"),
        Sam2Variant("sam2.1_hiera_b+", "configs/sam2.1/sam2.1_hiera_b+.yaml", "sam2.1_hiera_base_plus.pt"),
        Sam2Variant("sam2.1_hiera_l", "configs/sam2.1/sam2.1_hiera_l.yaml", "sam2.1_hiera_large.pt"),
    )
}


def build_sam2_model(variant: Sam2Variant, image_size: int = DEFAULT_IMAGE_SIZE) -> SAM2Base:
    """The official ``SAM2Base`` of ``variant`` at random init, on the CPU, in eval mode.

    ``build_sam2`` with ``ckpt_path=None`` (it would ``torch.load`` the file itself) and the
    predictor's default post-processing overrides; ``image_size`` overrides the config's.

    Args:
        variant: which packaged config.
        image_size: side of the square network input, a multiple of 32.
    """
    from sam2.build_sam import build_sam2

    if image_size <= 0 or image_size % SIZE_MULTIPLE:
        raise ValueError(f"SAM2 image_size must be a positive multiple of {SIZE_MULTIPLE}, got {image_size}")
    return build_sam2(
        variant.config_file,
        ckpt_path=None,
        device="cpu",
        mode="eval",
        hydra_overrides_extra=[f"++model.image_size={int(image_size)}"],
    )


class SAM2Teacher(BaseTeacher):
    """A frozen official SAM 2 / 2.1 whose features are ``SAM2ImagePredictor._features``.

    Frame: the image is stretched to ``image_size x image_size`` (aspect ratio not kept),
    so the whole input is valid.

    Args:
        model: the official ``SAM2Base`` with its weights loaded.
        name: the teacher's registry name (``sam2.1_hiera_b+``).
        features: names of the features to extract (default: ``embed``, ``hires_s8``,
            ``hires_s4``).
    """

    def __init__(self, model: SAM2Base, *, name: str, features: Sequence[str] | None = None) -> None:
        super().__init__(features)
        if not model.use_high_res_features_in_sam:
            raise ValueError(
                f"teacher '{name}' needs a SAM2 model with use_high_res_features_in_sam (every official config)"
            )
        self.name = name
        self.model = model
        self.image_size = int(model.image_size)
        self.backbone_stride = int(model.backbone_stride)
        self.embed_channels = int(model.sam_prompt_embed_dim)
        self.hires_s8_channels = int(model.sam_mask_decoder.conv_s1.out_channels)
        self.hires_s4_channels = int(model.sam_mask_decoder.conv_s0.out_channels)
        self.freeze()
        # Fail here, not at the first extraction, on an unknown requested feature.
        self.feature_specs  # noqa: B018

    @property
    def available_specs(self) -> dict[str, FeatureSpec]:
        size = self.image_size
        stride = self.backbone_stride
        return {
            "embed": FeatureSpec(
                "embed",
                self.embed_channels,
                stride,
                size // stride,
                size // stride,
                "SAM2ImagePredictor._features['image_embed']: FPN stride-16 level + no_mem_embed",
            ),
            "hires_s8": FeatureSpec(
                "hires_s8",
                self.hires_s8_channels,
                stride // 2,
                size // (stride // 2),
                size // (stride // 2),
                "SAM2ImagePredictor._features['high_res_feats'][1]: FPN stride-8 level after conv_s1",
            ),
            "hires_s4": FeatureSpec(
                "hires_s4",
                self.hires_s4_channels,
                stride // 4,
                size // (stride // 4),
                size // (stride // 4),
                "SAM2ImagePredictor._features['high_res_feats'][0]: FPN stride-4 level after conv_s0",
            ),
        }

    def frame_for(self, image_hw: tuple[int, int]) -> Frame:
        """Stretch to ``image_size x image_size``; the whole input is valid."""
        return resize_frame((int(image_hw[0]), int(image_hw[1])), (self.image_size, self.image_size))

    def preprocess_image(self, image: np.ndarray) -> tuple[torch.Tensor, Frame]:
        """``SAM2Transforms``' preprocessing of an RGB uint8 ``[H, W, 3]`` image.

        ``ToTensor`` (float in [0, 1]), ``Resize((S, S))`` (bilinear with antialias on the
        float tensor) and ``Normalize(mean, std)``.

        Returns:
            Pixels ``[3, S, S]`` float32 and the image's frame.
        """
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as transforms_functional

        image = check_rgb_image(image)
        frame = self.frame_for(image.shape[:2])
        # ToTensor's arithmetic, on a copy: images decoded by PIL are often read-only arrays.
        tensor = torch.from_numpy(image.transpose(2, 0, 1).copy()).float().div(255)
        resized = transforms_functional.resize(
            tensor, [self.image_size, self.image_size], interpolation=InterpolationMode.BILINEAR, antialias=True
        )
        pixels = transforms_functional.normalize(resized, list(PIXEL_MEAN), list(PIXEL_STD))
        return pixels.contiguous(), frame

    def forward_features(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """The predictor's three maps of preprocessed ``pixels [B, 3, S, S]``.

        Returns:
            ``embed [B, 256, S / 16, S / 16]``, ``hires_s8 [B, 64, S / 8, S / 8]`` and
            ``hires_s4 [B, 32, S / 4, S / 4]``.
        """
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != (3, self.image_size, self.image_size):
            raise ValueError(
                f"teacher '{self.name}' takes pixels [B, 3, {self.image_size}, {self.image_size}], "
                f"got {tuple(pixels.shape)}"
            )
        # forward_image already applies conv_s0 / conv_s1 to the two finest levels.
        levels = self.model.forward_image(pixels)["backbone_fpn"][-self.model.num_feature_levels :]
        embed = levels[-1]
        if self.model.directly_add_no_mem_embed:
            embed = embed + self.model.no_mem_embed.reshape(1, -1, 1, 1)
        return {"embed": embed, "hires_s8": levels[1], "hires_s4": levels[0]}

    def predict_masks(
        self,
        features: Mapping[str, torch.Tensor],
        boxes: torch.Tensor | None = None,
        points: tuple[torch.Tensor, torch.Tensor] | None = None,
        multimask_output: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Low-resolution mask logits from the official prompt encoder and mask decoder.

        Per image this is ``SAM2ImagePredictor._predict``'s low-resolution output (boxes
        become two labelled points ahead of the clicks; logits clamped to [-32, 32]).
        Prompts move to the features' device and are in teacher-input pixels, as the
        predictor takes them after ``transform_coords`` (i.e. ``frame.apply_points`` /
        ``frame.apply_boxes``; the prompt encoder adds half a pixel itself). Autograd is
        left on so a loss can flow into features passed in place of the teacher's own;
        wrap the call in ``torch.inference_mode()`` for plain inference.

        Args:
            features: ``embed [B, 256, S / 16, S / 16]``, ``hires_s8 [B, 64, S / 8, S / 8]``
                and ``hires_s4 [B, 32, S / 4, S / 4]``.
            boxes: ``[B, K, 4]`` xyxy boxes, or None.
            points: ``(coords [B, K, P, 2], labels [B, K, P])`` with labels 1 (foreground),
                0 (background) or -1 (padding), or None.
            multimask_output: three masks per prompt (True) or one (False).

        Returns:
            Mask logits ``[B, K, M, S / 4, S / 4]`` and predicted IoUs ``[B, K, M]``, with
            ``M`` 3 or 1 and ``K`` 1 when no prompt is given.
        """
        missing = [name for name in ("embed", "hires_s8", "hires_s4") if name not in features]
        if missing:
            raise ValueError(
                f"predict_masks needs the features embed, hires_s8 and hires_s4; missing {missing} "
                "(extract them all, e.g. with features=None)"
            )
        embeddings = features["embed"]
        prompt_count(embeddings.shape[0], boxes, points)
        decoder = self.prompt_decoder()
        all_masks, all_scores = [], []
        for index in range(embeddings.shape[0]):
            masks, scores = decoder.decode(
                {name: features[name][index : index + 1] for name in decoder.feature_names},
                boxes=None if boxes is None else boxes[index],
                points=None if points is None else (points[0][index], points[1][index]),
                multimask=multimask_output,
            )
            all_masks.append(masks)
            all_scores.append(scores)
        return torch.stack(all_masks), torch.stack(all_scores)

    def prompt_decoder(self) -> PromptDecoder:
        """The official prompt encoder and mask decoder (shared with this teacher's model)."""
        return PromptDecoder("sam2", self.model.sam_prompt_encoder, self.model.sam_mask_decoder)

    def preprocessing(self) -> dict[str, Any]:
        return {
            "resize": "stretch",
            "image_size": self.image_size,
            "interpolation": "torchvision bilinear antialias on float [0, 1]",
            "scale": 1.0 / 255.0,
            "pixel_mean": list(PIXEL_MEAN),
            "pixel_std": list(PIXEL_STD),
            "pad": "none",
        }


def create_sam2_teacher(
    name: str,
    *,
    checkpoint: Mapping[str, Any] | None = None,
    features: Sequence[str] | None = None,
    image_size: int | None = None,
) -> SAM2Teacher:
    """Build the SAM 2 / 2.1 teacher ``name`` (a key of :data:`SAM2_VARIANTS`).

    Args:
        name: e.g. ``sam2.1_hiera_b+``.
        checkpoint: the official checkpoint as loaded by ``torch.load(path,
            weights_only=True)`` (``{"model": state_dict}``, or the state dict itself);
            None for random init (seed torch before calling).
        features: features to extract (default: all).
        image_size: input side (default 1024); a multiple of 32.
    """
    if name not in SAM2_VARIANTS:
        raise KeyError(f"unknown SAM2 variant '{name}'; known: {', '.join(SAM2_VARIANTS)}")
    variant = SAM2_VARIANTS[name]
    model = build_sam2_model(variant, DEFAULT_IMAGE_SIZE if image_size is None else int(image_size))
    if checkpoint is not None:
        state_dict = unwrap_state_dict(checkpoint, teacher_name=name, expected_file=variant.checkpoint_file)
        load_official_state_dict(model, state_dict, teacher_name=name, expected_file=variant.checkpoint_file)
    teacher = SAM2Teacher(model, name=name, features=features)
    teacher.random_init = checkpoint is None
    return teacher


@TEACHERS.register("sam2_hiera_t")
def sam2_hiera_t(
    *,
    checkpoint: Mapping[str, Any] | None = None,
    features: Sequence[str] | None = None,
    image_size: int | None = None,
) -> SAM2Teacher:
    """SAM 2 Hiera-T (official file ``sam2_hiera_tiny.pt``)."""
    return create_sam2_teacher("sam2_hiera_t", checkpoint=checkpoint, features=features, image_size=image_size)


@TEACHERS.register("sam2_hiera_s")
def sam2_hiera_s(
    *,
    checkpoint: Mapping[str, Any] | None = None,
    features: Sequence[str] | None = None,
    image_size: int | None = None,
) -> SAM2Teacher:
    """SAM 2 Hiera-S (official file ``sam2_hiera_small.pt``)."""
    return create_sam2_teacher("sam2_hiera_s", checkpoint=checkpoint, features=features, image_size=image_size)


@TEACHERS.register("sam2_hiera_b+")
def sam2_hiera_b_plus(
    *,
    checkpoint: Mapping[str, Any] | None = None,
    features: Sequence[str] | None = None,
    image_size: int | None = None,
) -> SAM2Teacher:
    """SAM 2 Hiera-B+ (official file ``sam2_hiera_base_plus.pt``)."""
    return create_sam2_teacher("sam2_hiera_b+", checkpoint=checkpoint, features=features, image_size=image_size)


@TEACHERS.register("sam2_hiera_l")
def sam2_hiera_l(
    *,
    checkpoint: Mapping[str, Any] | None = None,
    features: Sequence[str] | None = None,
    image_size: int | None = None,
) -> SAM2Teacher:
    """SAM 2 Hiera-L (official file ``sam2_hiera_large.pt``)."""
    return create_sam2_teacher("sam2_hiera_l", checkpoint=checkpoint, features=features, image_size=image_size)


@TEACHERS.register("sam2.1_hiera_t")
def sam2_1_hiera_t(
    *,
    checkpoint: Mapping[str, Any] | None = None,
    features: Sequence[str] | None = None,
    image_size: int | None = None,
) -> SAM2Teacher:
    """SAM 2.1 Hiera-T (official file ``sam2.1_hiera_tiny.pt``)."""
    return create_sam2_teacher("sam2.1_hiera_t", checkpoint=checkpoint, features=features, image_size=image_size)


@TEACHERS.register("sam2.1_hiera_s")
def sam2_1_hiera_s(
    *,
    checkpoint: Mapping[str, Any] | None = None,
    features: Sequence[str] | None = None,
    image_size: int | None = None,
) -> SAM2Teacher:
    """SAM 2.1 Hiera-S (official file ``sam2.1_hiera_small.pt``)."""
    return create_sam2_teacher("sam2.1_hiera_s", checkpoint=checkpoint, features=features, image_size=image_size)


@TEACHERS.register("sam2.1_hiera_b+", aliases=("sam2",))
def sam2_1_hiera_b_plus(
    *,
    checkpoint: Mapping[str, Any] | None = None,
    features: Sequence[str] | None = None,
    image_size: int | None = None,
) -> SAM2Teacher:
    """SAM 2.1 Hiera-B+ (official file ``sam2.1_hiera_base_plus.pt``); also registered as ``sam2``."""
    return create_sam2_teacher("sam2.1_hiera_b+", checkpoint=checkpoint, features=features, image_size=image_size)


@TEACHERS.register("sam2.1_hiera_l")
def sam2_1_hiera_l(
    *,
    checkpoint: Mapping[str, Any] | None = None,
    features: Sequence[str] | None = None,
    image_size: int | None = None,
) -> SAM2Teacher:
    """SAM 2.1 Hiera-L (official file ``sam2.1_hiera_large.pt``)."""
    return create_sam2_teacher("sam2.1_hiera_l", checkpoint=checkpoint, features=features, image_size=image_size)
