"""RT-DETR's contrastive denoising queries in training (from DINO, via DN-DETR).

Zhang et al., "DINO: DETR with Improved DeNoising Anchor Boxes for End-to-End Object
Detection", ICLR 2023, arXiv:2203.03605; Li et al., "DN-DETR", CVPR 2022, arXiv:2203.01305;
as RT-DETR (Zhao et al., CVPR 2024, arXiv:2304.08069) and Ultralytics use them. Noised copies
of the ground truth enter the decoder beside the matching queries; a positive copy must be
reconstructed, a negative one (moved further) must be rejected as background. The matching
queries cannot see the copies, nor the groups of copies each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

from vfmkd.ops.boxes import xywh_to_xyxy, xyxy_to_xywh

__all__ = ["DenoisingQueries", "contrastive_denoising_queries"]


@dataclass
class DenoisingQueries:
    """Denoising queries of one batch (``D`` of them per image, zero-padded).

    Attributes:
        embeddings: ``[B, D, hidden_dim]`` class embeddings of the (noised) labels.
        reference: ``[B, D, 4]`` logits of the noised boxes ``(cx, cy, w, h)``.
        attention_mask: ``[D + K, D + K]`` bool, True where query ``i`` may not see ``j``
            (``K`` matching queries after the ``D`` denoising ones).
        meta: ``dn_pos_idx``, ``dn_gt_idx``, ``dn_num_group``, ``dn_num_split``, as in
            :meth:`vfmkd.models.heads.rtdetr_decoder.RTDETRDecoder.forward`.
    """

    embeddings: torch.Tensor
    reference: torch.Tensor
    attention_mask: torch.Tensor
    meta: dict[str, Any]


def contrastive_denoising_queries(
    targets: Mapping[str, torch.Tensor],
    batch_size: int,
    class_embedding: torch.Tensor,
    num_queries: int,
    num_denoising: int = 100,
    label_noise_ratio: float = 0.5,
    box_noise_scale: float = 1.0,
) -> DenoisingQueries | None:
    """Contrastive denoising queries from the ground truth (DINO, Zhang et al. 2022, arXiv:2203.03605).

    With ``M = min(most objects in one image, num_denoising)``, there are
    ``G = num_denoising // M`` groups of ``2 * M`` queries per image: each object once as a
    positive (corners moved by up to ``box_noise_scale`` half its size) and once as a negative
    (moved by one to two half sizes); padding slots are zero. A label is redrawn uniformly over
    the classes with probability ``label_noise_ratio / 2``. An image with more than ``num_denoising``
    objects denoises a random subset of them. Random draws come from torch's global generators
    in Ultralytics' order (the subsets, the label noise on CPU, then box signs and
    magnitudes), so a seeded run reproduces Ultralytics' queries.

    Args:
        targets: ``cls [N]`` (or ``[N, 1]``) class ids, ``bboxes [N, 4]`` ``(cx, cy, w, h)``
            normalised to ``[0, 1]``, ``batch_idx [N]`` image of each object (any order).
        batch_size: Number of images B.
        class_embedding: ``[num_classes, hidden_dim]`` embedding of the labels (its device is
            the device of every output).
        num_queries: Matching queries K that follow the denoising ones (for the mask).
        num_denoising: Denoising query budget per group set (``D <= 2 * num_denoising``).
        label_noise_ratio: Twice the probability of a label being replaced.
        box_noise_scale: Box noise in half box sizes. NOTE: at 0 the boxes are still turned
            into logits; Ultralytics (and the official code) then pass raw ``[0, 1]`` boxes.

    Returns:
        None when no image has an object or ``num_denoising`` is 0, else the queries, mask and
        meta (``dn_gt_idx`` indexes the rows of ``targets`` as given).
    """
    if num_denoising <= 0:
        return None
    labels, boxes, image_index, order = _sorted_targets(targets, batch_size, class_embedding.device)
    counts = torch.bincount(image_index, minlength=batch_size).tolist()
    per_image = min(max(counts), num_denoising)
    if per_image == 0:
        return None
    num_groups = num_denoising // per_image
    kept = _capped_subset(counts, per_image, boxes.device)
    if kept is not None:
        labels, boxes, image_index, order = labels[kept], boxes[kept], image_index[kept], order[kept]
        counts = [min(count, per_image) for count in counts]
    total, copies = len(labels), 2 * num_groups
    copy_index = torch.arange(copies, device=boxes.device).repeat_interleave(total)
    labels, boxes = labels.repeat(copies), boxes.repeat(copies, 1)
    if label_noise_ratio > 0:
        labels = _noisy_labels(labels, class_embedding.shape[0], label_noise_ratio)
    box_logits = _noisy_box_logits(boxes, copy_index % 2 == 1, box_noise_scale)

    ranks = torch.cat([torch.arange(count) for count in counts]).to(boxes.device)  # index within its image
    slots = ranks.repeat(copies) + per_image * copy_index
    images = image_index.repeat(copies)
    num_dn = per_image * copies
    embeddings = class_embedding.new_zeros(batch_size, num_dn, class_embedding.shape[1])
    embeddings[images, slots] = class_embedding[labels]
    reference = box_logits.new_zeros(batch_size, num_dn, 4)
    reference[images, slots] = box_logits

    positives = ranks.cpu()[None] + 2 * per_image * torch.arange(num_groups)[:, None]  # [G, total]
    meta = {
        "dn_pos_idx": [group.reshape(-1) for group in positives.split(counts, dim=1)],
        "dn_gt_idx": list(order.cpu().split(counts)),
        "dn_num_group": num_groups,
        "dn_num_split": [num_dn, num_queries],
    }
    mask = _denoising_attention_mask(num_dn, 2 * per_image, num_queries, class_embedding.device)
    return DenoisingQueries(embeddings, reference, mask, meta)


def _sorted_targets(
    targets: Mapping[str, torch.Tensor], batch_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    for key in ("cls", "bboxes", "batch_idx"):
        if key not in targets:
            raise KeyError(f"denoising targets need '{key}' (normalised cxcywh 'bboxes'); got keys {sorted(targets)}")
    labels = targets["cls"].to(device=device, dtype=torch.long).reshape(-1)
    boxes = targets["bboxes"].to(device=device, dtype=torch.float32).reshape(-1, 4)
    image_index = targets["batch_idx"].to(device=device, dtype=torch.long).reshape(-1)
    if not (labels.numel() == boxes.shape[0] == image_index.numel()):
        raise ValueError(
            f"denoising targets disagree in length: cls {labels.numel()}, bboxes {boxes.shape[0]}, "
            f"batch_idx {image_index.numel()}"
        )
    if image_index.numel() and not 0 <= int(image_index.min()) <= int(image_index.max()) < batch_size:
        raise ValueError(f"targets batch_idx spans {image_index.min()}..{image_index.max()}, batch has {batch_size}")
    order = torch.argsort(image_index, stable=True)
    return labels[order], boxes[order], image_index[order], order


def _capped_subset(counts: list[int], per_image: int, device: torch.device) -> torch.Tensor | None:
    """Rows kept when an image has more than ``per_image`` objects (a sorted random subset per image)."""
    if max(counts) <= per_image:
        return None
    starts = [sum(counts[:index]) for index in range(len(counts))]
    # NOTE: one randperm per image, even those under the cap, to draw as Ultralytics does.
    return torch.cat(
        [torch.randperm(count, device=device)[:per_image].sort().values + start for count, start in zip(counts, starts)]
    )


def _noisy_labels(labels: torch.Tensor, num_classes: int, ratio: float) -> torch.Tensor:
    # NOTE: the coin flips come from the CPU generator whatever the device, as in Ultralytics.
    flipped = (torch.rand(labels.shape) < ratio * 0.5).nonzero().squeeze(-1).to(labels.device)
    labels[flipped] = torch.randint(0, num_classes, flipped.shape, dtype=labels.dtype, device=labels.device)
    return labels


def _noisy_box_logits(boxes: torch.Tensor, negative: torch.Tensor, scale: float) -> torch.Tensor:
    """Corners moved by ``[0, 1)`` (positive) or ``[1, 2)`` (negative) half sizes times ``scale``; logits."""
    if scale > 0:
        reach = (boxes[:, 2:] * 0.5).repeat(1, 2) * scale
        sign = torch.randint_like(boxes, 0, 2) * 2.0 - 1.0
        magnitude = torch.rand_like(boxes) + negative[:, None]
        corners = (xywh_to_xyxy(boxes) + magnitude * sign * reach).clamp(0.0, 1.0)
        boxes = xyxy_to_xywh(corners)
    return torch.logit(boxes, eps=1e-6)


def _denoising_attention_mask(num_dn: int, group_size: int, num_queries: int, device: torch.device) -> torch.Tensor:
    """``[D + K, D + K]``: matching queries do not see denoising ones, groups do not see each other."""
    mask = torch.zeros(num_dn + num_queries, num_dn + num_queries, dtype=torch.bool, device=device)
    mask[num_dn:, :num_dn] = True
    group = torch.arange(num_dn, device=device) // group_size
    mask[:num_dn, :num_dn] = group[:, None] != group[None, :]
    return mask
