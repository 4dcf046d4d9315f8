"""Contract tests for every registered backbone, plus YOLOv8 backbone and PAFPN neck specifics."""

from __future__ import annotations

import math

import pytest
import torch

import vfmkd.models  # noqa: F401  (registers backbones, necks, heads)
from vfmkd.models.backbones import BaseBackbone, YOLOv8Backbone
from vfmkd.models.necks import YOLOv8PAFPN
from vfmkd.registry import BACKBONES, NECKS

# A generic build must stay small so the test stays fast; a backbone whose defaults are
# larger declares a classmethod ``small_config()`` returning small constructor kwargs.
MAX_SMALL_PARAMETERS = 10_000_000
# Square and non-square inputs (multiples of 32), so height and width cannot be swapped.
INPUT_SIZES = ((64, 64), (96, 64))


def _build_small(name: str) -> BaseBackbone:
    factory = BACKBONES.get(name)
    small_config = getattr(factory, "small_config", None)
    return factory(**(small_config() if small_config is not None else {}))


@pytest.mark.parametrize("name", BACKBONES.names())
def test_registered_backbone_matches_declaration(name: str) -> None:
    torch.manual_seed(0)
    backbone = _build_small(name).eval()
    assert isinstance(backbone, BaseBackbone)
    num_parameters = sum(p.numel() for p in backbone.parameters())
    assert num_parameters <= MAX_SMALL_PARAMETERS, (
        f"backbone '{name}' built for the contract test has {num_parameters:,} parameters; give its class a "
        f"classmethod small_config() returning constructor kwargs of an instance under {MAX_SMALL_PARAMETERS:,}"
    )
    assert backbone.get_feature_dims() == backbone.feature_dims
    assert backbone.get_feature_strides() == backbone.feature_strides
    for height, width in INPUT_SIZES:
        with torch.no_grad():
            features = backbone(torch.rand(2, 3, height, width))
        assert set(features) == set(backbone.feature_dims)
        for level, feature in features.items():
            stride = backbone.feature_strides[level]
            expected = (2, backbone.feature_dims[level], math.ceil(height / stride), math.ceil(width / stride))
            assert feature.shape == expected, f"{name} level {level} at input {height}x{width}"
            assert torch.isfinite(feature).all(), f"{name} level {level} is not finite"


@pytest.mark.parametrize("name", BACKBONES.names())
def test_registered_backbone_default_neck_builds(name: str) -> None:
    backbone = _build_small(name)
    neck_config = backbone.default_neck_config()
    if neck_config is None:
        return
    assert neck_config["type"] in NECKS, f"backbone '{name}' names an unregistered default neck {neck_config}"
    kwargs = {key: value for key, value in neck_config.items() if key != "type"}
    with torch.device("meta"):
        neck = NECKS.build(
            neck_config["type"], in_channels=backbone.feature_dims, in_strides=backbone.feature_strides, **kwargs
        )
    assert set(neck.feature_dims) == set(neck.feature_strides), f"neck of '{name}' declares mismatched levels"


def test_yolov8_backbone_levels_and_scales() -> None:
    assert YOLOv8Backbone("n").feature_dims == {"p3": 64, "p4": 128, "p5": 256}
    assert YOLOv8Backbone("n").feature_strides == {"p3": 8, "p4": 16, "p5": 32}
    with torch.device("meta"):
        assert YOLOv8Backbone("m").feature_dims == {"p3": 192, "p4": 384, "p5": 576}
        assert YOLOv8Backbone("x").feature_dims == {"p3": 320, "p4": 640, "p5": 640}
    with pytest.raises(ValueError, match="unknown YOLOv8 scale 'q'"):
        YOLOv8Backbone("q")


def test_yolov8_backbone_depths() -> None:
    with torch.device("meta"):
        small, medium = YOLOv8Backbone("n"), YOLOv8Backbone("m")
    assert [len(getattr(small, f"stage{i}").csp.bottlenecks) for i in range(1, 5)] == [1, 2, 2, 1]
    assert [len(getattr(medium, f"stage{i}").csp.bottlenecks) for i in range(1, 5)] == [2, 4, 4, 2]


def test_pafpn_outputs_match_declaration_for_odd_sizes() -> None:
    backbone = YOLOv8Backbone("n").eval()
    neck = NECKS.build("yolov8_pafpn", in_channels=backbone.feature_dims, in_strides=backbone.feature_strides)
    assert isinstance(neck, YOLOv8PAFPN)
    assert neck.feature_strides == {"p3": 8, "p4": 16, "p5": 32}
    height, width = 100, 76
    with torch.no_grad():
        features = neck(backbone(torch.rand(1, 3, height, width)))
    for level, feature in features.items():
        stride = neck.feature_strides[level]
        assert feature.shape == (1, neck.feature_dims[level], math.ceil(height / stride), math.ceil(width / stride))


def test_pafpn_accepts_other_input_channels_and_checks_levels() -> None:
    neck = YOLOv8PAFPN({"p3": 24, "p4": 40, "p5": 80}, {"p3": 8, "p4": 16, "p5": 32}, scale="n")
    features = {"p3": torch.rand(1, 24, 8, 8), "p4": torch.rand(1, 40, 4, 4), "p5": torch.rand(1, 80, 2, 2)}
    assert {k: v.shape[1] for k, v in neck(features).items()} == {"p3": 64, "p4": 128, "p5": 256}
    with pytest.raises(ValueError, match="missing \\['p5'\\]"):
        YOLOv8PAFPN({"p3": 24, "p4": 40}, {"p3": 8, "p4": 16})
    with pytest.raises(ValueError, match="double"):
        YOLOv8PAFPN({"p3": 24, "p4": 40, "p5": 80}, {"p3": 8, "p4": 16, "p5": 64})
