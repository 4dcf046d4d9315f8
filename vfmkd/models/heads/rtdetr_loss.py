"""RT-DETR set-prediction loss: Hungarian matching, varifocal classification, L1 and GIoU box terms.

RT-DETR: Zhao et al., "DETRs Beat YOLOs on Real-time Object Detection", CVPR 2024,
arXiv:2304.08069 (reference code: github.com/lyuwenyu/RT-DETR, Apache-2.0). Hungarian
matching: Carion et al., "End-to-End Object Detection with Transformers" (DETR), ECCV 2020.
Varifocal loss: Zhang et al., "VarifocalNet", CVPR 2021, arXiv:2008.13367. Denoising
queries: Li et al., "DN-DETR", CVPR 2022.

The values reproduce Ultralytics' ``RTDETRDetectionLoss(nc, use_vfl=True)`` as its
``RTDETRDetectionModel.loss`` calls it (weights class 1 / bbox 5 / giou 2; varifocal
``alpha 0.25, gamma 1.5``; matcher costs class 2 / bbox 5 / giou 2 with a focal class cost
``alpha 0.25, gamma 2.0``), and so its total. Every set of predictions (the encoder's
proposals, each decoder layer, each denoising layer) is matched on its own, except the
denoising queries, which are matched to the boxes they were made from. Each term of a set
is divided by its number of matched pairs (at least 1). A batch with no boxes at all has
only the classification term, and Ultralytics then uses a focal loss, not the varifocal one
(all targets are 0): reproduced here.

Loss names, and the Ultralytics key each one equals:

============================  ===================================================
``det/cls``, ``det/l1``,      last decoder layer (``loss_class``, ``loss_bbox``,
``det/giou``                  ``loss_giou``: the three Ultralytics shows)
``det/*_aux``                 encoder proposals + every other decoder layer, summed
                              (``loss_class_aux``, ...)
``det/*_dn``                  denoising queries of the last layer (``loss_class_dn``, ...)
``det/*_aux_dn``              denoising queries of the other layers (``loss_class_aux_dn``, ...)
============================  ===================================================

All twelve are returned (the ``_dn`` ones are zeros without denoising, so the set of names
never changes); the trainer sums them into Ultralytics' total.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vfmkd.ops.boxes import aligned_box_giou, aligned_box_iou, xywh_to_xyxy

__all__ = ["HungarianMatcher", "RTDETRLoss", "denoising_matches", "sigmoid_focal_loss", "varifocal_loss"]

CLS_LOSS = "det/cls"
L1_LOSS = "det/l1"
GIOU_LOSS = "det/giou"
AUX_SUFFIX = "_aux"
DN_SUFFIX = "_dn"
TERM_NAMES = (CLS_LOSS, L1_LOSS, GIOU_LOSS)

# Per image: (query indices [K], indices into the batch's flat ground-truth list [K]).
Matches = list[tuple[torch.Tensor, torch.Tensor]]


def sigmoid_focal_loss(logits: torch.Tensor, labels: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    """Element-wise focal loss on logits (Lin et al., ICCV 2017).

    Args:
        logits: ``[...]`` class logits.
        labels: ``[...]`` 0/1 targets, same shape.
        alpha: Weight of the positives (``1 - alpha`` for the negatives).
        gamma: Focusing exponent on ``1 - p_t``.

    Returns:
        ``[...]`` unreduced loss.
    """
    probs = logits.sigmoid()
    p_t = labels * probs + (1 - labels) * (1 - probs)
    alpha_t = labels * alpha + (1 - labels) * (1 - alpha)
    bce = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    return bce * (1.0 - p_t) ** gamma * alpha_t


def varifocal_loss(
    logits: torch.Tensor, target_scores: torch.Tensor, labels: torch.Tensor, alpha: float, gamma: float
) -> torch.Tensor:
    """Element-wise varifocal (IoU-aware) loss on logits.

    Positives are pulled towards their target score (the IoU of the matched box) and
    weighted by it; negatives are weighted by ``alpha * p ** gamma``.

    Args:
        logits: ``[...]`` class logits.
        target_scores: ``[...]`` targets in ``[0, 1]``, 0 off the positives.
        labels: ``[...]`` 0/1 positive mask, same shape.
        alpha: Weight of the negatives.
        gamma: Exponent of the predicted probability on the negatives.

    Returns:
        ``[...]`` unreduced loss.
    """
    # NOTE: the weight is not detached, as in Ultralytics (the reference code detaches it).
    weight = alpha * logits.sigmoid().pow(gamma) * (1 - labels) + target_scores * labels
    return F.binary_cross_entropy_with_logits(logits, target_scores, reduction="none") * weight


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to ground-truth boxes by minimum total cost.

    Cost of a (query, box) pair: ``class_weight * focal class cost + bbox_weight * L1 of the
    cxcywh boxes + giou_weight * (1 - GIoU)``; the focal class cost of class ``c`` with
    probability ``p`` is ``alpha (1 - p)^gamma (-log p) - (1 - alpha) p^gamma (-log(1 - p))``.
    Non-finite costs count as 0. Each image is solved by ``scipy.optimize.linear_sum_assignment``.

    Args:
        class_weight: Weight of the class cost.
        bbox_weight: Weight of the L1 box cost.
        giou_weight: Weight of the GIoU cost.
        alpha: Focal balance of the class cost.
        gamma: Focal exponent of the class cost.

    The defaults are the costs Ultralytics' ``DETRLoss`` gives its matcher (its
    ``HungarianMatcher`` alone defaults to a class weight of 1) and those of the reference code.
    """

    def __init__(
        self,
        class_weight: float = 2.0,
        bbox_weight: float = 5.0,
        giou_weight: float = 2.0,
        alpha: float = 0.25,
        gamma: float = 2.0,
    ) -> None:
        super().__init__()
        self.class_weight = class_weight
        self.bbox_weight = bbox_weight
        self.giou_weight = giou_weight
        self.alpha = alpha
        self.gamma = gamma

    def extra_repr(self) -> str:
        return f"class_weight={self.class_weight}, bbox_weight={self.bbox_weight}, giou_weight={self.giou_weight}"

    def cost(
        self, pred_boxes: torch.Tensor, pred_logits: torch.Tensor, gt_boxes: torch.Tensor, gt_classes: torch.Tensor
    ) -> torch.Tensor:
        """Matching cost of every query against every ground-truth box of the batch.

        Args:
            pred_boxes: ``[B, Q, 4]`` cxcywh boxes, normalised.
            pred_logits: ``[B, Q, C]`` class logits.
            gt_boxes: ``[N, 4]`` cxcywh boxes, normalised.
            gt_classes: ``[N]`` int64 class ids.

        Returns:
            ``[B, Q, N]`` float32 costs (no gradient).
        """
        probs = pred_logits.detach().float().sigmoid()[..., gt_classes]
        positive = self.alpha * (1 - probs) ** self.gamma * -(probs + 1e-8).log()
        negative = (1 - self.alpha) * probs**self.gamma * -(1 - probs + 1e-8).log()
        boxes, gt_boxes = pred_boxes.detach().float(), gt_boxes.float()
        l1 = (boxes[:, :, None] - gt_boxes[None, None]).abs().sum(-1)
        giou = aligned_box_giou(xywh_to_xyxy(boxes)[:, :, None], xywh_to_xyxy(gt_boxes)[None, None])
        total = self.class_weight * (positive - negative) + self.bbox_weight * l1 + self.giou_weight * (1 - giou)
        return torch.where(torch.isfinite(total), total, torch.zeros_like(total))

    @torch.no_grad()
    def forward(
        self,
        pred_boxes: torch.Tensor,
        pred_logits: torch.Tensor,
        gt_boxes: torch.Tensor,
        gt_classes: torch.Tensor,
        gt_groups: Sequence[int],
    ) -> Matches:
        """Match each image's queries to its own boxes.

        Args:
            pred_boxes: ``[B, Q, 4]`` cxcywh boxes, normalised.
            pred_logits: ``[B, Q, C]`` class logits.
            gt_boxes: ``[N, 4]`` cxcywh boxes, normalised, image by image.
            gt_classes: ``[N]`` int64 class ids, same order.
            gt_groups: ``B`` box counts, summing to ``N``.

        Returns:
            Per image, ``(query indices [K], ground-truth indices [K])`` int64 on the CPU,
            ``K = min(Q, count)``, sorted by query; the ground-truth indices point into the
            flat ``[N]`` list (image offset included).
        """
        from scipy.optimize import linear_sum_assignment

        empty = torch.zeros(0, dtype=torch.long)
        if sum(gt_groups) == 0:
            return [(empty, empty) for _ in gt_groups]
        costs = self.cost(pred_boxes, pred_logits, gt_boxes, gt_classes).cpu().double().numpy()
        matches, first = [], 0
        for image, count in enumerate(gt_groups):
            queries, boxes = linear_sum_assignment(costs[image, :, first : first + count])
            boxes = torch.as_tensor(boxes, dtype=torch.long) + first
            matches.append((torch.as_tensor(queries, dtype=torch.long), boxes))
            first += count
        return matches


