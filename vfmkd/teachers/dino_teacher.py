"""DINO, DINOv2 and DINOv3 teachers: timm's ViTs loading Meta's official checkpoint files.

Papers and sources:
    DINO: Caron et al., "Emerging Properties in Self-Supervised Vision Transformers",
        ICCV 2021, https://github.com/facebookresearch/dino
    DINOv2: Oquab et al., "DINOv2: Learning Robust Visual Features without Supervision",
        TMLR 2024, https://github.com/facebookresearch/dinov2 ; with registers: Darcet et
        al., "Vision Transformers Need Registers", ICLR 2024.
    DINOv3: Siméoni et al., "DINOv3", 2025, https://github.com/facebookresearch/dinov3
        (weights gated under the DINOv3 License: request access, then pass the file).

The architecture is timm's (``vision_transformer.VisionTransformer`` for DINO/DINOv2,
``eva.Eva`` with RoPE for DINOv3), built with ``pretrained=False`` and loaded from the
official file through the ``checkpoint_filter_fn`` of the model's own timm module, which
maps the official key names (``register_tokens``, ``storage_tokens``, ``ls1.gamma``,
``mlp.w12``, a DINOv3 ``qkv.bias`` with its masked key part ...) onto timm's, then
strictly: a missing or unexpected key is an error.

Features (both after the final LayerNorm, as the official ``x_norm_patchtokens`` and
``x_norm_clstoken``):
    ``patch``: ``[B, C, S/p, S/p]`` patch tokens, class and register tokens removed,
        stride = patch size ``p`` (8, 14 or 16).
    ``cls``: ``[B, C, 1, 1]`` class token, stride 0.

Input: the image resized to a square ``S x S`` (aspect ratio not kept). Default ``S``:
224 for DINO (its training and evaluation crop), 518 for DINOv2 (its pretrained size:
the 37 x 37 position table needs no resampling), 256 for DINOv3 (timm's pretrained
config; RoPE has no table). ``S`` must be a multiple of ``p``.

Exact to Meta's own code at every ``S``: at another size than the table's, Meta's models
resample the absolute position table at every forward (``interpolate_pos_encoding``),
bicubic, with the flags of each hub function: DINO and DINOv2 with a scale factor of
``(g + 0.1) / M`` and no antialiasing, DINOv2 with registers to the size ``g`` with
antialiasing (``g``: the input's patch grid, ``M``: the table's). The teacher resamples
the table once at load by the same rule (:func:`resample_position_table`), so its tokens
equal the official ``forward_features`` (timm's own checkpoint filter resamples with
antialiasing and no offset, which differs by up to ~0.4 for DINO / DINOv2). DINOv3
builds its RoPE for the input grid; the periods a checkpoint stores
(``rope_embed.periods``, rounded to bfloat16 in Meta's files) are used as stored, as
Meta's hub model does, where timm would recompute them in float32.
"""

from __future__ import annotations

import importlib
import logging
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from vfmkd.geometry import Frame, resize_frame
from vfmkd.registry import TEACHERS
from vfmkd.teachers.base import BaseTeacher, FeatureSpec
from vfmkd.utils.state_dict import load_state_dict_strict

logger = logging.getLogger(__name__)

