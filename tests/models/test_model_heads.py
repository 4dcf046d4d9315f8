"""The head contract, checked on every registered head (a new head needs no new test code).

Each head is built on a YOLOv8n neck's levels at 64 px and must: subclass BaseHead; give
the same output structure in train and eval mode; name its losses with its prefix and
give finite losses with gradients; leave an image flagged ``has_labels = False`` out of
its loss; predict one result per image, in original image pixels when the batch has
frames; ask for registered evaluators; and expose the maps it declares.
"""

from __future__ import annotations

import inspect

import pytest
import torch

from vfmkd.evaluation import COCOBoxEvaluator  # noqa: F401  (registers the evaluators)
from vfmkd.geometry import letterbox_frame
from vfmkd.models import build_model
from vfmkd.models.heads.base import BaseHead
from vfmkd.registry import EVALUATORS, HEADS

SIZE = 64
NUM_CLASSES = 3


def _head_config(name: str) -> dict:
    factory = HEADS.get(name)
    config = dict(factory.small_config()) if hasattr(factory, "small_config") else {}
    if "num_classes" in inspect.signature(factory).parameters:
        config.setdefault("num_classes", NUM_CLASSES)
    return {"type": name, **config}


def _model(name: str):
    torch.manual_seed(0)
    return build_model({"backbone": {"type": "yolov8", "scale": "n"}, "heads": {"task": _head_config(name)}})


BOXES = ((0, 4, 6, 30, 40), (0, 20, 20, 60, 50), (1, 8, 8, 56, 56))  # image, x0, y0, x1, y1


def _targets(batch_size: int) -> dict:
    masks = [torch.zeros(0, SIZE, SIZE, dtype=torch.uint8) for _ in range(batch_size)]
    for image, x0, y0, x1, y1 in BOXES:
        mask = torch.zeros(1, SIZE, SIZE, dtype=torch.uint8)
        mask[0, y0:y1, x0:x1] = 1
        masks[image] = torch.cat([masks[image], mask])
    return {
        "batch_idx": torch.tensor([image for image, *_ in BOXES]),
        "cls": torch.tensor([0, 2, 1]),
        "boxes": torch.tensor([[float(v) for v in box] for _, *box in BOXES]),
        "has_labels": torch.ones(batch_size, dtype=torch.bool),
        "masks": masks,
    }


def _structure(value):
    # NOTE: the same keys, nesting and tensor ranks in both modes; sizes may differ (a DETR
    # decoder runs only up to its eval_idx layer at inference).
    if torch.is_tensor(value):
        return ("tensor", value.ndim)
    if isinstance(value, dict):
        return {key: _structure(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_structure(item) for item in value]
    return type(value).__name__


@pytest.mark.parametrize("name", HEADS.names())
def test_head_follows_the_contract(name: str) -> None:
    model = _model(name)
    head = model.heads["task"]
    assert isinstance(head, BaseHead), f"{name} must subclass vfmkd.models.heads.base.BaseHead"
    assert head.loss_prefix.endswith("/") and head.loss_prefix != "/"
    images = torch.rand(2, 3, SIZE, SIZE)

    outputs = model(images)
    losses = model.loss(outputs, _targets(2))
    assert losses and all(key.startswith(head.loss_prefix) for key in losses)
    assert all(value.ndim == 0 and torch.isfinite(value) for value in losses.values())
    sum(losses.values()).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())

    with torch.no_grad():
        eval_outputs = model.eval()(images)
    assert _structure(eval_outputs["task"]) == _structure(outputs["task"])

    for name_ in head.evaluators:
        assert name_ in EVALUATORS, f"{name} asks for evaluator '{name_}', which is not registered"
    maps = head.named_maps(outputs["task"])
    assert set(maps) == set(head.map_specs)
    for key, (channels, stride) in head.map_specs.items():
        assert tuple(maps[key].shape) == (2, channels, SIZE // stride, SIZE // stride)
        assert model.map_dims[f"task.{key}"] == channels


@pytest.mark.parametrize("name", HEADS.names())
def test_unlabelled_images_are_left_out_of_the_loss(name: str) -> None:
    model = _model(name)
    outputs = model(torch.rand(2, 3, SIZE, SIZE))
    targets = _targets(2)
    first = targets["batch_idx"] == 0
    image0 = {"batch_idx": targets["batch_idx"][first], "cls": targets["cls"][first], "boxes": targets["boxes"][first]}
    # the second image is unlabelled: no objects, flagged
    flagged_targets = {**image0, "masks": [targets["masks"][0], targets["masks"][1][:0]],
                       "has_labels": torch.tensor([True, False])}
    alone_targets = {**image0, "masks": targets["masks"][:1], "has_labels": torch.tensor([True])}
    torch.manual_seed(1)
    flagged = model.loss(outputs, flagged_targets)
    torch.manual_seed(1)
    alone = model.loss({key: _first(value) for key, value in outputs.items()}, alone_targets)
    for key in alone:
        torch.testing.assert_close(flagged[key], alone[key], rtol=1e-5, atol=1e-6, msg=key)
    # every image labelled: exactly the loss without the flag
    without_flag = {key: value for key, value in targets.items() if key != "has_labels"}
    torch.manual_seed(2)
    plain = model.loss(outputs, without_flag)
    torch.manual_seed(2)
    flagged_all = model.loss(outputs, targets)
    assert all(torch.equal(plain[key], flagged_all[key]) for key in plain)


def _first(value):
    """The first image's part of a head output (tensors, dicts and lists of them; other values as they are)."""
    if torch.is_tensor(value):
        return value[:1]
    if isinstance(value, dict):
        return {key: _first(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_first(item) for item in value]
    return value


@pytest.mark.parametrize("name", HEADS.names())
def test_predictions_are_per_image_and_in_original_pixels(name: str) -> None:
    model = _model(name).eval()
    with torch.no_grad():
        outputs = model(torch.rand(2, 3, SIZE, SIZE))
        sizes = [(120, 200), (48, 30)]  # (H, W) of the original images
        batch = {"frames": [[letterbox_frame(size, SIZE)] for size in sizes]}
        results = model.predict(outputs, batch, conf_threshold=0.0)
    assert len(results) == 2
    for result, (height, width) in zip(results, sizes):
        if "boxes" in result:
            boxes = result["boxes"]
            assert boxes.ndim == 2 and boxes.shape[1] == 4 and len(boxes) > 0
            assert float(boxes[:, [0, 2]].max()) <= width + 1e-6 and float(boxes[:, [1, 3]].max()) <= height + 1e-6
            assert float(boxes.min()) >= 0.0
