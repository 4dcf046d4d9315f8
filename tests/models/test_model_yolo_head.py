"""Tests of the YOLOv8 detection head: outputs, decoding, NMS and loss behaviour."""

from __future__ import annotations

import math

import pytest
import torch

from vfmkd.models.heads import YOLOHead, pad_targets

DIMS = {"p3": 16, "p4": 32, "p5": 64}
STRIDES = {"p3": 8, "p4": 16, "p5": 32}


def _head(num_classes: int = 3) -> YOLOHead:
    return YOLOHead(DIMS, STRIDES, num_classes=num_classes)


def _features(batch_size: int = 2, size: int = 64) -> dict[str, torch.Tensor]:
    return {level: torch.rand(batch_size, DIMS[level], size // s, size // s) for level, s in STRIDES.items()}


def test_forward_is_a_list_of_level_maps_in_train_and_eval() -> None:
    head = _head()
    features = _features()
    train_outputs = head.train()(features)
    eval_outputs = head.eval()(features)
    for outputs in (train_outputs, eval_outputs):
        assert isinstance(outputs, list)
        assert [tuple(o.shape) for o in outputs] == [(2, 67, 8, 8), (2, 67, 4, 4), (2, 67, 2, 2)]


def test_branch_widths_and_bias_prior() -> None:
    head = YOLOHead({"p3": 64, "p4": 128, "p5": 256}, STRIDES, num_classes=80)
    assert head.box_branches[0][0].conv.out_channels == 64  # max(16, 64 // 4, 4 * 16)
    assert head.class_branches[0][0].conv.out_channels == 80  # max(64, min(80, 100))
    assert torch.all(head.box_branches[1][-1].bias == 1.0)
    torch.testing.assert_close(
        head.class_branches[2][-1].bias, torch.full((80,), math.log(5 / 80 / (640 / 32) ** 2))
    )
    assert not head.integral.projection.requires_grad


def _crafted_outputs(head: YOLOHead, batch_size: int = 2, size: int = 64) -> list[torch.Tensor]:
    """Maps whose box distributions put all mass on bin 2 (distance 2 cells) on every side."""
    outputs = []
    for stride in head.strides:
        grid = size // stride
        level = torch.zeros(batch_size, 4 * head.reg_max + head.num_classes, grid, grid)
        level[:, : 4 * head.reg_max].view(batch_size, 4, head.reg_max, grid, grid)[:, :, 2] = 30.0
        level[:, 4 * head.reg_max :] = -30.0
        outputs.append(level)
    return outputs


def test_predict_decodes_boxes_and_applies_class_aware_nms() -> None:
    head = _head()
    outputs = _crafted_outputs(head)
    classes = outputs[0][:, 4 * head.reg_max :]
    classes[0, 1, 3, 3] = 5.0  # anchor (x 3.5, y 3.5) cells -> box (12, 12, 44, 44)
    classes[0, 1, 3, 4] = 3.0  # same class, shifted 8 px right: IoU 0.6 -> suppressed at 0.5
    classes[0, 2, 4, 3] = 4.0  # other class, shifted 8 px down: IoU 0.6 but kept
    predictions = head.predict(outputs, conf_threshold=0.01, iou_threshold=0.5)
    assert len(predictions) == 2
    first = predictions[0]
    assert first["labels"].dtype == torch.int64
    assert first["labels"].tolist() == [1, 2]
    torch.testing.assert_close(first["scores"], torch.sigmoid(torch.tensor([5.0, 4.0])))
    torch.testing.assert_close(first["boxes"], torch.tensor([[12.0, 12.0, 44.0, 44.0], [12.0, 20.0, 44.0, 52.0]]))
    assert predictions[1]["boxes"].shape == (0, 4) and predictions[1]["labels"].dtype == torch.int64

    assert len(head.predict(outputs, conf_threshold=0.01, iou_threshold=0.7)[0]["boxes"]) == 3
    assert head.predict(outputs, conf_threshold=0.01, iou_threshold=0.5, max_det=1)[0]["labels"].tolist() == [1]


def test_predict_multi_label_and_clipping() -> None:
    head = _head()
    outputs = _crafted_outputs(head)
    classes = outputs[0][:, 4 * head.reg_max :]
    classes[1, 0, 0, 0] = 2.0  # corner anchor: box extends past the image, clipped to 0
    classes[1, 2, 0, 0] = 1.0
    single = head.predict(outputs, conf_threshold=0.5)
    multi = head.predict(outputs, conf_threshold=0.5, multi_label=True)
    assert single[1]["labels"].tolist() == [0]
    assert multi[1]["labels"].tolist() == [0, 2]
    torch.testing.assert_close(single[1]["boxes"][0], torch.tensor([0.0, 0.0, 20.0, 20.0]))


def test_pad_targets_groups_boxes_by_image() -> None:
    targets = {
        "batch_idx": torch.tensor([2, 0, 2, 2]),
        "cls": torch.tensor([5, 1, 6, 7]),
        "boxes": torch.arange(16, dtype=torch.float32).view(4, 4),
    }
    labels, boxes, mask = pad_targets(targets, batch_size=3, device=torch.device("cpu"))
    assert labels.tolist() == [[1, 0, 0], [0, 0, 0], [5, 6, 7]]
    assert mask.tolist() == [[True, False, False], [False, False, False], [True, True, True]]
    torch.testing.assert_close(boxes[2, 1], torch.tensor([8.0, 9.0, 10.0, 11.0]))
    with pytest.raises(ValueError, match="batch has 2 images"):
        pad_targets(targets, batch_size=2, device=torch.device("cpu"))


def test_loss_keys_gradients_and_empty_targets() -> None:
    head = _head()
    outputs = head(_features())
    targets = {
        "batch_idx": torch.tensor([0, 1]),
        "cls": torch.tensor([0, 2]),
        "boxes": torch.tensor([[8.0, 8.0, 40.0, 48.0], [20.0, 4.0, 60.0, 30.0]]),
    }
    losses = head.loss(outputs, targets)
    assert set(losses) == {"det/box", "det/cls", "det/dfl"}
    assert all(value.ndim == 0 and torch.isfinite(value) and value > 0 for value in losses.values())
    sum(losses.values()).backward()
    assert head.box_branches[0][-1].weight.grad.abs().sum() > 0

    empty = {
        "batch_idx": torch.zeros(0, dtype=torch.long),
        "cls": torch.zeros(0, dtype=torch.long),
        "boxes": torch.zeros(0, 4),
    }
    losses = head.loss(head(_features()), empty)
    assert losses["det/box"] == 0 and losses["det/dfl"] == 0 and losses["det/cls"] > 0
    sum(losses.values()).backward()


def test_loss_and_predict_run_in_float32_under_autocast() -> None:
    head = _head()
    targets = {"batch_idx": torch.tensor([0]), "cls": torch.tensor([1]), "boxes": torch.tensor([[8.0, 8.0, 40.0, 48.0]])}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = head(_features())
        losses = head.loss(outputs, targets)
        predictions = head.predict(outputs, conf_threshold=0.0, max_det=5)
    assert all(value.dtype == torch.float32 for value in losses.values())
    assert predictions[0]["boxes"].dtype == torch.float32 and 0 < len(predictions[0]["boxes"]) <= 5
