"""DINO / DINOv2 / DINOv3 teachers: official checkpoints in, the official code's tokens out.

DINO and DINOv2 are checked against Meta's own forward (``official_dino.py``, an
attributed copy used as the oracle only) at the native size and at others, where the
official models resample their position table at every forward. DINOv3 (licence: the
DINOv3 License, so no copy) is checked against timm's model, whose RoPE follows Meta's
formula, rebuilt here from the formula with the checkpoint's stored periods.

The timm comparisons build timm's model at random init, write its weights under the
OFFICIAL key names (``register_tokens``, ``storage_tokens``, ``ls1.gamma``, a DINOv3
``qkv.bias`` with its masked key part, ``mask_token``, ``rope_embed.periods``, ...), load
that through the teacher and compare with timm's ``forward_features`` on the same input.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models import eva, vision_transformer

from official_dino import DinoV1VisionTransformer, DinoV2VisionTransformer
from vfmkd.features.extract import extract_features
from vfmkd.features.format import describe_differences
from vfmkd.features.store import FeatureStore
from vfmkd.registry import TEACHERS
from vfmkd.teachers.dino_teacher import (
    DINO_VARIANTS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    DinoTeacher,
    official_state_dict,
    resample_position_table,
)

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
    official["rope_embed.periods"] = _bfloat16_periods(embed_dim // num_heads)
    return official


def _bfloat16_periods(head_dim: int, base: float = 100.0) -> torch.Tensor:
    """DINOv3's RoPE periods as its released files hold them: computed and stored in bfloat16."""
    exponents = 2 * torch.arange(head_dim // 4, dtype=torch.bfloat16) / (head_dim // 2)
    return base ** exponents


def _tokens_to_features(tokens: torch.Tensor, prefix: int, grid: int) -> dict[str, torch.Tensor]:
    patch = tokens[:, prefix:].reshape(tokens.shape[0], grid, grid, -1).permute(0, 3, 1, 2)
    return {"patch": patch, "cls": tokens[:, 0, :, None, None]}


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    rng = np.random.default_rng(1)
    return rng.integers(0, 256, size=(90, 130, 3), dtype=np.uint8)


TIMM_CASES = [
    ("dino_vits16", (224,)),
    ("dinov2_vits14", (518,)),
    ("dinov2_vits14_reg", (518,)),
    ("dinov3_vits16", (256, 128)),
    ("dinov3_vits16plus", (256, 96)),
]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "sizes"), TIMM_CASES)
def test_official_checkpoint_gives_timm_features(
    name: str,
    sizes: tuple[int, ...],
    image: np.ndarray,
    randomise_constant_parameters: Callable[..., None],
    max_abs_error: Callable[[torch.Tensor, torch.Tensor], float],
) -> None:
    """timm equals Meta's code where no position table is resampled: DINO / DINOv2 at the
    native size, DINOv3 (RoPE) at every size, with the checkpoint's stored periods."""
    variant = DINO_VARIANTS[name]
    torch.manual_seed(0)
    reference = _reference_model(name, variant.default_image_size)
    randomise_constant_parameters(reference, seed=1)
    timm_state = {key: value.clone() for key, value in reference.state_dict().items()}
    official = _official_layout(timm_state, variant.family)

    for size in sizes:
        teacher = TEACHERS.get(name)(checkpoint=official, image_size=size)
        assert teacher.image_size == size
        reference = _reference_model(name, size)
        reference.load_state_dict(eva.checkpoint_filter_fn(dict(timm_state), reference)
                                  if variant.family == "dinov3" else timm_state)
        if variant.family == "dinov3":
            reference.rope.periods.copy_(official["rope_embed.periods"])
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


# --------------------------------------------------------------- Meta's own code
def _official_model(name: str) -> torch.nn.Module:
    """Meta's model as its hub function builds it (``dinov2_vits14``: img_size 518, init_values 1.0, ...)."""
    variant = DINO_VARIANTS[name]
    if variant.family == "dino":
        return DinoV1VisionTransformer(img_size=224, patch_size=variant.patch_size)
    return DinoV2VisionTransformer(
        img_size=518, patch_size=14, init_values=1.0, num_register_tokens=4 if name.endswith("_reg") else 0,
        interpolate_antialias=name.endswith("_reg"), interpolate_offset=0.0 if name.endswith("_reg") else 0.1,
    )


