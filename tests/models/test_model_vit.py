"""Tests of the ViT backbone, its simple feature pyramid, checkpoints and training through build_model."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from timm.layers import resample_abs_pos_embed
from torch import nn

from vfmkd.models import build_model
from vfmkd.models.backbones import ViTBackbone
from vfmkd.models.backbones.vit import VIT_SIZES
from vfmkd.models.necks.simple_pyramid import LayerNorm2d, SimpleFeaturePyramid

# timm's VisionTransformer without its 1000-class head at 224 px (DeiT: 5.7 M, 22 M, 86 M with it).
TRANSFORMER_PARAMETERS_224 = {"tiny": 5_524_416, "small": 21_665_664, "base": 85_798_656}


@pytest.mark.parametrize("size", list(VIT_SIZES))
def test_sizes_declare_levels_and_match_published_transformers(size: str) -> None:
    with torch.device("meta"):
        backbone = ViTBackbone(size, img_size=224)
    channels = VIT_SIZES[size].out_channels
    assert backbone.feature_dims == {"p3": channels, "p4": channels, "p5": channels}
    assert backbone.feature_strides == {"p3": 8, "p4": 16, "p5": 32}
    assert sum(p.numel() for p in backbone.vit.parameters()) == TRANSFORMER_PARAMETERS_224[size]
    assert backbone.default_neck_config() == {"type": "yolov8_pafpn", "scale": VIT_SIZES[size].neck_scale}


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="unknown ViT size 'huge'; choose one of tiny, small, base"):
        ViTBackbone("huge")
    with pytest.raises(ValueError, match="multiple of the patch size 16, got 100"):
        ViTBackbone("tiny", img_size=100)


def test_any_input_size_gives_rounded_up_levels() -> None:
    backbone = ViTBackbone("tiny", img_size=64, out_channels=32).eval()
    assert backbone.feature_dims == {"p3": 32, "p4": 32, "p5": 32}
    for height, width in ((128, 96), (100, 76)):
        with torch.no_grad():
            features = backbone(torch.rand(1, 3, height, width))
        for level, feature in features.items():
            stride = backbone.feature_strides[level]
            assert feature.shape == (1, 32, math.ceil(height / stride), math.ceil(width / stride))


def test_inputs_are_normalised_inside() -> None:
    backbone = ViTBackbone("tiny", img_size=64, out_channels=16).eval()
    assert backbone.pixel_mean.flatten().tolist() == [0.5, 0.5, 0.5]  # timm's default ViT weights
    assert "pixel_mean" not in backbone.state_dict()
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        normalised_inside = backbone(images)["p4"]
        backbone.normalize_input = False
        torch.testing.assert_close(backbone((images - 0.5) / 0.5)["p4"], normalised_inside)
    imagenet = ViTBackbone("tiny", img_size=64, pixel_mean=(0.485, 0.456, 0.406), pixel_std=(0.229, 0.224, 0.225))
    torch.testing.assert_close(imagenet.pixel_std.flatten(), torch.tensor([0.229, 0.224, 0.225]))


def test_position_table_is_resampled_for_other_input_sizes() -> None:
    backbone = ViTBackbone("tiny", img_size=64)
    table = backbone.vit.pos_embed
    assert table.shape == (1, 1 + 4 * 4, 192)
    # Zero patch tokens on an 8 x 6 grid come out as the table resampled to that grid.
    tokens = backbone.vit._pos_embed(torch.zeros(1, 8, 6, 192))
    expected = resample_abs_pos_embed(table, new_size=[8, 6], old_size=[4, 4], num_prefix_tokens=1)
    torch.testing.assert_close(tokens[:, 1:], expected[:, 1:])


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    torch.manual_seed(0)
    plain = ViTBackbone("tiny", img_size=64, drop_path_rate=0.1)
    checkpointed = ViTBackbone("tiny", img_size=64, drop_path_rate=0.1, grad_checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())
    assert checkpointed.grad_checkpointing and not plain.grad_checkpointing
    assert plain.vit.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
    images = torch.rand(2, 3, 64, 64)
    gradients = []
    for backbone in (plain, checkpointed):
        backbone.eval()  # no stochastic depth, so both runs compute the same function
        sum(level.square().mean() for level in backbone(images).values()).backward()
        gradients.append(backbone.vit.blocks[0].attn.qkv.weight.grad)
    torch.testing.assert_close(gradients[1], gradients[0])


def test_checkpoint_loads_timm_weights_and_resamples_positions(tmp_path: Path) -> None:
    import timm
    from safetensors.torch import save_file

    source = timm.create_model("vit_tiny_patch16_224", pretrained=False)  # with its 1000-class head
    path = tmp_path / "vit_tiny.safetensors"
    save_file(source.state_dict(), path)
    backbone = ViTBackbone("tiny", img_size=64, checkpoint=str(path))
    loaded = backbone.vit.state_dict()
    for key, value in source.state_dict().items():
        if key.startswith("head."):
            assert key not in loaded
        elif key != "pos_embed":
            torch.testing.assert_close(loaded[key], value, msg=key)
    expected_table = resample_abs_pos_embed(source.pos_embed, new_size=[4, 4], num_prefix_tokens=1)
    torch.testing.assert_close(loaded["pos_embed"], expected_table)


def test_checkpoint_that_does_not_fit_is_refused(tmp_path: Path) -> None:
    import timm

    source = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0).state_dict()
    path = tmp_path / "vit.pth"
    torch.save({"model": {k: v for k, v in source.items() if not k.startswith("blocks.11.")}}, path)
    with pytest.raises(ValueError, match=r"ViT backbone 'tiny' does not fit: \d+ missing keys: blocks\.11\."):
        ViTBackbone("tiny", img_size=64, checkpoint=path)


def test_simple_pyramid_levels_and_norm() -> None:
    pyramid = SimpleFeaturePyramid(64, 24, level_strides={"p2": 4, "p3": 8, "p4": 16, "p5": 32})
    assert pyramid.feature_dims == {"p2": 24, "p3": 24, "p4": 24, "p5": 24}
    features = pyramid(torch.rand(1, 64, 5, 3))
    assert {level: tuple(f.shape[-2:]) for level, f in features.items()} == {
        "p2": (20, 12), "p3": (10, 6), "p4": (5, 3), "p5": (3, 2),
    }
    with pytest.raises(ValueError, match="level 'p6' has stride 64"):
        SimpleFeaturePyramid(64, 24, level_strides={"p6": 64})
    norm = LayerNorm2d(6)
    nn.init.normal_(norm.weight)
    x = torch.randn(2, 6, 3, 4)
    expected = nn.functional.layer_norm(x.permute(0, 2, 3, 1), (6,), norm.weight, norm.bias, 1e-6)
    torch.testing.assert_close(norm(x), expected.permute(0, 3, 1, 2))


@pytest.mark.slow
def test_trains_through_build_model() -> None:
    torch.manual_seed(0)
    model = build_model(
        {
            "backbone": {"type": "vit", "size": "tiny", "img_size": 64},
            "heads": {"detection": {"type": "yolo_head", "num_classes": 6}},
        }
    ).train()
    assert model.config["neck"] == {"type": "yolov8_pafpn", "scale": "n"}
    images = torch.rand(2, 3, 64, 64)
    targets = {
        "batch_idx": torch.tensor([0, 1]),
        "cls": torch.tensor([2, 5]),
        "boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0], [20.0, 10.0, 60.0, 44.0]]),
    }
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    totals = []
    for _ in range(4):
        total = sum(model.loss(model(images), targets).values())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        totals.append(total.item())
    assert all(math.isfinite(total) for total in totals)
    assert totals[-1] < totals[0], totals
    unused = [name for name, p in model.backbone.named_parameters() if p.grad is None]
    assert not unused, f"backbone parameters without gradient (DDP would fail): {unused}"
