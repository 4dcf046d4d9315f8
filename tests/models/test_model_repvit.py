"""Tests of the RepViT backbone: declared levels, fusion, published sizes, checkpoints, training."""

from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from timm.layers import SqueezeExcite
from torch import nn

from vfmkd.models import build_model
from vfmkd.models.backbones.repvit import REPVIT_VARIANTS, RepViTBackbone, normalize_variant_name
from vfmkd.models.necks import YOLOv8PAFPN
from vfmkd.registry import BACKBONES

DECLARED_CHANNELS = {
    "m0_9": {"p3": 96, "p4": 192, "p5": 384},
    "m1_0": {"p3": 112, "p4": 224, "p5": 448},
    "m1_1": {"p3": 128, "p4": 256, "p5": 512},
    "m1_5": {"p3": 128, "p4": 256, "p5": 512},
    "m2_3": {"p3": 160, "p4": 320, "p5": 640},
}
# Official README (https://github.com/THU-MIG/RepViT): parameters of the fused model with its
# 1000-class classifier (a fused Linear(C5, 1000) after fusion), in millions.
PUBLISHED_FUSED_MILLIONS_WITH_CLASSIFIER = {"m0_9": 5.1, "m1_0": 6.8, "m1_1": 8.2, "m1_5": 14.0, "m2_3": 22.9}
# What this backbone has after fuse(): the published network minus the classifier.
FUSED_PARAMETERS = {"m0_9": 4_682_056, "m1_0": 6_361_312, "m1_1": 7_731_312, "m1_5": 13_536_992, "m2_3": 22_285_792}


def _randomise_batch_norms(module: nn.Module, generator: torch.Generator) -> None:
    """Give every BatchNorm non-trivial statistics and affine terms, so fusion is really tested."""
    for batch_norm in module.modules():
        if isinstance(batch_norm, nn.BatchNorm2d):
            channels = batch_norm.num_features
            batch_norm.running_mean.copy_(torch.randn(channels, generator=generator) * 0.5)
            batch_norm.running_var.copy_(torch.rand(channels, generator=generator) * 1.5 + 0.5)
            batch_norm.weight.data.copy_(torch.randn(channels, generator=generator) * 0.3 + 1.0)
            batch_norm.bias.data.copy_(torch.randn(channels, generator=generator) * 0.3)


@pytest.mark.parametrize("variant", list(REPVIT_VARIANTS))
def test_outputs_match_declaration(variant: str) -> None:
    backbone = RepViTBackbone(variant).eval()
    assert backbone.feature_dims == DECLARED_CHANNELS[variant]
    assert backbone.feature_strides == {"p3": 8, "p4": 16, "p5": 32}
    height, width = (64, 96) if variant != "m0_9" else (100, 76)
    with torch.no_grad():
        features = backbone(torch.rand(1, 3, height, width))
    assert list(features) == ["p3", "p4", "p5"]
    for level, feature in features.items():
        stride = backbone.feature_strides[level]
        expected = (1, backbone.feature_dims[level], math.ceil(height / stride), math.ceil(width / stride))
        assert feature.shape == expected


def test_variant_names_and_registry() -> None:
    assert normalize_variant_name("M1.1") == "m1_1"
    assert normalize_variant_name("repvit_m2_3") == "m2_3"
    with pytest.raises(ValueError, match="unknown RepViT variant 'm1_2'.*Did you mean"):
        normalize_variant_name("m1_2")
    with torch.device("meta"):
        backbone = BACKBONES.build("repvit")
    assert isinstance(backbone, RepViTBackbone) and backbone.variant == "m1_1"
    assert RepViTBackbone.small_config() == {"variant": "m0_9"}
    with pytest.raises(ValueError, match="in_channels=3"):
        RepViTBackbone("m0_9", in_channels=1)


def test_fuse_keeps_outputs_and_removes_parameters() -> None:
    generator = torch.Generator().manual_seed(0)
    backbone = RepViTBackbone("m0_9").eval()
    with torch.no_grad():
        _randomise_batch_norms(backbone, generator)
        images = torch.rand(2, 3, 96, 64, generator=generator)
        reference = backbone(images)
    parameters_before = sum(parameter.numel() for parameter in backbone.parameters())
    assert backbone.fuse() is backbone and backbone.is_fused
    assert not any(isinstance(module, nn.BatchNorm2d) for module in backbone.modules())
    depthwise_3x3 = [m for m in backbone.modules() if isinstance(m, nn.Conv2d) and m.groups > 1 and m.stride == (1, 1)]
    assert depthwise_3x3 and all(conv.kernel_size == (3, 3) for conv in depthwise_3x3)
    assert sum(parameter.numel() for parameter in backbone.parameters()) < parameters_before
    with torch.no_grad():
        fused = backbone(images)
    for level in reference:
        assert reference[level].abs().max() > 1.0  # the comparison below is not trivially small
        assert (fused[level] - reference[level]).abs().max().item() <= 1e-4
    parameters_fused = sum(parameter.numel() for parameter in backbone.parameters())
    backbone.fuse()
    assert sum(parameter.numel() for parameter in backbone.parameters()) == parameters_fused