@dataclass(frozen=True)
class _GroundTruth:
    classes: torch.Tensor  # [N] int64
    boxes: torch.Tensor  # [N, 4] cxcywh, normalised
    groups: list[int]  # boxes per image, B entries


def _ground_truth(targets: Mapping[str, torch.Tensor], batch_size: int, device: torch.device) -> _GroundTruth:
    for key in ("batch_idx", "cls", "bboxes"):
        if key not in targets:
            raise KeyError(f"RT-DETR loss targets need '{key}'; got keys {sorted(targets)}")
    image_index = targets["batch_idx"].to(device=device, dtype=torch.long).reshape(-1)
    classes = targets["cls"].to(device=device, dtype=torch.long).reshape(-1)
    boxes = targets["bboxes"].to(device=device).reshape(-1, 4)
    if not (image_index.numel() == classes.numel() == boxes.shape[0]):
        raise ValueError(
            f"RT-DETR loss targets disagree in length: batch_idx {image_index.numel()}, cls {classes.numel()}, "
            f"bboxes {boxes.shape[0]}"
        )
    unsorted = bool((image_index[1:] < image_index[:-1]).any())
    if unsorted or (image_index.numel() and int(image_index.max()) >= batch_size):
        raise ValueError(
            f"RT-DETR loss targets need batch_idx sorted and below the batch size {batch_size} (boxes image by "
            f"image, as vfmkd.datasets.collate gives them); got {image_index[:20].tolist()}"
        )
    groups = torch.bincount(image_index, minlength=batch_size).tolist()
    return _GroundTruth(classes, boxes, groups)


