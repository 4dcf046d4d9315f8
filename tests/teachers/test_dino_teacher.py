"""DINO / DINOv2 / DINOv3 teachers: official checkpoint layout in, timm's features out.

Each exactness test builds timm's model at random init, writes its weights under the
OFFICIAL key names (``register_tokens``, ``storage_tokens``, ``ls1.gamma``, a DINOv3
``qkv.bias`` with its masked key part, ``mask_token``, ...), loads that through the
teacher and compares with timm's ``forward_features`` on the same input.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models import eva, vision_transformer

from vfmkd.registry import TEACHERS
from vfmkd.teachers.dino_teacher import DINO_VARIANTS, IMAGENET_MEAN, IMAGENET_STD, DinoTeacher, official_state_dict

TOLERANCE = 1e-4


def _reference_model(variant_name: str, image_size: int) -> torch.nn.Module:
    variant = DINO_VARIANTS[variant_name]
    return timm.create_model(
        variant.timm_name, pretrained=False, num_classes=0, img_size=image_size,
        dynamic_img_size=variant.family == "dinov3",
    ).eval()


def _official_layout(
    state: dict[str, torch.Tensor], family: str, seed: int = 0, num_heads: int = 6
) -> dict[str, torch.Tensor]:
    """timm's keys -> the keys and layout of Meta's published files (inverse of timm's filters)."""
    generator = torch.Generator().manual_seed(seed)
    embed_dim = state["cls_token"].shape[-1]
    if family == "dino":
        return dict(state)
    if family == "dinov2":
        official = dict(state)
        official["mask_token"] = torch.randn(1, embed_dim, generator=generator)
        if "reg_token" in official:
            # Official DINOv2 with registers: the class token's position sits in pos_embed.
            class_position = torch.randn(1, 1, embed_dim, generator=generator)
            official["register_tokens"] = official.pop("reg_token")
            official["cls_token"] = state["cls_token"] - class_position
            official["pos_embed"] = torch.cat([class_position, state["pos_embed"]], dim=1)
        return official
    swiglu = any(".mlp.fc1_g." in key for key in state)
    renames = [("gamma_1", "ls1.gamma"), ("gamma_2", "ls2.gamma")]
    if swiglu:
        renames += [("mlp.fc1_g", "mlp.w1"), ("mlp.fc1_x", "mlp.w2"), ("mlp.fc2", "mlp.w3")]
    official = {}
    for key, value in state.items():
        if key == "reg_token":
            official["storage_tokens"] = value
        elif key.endswith(".attn.q_bias"):
            key_bias = torch.randn(value.shape, generator=generator)  # masked to zero by the official model
            official[key.replace("q_bias", "qkv.bias")] = torch.cat([value, key_bias, state[key.replace("q_", "v_")]])
            official[key.replace("q_bias", "qkv.bias_mask")] = torch.cat(
                [torch.ones_like(value), torch.zeros_like(value), torch.ones_like(value)]
            )
        elif not key.endswith(".attn.v_bias"):
            for timm_part, official_part in renames:
                key = key.replace(timm_part, official_part)
            official[key] = value
    official["mask_token"] = torch.randn(1, embed_dim, generator=generator)
    official["rope_embed.periods"] = torch.arange(embed_dim // num_heads // 4, dtype=torch.float32) + 1.0
    return official


def _tokens_to_features(tokens: torch.Tensor, prefix: int, grid: int) -> dict[str, torch.Tensor]:
    patch = tokens[:, prefix:].reshape(tokens.shape[0], grid, grid, -1).permute(0, 3, 1, 2)
    return {"patch": patch, "cls": tokens[:, 0, :, None, None]}


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    rng = np.random.default_rng(1)
    return rng.integers(0, 256, size=(90, 130, 3), dtype=np.uint8)


CASES = [
    ("dino_vits16", 160),
    ("dinov2_vits14", 112),
    ("dinov2_vits14_reg", 112),
    ("dinov3_vits16", 128),
    ("dinov3_vits16plus", 96),
]


@pytest.mark.parametrize(("name", "other_size"), CASES)
def test_official_checkpoint_gives_timm_features(
    name: str,
    other_size: int,
    image: np.ndarray,
    randomise_constant_parameters: Callable[..., None],
    max_abs_error: Callable[[torch.Tensor, torch.Tensor], float],
) -> None:
    variant = DINO_VARIANTS[name]
    torch.manual_seed(0)
    reference = _reference_model(name, variant.default_image_size)
    randomise_constant_parameters(reference, seed=1)
    timm_state = {key: value.clone() for key, value in reference.state_dict().items()}
    official = _official_layout(timm_state, variant.family)

    for size in (variant.default_image_size, other_size):
        teacher = TEACHERS.get(name)(checkpoint=official, image_size=size)
        assert teacher.image_size == size
        if size != variant.default_image_size:
            # timm's own path for pretrained weights at another size: its filter on timm's keys.
            reference = _reference_model(name, size)
            module = eva if variant.family == "dinov3" else vision_transformer
            reference.load_state_dict(module.checkpoint_filter_fn(dict(timm_state), reference))
        pixels, frame = teacher.preprocess_image(image)
        batch = pixels[None]
        features = teacher.extract(batch)
        with torch.inference_mode():
            expected = _tokens_to_features(
                reference.forward_features(batch), reference.num_prefix_tokens, size // variant.patch_size
            )
        grid = size // variant.patch_size
        channels = reference.embed_dim
        assert features["patch"].shape == (1, channels, grid, grid)
        assert features["cls"].shape == (1, channels, 1, 1)
        for key in ("patch", "cls"):
            assert max_abs_error(features[key], expected[key]) <= TOLERANCE, (name, size, key)
        specs = teacher.feature_specs
        assert (specs["patch"].channels, specs["patch"].stride, specs["patch"].height) == (
            channels, variant.patch_size, grid)
        assert (specs["cls"].stride, specs["cls"].height, specs["cls"].width) == (0, 1, 1)
        assert frame.input_size == (size, size)


def test_official_dinov2_register_layout_is_the_published_one() -> None:
    """The fixture writes what Meta's dinov2_vits14_reg4_pretrain.pth holds (guards the inverse)."""
    state = _reference_model("dinov2_vits14_reg", 518).state_dict()
    official = _official_layout(state, "dinov2")
    assert {"cls_token", "pos_embed", "register_tokens", "mask_token", "patch_embed.proj.weight",
            "blocks.0.norm1.weight", "blocks.0.attn.qkv.weight", "blocks.0.ls1.gamma", "blocks.0.mlp.fc1.weight",
            "blocks.0.ls2.gamma", "norm.weight"} <= set(official)
    assert "reg_token" not in official
    assert official["pos_embed"].shape == (1, 1 + 37 * 37, 384)
    assert official["register_tokens"].shape == (1, 4, 384)
    assert official["mask_token"].shape == (1, 384)


def test_dinov3_checkpoint_without_qkv_bias_uses_the_bias_free_model() -> None:
    reference = _reference_model("dinov3_vits16", 256)
    official = _official_layout(reference.state_dict(), "dinov3")
    without_bias = {key: value for key, value in official.items() if "qkv.bias" not in key}
    teacher = TEACHERS.get("dinov3_vits16")(checkpoint=without_bias, image_size=64)
    assert teacher.timm_name == DINO_VARIANTS["dinov3_vits16"].timm_name_without_qkv_bias
    assert teacher.extract(torch.zeros(1, 3, 64, 64))["patch"].shape == (1, 384, 4, 4)


def test_mismatched_checkpoint_is_refused_with_the_keys() -> None:
    official = _official_layout(_reference_model("dino_vits16", 224).state_dict(), "dino")
    official.pop("blocks.3.norm1.weight")
    official["blocks.0.extra.weight"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"blocks\.3\.norm1\.weight.*blocks\.0\.extra\.weight"):
        TEACHERS.get("dino_vits16")(checkpoint=official)
    with pytest.raises(ValueError, match="dino_vits8"):
        TEACHERS.get("dino_vits8")(checkpoint=_official_layout(_reference_model("dino_vits16", 224).state_dict(),
                                                                "dino"))


def test_training_checkpoint_wrappers_are_unwrapped() -> None:
    weight = torch.ones(2)
    checkpoint = {"teacher": {"module.backbone.norm.weight": weight, "head.mlp.0.weight": torch.ones(1)},
                  "epoch": 100}
    assert official_state_dict(checkpoint) == {"norm.weight": weight}
    assert official_state_dict({"model": {"cls_token": weight}}) == {"cls_token": weight}
    with pytest.raises(ValueError, match="not a tensor"):
        official_state_dict({"cls_token": [1, 2]})


def test_preprocess_resizes_bicubic_and_normalises(image: np.ndarray) -> None:
    torch.manual_seed(0)
    teacher = TEACHERS.get("dinov2_vits14")(image_size=56)
    pixels, frame = teacher.preprocess_image(image)
    assert pixels.shape == (3, 56, 56) and pixels.dtype == torch.float32
    source = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255.0
    resized = F.interpolate(source, size=(56, 56), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    expected = (resized[0] - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]
    assert torch.allclose(pixels, expected, atol=1e-6)
    height, width = image.shape[:2]
    corners = frame.apply_points(np.array([[0.0, 0.0], [width, height], [width / 2, height / 2]]))
    assert np.allclose(corners, [[0, 0], [56, 56], [28, 28]])
    assert frame.valid == (0.0, 0.0, 56.0, 56.0) and frame.source_size == (height, width)

    grey = np.full((56, 56, 3), 128, dtype=np.uint8)
    constant, _ = teacher.preprocess_image(grey)
    expected_value = (128 / 255 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    assert np.allclose(constant.mean(dim=(1, 2)).numpy(), expected_value, atol=1e-6)
    assert float(constant.std(dim=(1, 2)).max()) < 1e-6
    online, frames = teacher.preprocess_tensor(source.repeat(2, 1, 1, 1))
    assert online.shape == (2, 3, 56, 56) and torch.allclose(online[1], pixels, atol=1e-6)
    assert frames[0] == frame
    preprocessing = teacher.preprocessing()
    assert preprocessing["interpolation"] == "bicubic" and preprocessing["image_size"] == 56
    assert teacher.input_mean_std() == (list(IMAGENET_MEAN), list(IMAGENET_STD))
    with pytest.raises(ValueError, match="RGB uint8"):
        teacher.preprocess_image(image[..., :2])


def test_requested_features_and_bad_sizes() -> None:
    torch.manual_seed(0)
    teacher = TEACHERS.get("dino_vits16")(features=["cls"], image_size=64)
    assert list(teacher.extract(torch.zeros(2, 3, 64, 64))) == ["cls"]
    with pytest.raises(ValueError, match="multiple of the patch size 14"):
        TEACHERS.get("dinov2_vits14")(image_size=100)
    with pytest.raises(ValueError, match=r"\[B, 3, 64, 64\]"):
        teacher.forward_features(torch.zeros(1, 3, 32, 32))
    with pytest.raises(KeyError, match="available: patch, cls"):
        _ = TEACHERS.get("dino_vits16")(features=["embed"], image_size=64).feature_specs


def test_every_dino_name_is_registered_with_the_shared_signature() -> None:
    expected = {
        "dino_vits16", "dino_vitb16", "dino_vits8", "dino_vitb8",
        "dinov2_vits14", "dinov2_vitb14", "dinov2_vitl14", "dinov2_vitg14",
        "dinov2_vits14_reg", "dinov2_vitb14_reg", "dinov2_vitl14_reg", "dinov2_vitg14_reg",
        "dinov3_vits16", "dinov3_vitb16", "dinov3_vitl16", "dinov3_vith16plus",
    }
    assert expected <= set(TEACHERS.names())
    assert TEACHERS.get("dino") is TEACHERS.get("dinov2_vitb14")
    for name in expected:
        assert timm.is_model(DINO_VARIANTS[name].timm_name.split(".")[0]), name
        assert DINO_VARIANTS[name].default_image_size % DINO_VARIANTS[name].patch_size == 0


def test_teacher_is_frozen_in_eval() -> None:
    torch.manual_seed(0)
    teacher = TEACHERS.get("dino_vits16")(image_size=32).freeze()
    teacher.train()
    assert not teacher.training and not teacher.model.training
    assert all(not parameter.requires_grad for parameter in teacher.parameters())
    assert isinstance(teacher, DinoTeacher) and teacher.name == "dino_vits16"