@pytest.mark.parametrize("variant", list(REPVIT_VARIANTS))
def test_fused_parameter_counts_match_published(variant: str) -> None:
    with torch.device("meta"):
        backbone = RepViTBackbone(variant).fuse()
    count = sum(parameter.numel() for parameter in backbone.parameters())
    assert count == FUSED_PARAMETERS[variant]
    channels_p5 = DECLARED_CHANNELS[variant]["p5"]
    published_without_classifier = PUBLISHED_FUSED_MILLIONS_WITH_CLASSIFIER[variant] * 1e6 - (channels_p5 * 1000 + 1000)
    assert count == pytest.approx(published_without_classifier, rel=0.01)


# Official RepViT-M0.9 (model/repvit.py of THU-MIG/RepViT): one row per block after the stem,
# (output channels, squeeze-excite, stride).
_OFFICIAL_M0_9_ROWS = (
    [(48, 1, 1), (48, 0, 1), (48, 0, 1)]
    + [(96, 0, 2), (96, 1, 1), (96, 0, 1), (96, 0, 1)]
    + [(192, 0, 2)] + [(192, 1 - index % 2, 1) for index in range(14)] + [(192, 0, 1)]
    + [(384, 0, 2), (384, 1, 1), (384, 0, 1)]
)


def _official_conv_bn(in_channels: int, out_channels: int, kernel_size: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        OrderedDict(
            c=nn.Conv2d(in_channels, out_channels, kernel_size, groups=groups, bias=False),
            bn=nn.BatchNorm2d(out_channels),
        )
    )


class _OfficialRepVGGDW(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = _official_conv_bn(channels, channels, 3, groups=channels)
        self.conv1 = nn.Conv2d(channels, channels, 1, groups=channels)
        self.bn = nn.BatchNorm2d(channels)


class _OfficialResidual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.m = nn.Sequential(
            _official_conv_bn(channels, 2 * channels), nn.GELU(), _official_conv_bn(2 * channels, channels)
        )


class _OfficialBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, use_se: bool, stride: int) -> None:
        super().__init__()
        squeeze_excite = SqueezeExcite(in_channels, 0.25) if use_se else nn.Identity()
        if stride == 2:
            self.token_mixer = nn.Sequential(
                _official_conv_bn(in_channels, in_channels, 3, groups=in_channels),
                squeeze_excite,
                _official_conv_bn(in_channels, out_channels),
            )
        else:
            self.token_mixer = nn.Sequential(_OfficialRepVGGDW(in_channels), squeeze_excite)
        self.channel_mixer = _OfficialResidual(out_channels)


def _official_m0_9_state_dict() -> dict[str, torch.Tensor]:
    """Parameter names and shapes of the official RepViT-M0.9 with a distillation classifier."""
    layers: list[nn.Module] = [nn.Sequential(_official_conv_bn(3, 24, 3), nn.GELU(), _official_conv_bn(24, 48, 3))]
    in_channels = 48
    for out_channels, use_se, stride in _OFFICIAL_M0_9_ROWS:
        layers.append(_OfficialBlock(in_channels, out_channels, bool(use_se), stride))
        in_channels = out_channels
    official = nn.Module()
    official.features = nn.ModuleList(layers)
    official.classifier = nn.Module()
    official.classifier.classifier = nn.Sequential(OrderedDict(bn=nn.BatchNorm1d(384), l=nn.Linear(384, 1000)))
    official.classifier.classifier_dist = nn.Sequential(OrderedDict(bn=nn.BatchNorm1d(384), l=nn.Linear(384, 1000)))
    generator = torch.Generator().manual_seed(1)
    return {key: torch.randn(value.shape, generator=generator) for key, value in official.state_dict().items()}


