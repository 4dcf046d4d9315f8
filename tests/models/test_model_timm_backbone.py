"""Tests of the generic timm backbone: level selection, errors, checkpoints and training."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import timm
import torch

from vfmkd.models import build_model
from vfmkd.models.backbones import TimmBackbone
from vfmkd.models.backbones.timm_backbone import read_checkpoint, select_out_indices

# Channels of the last stage at strides 8, 16, 32 (from timm's feature_info).
DECLARED_CHANNELS = {
    "resnet18": {"p3": 128, "p4": 256, "p5": 512},
    "efficientnet_b0": {"p3": 40, "p4": 112, "p5": 320},
    "convnext_atto": {"p3": 80, "p4": 160, "p5": 320},
    "mobilenetv3_small_050": {"p3": 16, "p4": 24, "p5": 288},
}


@pytest.mark.parametrize("name", list(DECLARED_CHANNELS))
def test_declared_levels_come_from_feature_info(name: str) -> None:
    with torch.device("meta"):
        backbone = TimmBackbone(name)
    assert backbone.feature_dims == DECLARED_CHANNELS[name]
    assert backbone.feature_strides == {"p3": 8, "p4": 16, "p5": 32}
    assert backbone.default_neck_config() == {"type": "yolov8_pafpn", "scale": "n"}


@pytest.mark.parametrize("name", ["convnext_atto", "mambaout_femto"])
def test_any_input_size_gives_rounded_up_channels_first_levels(name: str) -> None:
    # convnext patchifies without padding (floors odd sizes); mambaout returns NHWC maps.
    backbone = TimmBackbone(name).eval()
    height, width = 100, 76
    with torch.no_grad():
        features = backbone(torch.rand(1, 3, height, width))
    for level, feature in features.items():
        stride = backbone.feature_strides[level]
        expected = (1, backbone.feature_dims[level], math.ceil(height / stride), math.ceil(width / stride))
        assert feature.shape == expected


def test_last_stage_at_each_stride_is_chosen() -> None:
    feature_info = [
        {"module": "stem", "reduction": 4, "num_chs": 8},
        {"module": "a", "reduction": 8, "num_chs": 16},
        {"module": "b", "reduction": 8, "num_chs": 24},
        {"module": "c", "reduction": 16, "num_chs": 32},
        {"module": "d", "reduction": 32, "num_chs": 64},
        {"module": "e", "reduction": 32, "num_chs": 96},
    ]
    assert select_out_indices("toy", feature_info) == {"p3": 2, "p4": 3, "p5": 5}


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("vit_tiny_patch16_224", r"'vit_tiny_patch16_224' has no feature output at stride 8, 32.*blocks.11 \(stride"),
        ("levit_128s", r"'levit_128s' has no feature output at stride 8;.*stages.2 \(stride 64\)"),
    ],
)
def test_model_without_strides_8_16_32_is_refused(name: str, message: str) -> None:
    with torch.device("meta"), pytest.raises(ValueError, match=message):
        TimmBackbone(name)


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="unknown timm model 'convnext_ato'. Did you mean 'convnext_atto'"):
        TimmBackbone("convnext_ato")
    with pytest.raises(ValueError, match="either 'checkpoint'"):
        TimmBackbone("resnet18", checkpoint="weights.pth", pretrained=True)
    with pytest.raises(ValueError, match=r"may not set \['out_indices'\]"):
        TimmBackbone("resnet18", model_kwargs={"out_indices": (1,)})
    with pytest.raises(ValueError, match="'resnet18' rejected model_kwargs {'drop_rate_typo': 0.1}"):
        TimmBackbone("resnet18", model_kwargs={"drop_rate_typo": 0.1})
    with pytest.raises(KeyError, match="unknown key 'nme' for timm. Did you mean 'name'"):
        build_model({"backbone": {"type": "timm", "nme": "resnet18"}})


def test_model_kwargs_reach_timm() -> None:
    with torch.device("meta"):
        backbone = TimmBackbone("convnext_atto", model_kwargs={"drop_path_rate": 0.2})
    rates = [m.drop_prob for m in backbone.modules() if type(m).__name__ == "DropPath"]
    assert rates and max(rates) == pytest.approx(0.2)


def test_models_that_cannot_be_built_on_meta_are_probed_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    create_model = timm.create_model

    def create_off_meta(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        if torch.get_default_device().type == "meta":
            raise NotImplementedError("Tensor.item() cannot be called on meta tensors")
        return create_model(*args, **kwargs)

    monkeypatch.setattr(timm, "create_model", create_off_meta)
    assert TimmBackbone("mobilenetv3_small_050").feature_dims == DECLARED_CHANNELS["mobilenetv3_small_050"]


def test_checkpoint_loads_into_the_feature_extractor(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    torch.manual_seed(0)
    source = timm.create_model("convnext_atto", pretrained=False).eval()  # with its classifier
    path = tmp_path / "convnext_atto.safetensors"
    save_file(source.state_dict(), path)
    backbone = TimmBackbone("convnext_atto", checkpoint=str(path)).eval()
    images = torch.rand(1, 3, 64, 64)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])  # ImageNet
    with torch.no_grad():
        normalised = (images - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
        expected = source.forward_intermediates(normalised, indices=[1, 2, 3], intermediates_only=True)
        features = backbone(images)
    for level, reference in zip(("p3", "p4", "p5"), expected):
        torch.testing.assert_close(features[level], reference)


def test_checkpoint_that_does_not_fit_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "resnet18.pth"
    torch.save({"state_dict": timm.create_model("resnet18", pretrained=False).state_dict()}, path)
    with pytest.raises(ValueError, match=r"for timm model 'efficientnet_b0' does not fit: \d+ missing keys: .*unexpected"):
        TimmBackbone("efficientnet_b0", checkpoint=path)


def test_checkpoint_files_are_read_safely(tmp_path: Path) -> None:
    path = tmp_path / "training.pth"
    weights = {"weight": torch.ones(2)}
    torch.save({"model": weights, "state_dict_ema": {"weight": torch.zeros(2)}, "epoch": 3}, path)
    torch.testing.assert_close(read_checkpoint(path), {"weight": torch.zeros(2)})  # EMA weights first
    torch.save({"module.weight": torch.ones(2)}, path)
    assert list(read_checkpoint(path)) == ["weight"]
    torch.save({"weight": torch.ones(2), "epoch": 3}, path)
    with pytest.raises(ValueError, match=r"entries \[epoch\] are not tensors"):
        read_checkpoint(path)
    torch.save(torch.nn.Linear(2, 2), path)
    with pytest.raises(ValueError, match="pickled Python objects"):
        read_checkpoint(path)
    with pytest.raises(ValueError, match="NumPy"):
        read_checkpoint(tmp_path / "weights.npz")
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        read_checkpoint(tmp_path / "nope.pth")


@pytest.mark.slow
def test_trains_through_build_model() -> None:
    torch.manual_seed(0)
    model = build_model(
        {
            "backbone": {"type": "timm", "name": "convnext_atto", "pretrained": False, "checkpoint": None},
            "heads": {"detection": {"type": "yolo_head", "num_classes": 6}},
        }
    ).train()
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