__all__ = [
    "DINO_VARIANTS", "DinoTeacher", "DinoVariant", "IMAGENET_MEAN", "IMAGENET_STD", "official_to_timm",
    "resample_position_table",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Wrappers that training checkpoints put around the backbone's state dict.
_CONTAINER_KEYS = ("model", "state_dict", "teacher")
_KEY_PREFIXES = ("module.", "backbone.")


@dataclass(frozen=True)
class DinoVariant:
    """One DINO-family teacher.

    Attributes:
        timm_name: timm architecture with the pretrained tag of the official weights.
        family: ``dino``, ``dinov2`` or ``dinov3``.
        patch_size: pixels per patch side (the ``patch`` feature's stride).
        default_image_size: side of the square input when none is given.
        timm_name_without_qkv_bias: DINOv3 only: the timm twin without query/value
            biases, for a checkpoint that has no ``attn.qkv.bias``.
        position_offset: DINO / DINOv2: ``interpolate_offset`` of the official hub
            function (0.1; 0.0 for DINOv2 with registers, which then resamples to a size).
        position_antialias: DINO / DINOv2: ``interpolate_antialias`` of the official hub
            function (False; True for DINOv2 with registers).
    """

    timm_name: str
    family: str
    patch_size: int
    default_image_size: int
    timm_name_without_qkv_bias: str | None = None
    position_offset: float = 0.1
    position_antialias: bool = False

    @property
    def has_position_table(self) -> bool:
        """DINO / DINOv2: an absolute position table; DINOv3: RoPE."""
        return self.family != "dinov3"


def _dinov3(size: str) -> DinoVariant:
    # NOTE: the official DINOv3 ViTs have a qkv bias whose key part is masked to zero;
    # timm's `_qkvb` models hold exactly the query and value parts.
    return DinoVariant(
        f"vit_{size}_patch16_dinov3_qkvb.lvd1689m", "dinov3", 16, 256, f"vit_{size}_patch16_dinov3.lvd1689m"
    )


def _dinov2_registers(timm_name: str) -> DinoVariant:
    # NOTE: Meta's hub builds the register models with interpolate_antialias=True,
    # interpolate_offset=0.0, unlike the DINOv2 models without registers.
    return DinoVariant(timm_name, "dinov2", 14, 518, position_offset=0.0, position_antialias=True)


DINO_VARIANTS: dict[str, DinoVariant] = {
    "dino_vits16": DinoVariant("vit_small_patch16_224.dino", "dino", 16, 224),
    "dino_vitb16": DinoVariant("vit_base_patch16_224.dino", "dino", 16, 224),
    "dino_vits8": DinoVariant("vit_small_patch8_224.dino", "dino", 8, 224),
    "dino_vitb8": DinoVariant("vit_base_patch8_224.dino", "dino", 8, 224),
    "dinov2_vits14": DinoVariant("vit_small_patch14_dinov2.lvd142m", "dinov2", 14, 518),
    "dinov2_vitb14": DinoVariant("vit_base_patch14_dinov2.lvd142m", "dinov2", 14, 518),
    "dinov2_vitl14": DinoVariant("vit_large_patch14_dinov2.lvd142m", "dinov2", 14, 518),
    "dinov2_vitg14": DinoVariant("vit_giant_patch14_dinov2.lvd142m", "dinov2", 14, 518),
    "dinov2_vits14_reg": _dinov2_registers("vit_small_patch14_reg4_dinov2.lvd142m"),
    "dinov2_vitb14_reg": _dinov2_registers("vit_base_patch14_reg4_dinov2.lvd142m"),
    "dinov2_vitl14_reg": _dinov2_registers("vit_large_patch14_reg4_dinov2.lvd142m"),
    "dinov2_vitg14_reg": _dinov2_registers("vit_giant_patch14_reg4_dinov2.lvd142m"),
    "dinov3_vits16": _dinov3("small"),
    "dinov3_vits16plus": _dinov3("small_plus"),
    "dinov3_vitb16": _dinov3("base"),
    "dinov3_vitl16": _dinov3("large"),
    "dinov3_vith16plus": _dinov3("huge_plus"),
}


class DinoTeacher(BaseTeacher):
    """A frozen DINO / DINOv2 / DINOv3 ViT producing ``patch`` and ``cls`` features.

    Args:
        variant_name: key of :data:`DINO_VARIANTS` (``dinov2_vitb14``, ...).
        checkpoint: the object loaded from the official file (a state dict, or a dict
            around one); None leaves timm's random init (seed torch first).
        features: features to extract (default: ``patch`` and ``cls``).
        image_size: side of the square input (default: the variant's, see the module doc).
    """

    def __init__(
        self,
        variant_name: str,
        *,
        checkpoint: Mapping[str, Any] | None = None,
        features: Sequence[str] | None = None,
        image_size: int | None = None,
    ) -> None:
        super().__init__(features)
        if variant_name not in DINO_VARIANTS:
            raise KeyError(f"unknown DINO teacher '{variant_name}'. Known: {', '.join(DINO_VARIANTS)}")
        variant = DINO_VARIANTS[variant_name]
        self.name = variant_name
        self.variant = variant
        self.image_size = int(image_size or variant.default_image_size)
        if self.image_size <= 0 or self.image_size % variant.patch_size:
            raise ValueError(
                f"{variant_name}: image_size {self.image_size} must be a positive multiple of the patch "
                f"size {variant.patch_size} (e.g. {variant.default_image_size})"
            )
        state_dict = official_state_dict(checkpoint) if checkpoint is not None else None
        self.timm_name = variant.timm_name
        if (
            variant.timm_name_without_qkv_bias is not None
            and state_dict is not None
            and not any(key.endswith("attn.qkv.bias") for key in state_dict)
        ):
            self.timm_name = variant.timm_name_without_qkv_bias
        self.model = _create_timm_model(self.timm_name, self.image_size, dynamic_img_size=variant.family == "dinov3")
        # Whether the RoPE periods came from the checkpoint and differ from timm's float32 formula.
        self.stored_rope_periods = False
        if state_dict is not None:
            if variant.has_position_table:
                state_dict = _position_table_for_grid(state_dict, variant, self.image_size // variant.patch_size)
            _load_official(self.model, state_dict, variant_name)
            if "rope_embed.periods" in state_dict:
                self.stored_rope_periods = _use_stored_rope_periods(
                    self.model, state_dict["rope_embed.periods"], variant_name
                )
        self.eval()

    @property
    def patch_size(self) -> int:
        """Input pixels per patch side: the stride of the ``patch`` feature."""
        return self.variant.patch_size

    # ------------------------------------------------------------------ contract
    @property
    def available_specs(self) -> dict[str, FeatureSpec]:
        grid = self.image_size // self.patch_size
        channels = int(self.model.embed_dim)
        return {
            "patch": FeatureSpec(
                "patch", channels, self.patch_size, grid, grid,
                "patch tokens after the final norm (x_norm_patchtokens), class and register tokens removed",
            ),
            "cls": FeatureSpec("cls", channels, 0, 1, 1, "class token after the final norm (x_norm_clstoken)"),
        }

    def frame_for(self, image_hw: tuple[int, int]) -> Frame:
        return resize_frame(tuple(image_hw), (self.image_size, self.image_size))

    def preprocess_image(self, image: np.ndarray) -> tuple[torch.Tensor, Frame]:
        """RGB uint8 ``[H, W, 3]`` -> normalised ``[3, S, S]`` float32 and its frame.

        The image becomes float32 in ``[0, 1]``, is resized to ``S x S`` (bicubic,
        antialiased, ``align_corners=False``; skipped when already that size), clamped to
        ``[0, 1]`` and normalised with the ImageNet mean and std.
        """
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(
                f"{self.name}: expected an RGB uint8 image [H, W, 3], got dtype {image.dtype} shape {image.shape}"
            )
        height, width = image.shape[:2]
        # NOTE: a writable copy only when needed (store and cache arrays are read-only).
        writable = np.require(image, requirements=["C", "W"])
        pixels = torch.from_numpy(writable).permute(2, 0, 1)[None].to(torch.float32) / 255.0
        return self._resize_normalise(pixels)[0].contiguous(), self.frame_for((height, width))

    def preprocess_tensor(self, images: torch.Tensor) -> tuple[torch.Tensor, list[Frame]]:
        """:meth:`preprocess_image` on a batch already on the device (online distillation).

        Args:
            images: ``[B, 3, H, W]`` float RGB in ``[0, 1]``.

        Returns:
            ``[B, 3, S, S]`` teacher input (the same resize and normalisation as
            :meth:`preprocess_image`) and B frames.
        """
        height, width = images.shape[-2:]
        frame = self.frame_for((int(height), int(width)))
        return self._resize_normalise(images.float()), [frame] * images.shape[0]

    def _resize_normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` in ``[0, 1]`` -> ``[B, 3, S, S]`` resized, clamped, normalised."""
        if tuple(pixels.shape[-2:]) != (self.image_size, self.image_size):
            pixels = F.interpolate(
                pixels, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False, antialias=True
            ).clamp_(0.0, 1.0)
        mean = torch.tensor(IMAGENET_MEAN, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
        return (pixels - mean) / std

    def forward_features(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """``pixels [B, 3, S, S]`` -> ``patch [B, C, S/p, S/p]`` and ``cls [B, C, 1, 1]``."""
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, self.image_size, self.image_size):
            raise ValueError(
                f"{self.name}: expected pixels [B, 3, {self.image_size}, {self.image_size}], got {tuple(pixels.shape)}"
            )
        batch = pixels.shape[0]
        grid = self.image_size // self.patch_size
        tokens = self.model.forward_features(pixels)  # [B, prefix + grid * grid, C], final norm applied
        prefix = int(self.model.num_prefix_tokens)  # class token first, then registers
        patch = tokens[:, prefix:].reshape(batch, grid, grid, -1).permute(0, 3, 1, 2).contiguous()
        cls = tokens[:, 0, :, None, None].contiguous()
        return {"patch": patch, "cls": cls}

    def preprocessing(self) -> dict[str, Any]:
        settings = {
            "resize": "square (aspect ratio not kept)",
            "image_size": self.image_size,
            "input": "RGB uint8 / 255 as float32",
            "interpolation": "bicubic",
            "antialias": True,
            "align_corners": False,
            "clamp": [0.0, 1.0],
            "pixel_mean": list(IMAGENET_MEAN),
            "pixel_std": list(IMAGENET_STD),
            "timm_model": self.timm_name,
            "position_embedding": self._position_embedding(),
        }
        if self.stored_rope_periods:
            settings["rope_periods"] = "rope_embed.periods as stored in the checkpoint (Meta's hub model)"
        return settings

    def _position_embedding(self) -> str:
        """How the input grid gets its positions; a changed text refuses stores made otherwise."""
        variant = self.variant
        if not variant.has_position_table:
            return "RoPE computed for the input grid"
        if self.image_size == variant.default_image_size:
            # NOTE: the text of stores made before the resampling followed Meta's code; at
            # the native size nothing is resampled, so those stores stay valid.
            return "absolute table resampled once at load to the input grid by timm (bicubic, antialias)"
        rule = (
            f"scale factor (grid + {variant.position_offset}) / table grid"
            if variant.position_offset
            else "to the grid size"
        )
        antialias = "antialias" if variant.position_antialias else "no antialias"
        return f"absolute table resampled once at load as Meta's interpolate_pos_encoding (bicubic, {rule}, {antialias})"


# --------------------------------------------------------------------- loading
def official_state_dict(checkpoint: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The backbone tensors of an official (or training) DINO checkpoint, official key names.

    Unwraps ``model`` / ``state_dict`` / ``teacher`` containers, strips ``module.`` and
    ``backbone.`` prefixes and drops the DINO projection ``head.*`` of full training
    checkpoints; the backbone-only files Meta publishes pass through unchanged.
    """
    for key in _CONTAINER_KEYS:
        inner = checkpoint.get(key)
        if isinstance(inner, Mapping):
            checkpoint = inner
    state_dict: dict[str, torch.Tensor] = {}
    for key, value in checkpoint.items():
        for prefix in _KEY_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        if key.startswith("head."):
            continue
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"checkpoint entry '{key}' is a {type(value).__name__}, not a tensor")
        state_dict[key] = value
    return state_dict


def official_to_timm(state_dict: Mapping[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Official key names -> ``model``'s, by the ``checkpoint_filter_fn`` of its timm module.

    The filter would resample a position table of another grid timm's way (antialiased,
    no offset); :class:`DinoTeacher` hands it a table already at the model's grid.
    """
    module = importlib.import_module(type(model).__module__)
    # NOTE: timm's DINOv2 conversion pops keys from its argument; give it a copy.
    return module.checkpoint_filter_fn(dict(state_dict), model)


def resample_position_table(
    pos_embed: torch.Tensor, grid: int, *, offset: float, antialias: bool, prefix_tokens: int = 1
) -> torch.Tensor:
    """An official position table for another patch grid, as Meta's ``interpolate_pos_encoding``.

    The same ``F.interpolate`` call as DINO's and DINOv2's forward makes at a non-native
    input size, made once: in float32, bicubic, ``align_corners=False``; with ``offset``
    the scale factor ``(grid + offset) / M`` (which PyTorch also uses to map
    coordinates, so the result differs from resampling to a size), otherwise the size
    ``grid``.

    Args:
        pos_embed: ``[1, prefix_tokens + M * M, C]``, the class token's position first.
        grid: the input's patch grid side ``g``.
        offset: the hub function's ``interpolate_offset`` (0 to resample to the size).
        antialias: the hub function's ``interpolate_antialias``.
        prefix_tokens: leading positions that are not resampled.

    Returns:
        ``[1, prefix_tokens + g * g, C]`` in ``pos_embed``'s dtype (unchanged when ``M == g``).
    """
    prefix, patches = pos_embed[:, :prefix_tokens], pos_embed[:, prefix_tokens:]
    table_grid = math.isqrt(patches.shape[1])
    if table_grid * table_grid != patches.shape[1]:
        raise ValueError(f"position table of {patches.shape[1]} patch positions is not a square grid")
    if table_grid == grid:
        return pos_embed
    channels = patches.shape[-1]
    square = patches.float().reshape(1, table_grid, table_grid, channels).permute(0, 3, 1, 2)
    if offset:
        scale = float(grid + offset) / table_grid
        resampled = F.interpolate(square, scale_factor=(scale, scale), mode="bicubic", antialias=antialias)
    else:
        resampled = F.interpolate(square, size=(grid, grid), mode="bicubic", antialias=antialias)
    if tuple(resampled.shape[-2:]) != (grid, grid):
        raise ValueError(f"resampling a {table_grid}x{table_grid} position table gave {tuple(resampled.shape[-2:])}, "
                         f"not {grid}x{grid}")
    patches = resampled.permute(0, 2, 3, 1).reshape(1, grid * grid, channels).to(pos_embed.dtype)
    return torch.cat([prefix.to(pos_embed.dtype), patches], dim=1)


def _position_table_for_grid(
    state_dict: Mapping[str, torch.Tensor], variant: DinoVariant, grid: int
) -> dict[str, torch.Tensor]:
    """``state_dict`` with its ``pos_embed`` resampled to ``grid`` by the variant's official rule.

    Official DINO and DINOv2 files (registers included) keep the class token's position
    first in ``pos_embed``; timm's filter then finds a table of the model's size and
    leaves it alone.
    """
    state_dict = dict(state_dict)
    if "pos_embed" in state_dict:
        state_dict["pos_embed"] = resample_position_table(
            state_dict["pos_embed"], grid, offset=variant.position_offset, antialias=variant.position_antialias
        )
    return state_dict


def _use_stored_rope_periods(model: torch.nn.Module, periods: torch.Tensor, teacher_name: str) -> bool:
    """Put a DINOv3 checkpoint's RoPE periods into timm's model; True when they differ from timm's.

    Meta's hub model loads ``rope_embed.periods`` from the file (its released files hold
    them rounded to bfloat16); timm drops them and recomputes them in float32. The model
    is built with ``dynamic_img_size``, so its RoPE is computed from ``periods`` at every
    forward.
    """
    rope = model.rope
    if tuple(periods.shape) != tuple(rope.periods.shape):
        raise ValueError(
            f"the checkpoint for teacher '{teacher_name}' does not fit: rope_embed.periods is {tuple(periods.shape)}, "
            f"expected {tuple(rope.periods.shape)}"
        )
    stored = periods.detach().to(device=rope.periods.device, dtype=rope.periods.dtype)
    differs = not torch.equal(stored, rope.periods)
    with torch.no_grad():
        rope.periods.copy_(stored)
    return differs


def _load_official(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], teacher_name: str) -> None:
    # NOTE: timm's filters resample a patch kernel of another size to fit; for a teacher
    # that only ever means the wrong file, so a kernel that does not fit is refused.
    patch_weight = state_dict.get("patch_embed.proj.weight")
    expected_shape = tuple(model.patch_embed.proj.weight.shape)
    if patch_weight is not None and tuple(patch_weight.shape) != expected_shape:
        raise ValueError(
            f"the checkpoint for teacher '{teacher_name}' does not fit: patch_embed.proj.weight is "
            f"{tuple(patch_weight.shape)}, expected {expected_shape}. Is it the official file for {teacher_name}?"
        )
    load_state_dict_strict(
        model,
        official_to_timm(state_dict, model),
        source=f"the checkpoint for teacher '{teacher_name}'",
        hint=f"Is it the official file for {teacher_name}?",
    )


def _create_timm_model(timm_name: str, image_size: int, *, dynamic_img_size: bool) -> torch.nn.Module:
    import timm
    from timm.models.eva import Eva
    from timm.models.vision_transformer import VisionTransformer

    model = timm.create_model(
        timm_name, pretrained=False, num_classes=0, img_size=image_size, dynamic_img_size=dynamic_img_size
    )
    if not isinstance(model, (VisionTransformer, Eva)) or model.cls_token is None:
        raise TypeError(
            f"timm built {type(model).__name__} for '{timm_name}', not a ViT with a class token; "
            "unset TIMM_USE_NAFLEX / TIMM_USE_NAFLEXVIT"
        )
    return model


# -------------------------------------------------------------------- factories
def _build(name: str, checkpoint: Mapping[str, Any] | None, features: Sequence[str] | None,
           image_size: int | None) -> DinoTeacher:
    return DinoTeacher(name, checkpoint=checkpoint, features=features, image_size=image_size)


@TEACHERS.register("dino_vits16")
def dino_vits16(*, checkpoint: Mapping[str, Any] | None = None, features: Sequence[str] | None = None,
                image_size: int | None = None) -> DinoTeacher:
    """DINO ViT-S/16 (21 M), 224 px, official ``dino_deitsmall16_pretrain.pth``."""
    return _build("dino_vits16", checkpoint, features, image_size)


@TEACHERS.register("dino_vitb16")
def dino_vitb16(*, checkpoint: Mapping[str, Any] | None = None, features: Sequence[str] | None = None,
                image_size: int | None = None) -> DinoTeacher:
    """DINO ViT-B/16 (85 M), 224 px, official ``dino_vitbase16_pretrain.pth``."""
    return _build("dino_vitb16", checkpoint, features, image_size)


@TEACHERS.register("dino_vits8")
def dino_vits8(*, checkpoint: Mapping[str, Any] | None = None, features: Sequence[str] | None = None,
               image_size: int | None = None) -> DinoTeacher:
    """DINO ViT-S/8 (21 M), 224 px, official ``dino_deitsmall8_pretrain.pth``."""
    return _build("dino_vits8", checkpoint, features, image_size)


@TEACHERS.register("dino_vitb8")
def dino_vitb8(*, checkpoint: Mapping[str, Any] | None = None, features: Sequence[str] | None = None,
               image_size: int | None = None) -> DinoTeacher:
    """DINO ViT-B/8 (85 M), 224 px, official ``dino_vitbase8_pretrain.pth``."""
    return _build("dino_vitb8", checkpoint, features, image_size)


@TEACHERS.register("dinov2_vits14")
def dinov2_vits14(*, checkpoint: Mapping[str, Any] | None = None, features: Sequence[str] | None = None,
                  image_size: int | None = None) -> DinoTeacher:
    """DINOv2 ViT-S/14 (21 M), 518 px, official ``dinov2_vits14_pretrain.pth``."""
    return _build("dinov2_vits14", checkpoint, features, image_size)


@TEACHERS.register("dinov2_vitb14", aliases=("dino",))
def dinov2_vitb14(*, checkpoint: Mapping[str, Any] | None = None, features: Sequence[str] | None = None,
                  image_size: int | None = None) -> DinoTeacher:
    """DINOv2 ViT-B/14 (86 M), 518 px, official ``dinov2_vitb14_pretrain.pth``; alias ``dino``."""
    return _build("dinov2_vitb14", checkpoint, features, image_size)


@TEACHERS.register("dinov2_vitl14")
def dinov2_vitl14(*, checkpoint: Mapping[str, Any] | None = None, features: Sequence[str] | None = None,
                  image_size: int | None = None) -> DinoTeacher:
    """DINOv2 ViT-L/14 (300 M), 518 px, official ``dinov2_vitl14_pretrain.pth``."""
    return _build("dinov2_vitl14", checkpoint, features, image_size)


@TEACHERS.register("dinov2_vitg14")
def dinov2_vitg14(*, checkpoint: Mapping[str, Any] | None = None, features: Sequence[str] | None = None,
                  image_size: int | None = None) -> DinoTeacher:
    """DINOv2 ViT-g/14 (1.1 B, SwiGLU), 518 px, official ``dinov2_vitg14_pretrain.pth``."""
    return _build("dinov2_vitg14", checkpoint, features, image_size)


@TEACHERS.register("dinov2_vits14_reg")
def dinov2_vits14_reg(*, checkpoint: Mapping[str, Any] | None = None, features: Sequence[str] | None = None,
                      image_size: int | None = None) -> DinoTeacher:
    """DINOv2 ViT-S/14 with 4 registers, 518 px, official ``dinov2_vits14_reg4_pretrain.pth``."""
    return _build("dinov2_vits14_reg", checkpoint, features, image_size)


@TEACHERS.register("dinov2_vitb14_reg")
def dinov2_vitb14_reg(*, checkpoint: Mapping[str, Any] | None = None, features: Sequence[str] | None = None,
                      image_size: int | None = None) -> DinoTeacher:
    """DINOv2 ViT-B/14 with 4 registers, 518 px, official ``dinov2_vitb14_reg4_pretrain.pth``."""
    return _build("dinov2_vitb14_reg", checkpoint, features, image_size)


@TEACHERS.register("dinov2_vitl14_reg")
def dinov2_vitl14_reg(*, checkpoint: Mapping[str, Any] | None = None, features: Sequence[str] | None = None,
                      image_size: int | None = None) -> DinoTeacher:
    """DINOv2 ViT-L/14 with 4 registers, 518 px, official ``dinov2_vitl14_reg4_pretrain.pth``."""
    return _build("dinov2_vitl14_reg", checkpoint, features, image_size)


@TEACHERS.register("dinov2_vitg14_reg")
def dinov2_vitg14_reg(*, checkpoint: Mapping[str, Any] | None = None, features: Sequence[str] | None = None,
                      image_size: int | None = None) -> DinoTeacher:
    """DINOv2 ViT-g/14 with 4 registers, 518 px, official ``dinov2_vitg14_reg4_pretrain.pth``."""
    return _build("dinov2_vitg14_reg", checkpoint, features, image_size)


@TEACHERS.register("dinov3_vits16")
def dinov3_vits16(*, checkpoint: Mapping[str, Any] | None = None, features: Sequence[str] | None = None,
                  image_size: int | None = None) -> DinoTeacher:
    """DINOv3 ViT-S/16 (21 M, 4 registers, RoPE), 256 px; gated file ``dinov3_vits16_pretrain_lvd1689m-*.pth``."""
    return _build("dinov3_vits16", checkpoint, features, image_size)


@TEACHERS.register("dinov3_vits16plus")
def dinov3_vits16plus(*, checkpoint: Mapping[str, Any] | None = None, features: Sequence[str] | None = None,
                      image_size: int | None = None) -> DinoTeacher:
    """DINOv3 ViT-S+/16 (29 M, SwiGLU), 256 px; gated file ``dinov3_vits16plus_pretrain_lvd1689m-*.pth``."""
    return _build("dinov3_vits16plus", checkpoint, features, image_size)


@TEACHERS.register("dinov3_vitb16")
def dinov3_vitb16(*, checkpoint: Mapping[str, Any] | None = None, features: Sequence[str] | None = None,
                  image_size: int | None = None) -> DinoTeacher:
    """DINOv3 ViT-B/16 (86 M), 256 px; gated file ``dinov3_vitb16_pretrain_lvd1689m-*.pth``."""
    return _build("dinov3_vitb16", checkpoint, features, image_size)


@TEACHERS.register("dinov3_vitl16")
def dinov3_vitl16(*, checkpoint: Mapping[str, Any] | None = None, features: Sequence[str] | None = None,
                  image_size: int | None = None) -> DinoTeacher:
    """DINOv3 ViT-L/16 (300 M), 256 px; gated file ``dinov3_vitl16_pretrain_lvd1689m-*.pth``."""
    return _build("dinov3_vitl16", checkpoint, features, image_size)


@TEACHERS.register("dinov3_vith16plus")
def dinov3_vith16plus(*, checkpoint: Mapping[str, Any] | None = None, features: Sequence[str] | None = None,
                      image_size: int | None = None) -> DinoTeacher:
    """DINOv3 ViT-H+/16 (840 M, SwiGLU), 256 px; gated file ``dinov3_vith16plus_pretrain_lvd1689m-*.pth``."""
    return _build("dinov3_vith16plus", checkpoint, features, image_size)
