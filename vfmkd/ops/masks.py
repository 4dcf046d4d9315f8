"""Binary-mask utilities for promptable segmentation: IoU, EdgeSAM's prompt points, frames.

Conventions: masks are bool ``[N, H, W]`` (or ``[H, W]`` for one mask); points are
continuous ``(x, y)`` pixel coordinates as in :mod:`vfmkd.geometry`, so the centre of
pixel ``(row, column)`` is ``(column + 0.5, row + 0.5)``.

- :func:`mask_iou`: IoU of aligned pairs of masks.
- :func:`centre_point`: the pixel farthest from the mask boundary (EdgeSAM's centre-point
  prompt), by a Euclidean distance transform.
- :func:`refinement_point` / :func:`refinement_points`: a click drawn uniformly from where a
  prediction disagrees with its target (EdgeSAM's and RITM's iterative refinement).
- :func:`logits_to_original` / :func:`masks_to_original`: mask logits of a network input
  back to the original image through a frame's inverse (SAM's ``postprocess_masks``).
"""

from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "FrameLike",
    "centre_point",
    "logits_to_original",
    "mask_iou",
    "masks_to_original",
    "refinement_point",
    "refinement_points",
]


class FrameLike(Protocol):
    """What the mapping functions read of a :class:`vfmkd.geometry.Frame`.

    Attributes:
        matrix: 2x3 affine matrix, original pixels -> input pixels.
        input_size: (H, W) of the network input.
        valid: (x0, y0, x1, y1) input region holding image content.
        source_size: (H, W) of the original image.
    """

    matrix: np.ndarray
    input_size: tuple[int, int]
    valid: Sequence[float]
    source_size: tuple[int, int]