def _official_features(model: torch.nn.Module, pixels: torch.Tensor, patch_size: int) -> dict[str, torch.Tensor]:
    """``patch [B, C, g, g]`` and ``cls [B, C, 1, 1]``: DINOv2's ``x_norm_patchtokens`` / ``x_norm_clstoken``,
    DINO's normed tokens of the last block (``get_intermediate_layers(x, 1)``)."""
    with torch.inference_mode():
        if isinstance(model, DinoV1VisionTransformer):
            tokens = model.get_intermediate_layers(pixels, 1)[0]
            patch, cls = tokens[:, 1:], tokens[:, 0]
        else:
            output = model.forward_features(pixels)
            patch, cls = output["x_norm_patchtokens"], output["x_norm_clstoken"]
    grid = pixels.shape[-1] // patch_size
    return {"patch": patch.reshape(pixels.shape[0], grid, grid, -1).permute(0, 3, 1, 2),
            "cls": cls[:, :, None, None]}


class _OneImage:
    """The smallest data set ``extract_features`` reads: one image."""

    def __init__(self, image: np.ndarray) -> None:
        self.image = image
        self.ids = ["image"]

    def __len__(self) -> int:
        return 1

    def load_raw(self, index: int) -> dict:
        return {"image": self.image, "id": self.ids[index]}


