"""SAM teachers (ViT-B, ViT-L, ViT-H) through the official ``segment_anything`` package.

Paper: Kirillov et al., "Segment Anything", ICCV 2023.
Source: https://github.com/facebookresearch/segment-anything

The model is built from the official classes (``ImageEncoderViT``, ``PromptEncoder``,
``MaskDecoder``, ``Sam``) with the official hyper-parameters, and the official
checkpoint's state dict is loaded strictly under its own key names. The features equal
what ``SamPredictor`` computes: ``embed`` is ``SamPredictor.get_image_embedding()`` after
``SamPredictor.set_image(image)``.

Other input sizes than SAM's 1024 px build the encoder at that size and resample the
position tables of the 1024-px checkpoint once, when it is loaded: the absolute position
embedding bicubically (as timm's ``resample_abs_pos_embed_nhwc``), the relative position
tables of the global-attention blocks linearly (exactly as the official ``get_rel_pos``
does at run time when a table does not fit). Windowed blocks keep their 14x14 tables.

``segment_anything`` is imported inside the functions that need it, so importing this
module (and registering the teachers) stays cheap.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from vfmkd.geometry import Frame, longest_side_frame
from vfmkd.ops.prompt_decoder import PromptDecoder
from vfmkd.registry import TEACHERS
from vfmkd.teachers.base import BaseTeacher, FeatureSpec
from vfmkd.utils.state_dict import list_keys, load_state_dict_strict

if TYPE_CHECKING:
    from segment_anything.modeling import Sam

__all__ = [
    "SAM_VARIANTS",
    "SAMTeacher",
    "SamVariant",
    "build_sam_model",
    "check_rgb_image",
    "create_sam_teacher",
    "load_official_state_dict",
    "prompt_count",
    "resize_relative_position_table",
    "sam_checkpoint_filter",
    "sam_vit_b",
    "sam_vit_h",
    "sam_vit_l",
    "unwrap_state_dict",
]

logger = logging.getLogger(__name__)

DEFAULT_IMAGE_SIZE = 1024
PATCH_SIZE = 16
PROMPT_EMBED_DIM = 256


@dataclass(frozen=True)
class SamVariant:
    """The hyper-parameters of one official SAM image encoder.

    Attributes:
        name: registry name (``sam_vit_b``).
        encoder_embed_dim: ViT width.
        encoder_depth: number of ViT blocks.
        encoder_num_heads: attention heads per block.
        encoder_global_attn_indexes: blocks with global (not windowed) attention.
        checkpoint_file: the official checkpoint file these weights come from.
    """

    name: str
    encoder_embed_dim: int
    encoder_depth: int
    encoder_num_heads: int
    encoder_global_attn_indexes: tuple[int, ...]
    checkpoint_file: str


# The values of segment_anything.build_sam.build_sam_vit_{b,l,h}.
SAM_VARIANTS: dict[str, SamVariant] = {
    variant.name: variant
    for variant in (
        SamVariant("sam_vit_b", 768, 12, 12, (2, 5, 8, 11), "sam_vit_b_01ec64.pth"),
        SamVariant("sam_vit_l", 1024, 24, 16, (5, 11, 17, 23), "sam_vit_l_0b3195.pth"),
        SamVariant("sam_vit_h", 1280, 32, 16, (7, 15, 23, 31), "sam_vit_h_4b8939.pth"),
    )
}


# --------------------------------------------------------------------------- shared helpers
def check_rgb_image(image: np.ndarray) -> np.ndarray:
    """Check that ``image`` is an RGB uint8 ``[H, W, 3]`` array; return it C-contiguous.

    Contiguity lets views such as ``bgr[..., ::-1]`` through ``torch.from_numpy``; the
    values are unchanged.

    Raises:
        ValueError: for another dtype or shape.
    """
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        description = (
            f"{type(image).__name__} of dtype {image.dtype} and shape {tuple(image.shape)}"
            if isinstance(image, np.ndarray)
            else type(image).__name__
        )
        raise ValueError(f"a teacher takes an RGB uint8 numpy image [H, W, 3], got a {description}")
    return np.ascontiguousarray(image)


def unwrap_state_dict(
    checkpoint: Mapping[str, Any], *, teacher_name: str, expected_file: str
) -> Mapping[str, torch.Tensor]:
    """The state dict inside an official checkpoint: the mapping itself or its ``model`` entry.

    Args:
        checkpoint: what ``torch.load(path, weights_only=True)`` returned for the official
            file (SAM: a plain state dict; SAM2: ``{"model": state_dict}``).
        teacher_name: for error messages.
        expected_file: the official file name, for error messages.

    Raises:
        ValueError: when the mapping holds something other than tensors.
    """
    if not isinstance(checkpoint, Mapping):
        raise ValueError(
            f"checkpoint for teacher '{teacher_name}' must be the mapping loaded from the official file "
            f"'{expected_file}' with torch.load(path, weights_only=True), got {type(checkpoint).__name__}"
        )
    nested = checkpoint.get("model")
    state_dict = nested if isinstance(nested, Mapping) else checkpoint
    not_tensors = [key for key, value in state_dict.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise ValueError(
            f"checkpoint for teacher '{teacher_name}' is not a state dict: entries {list_keys(not_tensors)} are "
            f"not tensors. Expected the official file '{expected_file}' loaded with "
            "torch.load(path, weights_only=True)."
        )
    return state_dict


def load_official_state_dict(
    model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], *, teacher_name: str, expected_file: str
) -> None:
    """Load an official state dict strictly: every key present, none extra, every shape equal.

    Args:
        model: the official model, built at the teacher's input size.
        state_dict: official key names, already adapted to the model's input size.
        teacher_name: for error messages.
        expected_file: the official checkpoint file name, for error messages.

    Raises:
        ValueError: listing (the first few) missing keys, unexpected keys and shape
            mismatches, and naming the official file that was expected.
    """
    load_state_dict_strict(
        model,
        state_dict,
        source=f"checkpoint for teacher '{teacher_name}'",
        hint=f"Expected the official file '{expected_file}' loaded with torch.load(path, weights_only=True).",
    )


def prompt_count(
    batch_size: int,
    boxes: torch.Tensor | None,
    points: tuple[torch.Tensor, torch.Tensor] | None,
) -> int:
    """Check prompt shapes and return ``K``, the prompts per image (1 without prompts).

    Args:
        batch_size: ``B``, the images in the feature batch.
        boxes: ``[B, K, 4]`` xyxy boxes or None.
        points: ``(coords [B, K, P, 2], labels [B, K, P])`` or None.

    Raises:
        ValueError: on a shape that does not fit.
    """
    counts = []
    if boxes is not None:
        if boxes.dim() != 3 or boxes.shape[0] != batch_size or boxes.shape[2] != 4:
            raise ValueError(f"boxes must be [B={batch_size}, K, 4] xyxy, got {tuple(boxes.shape)}")
        counts.append(boxes.shape[1])
    if points is not None:
        coords, labels = points
        if coords.dim() != 4 or coords.shape[0] != batch_size or coords.shape[3] != 2:
            raise ValueError(f"point coords must be [B={batch_size}, K, P, 2], got {tuple(coords.shape)}")
        if tuple(labels.shape) != tuple(coords.shape[:3]):
            raise ValueError(
                f"point labels must be [B, K, P] = {tuple(coords.shape[:3])}, got {tuple(labels.shape)}"
            )
        counts.append(coords.shape[1])
    if len(set(counts)) > 1:
        raise ValueError(f"boxes and points must give the same number of prompts per image, got {counts}")
    return counts[0] if counts else 1


# --------------------------------------------------------------------------- model building
def build_sam_model(variant: SamVariant, image_size: int = DEFAULT_IMAGE_SIZE) -> Sam:
    """The official ``Sam`` model of ``variant`` at random init, for inputs of ``image_size``.

    Follows ``segment_anything.build_sam._build_sam`` with the input size as a parameter.

    Args:
        variant: encoder hyper-parameters.
        image_size: side of the square network input, a multiple of 16.
    """
    from functools import partial

    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    if image_size <= 0 or image_size % PATCH_SIZE:
        raise ValueError(f"SAM image_size must be a positive multiple of {PATCH_SIZE}, got {image_size}")
    embedding_size = image_size // PATCH_SIZE
    model = Sam(
        image_encoder=ImageEncoderViT(
            depth=variant.encoder_depth,
            embed_dim=variant.encoder_embed_dim,
            img_size=image_size,
            mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=variant.encoder_num_heads,
            patch_size=PATCH_SIZE,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=variant.encoder_global_attn_indexes,
            window_size=14,
            out_chans=PROMPT_EMBED_DIM,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=PROMPT_EMBED_DIM,
            image_embedding_size=(embedding_size, embedding_size),
            input_image_size=(image_size, image_size),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=PROMPT_EMBED_DIM, mlp_dim=2048, num_heads=8),
            transformer_dim=PROMPT_EMBED_DIM,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    return model.eval()


def resize_relative_position_table(table: torch.Tensor, length: int) -> torch.Tensor:
    """Linearly resample a relative position table ``[L, C]`` to ``[length, C]``.

    The same computation as the official ``get_rel_pos`` when a table does not fit the
    attention size, done once at load time instead of on every forward.
    """
    resized = F.interpolate(
        table.float().reshape(1, table.shape[0], -1).permute(0, 2, 1), size=length, mode="linear"
    )
    return resized.reshape(-1, length).permute(1, 0).to(table.dtype).contiguous()


def sam_checkpoint_filter(state_dict: Mapping[str, torch.Tensor], model: Sam) -> dict[str, torch.Tensor]:
    """Fit the official (1024-px) position tables to ``model``'s input size.

    ``image_encoder.pos_embed [1, 64, 64, C]`` is resampled bicubically (timm's
    ``resample_abs_pos_embed_nhwc``); ``*.rel_pos_h`` / ``*.rel_pos_w`` ``[2 * 64 - 1, C]``
    of the global-attention blocks linearly (the official ``get_rel_pos``). Other entries
    pass unchanged, so a checkpoint that does not fit still fails the strict load.

    Args:
        state_dict: official key names.
        model: the official ``Sam`` built at the target input size.
    """
    from timm.layers import resample_abs_pos_embed_nhwc

    own = model.state_dict()
    adapted: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        target = own.get(key)
        if target is not None and tuple(value.shape) != tuple(target.shape):
            if key == "image_encoder.pos_embed" and value.dim() == 4 and value.shape[-1] == target.shape[-1]:
                logger.info("resampling %s from %s to %s", key, tuple(value.shape), tuple(target.shape))
                value = resample_abs_pos_embed_nhwc(value, [int(target.shape[1]), int(target.shape[2])])
            elif key.endswith(("rel_pos_h", "rel_pos_w")) and value.dim() == 2 and value.shape[1] == target.shape[1]:
                value = resize_relative_position_table(value, int(target.shape[0]))
        adapted[key] = value
    return adapted


# --------------------------------------------------------------------------- the teacher
class SAMTeacher(BaseTeacher):
    """A frozen official SAM whose ``embed`` feature is ``SamPredictor.get_image_embedding()``.

    Frame: the longest side is resized to ``image_size`` (``ResizeLongestSide`` rounding)
    and the image padded at the bottom and right to ``image_size x image_size``.

    Args:
        model: the official ``segment_anything`` ``Sam`` with its weights loaded.
        name: the teacher's registry name (``sam_vit_b``).
        features: names of the features to extract (default: all, i.e. ``embed``).
    """

    def __init__(self, model: Sam, *, name: str, features: Sequence[str] | None = None) -> None:
        super().__init__(features)
        self.name = name
        self.model = model
        self.image_size = int(model.image_encoder.img_size)
        self.embedding_size = tuple(int(side) for side in model.prompt_encoder.image_embedding_size)
        self.embed_channels = int(model.prompt_encoder.embed_dim)
        # Plain floats, so that preprocessing in DataLoader workers never touches the device.
        self.pixel_mean = tuple(float(value) for value in model.pixel_mean.flatten().tolist())
        self.pixel_std = tuple(float(value) for value in model.pixel_std.flatten().tolist())
        self.freeze()
        # Fail here, not at the first extraction, on an unknown requested feature.
        self.feature_specs  # noqa: B018

    @property
    def available_specs(self) -> dict[str, FeatureSpec]:
        height, width = self.embedding_size
        return {
            "embed": FeatureSpec(
                "embed",
                self.embed_channels,
                self.image_size // height,
                height,
                width,
                "SamPredictor.get_image_embedding(): image_encoder output (after its neck)",
            )
        }

    def frame_for(self, image_hw: tuple[int, int]) -> Frame:
        """Longest side to ``image_size``, padded bottom-right; ``valid`` is the resized image."""
        return longest_side_frame((int(image_hw[0]), int(image_hw[1])), self.image_size)

    def preprocess_image(self, image: np.ndarray) -> tuple[torch.Tensor, Frame]:
        """``SamPredictor.set_image``'s preprocessing of an RGB uint8 ``[H, W, 3]`` image.

        ``ResizeLongestSide.apply_image`` (PIL bilinear on uint8), then
        ``(x - pixel_mean) / pixel_std`` and zero padding at the bottom and right.

        Returns:
            Pixels ``[3, S, S]`` float32 and the image's frame.
        """
        from segment_anything.utils.transforms import ResizeLongestSide

        image = check_rgb_image(image)
        frame = self.frame_for(image.shape[:2])
        resized = ResizeLongestSide(self.image_size).apply_image(image)  # [h, w, 3] uint8
        height, width = resized.shape[:2]
        expected = (int(frame.valid[3]), int(frame.valid[2]))
        if (height, width) != expected:
            raise RuntimeError(
                f"ResizeLongestSide gave {height}x{width}, the frame expects {expected[0]}x{expected[1]}"
            )
        content = torch.from_numpy(resized).permute(2, 0, 1).float()
        mean = torch.tensor(self.pixel_mean, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(self.pixel_std, dtype=torch.float32).view(3, 1, 1)
        normalised = (content - mean) / std
        pixels = F.pad(normalised, (0, self.image_size - width, 0, self.image_size - height))
        return pixels.contiguous(), frame

    def forward_features(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"embed": [B, 256, S / 16, S / 16]}`` of preprocessed ``pixels [B, 3, S, S]``."""
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != (3, self.image_size, self.image_size):
            raise ValueError(
                f"teacher '{self.name}' takes pixels [B, 3, {self.image_size}, {self.image_size}], "
                f"got {tuple(pixels.shape)}"
            )
        return {"embed": self.model.image_encoder(pixels)}

    def predict_masks(
        self,
        features: Mapping[str, torch.Tensor],
        boxes: torch.Tensor | None = None,
        points: tuple[torch.Tensor, torch.Tensor] | None = None,
        multimask_output: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Low-resolution mask logits from the official prompt encoder and mask decoder.

        Per image this is ``SamPredictor.predict_torch`` before its upscaling. Prompts move
        to the features' device and are in teacher-input pixels, as the official predictor
        takes them after ``transform.apply_coords`` / ``apply_boxes`` (i.e.
        ``frame.apply_points`` / ``frame.apply_boxes``; the prompt encoder adds half a pixel
        itself). Autograd is left on so a loss can flow into features passed in place of
        the teacher's own; wrap the call in ``torch.inference_mode()`` for plain inference.

        Args:
            features: at least ``embed [B, 256, S / 16, S / 16]``.
            boxes: ``[B, K, 4]`` xyxy boxes, or None.
            points: ``(coords [B, K, P, 2], labels [B, K, P])`` with labels 1 (foreground),
                0 (background) or -1 (padding), or None.
            multimask_output: three masks per prompt (True) or one (False).

        Returns:
            Mask logits ``[B, K, M, S / 4, S / 4]`` and predicted IoUs ``[B, K, M]``, with
            ``M`` 3 or 1 and ``K`` 1 when no prompt is given.
        """
        if "embed" not in features:
            raise ValueError(f"predict_masks needs the 'embed' feature, got {sorted(features)}")
        embeddings = features["embed"]
        prompt_count(embeddings.shape[0], boxes, points)
        decoder = self.prompt_decoder()
        all_masks, all_scores = [], []
        for index in range(embeddings.shape[0]):
            masks, scores = decoder.decode(
                {"embed": embeddings[index : index + 1]},
                boxes=None if boxes is None else boxes[index],
                points=None if points is None else (points[0][index], points[1][index]),
                multimask=multimask_output,
            )
            all_masks.append(masks)
            all_scores.append(scores)
        return torch.stack(all_masks), torch.stack(all_scores)

    def prompt_decoder(self) -> PromptDecoder:
        """The official prompt encoder and mask decoder (shared with this teacher's model)."""
        return PromptDecoder("sam", self.model.prompt_encoder, self.model.mask_decoder)

    def preprocessing(self) -> dict[str, Any]:
        return {
            "resize": "longest_side",
            "image_size": self.image_size,
            "rounding": "int(side * scale + 0.5)",
            "interpolation": "PIL bilinear on uint8",
            "pixel_mean": list(self.pixel_mean),
            "pixel_std": list(self.pixel_std),
            "pad": "bottom_right",
            "pad_value": 0.0,
        }


# --------------------------------------------------------------------------- factories
def create_sam_teacher(
    name: str,
    *,
    checkpoint: Mapping[str, Any] | None = None,
    features: Sequence[str] | None = None,
    image_size: int | None = None,
) -> SAMTeacher:
    """Build the SAM teacher ``name`` (a key of :data:`SAM_VARIANTS`).

    Args:
        name: ``sam_vit_b``, ``sam_vit_l`` or ``sam_vit_h``.
        checkpoint: the official checkpoint as loaded by ``torch.load(path,
            weights_only=True)`` (a state dict, or ``{"model": state_dict}``); None for
            random init (seed torch before calling).
        features: features to extract (default: all).
        image_size: input side (default 1024); a multiple of 16.
    """
    if name not in SAM_VARIANTS:
        raise KeyError(f"unknown SAM variant '{name}'; known: {', '.join(SAM_VARIANTS)}")
    variant = SAM_VARIANTS[name]
    model = build_sam_model(variant, DEFAULT_IMAGE_SIZE if image_size is None else int(image_size))
    if checkpoint is not None:
        state_dict = unwrap_state_dict(checkpoint, teacher_name=name, expected_file=variant.checkpoint_file)
        load_official_state_dict(
            model,
            sam_checkpoint_filter(state_dict, model),
            teacher_name=name,
            expected_file=variant.checkpoint_file,
        )
    teacher = SAMTeacher(model, name=name, features=features)
    teacher.random_init = checkpoint is None
    return teacher


@TEACHERS.register("sam_vit_b")
def sam_vit_b(
    *,
    checkpoint: Mapping[str, Any] | None = None,
    features: Sequence[str] | None = None,
    image_size: int | None = None,
) -> SAMTeacher:
    """SAM ViT-B (official file ``sam_vit_b_01ec64.pth``)."""
    return create_sam_teacher("sam_vit_b", checkpoint=checkpoint, features=features, image_size=image_size)


@TEACHERS.register("sam_vit_l")
def sam_vit_l(
    *,
    checkpoint: Mapping[str, Any] | None = None,
    features: Sequence[str] | None = None,
    image_size: int | None = None,
) -> SAMTeacher:
    """SAM ViT-L (official file ``sam_vit_l_0b3195.pth``)."""
    return create_sam_teacher("sam_vit_l", checkpoint=checkpoint, features=features, image_size=image_size)


@TEACHERS.register("sam_vit_h", aliases=("sam",))
def sam_vit_h(
    *,
    checkpoint: Mapping[str, Any] | None = None,
    features: Sequence[str] | None = None,
    image_size: int | None = None,
) -> SAMTeacher:
    """SAM ViT-H (official file ``sam_vit_h_4b8939.pth``); also registered as ``sam``."""
    return create_sam_teacher("sam_vit_h", checkpoint=checkpoint, features=features, image_size=image_size)