def mask_iou(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """IoU of each pair ``(first[i], second[i])`` of bool masks.

    Args:
        first: ``[N, H, W]`` bool masks.
        second: ``[N, H, W]`` bool masks, aligned with ``first``.

    Returns:
        ``[N]`` float32 IoU; a pair of two empty masks counts as identical (1.0).
    """
    if first.shape != second.shape:
        raise ValueError(f"mask_iou needs aligned masks, got shapes {tuple(first.shape)} and {tuple(second.shape)}")
    first, second = first.bool().flatten(1), second.bool().flatten(1)
    intersection = (first & second).sum(1)
    union = (first | second).sum(1)
    iou = intersection.float() / union.clamp(min=1).float()
    return torch.where(union > 0, iou, torch.ones_like(iou))


def centre_point(mask: torch.Tensor) -> torch.Tensor:
    """The pixel centre farthest from the mask's boundary (EdgeSAM's centre-point prompt).

    The distance of a mask pixel is the Euclidean distance (between pixel centres) to the
    nearest pixel outside the mask; pixels beyond the image border count as outside, so a
    mask touching the border is not pulled towards it. Ties (several pixels at the
    largest distance) go to the first in row-major order: the smallest row, then the
    smallest column.

    Args:
        mask: ``[H, W]`` bool mask with at least one pixel set.

    Returns:
        ``[2]`` float32 ``(column + 0.5, row + 0.5)`` on the mask's device.
    """
    from scipy.ndimage import distance_transform_edt

    if mask.dim() != 2:
        raise ValueError(f"centre_point needs one [H, W] mask, got shape {tuple(mask.shape)}")
    array = mask.detach().bool().cpu().numpy()
    if not array.any():
        raise ValueError("centre_point needs a non-empty mask; this one has no pixel set")
    distance = distance_transform_edt(np.pad(array, 1))[1:-1, 1:-1]
    # NOTE: np.argmax returns the first maximum in row-major order: the documented tie-break.
    row, column = np.unravel_index(int(np.argmax(distance)), distance.shape)
    return torch.tensor([column + 0.5, row + 0.5], dtype=torch.float32, device=mask.device)


def refinement_points(
    predictions: torch.Tensor,
    targets: torch.Tensor,
    generator: torch.Generator,
    min_pixels: int = 10,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One correction click per mask, drawn uniformly from where prediction and target differ.

    The error region is the union of false negatives (target pixels the prediction misses)
    and false positives (predicted pixels outside the target); a click in a false negative
    is positive (label 1), in a false positive negative (label 0). Exactly one number is
    drawn from ``generator`` per mask, whatever the masks hold, so the clicks of a mask do
    not depend on the masks drawn with it.

    Args:
        predictions: ``[N, H, W]`` bool predicted masks.
        targets: ``[N, H, W]`` bool target masks.
        generator: a CPU ``torch.Generator`` (seed it for repeatable clicks).
        min_pixels: an error region smaller than this gives no click.

    Returns:
        ``[N, 2]`` float32 click points (pixel centres ``(x, y)``; ``(0, 0)`` where there is
        none) and ``[N]`` int64 labels: 1 positive, 0 negative, -1 no click.
    """
    if predictions.shape != targets.shape or predictions.dim() != 3:
        raise ValueError(
            "refinement_points needs aligned [N, H, W] masks, "
            f"got {tuple(predictions.shape)} and {tuple(targets.shape)}"
        )
    count, _, width = targets.shape
    draws = torch.rand(count, generator=generator, dtype=torch.float64).tolist()
    points = torch.zeros(count, 2, dtype=torch.float32)
    labels = torch.full((count,), -1, dtype=torch.int64)
    targets_flat = targets.bool().flatten(1)
    errors = predictions.bool().flatten(1) ^ targets_flat
    for index, draw in enumerate(draws):
        positions = torch.nonzero(errors[index]).squeeze(1)
        if len(positions) < max(int(min_pixels), 1):
            continue
        chosen = int(positions[min(int(draw * len(positions)), len(positions) - 1)])
        row, column = divmod(chosen, width)
        points[index] = torch.tensor([column + 0.5, row + 0.5])
        labels[index] = int(bool(targets_flat[index, chosen]))
    return points.to(targets.device), labels.to(targets.device)


def refinement_point(
    prediction: torch.Tensor,
    target: torch.Tensor,
    generator: torch.Generator,
    min_pixels: int = 10,
) -> tuple[torch.Tensor, int] | None:
    """One correction click for one mask (see :func:`refinement_points`).

    Args:
        prediction: ``[H, W]`` bool predicted mask.
        target: ``[H, W]`` bool target mask.
        generator: a CPU ``torch.Generator``.
        min_pixels: an error region smaller than this gives no click.

    Returns:
        ``([2] float32 (x, y) pixel centre, label)`` with label 1 (in a false negative) or 0
        (in a false positive), or None when the error region has fewer than ``min_pixels``.
    """
    points, labels = refinement_points(prediction[None], target[None], generator, min_pixels)
    if int(labels[0]) < 0:
        return None
    return points[0], int(labels[0])


def logits_to_original(mask_logits: torch.Tensor, frame: FrameLike) -> torch.Tensor:
    """Resample mask logits of a network input onto the original image's pixel grid.

    Each original pixel centre is mapped into the input by ``frame.matrix`` and the logits
    are sampled there bilinearly; sample points are kept inside the valid (non-padding)
    region's outer pixel centres, so padding logits never leak in. For a letterbox frame
    this equals SAM's ``postprocess_masks`` (up to float32 rounding of the sampling
    coordinates): crop the valid region, then ``F.interpolate(..., mode="bilinear",
    align_corners=False)`` to the original size.

    Args:
        mask_logits: ``[N, h, w]`` logits covering the whole network input, at the input's
            resolution or any other (a low-res ``[N, 256, 256]`` for a 1024 input works).
        frame: the map original image -> network input (a :class:`vfmkd.geometry.Frame`).

    Returns:
        ``[N, H0, W0]`` float32 logits, ``(H0, W0) = frame.source_size``.
    """
    if mask_logits.dim() != 3:
        raise ValueError(f"mask_logits must be [N, h, w], got shape {tuple(mask_logits.shape)}")
    count, height, width = mask_logits.shape
    source_height, source_width = (int(size) for size in frame.source_size)
    input_height, input_width = (int(size) for size in frame.input_size)
    if count == 0:
        return mask_logits.new_zeros((0, source_height, source_width), dtype=torch.float32)
    matrix = np.asarray(frame.matrix, dtype=np.float64)
    columns = np.arange(source_width, dtype=np.float64)[None, :] + 0.5
    rows = np.arange(source_height, dtype=np.float64)[:, None] + 0.5
    # Original pixel centres -> input pixels -> mask pixels.
    scale_x, scale_y = width / input_width, height / input_height
    mask_x = (matrix[0, 0] * columns + matrix[0, 1] * rows + matrix[0, 2]) * scale_x
    mask_y = (matrix[1, 0] * columns + matrix[1, 1] * rows + matrix[1, 2]) * scale_y
    x0, y0, x1, y1 = (float(value) for value in frame.valid)
    mask_x = _clamp_to_centres(mask_x, x0 * scale_x, x1 * scale_x)
    mask_y = _clamp_to_centres(mask_y, y0 * scale_y, y1 * scale_y)
    # align_corners=False: normalised -1 and 1 are the outer edges of the mask grid.
    grid = np.stack([mask_x * (2.0 / width) - 1.0, mask_y * (2.0 / height) - 1.0], axis=-1)
    grid_t = torch.from_numpy(grid).to(device=mask_logits.device, dtype=torch.float32)
    sampled = F.grid_sample(
        mask_logits[:, None].float(),
        grid_t[None].expand(count, -1, -1, -1),
        mode="bilinear",
        padding_mode="border",
        align_corners=False,
    )
    return sampled[:, 0]


def _clamp_to_centres(coordinates: np.ndarray, start: float, end: float) -> np.ndarray:
    """Clamp coordinates to the first and last pixel centres of the span ``[start, end)``."""
    low, high = start + 0.5, end - 0.5
    if high < low:
        low = high = (start + end) / 2
    return np.clip(coordinates, low, high)


def masks_to_original(mask_logits: torch.Tensor, frame: FrameLike) -> torch.Tensor:
    """Binary masks in original image pixels from mask logits of a network input.

    Args:
        mask_logits: ``[N, h, w]`` logits covering the network input (see
            :func:`logits_to_original`).
        frame: the map original image -> network input.

    Returns:
        ``[N, H0, W0]`` bool masks: bilinear logits above 0.
    """
    return logits_to_original(mask_logits, frame) > 0