def test_official_checkpoint_keys_load_strictly(tmp_path: Path) -> None:
    official = _official_m0_9_state_dict()
    assert max(int(key.split(".")[1]) for key in official if key.startswith("features.")) == 26
    path = tmp_path / "repvit_m0_9_distill_300e.pth"
    torch.save({"model": official, "epoch": 299}, path)
    backbone = RepViTBackbone("m0_9", checkpoint=path)
    network = backbone.repvit
    # Official block 3 is the last 48-channel block, which timm keeps as stage 1's pre-block;
    # block 4 is the stride-2 block; block 23 is stage 3's pre-block.
    pairs = {
        "features.0.2.c.weight": network.stem.conv2.c.weight,
        "features.1.token_mixer.1.fc1.weight": network.stages[0].blocks[0].se.fc1.weight,
        "features.3.token_mixer.0.conv1.weight": network.stages[1].downsample.pre_block.token_mixer.conv1.weight,
        "features.4.token_mixer.0.c.weight": network.stages[1].downsample.spatial_downsample.c.weight,
        "features.4.token_mixer.2.bn.running_var": network.stages[1].downsample.channel_downsample.bn.running_var,
        "features.4.channel_mixer.m.2.c.weight": network.stages[1].downsample.ffn.conv2.c.weight,
        "features.23.channel_mixer.m.0.bn.bias": network.stages[3].downsample.pre_block.channel_mixer.conv1.bn.bias,
        "features.26.token_mixer.0.bn.weight": network.stages[3].blocks[1].token_mixer.bn.weight,
    }
    for key, parameter in pairs.items():
        assert torch.equal(parameter, official[key]), key

    official["features.4.token_mixer.1.fc1.weight"] = torch.zeros(12, 48, 1, 1)  # no SE in stride-2 blocks
    torch.save({"model": official}, path)
    with pytest.raises(ValueError, match="features.4.token_mixer.1.fc1.weight"):
        RepViTBackbone("m0_9", checkpoint=path)


def test_timm_checkpoint_round_trip_and_mismatch_errors(tmp_path: Path) -> None:
    import timm

    generator = torch.Generator().manual_seed(2)
    source = timm.create_model("repvit_m0_9", pretrained=False).eval()  # with its classifier
    with torch.no_grad():
        _randomise_batch_norms(source, generator)
    path = tmp_path / "repvit_m0_9_timm.pth"
    torch.save({"state_dict": source.state_dict()}, path)
    backbone = RepViTBackbone("m0_9", checkpoint=path).eval()
    images = torch.rand(1, 3, 64, 64, generator=generator)
    with torch.no_grad():
        expected = source.forward_intermediates(_imagenet(images), indices=[1, 2, 3], intermediates_only=True)
        features = backbone(images)
    for level, reference in zip(("p3", "p4", "p5"), expected):
        torch.testing.assert_close(features[level], reference)

    with pytest.raises(ValueError, match="for variant 'm1_0' does not fit: .*shape mismatch.*another variant"):
        RepViTBackbone("m1_0", checkpoint=path)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        RepViTBackbone("m0_9", checkpoint=tmp_path / "missing.pth")
    with pytest.raises(RuntimeError, match="before fuse"):
        backbone.fuse().load_checkpoint(path)


def _imagenet(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (images - mean) / std


def test_build_model_with_yolo_head_trains() -> None:
    torch.manual_seed(0)
    model = build_model(
        {
            "backbone": {"type": "repvit", "variant": "m0_9"},
            "neck": {"type": "yolov8_pafpn", "scale": "n"},  # the smallest neck keeps the test fast
            "heads": {"detection": {"type": "yolo_head", "num_classes": 3}},
        }
    )
    images = torch.rand(2, 3, 64, 64)
    targets = {
        "batch_idx": torch.tensor([0, 1]),
        "cls": torch.tensor([1, 2]),
        "boxes": torch.tensor([[8.0, 8.0, 40.0, 48.0], [20.0, 4.0, 60.0, 30.0]]),
    }
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    stem_before = model.backbone.repvit.stem.conv1.c.weight.detach().clone()
    model.train()
    totals = []
    for _ in range(3):
        losses = model.loss(model(images), targets)
        total = sum(losses.values())
        assert torch.isfinite(total)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        totals.append(total.item())
    assert not torch.equal(stem_before, model.backbone.repvit.stem.conv1.c.weight)
    assert min(totals[1:]) < totals[0]


def test_config_file_and_default_neck() -> None:
    with torch.device("meta"):
        model = build_model({"backbone": {"config": "configs/backbones/repvit.yaml"}})
        large = build_model({"backbone": {"type": "repvit", "variant": "m2_3"}})
    assert model.backbone.variant == "m1_1"
    assert model.backbone.feature_dims == DECLARED_CHANNELS["m1_1"]
    assert isinstance(model.neck, YOLOv8PAFPN) and model.neck.scale == "s"
    assert model.config["neck"] == {"type": "yolov8_pafpn", "scale": "s"}
    assert large.config["neck"] == {"type": "yolov8_pafpn", "scale": "m"}
