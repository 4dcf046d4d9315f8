"""Mask ops: IoU, the centre point against brute force, refinement clicks, masks back through frames."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vfmkd.geometry import Frame, letterbox_frame, scale_translate_matrix
from vfmkd.ops.masks import (
    centre_point,
    logits_to_original,
    mask_iou,
    masks_to_original,
    refinement_point,
    refinement_points,
)


def random_blob(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A union of a few random discs and rectangles, some touching the border."""
    rows, columns = np.mgrid[:height, :width]
    mask = np.zeros((height, width), dtype=bool)
    for _ in range(rng.integers(1, 4)):
        if rng.random() < 0.5:
            cx, cy, radius = rng.uniform(-2, width + 2), rng.uniform(-2, height + 2), rng.uniform(2, 9)
            mask |= (columns - cx) ** 2 + (rows - cy) ** 2 <= radius**2
        else:
            x0, y0 = rng.integers(0, width - 2), rng.integers(0, height - 2)
            mask[y0 : y0 + rng.integers(2, 15), x0 : x0 + rng.integers(2, 15)] = True
    if not mask.any():
        mask[height // 2, width // 2] = True
    return mask


def brute_force_centre(mask: np.ndarray) -> tuple[float, float]:
    """For every mask pixel the squared distance to the nearest pixel outside (border ring
    included); the first farthest pixel in row-major order, as (x + 0.5, y + 0.5)."""
    height, width = mask.shape
    padded = np.pad(mask, 1)
    outside = np.argwhere(~padded) - 1  # (row, column) in image coordinates
    best, best_pixel = -1, None
    for row in range(height):
        for column in range(width):
            if not mask[row, column]:
                continue
            squared = int(((outside - (row, column)) ** 2).sum(1).min())
            if squared > best:
                best, best_pixel = squared, (column + 0.5, row + 0.5)
    return best_pixel


def test_mask_iou_of_aligned_pairs():
    first = torch.zeros(3, 4, 5, dtype=torch.bool)
    second = torch.zeros(3, 4, 5, dtype=torch.bool)
    first[0, :2] = True  # 10 pixels
    second[0, 1:3] = True  # 10 pixels, 5 shared
    first[1, 0, 0] = True  # disjoint
    second[1, 3, 4] = True
    # pair 2: both empty
    assert mask_iou(first, second).tolist() == pytest.approx([5 / 15, 0.0, 1.0])
    with pytest.raises(ValueError, match="aligned"):
        mask_iou(first, second[:2])


def test_centre_point_matches_brute_force_on_random_blobs():
    rng = np.random.default_rng(0)
    for _ in range(25):
        height, width = int(rng.integers(6, 24)), int(rng.integers(6, 24))
        mask = random_blob(rng, height, width)
        assert centre_point(torch.from_numpy(mask)).tolist() == list(brute_force_centre(mask))


def test_centre_point_ties_go_to_the_first_pixel_in_row_major_order():
    mask = torch.zeros(6, 8, dtype=torch.bool)
    mask[1:3, 1:7] = True  # a 2 x 6 bar: every pixel is 1 away from the outside
    assert centre_point(mask).tolist() == [1.5, 1.5]
    full = torch.ones(5, 5, dtype=torch.bool)  # the border counts as outside
    assert centre_point(full).tolist() == [2.5, 2.5]


def test_centre_point_of_an_empty_mask_is_an_error():
    with pytest.raises(ValueError, match="non-empty"):
        centre_point(torch.zeros(4, 4, dtype=torch.bool))


def _prediction_and_target() -> tuple[torch.Tensor, torch.Tensor]:
    target = torch.zeros(20, 20, dtype=torch.bool)
    target[2:12, 2:12] = True
    prediction = torch.zeros(20, 20, dtype=torch.bool)
    prediction[5:15, 5:15] = True
    return prediction, target


def test_refinement_point_falls_in_the_error_region_with_its_label():
    prediction, target = _prediction_and_target()
    generator = torch.Generator().manual_seed(0)
    labels_seen = set()
    for _ in range(200):
        point, label = refinement_point(prediction, target, generator)
        column, row = int(point[0] - 0.5), int(point[1] - 0.5)
        assert point.tolist() == [column + 0.5, row + 0.5]
        if label == 1:  # missed target pixel
            assert target[row, column] and not prediction[row, column]
        else:  # over-segmented pixel
            assert label == 0 and prediction[row, column] and not target[row, column]
        labels_seen.add(label)
    assert labels_seen == {0, 1}


def test_refinement_point_is_uniform_over_the_error_region():
    prediction = torch.zeros(10, 10, dtype=torch.bool)
    target = torch.zeros(10, 10, dtype=torch.bool)
    target[0, :10] = True  # 10 missed pixels
    prediction[7:10] = True  # 30 over-segmented pixels
    generator = torch.Generator().manual_seed(1)
    labels = [refinement_point(prediction, target, generator)[1] for _ in range(2000)]
    assert np.mean(labels) == pytest.approx(10 / 40, abs=0.03)


def test_refinement_point_needs_min_pixels_of_error():
    target = torch.zeros(8, 8, dtype=torch.bool)
    target[:3, :3] = True  # 9 missed pixels
    prediction = torch.zeros(8, 8, dtype=torch.bool)
    generator = torch.Generator().manual_seed(0)
    assert refinement_point(prediction, target, generator) is None
    assert refinement_point(prediction, target, generator, min_pixels=9) is not None
    assert refinement_point(target, target, generator, min_pixels=0) is None  # no error at all


def test_refinement_points_are_deterministic_and_independent_of_batch_mates():
    prediction, target = _prediction_and_target()
    predictions, targets = prediction[None].repeat(4, 1, 1), target[None].repeat(4, 1, 1)
    first = refinement_points(predictions, targets, torch.Generator().manual_seed(7))
    second = refinement_points(predictions, targets, torch.Generator().manual_seed(7))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert len({tuple(point) for point in first[0].tolist()}) > 1  # one draw per mask
    # A mask without enough error still uses its draw: the masks after it keep their clicks.
    predictions = torch.stack([target, prediction, prediction])
    targets = torch.stack([target, target, target])
    points, labels = refinement_points(predictions, targets, torch.Generator().manual_seed(7))
    assert labels[0] == -1 and points[0].tolist() == [0.0, 0.0]
    assert torch.equal(points[1:], first[0][1:3]) and torch.equal(labels[1:], first[1][1:3])


def _letterbox_logits(mask: torch.Tensor, frame: Frame, scale: int, padding_value: float) -> torch.Tensor:
    """Input logits of an original mask under an integer-scale letterbox (nearest upsampling)."""
    height, width = frame.input_size
    logits = torch.full((mask.shape[0], height, width), padding_value)
    left, top = int(frame.valid[0]), int(frame.valid[1])
    upsampled = mask.repeat_interleave(scale, 1).repeat_interleave(scale, 2).float() * 20 - 10
    logits[:, top : top + upsampled.shape[1], left : left + upsampled.shape[2]] = upsampled
    return logits


def test_masks_to_original_round_trip_through_a_letterbox():
    rng = np.random.default_rng(3)
    masks = torch.from_numpy(np.stack([random_blob(rng, 16, 24) for _ in range(5)]))
    frame = letterbox_frame((16, 24), 48)
    assert frame.valid == (0.0, 8.0, 48.0, 40.0)  # scale 2, 8 rows of padding above and below
    logits = _letterbox_logits(masks, frame, scale=2, padding_value=10.0)  # padding says "object"
    assert torch.equal(masks_to_original(logits, frame), masks)
    # The same at a quarter of the input resolution (SAM's low-res logits).
    low_res = F.avg_pool2d(logits[:, None], 2)[:, 0]
    assert masks_to_original(low_res, frame).shape == masks.shape


def test_logits_to_original_equals_crop_then_resize_for_letterboxes():
    torch.manual_seed(0)
    for source_size, input_size in [((30, 50), 64), ((100, 150), 64), ((64, 20), (48, 64))]:
        frame = letterbox_frame(source_size, input_size)
        logits = torch.randn(3, *frame.input_size)
        x0, y0, x1, y1 = (int(value) for value in frame.valid)
        expected = F.interpolate(logits[:, None, y0:y1, x0:x1], size=source_size, mode="bilinear", align_corners=False)[:, 0]
        # atol: the sampling coordinates are float32
        torch.testing.assert_close(logits_to_original(logits, frame), expected, atol=1e-4, rtol=0)


def test_masks_to_original_follows_a_flip():
    mask = torch.zeros(1, 8, 12, dtype=torch.bool)
    mask[0, 2:5, 1:4] = True
    flip = Frame(np.array([[-1.0, 0.0, 12.0], [0.0, 1.0, 0.0]]), (8, 12), (0.0, 0.0, 12.0, 8.0), (8, 12))
    logits = mask.flip(-1).float() * 2 - 1  # the flipped image's mask
    assert torch.equal(masks_to_original(logits, flip), mask)
    stretch = Frame(scale_translate_matrix(2.0, 1.0), (8, 24), (0.0, 0.0, 24.0, 8.0), (8, 12))
    assert torch.equal(masks_to_original(mask.repeat_interleave(2, 2).float() - 0.5, stretch), mask)
    assert masks_to_original(torch.zeros(0, 8, 24), stretch).shape == (0, 8, 12)
