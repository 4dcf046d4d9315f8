"""RT-DETR matching and loss against Ultralytics' (a test oracle only, never imported by vfmkd)."""

from __future__ import annotations

import pytest
import torch
import torchvision

from tests.helpers.ultralytics_oracle import import_ultralytics
from vfmkd.models.heads.rtdetr_loss import HungarianMatcher, RTDETRLoss, denoising_matches
from vfmkd.ops.boxes import aligned_box_giou, aligned_box_iou

ultralytics_detr_ops = import_ultralytics("ultralytics.models.utils.ops")
ultralytics_detr_loss = import_ultralytics("ultralytics.models.utils.loss")

NUM_CLASSES = 5
NUM_QUERIES = 12
NUM_LAYERS = 3
GT_GROUPS = [3, 0, 5, 1]
# Ultralytics name of each vfmkd name.
ULTRALYTICS_NAMES = {
    f"det/{ours}{part}": f"loss_{theirs}{part}"
    for ours, theirs in (("cls", "class"), ("l1", "bbox"), ("giou", "giou"))
    for part in ("", "_aux", "_dn", "_aux_dn")
}


def _random_boxes(count: int, generator: torch.Generator) -> torch.Tensor:
    """``[count, 4]`` cxcywh boxes, normalised, inside the image."""
    size = torch.rand(count, 2, generator=generator) * 0.4 + 0.05
    centre = size / 2 + torch.rand(count, 2, generator=generator) * (1 - size)
    return torch.cat((centre, size), dim=1)


