"""Prompts for training a promptable mask head: one box or one point per instance.

:func:`sample_prompts` draws, from a batch's ground truth, at most ``max_instances``
instances per labelled image and gives each a box prompt (its box) or a single positive
point drawn uniformly among its mask's pixels (SAM's and EdgeSAM's training recipe).
:func:`add_points` appends one point per prompt, for the refinement loop that adds a
point in the error region and decodes again (EdgeSAM's prompt-in-the-loop).

Coordinates are network-input pixels, continuous (pixel ``(x, y)`` covers
``[x, x + 1) x [y, y + 1)``; a point is a pixel centre ``(x + 0.5, y + 0.5)``), as in
:mod:`vfmkd.geometry`. Only torch is used: the targets may live on any device.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

__all__ = ["PADDING_LABEL", "Prompts", "add_points", "sample_prompts"]

#: Point label of a padding slot (no point); 1 is a positive point, 0 a negative one.
PADDING_LABEL = -1


@dataclass(frozen=True)
class Prompts:
    """P prompts over a batch, each on one instance of one image.

    Attributes:
        image_index: ``[P]`` int64, the batch image of each prompt.
        instance: ``[P]`` int64, the instance within its image (index into
            ``targets["masks"][image]``, and the image's rows of ``targets["boxes"]`` in order).
        boxes: ``[P, 4]`` float32 xyxy input pixels (zeros where ``has_box`` is False).
        has_box: ``[P]`` bool, whether the prompt includes its box.
        points: ``[P, K, 2]`` float32 xy input pixels, K >= 1 (zeros in padding slots).
        point_labels: ``[P, K]`` int64: 1 positive, 0 negative, -1 padding.
    """

    image_index: torch.Tensor
    instance: torch.Tensor
    boxes: torch.Tensor
    has_box: torch.Tensor
    points: torch.Tensor
    point_labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.image_index.shape[0])

    @property
    def device(self) -> torch.device:
        """The device every tensor is on."""
        return self.image_index.device

    def to(self, device: torch.device | str) -> Prompts:
        """The same prompts on ``device``."""
        return Prompts(*(getattr(self, field.name).to(device) for field in dataclasses.fields(self)))

    @classmethod
    def empty(cls, device: torch.device | str = "cpu") -> Prompts:
        """No prompts (P = 0, K = 1)."""
        return cls(
            image_index=torch.zeros(0, dtype=torch.int64, device=device),
            instance=torch.zeros(0, dtype=torch.int64, device=device),
            boxes=torch.zeros(0, 4, dtype=torch.float32, device=device),
            has_box=torch.zeros(0, dtype=torch.bool, device=device),
            points=torch.zeros(0, 1, 2, dtype=torch.float32, device=device),
            point_labels=torch.zeros(0, 1, dtype=torch.int64, device=device),
        )


def _labelled_images(targets: Mapping[str, Any], batch_size: int) -> list[bool]:
    has_labels = targets.get("has_labels")
    if has_labels is None:
        return [True] * batch_size
    flags = torch.as_tensor(has_labels).reshape(-1).tolist()
    if len(flags) != batch_size:
        raise ValueError(
            f"targets['has_labels'] has {len(flags)} entries but targets['masks'] has {batch_size} images"
        )
    return [bool(flag) for flag in flags]


def _candidates(
    targets: Mapping[str, Any],
    max_instances: int,
    random_device: torch.device,
    generator: torch.Generator | None,
) -> tuple[list[int], list[int], list[int]]:
    """The prompted instances: (image, instance, row of ``targets["boxes"]``) lists, image-major."""
    masks: Sequence[torch.Tensor | None] = targets["masks"]
    batch_idx = torch.as_tensor(targets["batch_idx"]).reshape(-1)
    images, instances, rows = [], [], []
    for image, labelled in enumerate(_labelled_images(targets, len(masks))):
        image_masks = masks[image]
        if not labelled or image_masks is None or len(image_masks) == 0:
            continue
        image_rows = torch.nonzero(batch_idx == image).flatten()
        if len(image_rows) != len(image_masks):
            raise ValueError(
                f"image {image} of the batch has {len(image_masks)} masks but {len(image_rows)} boxes "
                "(targets['batch_idx']); masks and boxes must come one per instance"
            )
        usable = torch.nonzero(image_masks.flatten(1).ne(0).any(dim=1)).flatten().tolist()
        if len(usable) > max_instances:
            order = torch.randperm(len(usable), generator=generator, device=random_device)[:max_instances]
            usable = [usable[position] for position in sorted(order.tolist())]
        image_rows = image_rows.tolist()
        for instance in usable:
            images.append(image)
            instances.append(instance)
            rows.append(image_rows[instance])
    return images, instances, rows


def _points_in_masks(masks: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """One pixel centre per mask, the pixel picked by ``uniform`` among the mask's pixels.

    Args:
        masks: ``[N, H, W]`` non-empty masks (nonzero = inside).
        uniform: ``[N]`` float in [0, 1) on the masks' device.

    Returns:
        ``[N, 2]`` float32 xy pixel centres.
    """
    width = masks.shape[-1]
    # NOTE: int32 cumulative sums halve the memory of int64 ones; a mask has < 2**31 pixels.
    cumulative = masks.flatten(1).ne(0).to(torch.int32).cumsum(dim=1, dtype=torch.int32)
    counts = cumulative[:, -1]
    rank = (uniform * counts.to(uniform.dtype)).floor().to(torch.int32).clamp(max=counts - 1)
    flat = torch.searchsorted(cumulative, (rank + 1).unsqueeze(1)).squeeze(1)
    return torch.stack([flat % width, torch.div(flat, width, rounding_mode="floor")], dim=1).float() + 0.5


def sample_prompts(
    targets: Mapping[str, Any],
    *,
    max_instances: int,
    point_probability: float = 0.5,
    generator: torch.Generator | None = None,
) -> Prompts:
    """Prompts for a batch's instances: its box, or one positive point inside its mask.

    Per image with ``targets["has_labels"]`` True, at most ``max_instances`` of its
    instances with a non-empty mask (a uniformly random subset when there are more) are
    prompted. Each gets, independently, a point prompt with probability
    ``point_probability`` (a pixel drawn uniformly among its mask's pixels, at the pixel
    centre) or else a box prompt (its box).

    Random numbers are drawn on the generator's device (torch's default CPU generator
    when None) and moved to the targets' device, so a seeded generator gives the same
    prompts on every device.

    Args:
        targets: the batch's targets (:func:`vfmkd.datasets.collate.collate_samples`):
            ``masks`` (per image ``[n_i, H, W]`` or None; None overall gives no prompts),
            ``boxes`` ``[N, 4]`` xyxy input pixels, ``batch_idx`` ``[N]`` and
            ``has_labels`` ``[B]`` (all True when absent).
        max_instances: most prompted instances per image (>= 1).
        point_probability: share of point prompts, in [0, 1].
        generator: random generator, for repeatable prompts.

    Returns:
        The prompts, image-major and by instance within an image, on the device of
        ``targets["boxes"]``; K = 1 (box prompts have a padding point). P = 0 when no
        instance qualifies.
    """
    if max_instances < 1:
        raise ValueError(f"max_instances must be >= 1, got {max_instances}")
    if not 0.0 <= point_probability <= 1.0:
        raise ValueError(f"point_probability must be in [0, 1], got {point_probability}")
    boxes = torch.as_tensor(targets["boxes"])
    device = boxes.device
    if targets.get("masks") is None:
        return Prompts.empty(device)
    random_device = generator.device if generator is not None else torch.device("cpu")
    images, instances, rows = _candidates(targets, max_instances, random_device, generator)
    count = len(images)
    if count == 0:
        return Prompts.empty(device)
    uniforms = torch.rand(count, 2, generator=generator, device=random_device).to(device)
    is_point = uniforms[:, 0] < point_probability
    image_index = torch.tensor(images, dtype=torch.int64, device=device)
    instance = torch.tensor(instances, dtype=torch.int64, device=device)
    prompt_boxes = boxes.reshape(-1, 4)[torch.tensor(rows, dtype=torch.int64, device=device)].float()
    points = torch.zeros(count, 1, 2, dtype=torch.float32, device=device)
    point_labels = torch.full((count, 1), PADDING_LABEL, dtype=torch.int64, device=device)
    for image in sorted(set(images)):
        chosen = torch.nonzero(is_point & (image_index == image)).flatten()
        if len(chosen) == 0:
            continue
        image_masks = targets["masks"][image].to(device)
        points[chosen, 0] = _points_in_masks(image_masks[instance[chosen]], uniforms[chosen, 1])
        point_labels[chosen, 0] = 1
    has_box = ~is_point
    return Prompts(
        image_index=image_index,
        instance=instance,
        boxes=prompt_boxes * has_box.unsqueeze(1),
        has_box=has_box,
        points=points,
        point_labels=point_labels,
    )


def add_points(prompts: Prompts, points: torch.Tensor, labels: torch.Tensor) -> Prompts:
    """The prompts with one more point slot each (the refinement loop's new point).

    Args:
        prompts: P prompts with K point slots.
        points: ``[P, 2]`` xy input pixels.
        labels: ``[P]`` 1 positive, 0 negative, -1 none (the slot is padding and its
            point is zeroed).

    Returns:
        The same prompts with K + 1 point slots, on the prompts' device.
    """
    count = len(prompts)
    points = torch.as_tensor(points, device=prompts.device)
    labels = torch.as_tensor(labels, device=prompts.device)
    if points.shape != (count, 2) or labels.shape != (count,):
        raise ValueError(
            f"add_points needs points [P, 2] and labels [P] for P = {count} prompts, "
            f"got points {tuple(points.shape)} and labels {tuple(labels.shape)}"
        )
    labels = labels.to(torch.int64)
    if not bool(((labels >= PADDING_LABEL) & (labels <= 1)).all()):
        raise ValueError(f"point labels must be 1, 0 or -1, got {sorted(set(labels.tolist()))}")
    points = points.to(torch.float32) * (labels != PADDING_LABEL).unsqueeze(1)
    return dataclasses.replace(
        prompts,
        points=torch.cat([prompts.points, points.unsqueeze(1)], dim=1),
        point_labels=torch.cat([prompts.point_labels, labels.unsqueeze(1)], dim=1),
    )
