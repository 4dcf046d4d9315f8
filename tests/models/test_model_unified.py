"""Tests of build_model, UnifiedModel and weight loading (without Ultralytics)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from vfmkd.models import UnifiedModel, build_model
from vfmkd.models.necks import YOLOv8PAFPN

PUBLISHED_PARAMETERS = {"n": 3_157_200, "s": 11_166_560, "m": 25_902_640, "l": 43_691_520, "x": 68_229_648}


def _config(scale: str = "n", num_classes: int = 80) -> dict:
    return {
        "backbone": {"type": "yolov8", "scale": scale},
        "heads": {"detection": {"type": "yolo_head", "num_classes": num_classes}},
    }


@pytest.mark.parametrize("scale", list(PUBLISHED_PARAMETERS))
def test_parameter_counts_match_published_yolov8(scale: str) -> None:
    with torch.device("meta"):
        model = build_model(_config(scale))
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAMETERS[scale]


def test_forward_loss_predict_interfaces() -> None:
    model = build_model(_config(num_classes=5))
    assert isinstance(model, UnifiedModel)
    assert isinstance(model.neck, YOLOv8PAFPN) and model.neck.scale == "n"
    assert isinstance(model.heads, nn.ModuleDict)
    assert model.strides == {"p3": 8, "p4": 16, "p5": 32}
    outputs = model(torch.rand(2, 3, 64, 64))
    assert set(outputs) == {"features", "maps", "detection"}
    assert model.map_strides == {
        "p3": 8, "p4": 16, "p5": 32, "backbone.p3": 8, "backbone.p4": 16, "backbone.p5": 32,
        "detection.cls_p3": 8, "detection.cls_p4": 16, "detection.cls_p5": 32,
    }
    assert model.map_dims["backbone.p5"] == 256 and model.map_dims["p3"] == 64
    assert model.map_dims["detection.cls_p4"] == 5
    # The head's class-logit maps are the class part of its raw outputs.
    assert torch.equal(outputs["maps"]["detection.cls_p4"], outputs["detection"][1][:, -5:])
    assert {k: v.shape[1] for k, v in outputs["maps"].items()} == model.map_dims
    assert outputs["maps"]["p4"] is outputs["features"]["p4"]
    assert {k: tuple(v.shape) for k, v in outputs["features"].items()} == {
        "p3": (2, 64, 8, 8),
        "p4": (2, 128, 4, 4),
        "p5": (2, 256, 2, 2),
    }
    assert [o.shape[1] for o in outputs["detection"]] == [69, 69, 69]
    targets = {
        "batch_idx": torch.tensor([0]),
        "cls": torch.tensor([3]),
        "boxes": torch.tensor([[4.0, 4.0, 40.0, 36.0]]),
    }
    losses = model.loss(outputs, targets)
    assert set(losses) == {"det/box", "det/cls", "det/dfl"}
    weighted = model.loss(outputs, targets, weights={"detection": 3.0})
    assert all(torch.allclose(weighted[k], 3.0 * losses[k]) for k in losses)
    predictions = model.eval().predict(model(torch.rand(2, 3, 64, 64)), conf_threshold=0.0)
    assert len(predictions) == 2 and set(predictions[0]) == {"boxes", "scores", "labels"}
    assert len(predictions[0]["boxes"]) <= 300


def test_backbone_config_file_is_merged_and_config_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "bb.yaml").write_text("type: yolov8\nscale: s\n")
    monkeypatch.chdir(tmp_path)
    cfg = {
        "backbone": {"type": "yolov8", "config": "configs/bb.yaml", "scale": "n"},
        "heads": {"detection": {"type": "yolo_head", "num_classes": 2}},
    }
    with torch.device("meta"):
        model = build_model(cfg)
    assert model.backbone.scale == "n"  # explicit key wins
    assert model.config["backbone"] == {"type": "yolov8", "scale": "n"}
    assert model.config["neck"] == {"type": "yolov8_pafpn", "scale": "n"}
    with torch.device("meta"):
        rebuilt = build_model(model.config)
    assert [k for k, _ in rebuilt.named_parameters()] == [k for k, _ in model.named_parameters()]

    cfg["backbone"] = {"config": "configs/bb.yaml"}
    with torch.device("meta"):
        assert build_model(cfg).backbone.scale == "s"
    cfg["backbone"] = {"type": "yolov8", "config": "configs/missing.yaml"}
    with pytest.raises(FileNotFoundError, match="configs/missing.yaml"):
        build_model(cfg)


def test_config_errors_name_the_problem() -> None:
    with pytest.raises(KeyError, match="unknown model config keys \\['head'\\]"):
        build_model({"backbone": {"type": "yolov8"}, "head": {}})
    with pytest.raises(KeyError, match="Did you mean 'yolov8'"):
        build_model({"backbone": {"type": "yolov9"}})
    with pytest.raises(KeyError, match="model.backbone: unknown key 'scal' for yolov8. Did you mean 'scale'"):
        build_model({"backbone": {"type": "yolov8", "scal": "n"}})
    with pytest.raises(KeyError, match="model.heads.detection: unknown key 'num_class'"):
        build_model({"backbone": {"type": "yolov8"}, "heads": {"detection": {"type": "yolo_head", "num_class": 3}}})


def test_weights_round_trip_and_strict_errors(tmp_path: Path) -> None:
    source = build_model(_config(num_classes=3)).eval()
    path = tmp_path / "weights.pt"
    torch.save({"state_dict": source.state_dict()}, path)
    loaded = build_model({**_config(num_classes=3), "weights": str(path)}).eval()
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        for expected, actual in zip(source(images)["detection"], loaded(images)["detection"]):
            torch.testing.assert_close(actual, expected)
    assert "weights" not in loaded.config

    with pytest.raises(ValueError, match="class_branches.*num_classes"):
        build_model({**_config(num_classes=4), "weights": str(path)})

    partial = {k: v for k, v in source.state_dict().items() if not k.startswith("neck.")}
    torch.save(partial, path)
    with pytest.raises(ValueError, match=r"\d+ missing keys: neck\."):
        build_model({**_config(num_classes=3), "weights": str(path)})


def test_pickled_module_is_refused_with_advice(tmp_path: Path) -> None:
    path = tmp_path / "module.pt"
    torch.save(nn.Linear(2, 2), path)
    with pytest.raises(ValueError, match="torch.save\\(model.state_dict\\(\\), path\\)"):
        build_model({**_config(), "weights": str(path)})
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        build_model({**_config(), "weights": str(tmp_path / "nope.pt")})


def test_yolov8n_overfits_a_tiny_batch() -> None:
    torch.manual_seed(0)
    model = build_model(_config(num_classes=2)).train()
    images = torch.rand(2, 3, 64, 64)
    targets = {
        "batch_idx": torch.tensor([0, 0, 1]),
        "cls": torch.tensor([0, 1, 1]),
        "boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0], [30.0, 20.0, 60.0, 60.0], [10.0, 10.0, 50.0, 44.0]]),
    }
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    totals = []
    for _ in range(8):
        losses = model.loss(model(images), targets)
        total = sum(losses.values())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        totals.append(total.item())
    assert totals[-1] < 0.8 * totals[0], totals


def test_predict_with_a_batch_maps_boxes_to_the_original_image() -> None:
    from vfmkd.geometry import Frame

    torch.manual_seed(0)
    model = build_model(_config(num_classes=3)).eval()
    outputs = model(torch.rand(1, 3, 64, 64))
    in_input = model.predict(outputs, conf_threshold=0.0, max_det=20)[0]
    # the original image is 128 x 256 (H x W), scaled by 1/4 and padded by 16 rows at the top
    frame = Frame([[0.25, 0.0, 0.0], [0.0, 0.25, 16.0]], (64, 64), (0.0, 16.0, 64.0, 48.0), (128, 256))
    original = model.predict(outputs, {"frames": [[frame]]}, conf_threshold=0.0, max_det=20)[0]
    assert original["boxes"].dtype == torch.float64
    expected = in_input["boxes"].double().clone()
    expected[:, [1, 3]] -= 16.0
    expected = (expected * 4.0)
    expected[:, [0, 2]] = expected[:, [0, 2]].clamp(0, 256)
    expected[:, [1, 3]] = expected[:, [1, 3]].clamp(0, 128)
    assert torch.allclose(original["boxes"], expected, atol=1e-4)
    assert torch.equal(original["scores"], in_input["scores"])