def _targets(gt_groups: list[int], seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    total = sum(gt_groups)
    return {
        "cls": torch.randint(0, NUM_CLASSES, (total,), generator=generator),
        "bboxes": _random_boxes(total, generator),
        "batch_idx": torch.repeat_interleave(torch.arange(len(gt_groups)), torch.tensor(gt_groups)),
        "gt_groups": gt_groups,
    }


def _predictions(batch_size: int, num_dn: int = 0, seed: int = 1) -> tuple[torch.Tensor, ...]:
    """Decoder training outputs: (dec_boxes, dec_logits, enc_boxes, enc_logits), leaves with gradients."""
    generator = torch.Generator().manual_seed(seed)
    queries = num_dn + NUM_QUERIES
    dec_boxes = torch.randn(NUM_LAYERS, batch_size, queries, 4, generator=generator).sigmoid()
    dec_logits = torch.randn(NUM_LAYERS, batch_size, queries, NUM_CLASSES, generator=generator) * 2
    enc_boxes = torch.randn(batch_size, NUM_QUERIES, 4, generator=generator).sigmoid()
    enc_logits = torch.randn(batch_size, NUM_QUERIES, NUM_CLASSES, generator=generator) * 2
    return tuple(tensor.requires_grad_() for tensor in (dec_boxes, dec_logits, enc_boxes, enc_logits))


def _cdn_meta(targets: dict, num_dn: int) -> dict | None:
    """dn_meta as Ultralytics' decoder makes it for this batch."""
    torch.manual_seed(3)
    class_embed = torch.randn(NUM_CLASSES, 8)
    *_, dn_meta = ultralytics_detr_ops.get_cdn_group(
        targets, NUM_CLASSES, NUM_QUERIES, class_embed, num_dn=num_dn, training=True
    )
    return dn_meta


def _ultralytics_loss(preds: tuple[torch.Tensor, ...], targets: dict, dn_meta: dict | None) -> dict:
    """What RTDETRDetectionModel.loss does with the decoder's outputs and its criterion."""
    dec_boxes, dec_logits, enc_boxes, enc_logits = preds
    dn_boxes = dn_logits = None
    if dn_meta is not None:
        dn_boxes, dec_boxes = torch.split(dec_boxes, dn_meta["dn_num_split"], dim=2)
        dn_logits, dec_logits = torch.split(dec_logits, dn_meta["dn_num_split"], dim=2)
    dec_boxes = torch.cat([enc_boxes.unsqueeze(0), dec_boxes])
    dec_logits = torch.cat([enc_logits.unsqueeze(0), dec_logits])
    criterion = ultralytics_detr_loss.RTDETRDetectionLoss(nc=NUM_CLASSES, use_vfl=True)
    return criterion((dec_boxes, dec_logits), targets, dn_bboxes=dn_boxes, dn_scores=dn_logits, dn_meta=dn_meta)


def _assert_equals_ultralytics(gt_groups: list[int], num_dn: int) -> None:
    targets = _targets(gt_groups)
    dn_meta = _cdn_meta(targets, num_dn) if num_dn else None
    dn_queries = dn_meta["dn_num_split"][0] if dn_meta is not None else 0
    preds = _predictions(len(gt_groups), dn_queries)

    ours = RTDETRLoss(NUM_CLASSES)(preds, targets, dn_meta)
    theirs = _ultralytics_loss(preds, targets, dn_meta)
    assert set(ours) == set(ULTRALYTICS_NAMES)
    for name, their_name in ULTRALYTICS_NAMES.items():
        torch.testing.assert_close(ours[name], theirs[their_name].float(), atol=1e-5, rtol=1e-5, msg=name)
    if num_dn:
        assert all(ours[name] > 0 for name in ours), "denoising terms should be live"
    our_total, their_total = sum(ours.values()), sum(theirs.values())
    torch.testing.assert_close(our_total, their_total, atol=1e-5, rtol=1e-5)

    our_grads = torch.autograd.grad(our_total, preds)
    their_grads = torch.autograd.grad(their_total, preds)
    for ours_grad, theirs_grad in zip(our_grads, their_grads):
        assert ours_grad.abs().sum() > 0
        torch.testing.assert_close(ours_grad, theirs_grad, atol=1e-6, rtol=1e-4)


def test_aligned_iou_and_giou_match_torchvision_pairwise() -> None:
    generator = torch.Generator().manual_seed(0)
    corners1 = torchvision.ops.box_convert(_random_boxes(6, generator), "cxcywh", "xyxy")
    corners2 = torchvision.ops.box_convert(_random_boxes(4, generator), "cxcywh", "xyxy")
    pairwise = (corners1[:, None], corners2[None])
    torch.testing.assert_close(aligned_box_iou(*pairwise), torchvision.ops.box_iou(corners1, corners2))
    torch.testing.assert_close(aligned_box_giou(*pairwise), torchvision.ops.generalized_box_iou(corners1, corners2))
    # eps (1e-7) over a small box's area keeps identical boxes a little under 1
    torch.testing.assert_close(aligned_box_giou(corners1, corners1), torch.ones(6), atol=1e-4, rtol=0)


@pytest.mark.parametrize(("gt_groups", "num_queries"), [(GT_GROUPS, NUM_QUERIES), ([6, 0, 2], 4), ([0, 0], 4)])
def test_matcher_equals_ultralytics(gt_groups: list[int], num_queries: int) -> None:
    targets = _targets(gt_groups)
    generator = torch.Generator().manual_seed(2)
    boxes = torch.randn(len(gt_groups), num_queries, 4, generator=generator).sigmoid()
    logits = torch.randn(len(gt_groups), num_queries, NUM_CLASSES, generator=generator) * 2
    inputs = (boxes, logits, targets["bboxes"], targets["cls"], gt_groups)

    ours = HungarianMatcher()(*inputs)
    theirs = ultralytics_detr_ops.HungarianMatcher(cost_gain={"class": 2, "bbox": 5, "giou": 2})(*inputs)
    assert len(ours) == len(theirs) == len(gt_groups)
    for (our_queries, our_boxes), (their_queries, their_boxes), count in zip(ours, theirs, gt_groups):
        assert len(our_queries) == min(count, num_queries)
        assert torch.equal(our_queries, their_queries) and torch.equal(our_boxes, their_boxes)


def test_loss_equals_ultralytics_without_denoising() -> None:
    _assert_equals_ultralytics(GT_GROUPS, num_dn=0)


@pytest.mark.parametrize("num_dn", [20, 4])  # 4: fewer than the largest image's boxes, a subset is denoised
def test_loss_equals_ultralytics_with_denoising(num_dn: int) -> None:
    _assert_equals_ultralytics(GT_GROUPS, num_dn=num_dn)


def test_batch_without_objects_gives_classification_only() -> None:
    targets = _targets([0, 0, 0])
    preds = _predictions(3)
    losses = RTDETRLoss(NUM_CLASSES)(preds, targets)
    assert all(torch.isfinite(value) for value in losses.values())
    assert losses["det/cls"] > 0 and losses["det/cls_aux"] > 0
    assert all(losses[name] == 0 for name in ("det/l1", "det/giou", "det/l1_aux", "det/giou_aux"))
    theirs = _ultralytics_loss(preds, targets, None)
    torch.testing.assert_close(sum(losses.values()), sum(theirs.values()), atol=1e-5, rtol=1e-5)
    sum(losses.values()).backward()
    assert preds[1].grad.abs().sum() > 0 and preds[3].grad.abs().sum() > 0


def test_unlabelled_image_adds_nothing() -> None:
    labelled_targets, preds = _targets([3, 2]), _predictions(2)
    with_extra = _targets([3, 2, 0])
    extra_preds = _predictions(3)
    merged = tuple(torch.cat((small, big[..., 2:, :, :]), dim=-3) for small, big in zip(preds, extra_preds))
    loss = RTDETRLoss(NUM_CLASSES)
    reference = loss(preds, labelled_targets)
    masked = loss(merged, with_extra, labelled=torch.tensor([1.0, 1.0, 0.0]))
    for name in reference:
        torch.testing.assert_close(masked[name], reference[name], msg=name)


def test_denoising_matches_default_to_all_boxes_in_order() -> None:
    dn_meta = {"dn_pos_idx": [torch.tensor([0, 1, 6, 7]), torch.tensor([], dtype=torch.long)], "dn_num_group": 2}
    (queries, boxes), (no_queries, no_boxes) = denoising_matches(dn_meta, [2, 0])
    assert queries.tolist() == [0, 1, 6, 7] and boxes.tolist() == [0, 1, 0, 1]
    assert no_queries.numel() == no_boxes.numel() == 0


def test_unsorted_targets_are_rejected() -> None:
    targets = _targets([1, 1])
    targets["batch_idx"] = torch.tensor([1, 0])
    with pytest.raises(ValueError, match="sorted"):
        RTDETRLoss(NUM_CLASSES)(_predictions(2), targets)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_loss_on_cuda_equals_cpu() -> None:
    targets = _targets(GT_GROUPS)
    dn_meta = _cdn_meta(targets, 20)
    preds = _predictions(len(GT_GROUPS), dn_meta["dn_num_split"][0])
    on_cpu = RTDETRLoss(NUM_CLASSES)(preds, targets, dn_meta)
    cuda_targets = {key: value.cuda() if torch.is_tensor(value) else value for key, value in targets.items()}
    on_cuda = RTDETRLoss(NUM_CLASSES)(tuple(tensor.cuda() for tensor in preds), cuda_targets, dn_meta)
    for name, value in on_cpu.items():
        assert on_cuda[name].device.type == "cuda"
        torch.testing.assert_close(on_cuda[name].cpu(), value, atol=1e-5, rtol=1e-5, msg=name)