def denoising_matches(dn_meta: Mapping[str, Any], gt_groups: Sequence[int]) -> Matches:
    """Fixed matches of the denoising queries: each positive query to the box it was made from.

    Args:
        dn_meta: ``dn_pos_idx`` (per image, the positive denoising queries, group after group),
            ``dn_num_group`` (number of groups) and optionally ``dn_gt_idx`` (per image, the
            flat ground-truth indices one group reconstructs; without it, all the image's boxes
            in order, as in the reference code and older Ultralytics).
        gt_groups: ``B`` box counts.

    Returns:
        Per image, ``(query indices, ground-truth indices)`` as :meth:`HungarianMatcher.forward`.
    """
    positives, num_groups = dn_meta["dn_pos_idx"], int(dn_meta["dn_num_group"])
    if len(positives) != len(gt_groups):
        raise ValueError(f"dn_meta['dn_pos_idx'] has {len(positives)} images but the batch has {len(gt_groups)}")
    if "dn_gt_idx" in dn_meta:
        sources = [torch.as_tensor(indices, dtype=torch.long).cpu() for indices in dn_meta["dn_gt_idx"]]
    else:
        offsets = [sum(gt_groups[:image]) for image in range(len(gt_groups))]
        sources = [torch.arange(count) + offset for count, offset in zip(gt_groups, offsets)]
    matches = []
    for image, (queries, boxes) in enumerate(zip(positives, sources)):
        boxes = boxes.repeat(num_groups)
        if len(queries) != len(boxes):
            raise ValueError(
                f"image {image}: {len(queries)} positive denoising queries for {len(boxes)} boxes x groups in dn_meta"
            )
        matches.append((torch.as_tensor(queries, dtype=torch.long).cpu(), boxes))
    return matches