META_CASES = [
    ("dino_vits16", (224, 320)),
    ("dino_vits8", (96,)),  # downsampled table: 28 -> 12
    ("dinov2_vits14", (518, 224, 112)),
    ("dinov2_vits14_reg", (518, 224)),
]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "sizes"), META_CASES)
def test_tokens_equal_metas_code_at_every_size(
    name: str,
    sizes: tuple[int, ...],
    non_square_image: np.ndarray,
    tmp_path,
    randomise_constant_parameters: Callable[..., None],
    max_abs_error: Callable[[torch.Tensor, torch.Tensor], float],
) -> None:
    variant = DINO_VARIANTS[name]
    torch.manual_seed(0)
    official_model = _official_model(name).eval()
    randomise_constant_parameters(official_model, seed=2)
    checkpoint = {key: value.clone() for key, value in official_model.state_dict().items()}

    checked_other_paths = False
    for size in sizes:
        teacher = TEACHERS.get(name)(checkpoint=checkpoint, image_size=size)
        pixels, _ = teacher.preprocess_image(non_square_image)
        expected = _official_features(official_model, pixels[None], variant.patch_size)
        features = teacher.extract(pixels[None])
        for key in ("patch", "cls"):
            assert max_abs_error(features[key], expected[key]) <= TOLERANCE, (name, size, key)
        if size == variant.default_image_size or checked_other_paths:
            continue
        checked_other_paths = True
        # The test can fail: timm's own resampling of the table is not Meta's.
        timm_resampled = _reference_model(name, size)
        timm_resampled.load_state_dict(timm_resampled_state(checkpoint, timm_resampled))
        with torch.inference_mode():
            tokens = timm_resampled.forward_features(pixels[None])
        timm_patch = _tokens_to_features(tokens, timm_resampled.num_prefix_tokens, size // variant.patch_size)["patch"]
        if not variant.position_antialias:
            assert max_abs_error(timm_patch, expected["patch"]) > 100 * TOLERANCE, (name, size)
        # And from a float32 store, as training reads it.
        store = extract_features(teacher, _OneImage(non_square_image), tmp_path / f"{name}-{size}", dtype="float32",
                                 batch_size=1, num_workers=0, progress=False)
        stored = FeatureStore.open(store.path).read("image")
        for key in ("patch", "cls"):
            assert max_abs_error(torch.from_numpy(stored[key])[None], expected[key]) <= TOLERANCE, (name, size, key)


def timm_resampled_state(checkpoint: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """An official checkpoint through timm's filter alone (its own resampling of the table)."""
    return vision_transformer.checkpoint_filter_fn(dict(checkpoint), model)


@pytest.mark.parametrize(("offset", "antialias"), [(0.1, False), (0.0, True)])
@pytest.mark.parametrize("grid", [37, 16, 8, 40, 3])
def test_position_table_is_resampled_by_metas_rule(offset: float, antialias: bool, grid: int) -> None:
    torch.manual_seed(0)
    official = DinoV2VisionTransformer(img_size=518, patch_size=14, embed_dim=8, depth=0, num_heads=1,
                                       interpolate_offset=offset, interpolate_antialias=antialias)
    with torch.no_grad():
        official.pos_embed.normal_()
    tokens = torch.zeros(1, 1 + grid * grid, 8)
    expected = official.interpolate_pos_encoding(tokens, grid * 14, grid * 14)
    ours = resample_position_table(official.pos_embed.detach(), grid, offset=offset, antialias=antialias)
    assert torch.equal(ours, expected.detach())
    with pytest.raises(ValueError, match="not a square grid"):
        resample_position_table(torch.zeros(1, 1 + 10, 8), 4, offset=offset, antialias=antialias)


def test_loaded_table_is_metas_for_every_rule() -> None:
    """The table in the loaded model is the official resampling (class position folded in for registers)."""
    torch.manual_seed(0)
    for name in ("dino_vits16", "dinov2_vits14", "dinov2_vits14_reg"):
        official = _official_model(name)
        with torch.no_grad():
            official.pos_embed.normal_()
        variant = DINO_VARIANTS[name]
        teacher = TEACHERS.get(name)(checkpoint=official.state_dict(), image_size=8 * variant.patch_size)
        expected = resample_position_table(official.pos_embed.detach(), 8, offset=variant.position_offset,
                                           antialias=variant.position_antialias)
        loaded = teacher.model.pos_embed.detach()
        if name.endswith("_reg"):  # timm keeps no class position in the table
            assert torch.equal(loaded, expected[:, 1:])
            assert torch.equal(teacher.model.cls_token.detach(), official.cls_token.detach() + expected[:, :1])
        else:
            assert torch.equal(loaded, expected)


def test_stores_at_other_sizes_name_the_changed_position_embedding() -> None:
    """Stores made before the fix at non-native sizes are refused with the reason; native ones stay valid."""
    torch.manual_seed(0)
    old_text = "absolute table resampled once at load to the input grid by timm (bicubic, antialias)"
    native = TEACHERS.get("dinov2_vits14")(image_size=518).preprocessing()
    assert native["position_embedding"] == old_text
    assert "rope_periods" not in native
    teacher = TEACHERS.get("dinov2_vits14")(image_size=224)
    other = teacher.preprocessing()
    assert other["position_embedding"] != old_text
    made_before = teacher.fingerprint_fields()
    made_before["preprocessing"]["position_embedding"] = old_text
    differences = describe_differences(made_before, teacher.fingerprint_fields(), both_ways=False)
    assert len(differences) == 1 and differences[0].startswith("preprocessing.position_embedding: store")
    assert "interpolate_pos_encoding" in other["position_embedding"] and "0.1" in other["position_embedding"]
    registers = TEACHERS.get("dinov2_vits14_reg")(image_size=224).preprocessing()["position_embedding"]
    assert "antialias" in registers and "no antialias" not in registers and "0.1" not in registers
    assert TEACHERS.get("dino_vits16")(image_size=224).preprocessing()["position_embedding"] == old_text


# --------------------------------------------------------------- DINOv3 RoPE
def _metas_rope(periods: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """DINOv3's RoPE ``[H * W, 2 * D]`` (sin then cos), written from its formula: coordinates
    at patch centres scaled to [-1, 1] per axis, angles ``2 pi x / period``, (y, x) bands
    tiled twice."""
    coords_y = (torch.arange(height, dtype=torch.float32) + 0.5) / height
    coords_x = (torch.arange(width, dtype=torch.float32) + 0.5) / width
    coords = torch.stack(torch.meshgrid(coords_y, coords_x, indexing="ij"), dim=-1).flatten(0, 1) * 2.0 - 1.0
    angles = (2 * math.pi * coords[:, :, None] / periods.float()[None, None, :]).flatten(1).tile(2)
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


def test_dinov3_uses_the_checkpoints_rope_periods(max_abs_error: Callable[[torch.Tensor, torch.Tensor], float]) -> None:
    torch.manual_seed(0)
    reference = _reference_model("dinov3_vits16", 256)
    official = _official_layout(reference.state_dict(), "dinov3")
    stored = official["rope_embed.periods"]
    assert stored.dtype == torch.bfloat16
    teacher = TEACHERS.get("dinov3_vits16")(checkpoint=official, image_size=64)
    rope = teacher.model.rope
    assert torch.equal(rope.periods, stored.float())
    assert teacher.stored_rope_periods and "rope_periods" in teacher.preprocessing()
    assert max_abs_error(rope.get_embed(shape=(4, 6)), _metas_rope(stored, 4, 6)) <= 1e-6
    # The periods matter: timm's float32 ones give other tokens.
    exact = dict(official, **{"rope_embed.periods": reference.rope.periods.clone()})
    recomputed = TEACHERS.get("dinov3_vits16")(checkpoint=exact, image_size=64)
    assert not recomputed.stored_rope_periods and "rope_periods" not in recomputed.preprocessing()
    pixels = torch.randn(1, 3, 64, 64)
    assert max_abs_error(teacher.extract(pixels)["patch"], recomputed.extract(pixels)["patch"]) > 0
    with pytest.raises(ValueError, match="rope_embed.periods"):
        TEACHERS.get("dinov3_vits16")(checkpoint=dict(official, **{"rope_embed.periods": torch.ones(3)}))


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
