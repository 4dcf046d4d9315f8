"""Contract tests for every registered backbone, plus YOLOv8 backbone and PAFPN neck specifics."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

import vfmkd.models  # noqa: F401  (registers backbones, necks, heads)
from vfmkd.models.backbones import BaseBackbone, YOLOv8Backbone
from vfmkd.models.necks import YOLOv8PAFPN
from vfmkd.registry import BACKBONES, NECKS

# Small constructor kwargs per backbone for the generic test; a backbone whose defaults are
# already small needs no entry.
SMALL_KWARGS: dict[str, dict[str, Any]] = {"yolov8": {"scale": "n"}}


@pytest.mark.parametrize("name", BACKBONES.names())
def test_registered_backbone_matches_declaration(name: str) -> None:
    backbone = BACKBONES.build(name, **SMALL_KWARGS.get(name, {})).eval()
    assert isinstance(backbone, BaseBackbone)
    assert backbone.get_feature_dims() == backbone.feature_dims
    assert backbone.get_feature_strides() == backbone.feature_strides
    size = 64
    with torch.no_grad():
        features = backbone(torch.rand(2, 3, size, size))
    assert set(features) == set(backbone.feature_dims)
    for level, feature in features.items():
        stride = backbone.feature_strides[level]
        assert feature.shape == (2, backbone.feature_dims[level], math.ceil(size / stride), math.ceil(size / stride))


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