class RTDETRLoss(nn.Module):
    """Set-prediction loss of an RT-DETR decoder: matching, classification, L1 and GIoU terms.

    Args:
        num_classes: Number of classes C.
        class_weight: Weight of the classification term.
        bbox_weight: Weight of the L1 term (cxcywh, normalised).
        giou_weight: Weight of the GIoU term.
        alpha: Varifocal (or focal) balance of the classification term.
        gamma: Varifocal (or focal) exponent of the classification term.
        use_varifocal: Varifocal classification (Ultralytics' RT-DETR, ``use_vfl=True``);
            False: focal loss (``use_vfl=False``).
        matcher: The query-to-box matcher; default :class:`HungarianMatcher` with its defaults.

    Defaults are Ultralytics' (``RTDETRDetectionLoss(nc, use_vfl=True)``). The reference code
    (lyuwenyu/RT-DETR) differs in ``alpha`` (0.75) and ``gamma`` (2.0) of the varifocal term,
    in normalising by the number of boxes rather than of matched pairs, and in detaching the
    varifocal weight.

    Example (experiment YAML, keys passed through the head config)::

        heads:
          detection: {type: rtdetr_head, num_classes: 80, class_weight: 1.0, bbox_weight: 5.0, giou_weight: 2.0}
    """

    def __init__(
        self,
        num_classes: int,
        *,
        class_weight: float = 1.0,
        bbox_weight: float = 5.0,
        giou_weight: float = 2.0,
        alpha: float = 0.25,
        gamma: float = 1.5,
        use_varifocal: bool = True,
        matcher: HungarianMatcher | None = None,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.class_weight = class_weight
        self.bbox_weight = bbox_weight
        self.giou_weight = giou_weight
        self.alpha = alpha
        self.gamma = gamma
        self.use_varifocal = use_varifocal
        self.matcher = matcher if matcher is not None else HungarianMatcher()

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, class_weight={self.class_weight}, bbox_weight={self.bbox_weight}, "
            f"giou_weight={self.giou_weight}, use_varifocal={self.use_varifocal}"
        )

    def forward(
        self,
        preds: Sequence[torch.Tensor],
        targets: Mapping[str, torch.Tensor],
        dn_meta: Mapping[str, Any] | None = None,
        *,
        labelled: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Compute the twelve loss terms.

        Args:
            preds: The decoder's training outputs ``(dec_boxes [L, B, D + Q, 4], dec_logits
                [L, B, D + Q, C], enc_boxes [B, Q, 4], enc_logits [B, Q, C])``: boxes cxcywh
                normalised (after the sigmoid), class logits. The first ``D`` queries of every
                decoder layer are the denoising ones, ``D = dn_meta["dn_num_split"][0]``
                (``D = 0`` without ``dn_meta``). This is the tuple Ultralytics'
                ``RTDETRDecoder`` returns in training, before ``RTDETRDetectionModel.loss``
                splits the denoising queries off and stacks the encoder's in front.
            targets: ``batch_idx [N]`` (sorted), ``cls [N]`` (or ``[N, 1]``), ``bboxes [N, 4]``
                cxcywh normalised; the layout of Ultralytics' batch.
            dn_meta: The denoising metadata of the decoder's query builder (``dn_pos_idx``,
                ``dn_num_group``, ``dn_num_split``, optionally ``dn_gt_idx``; see
                :func:`denoising_matches`); None without denoising.
            labelled: ``[B]`` 0 for images without labels: their queries are left out of the
                classification term (they have no boxes, so no box terms). None: every image
                is labelled.

        Returns:
            ``det/{cls,l1,giou}`` and their ``_aux``, ``_dn`` and ``_aux_dn`` variants (module
            docstring): float32 scalars, weights applied; their sum is Ultralytics' total.
        """
        if len(preds) != 4:
            raise ValueError(
                f"RT-DETR loss preds must be (dec_boxes, dec_logits, enc_boxes, enc_logits); got {len(preds)} tensors"
            )
        dec_boxes, dec_logits, enc_boxes, enc_logits = preds
        if dec_logits.shape[-1] != self.num_classes:
            raise ValueError(f"RT-DETR loss built for {self.num_classes} classes got logits of {dec_logits.shape[-1]}")
        gt = _ground_truth(targets, dec_logits.shape[1], dec_logits.device)
        if dn_meta is not None:
            split = [int(count) for count in dn_meta["dn_num_split"]]
            dn_boxes, dec_boxes = dec_boxes.split(split, dim=2)
            dn_logits, dec_logits = dec_logits.split(split, dim=2)
        layers = [(enc_boxes, enc_logits), *zip(dec_boxes, dec_logits)]
        losses = self._set_terms(layers, gt, None, labelled, suffix="")
        if dn_meta is None:
            zero = torch.zeros((), device=dec_logits.device)
            losses.update({name + DN_SUFFIX: zero for name in list(losses)})
        else:
            matches = denoising_matches(dn_meta, gt.groups)
            losses.update(self._set_terms(list(zip(dn_boxes, dn_logits)), gt, matches, labelled, DN_SUFFIX))
        return losses

    def _set_terms(
        self,
        layers: Sequence[tuple[torch.Tensor, torch.Tensor]],
        gt: _GroundTruth,
        matches: Matches | None,
        labelled: torch.Tensor | None,
        suffix: str,
    ) -> dict[str, torch.Tensor]:
        """Terms of the last layer, and of the others summed as ``_aux``; each layer is matched
        on its own unless ``matches`` is given."""
        *aux_layers, last = layers
        main = self._layer_terms(*last, gt, matches, labelled)
        aux = torch.zeros(3, device=main.device)
        for boxes, logits in aux_layers:
            aux = aux + self._layer_terms(boxes, logits, gt, matches, labelled)
        named = {name + suffix: value for name, value in zip(TERM_NAMES, main.unbind())}
        named.update({name + AUX_SUFFIX + suffix: value for name, value in zip(TERM_NAMES, aux.unbind())})
        return named

    def _layer_terms(
        self,
        pred_boxes: torch.Tensor,
        pred_logits: torch.Tensor,
        gt: _GroundTruth,
        matches: Matches | None,
        labelled: torch.Tensor | None,
    ) -> torch.Tensor:
        """``[3]`` weighted (class, L1, GIoU) terms of one set of predictions ``[B, Q, 4]``, ``[B, Q, C]``."""
        if matches is None:
            matches = self.matcher(pred_boxes, pred_logits, gt.boxes, gt.classes, gt.groups)
        device = pred_logits.device
        image_index = torch.cat([torch.full_like(queries, image) for image, (queries, _) in enumerate(matches)])
        query_index = torch.cat([queries for queries, _ in matches])
        gt_index = torch.cat([boxes for _, boxes in matches]).to(device)
        positions = (image_index.to(device), query_index.to(device))
        normaliser = max(gt_index.numel(), 1)

        matched_boxes = pred_boxes[positions].float()
        target_boxes = gt.boxes[gt_index].float()
        matched_corners, target_corners = xywh_to_xyxy(matched_boxes), xywh_to_xyxy(target_boxes)
        l1 = F.l1_loss(matched_boxes, target_boxes, reduction="sum")
        giou = (1.0 - aligned_box_giou(matched_corners, target_corners)).sum()
        ious = aligned_box_iou(matched_corners.detach(), target_corners)
        classification = self._class_term(pred_logits, (*positions, gt.classes[gt_index]), ious, labelled)
        weighted = (self.class_weight * classification, self.bbox_weight * l1, self.giou_weight * giou)
        return torch.stack(weighted) / normaliser

    def _class_term(
        self,
        pred_logits: torch.Tensor,
        positives: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        ious: torch.Tensor,
        labelled: torch.Tensor | None,
    ) -> torch.Tensor:
        """Summed classification loss over ``[B, Q, C]``; ``positives`` index (image, query, class)."""
        logits = pred_logits.float()
        labels = torch.zeros_like(logits)
        labels[positives] = 1.0
        if self.use_varifocal and ious.numel():
            target_scores = torch.zeros_like(logits)
            target_scores[positives] = ious
            loss = varifocal_loss(logits, target_scores, labels, self.alpha, self.gamma)
        else:
            loss = sigmoid_focal_loss(logits, labels, self.alpha, self.gamma)
        if labelled is not None:
            loss = loss * labelled.to(device=loss.device, dtype=loss.dtype)[:, None, None]
        return loss.sum()
