"""The RT-DETR head on the head contract: denoising from the batch's targets, NMS-free predictions, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vfmkd.geometry import letterbox_frame
from vfmkd.models import build_model
from vfmkd.models.heads.rtdetr_head import RTDETRHead, _normalised_targets

SIZE = 64


def _model(**head: object) -> torch.nn.Module:
    torch.manual_seed(0)
    settings = {"type": "rtdetr_head", "num_classes": 3, **RTDETRHead.small_config(), **head}
    return build_model({"backbone": {"type": "yolov8", "scale": "n"}, "heads": {"detection": settings}})


def _targets(counts: list[int], has_labels: list[bool] | None = None) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    total = sum(counts)
    corners = torch.rand(total, 2, 2, generator=generator) * SIZE
    boxes = torch.cat([corners.amin(1), corners.amax(1) + 2.0], dim=1).clamp(max=SIZE)
    targets = {
        "boxes": boxes,
        "cls": torch.randint(0, 3, (total,), generator=generator),
        "batch_idx": torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts)),
    }
    if has_labels is not None:
        targets["has_labels"] = torch.tensor(has_labels)
    return targets


def test_training_with_targets_uses_denoising_queries_and_only_heads_that_want_them_get_targets() -> None:
    model = _model()
    images = torch.rand(2, 3, SIZE, SIZE)
    targets = _targets([3, 1])
    outputs = model(images, targets=targets)["detection"]
    assert outputs["dn_meta"] is not None and outputs["layer_boxes"].shape[0] == 2  # batch first
    denoising = outputs["dn_meta"]["dn_num_split"][0]
    assert outputs["layer_boxes"].shape[2] == denoising + 30
    losses = model.loss(model(images, targets=targets), targets)
    assert {"det/cls", "det/l1", "det/giou", "det/cls_dn"} <= set(losses)
    assert losses["det/giou_dn"] > 0
    assert model(images)["detection"]["dn_meta"] is None  # no targets: no denoising
    # A YOLO head does not take targets: the model keeps them from it.
    both = build_model({"backbone": {"type": "yolov8", "scale": "n"},
                        "heads": {"detection": {"type": "yolo_head", "num_classes": 3}}})
    assert isinstance(both(images, targets=targets)["detection"], list)


def test_predictions_are_the_top_scores_without_nms_in_original_pixels() -> None:
    model = _model().eval()
    images = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        outputs = model(images)
    head = model.heads["detection"]
    plain = head.predict(outputs["detection"], conf_threshold=0.0, max_det=7)
    for result in plain:
        assert len(result["boxes"]) == 7
        assert bool((result["scores"][:-1] >= result["scores"][1:]).all())
        assert bool((result["labels"] >= 0).all() and (result["labels"] < 3).all())
        assert bool((result["boxes"][:, 2:] >= result["boxes"][:, :2]).all())
    # The best pair is the highest probability over all (query, class) pairs.
    probabilities = outputs["detection"]["predictions"][0, :, 4:]
    assert torch.isclose(plain[0]["scores"][0], probabilities.max())
    # With frames: the same boxes mapped back to a letterboxed 40 x 100 original.
    frame = letterbox_frame((40, 100), SIZE)
    mapped = head.predict(outputs["detection"], {"frames": [[frame], [frame]]}, conf_threshold=0.0, max_det=7)
    expected = frame.invert_boxes(plain[0]["boxes"].double().numpy())
    expected[:, 0::2] = expected[:, 0::2].clip(0, 100)
    expected[:, 1::2] = expected[:, 1::2].clip(0, 40)
    np.testing.assert_allclose(mapped[0]["boxes"].numpy(), expected, atol=1e-4)


def test_eval_idx_cuts_the_decoder_at_inference() -> None:
    model = _model().eval()
    images = torch.rand(1, 3, SIZE, SIZE)
    with torch.no_grad():
        full = model(images)["detection"]["predictions"]
        model.heads["detection"].decoder.eval_idx = 0
        cut = model(images)["detection"]["predictions"]
    assert cut.shape == full.shape and not torch.allclose(cut, full)


def test_unlabelled_images_give_no_denoising_queries_and_no_matches() -> None:
    targets = _targets([2, 3], has_labels=[False, True])
    converted = _normalised_targets(targets, (SIZE, SIZE))
    assert converted["batch_idx"].tolist() == [1, 1, 1]
    assert bool((converted["bboxes"] >= 0).all() and (converted["bboxes"] <= 1).all())


@pytest.mark.parametrize("counts", [[0, 0], [40, 0], [1, 2]])
def test_no_objects_zero_area_boxes_and_more_objects_than_queries(counts: list[int]) -> None:
    """No objects in the batch, 40 objects for 30 queries, and degenerate (zero-area) boxes all
    give a finite loss with gradients."""
    model = _model()
    images = torch.rand(2, 3, SIZE, SIZE)
    targets = _targets(counts)
    if counts == [1, 2]:
        targets["boxes"][0, 2:] = targets["boxes"][0, :2]  # zero area
    outputs = model(images, targets=targets)
    losses = model.loss(outputs, targets)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.heads["detection"].parameters())


def test_unknown_preset_and_indivisible_aifi_heads_are_named() -> None:
    with pytest.raises(ValueError, match="rtdetr_head.preset: unknown 'r9'"):
        _model(preset="r9")
    with pytest.raises(ValueError, match="aifi_heads"):
        _model(aifi_heads=7)


def test_detr_boxes_prompt_a_mask_head() -> None:
    """With a sam_mask_head beside it, the DETR head's detections become box prompts: one mask per detection."""
    from vfmkd.models.heads.sam_mask_head import SAMMaskHead

    torch.manual_seed(0)
    model = build_model({"backbone": {"type": "yolov8", "scale": "n"}, "heads": {
        "detection": {"type": "rtdetr_head", "num_classes": 3, **RTDETRHead.small_config()},
        "segmentation": {"type": "sam_mask_head", **SAMMaskHead.small_config()},
    }}).eval()
    assert model.evaluator_names() == ["coco_bbox", "prompt_miou", "coco_segm"]
    frame = letterbox_frame((40, 100), SIZE)
    with torch.no_grad():
        outputs = model(torch.rand(1, 3, SIZE, SIZE))
        (result,) = model.predict(outputs, {"frames": [[frame]]}, conf_threshold=0.0, max_det=5)
    assert len(result["boxes"]) == 5 and result["masks"].shape == (5, 40, 100)
