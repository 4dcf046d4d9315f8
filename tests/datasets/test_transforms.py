"""Transforms move images, boxes and masks together with the sample's frames."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from vfmkd.datasets.transforms import (
    PAD_VALUE,
    EvalTransform,
    TrainTransform,
    hsv_jitter,
    render_sample,
    warp_image,
    warp_masks,
)
from vfmkd.geometry import Frame, hflip_matrix, letterbox_frame, scale_translate_matrix

NO_COLOUR = {"hsv_h": 0.0, "hsv_s": 0.0, "hsv_v": 0.0}


def _raw(height: int, width: int, seed: int) -> dict[str, Any]:
    """An image with three rectangles and an ellipse; boxes are the masks' tight boxes."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    masks = np.zeros((4, height, width), dtype=np.uint8)
    for index in range(3):
        x0, y0 = int(rng.integers(0, width - 20)), int(rng.integers(0, height - 20))
        x1, y1 = x0 + int(rng.integers(8, 20)), y0 + int(rng.integers(8, 20))
        masks[index, y0:y1, x0:x1] = 1
    ys, xs = np.mgrid[0:height, 0:width]
    masks[3] = ((xs - width * 0.6) / (width * 0.2)) ** 2 + ((ys - height * 0.4) / (height * 0.15)) ** 2 <= 1
    boxes = np.array([_mask_box(mask) for mask in masks], dtype=np.float32)
    return {
        "image": image,
        "boxes": boxes,
        "cls": np.arange(4, dtype=np.int64),
        "masks": masks,
        "id": f"image{seed}",
        "path": f"/data/image{seed}.jpg",
    }


def _mask_box(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


class _Source:
    def __init__(self, sizes: list[tuple[int, int]]) -> None:
        self.raws = [_raw(height, width, seed) for seed, (height, width) in enumerate(sizes)]

    def __len__(self) -> int:
        return len(self.raws)

    def load_raw(self, index: int) -> dict[str, Any]:
        return self.raws[index]


def _assert_boxes_match_masks(sample: dict[str, Any], tolerance: float = 1.5) -> None:
    assert sample["masks"] is not None and len(sample["masks"]) == len(sample["boxes"])
    for box, mask in zip(sample["boxes"].numpy(), sample["masks"].numpy()):
        assert mask.any()
        np.testing.assert_allclose(box, _mask_box(mask), atol=tolerance)


def _assert_boxes_follow_frame(boxes: np.ndarray, frame: Frame, source_boxes: np.ndarray) -> None:
    """Each box is a source box mapped by the frame: exactly when it was not cut by the
    valid region, else inside the cut mapped box."""
    mapped = frame.apply_boxes(source_boxes)
    clipped = mapped.copy()
    clipped[:, [0, 2]] = clipped[:, [0, 2]].clip(frame.valid[0], frame.valid[2])
    clipped[:, [1, 3]] = clipped[:, [1, 3]].clip(frame.valid[1], frame.valid[3])
    whole = np.abs(clipped - mapped).max(axis=1) < 1e-6
    for box in boxes:
        exact = np.abs(mapped[whole] - box).max(axis=1) < 1e-3 if whole.any() else np.zeros(0, bool)
        contained = (
            (box[0] >= clipped[:, 0] - 1.5)
            & (box[1] >= clipped[:, 1] - 1.5)
            & (box[2] <= clipped[:, 2] + 1.5)
            & (box[3] <= clipped[:, 3] + 1.5)
            & ~whole
        )
        assert exact.any() or contained.any(), f"box {box} does not follow the frame"


def test_warp_image_identity_and_whole_pixel_shift_are_exact() -> None:
    image = np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    np.testing.assert_array_equal(warp_image(image, np.eye(3)[:2], (20, 30)), image)
    shifted = warp_image(image, scale_translate_matrix(1.0, 1.0, 5, 3), (20, 30))
    np.testing.assert_array_equal(shifted[3:, 5:], image[:17, :25])
    assert (shifted[:3] == 114).all() and (shifted[:, :5] == 114).all()
    flipped = warp_image(image, hflip_matrix(30), (20, 30))
    np.testing.assert_array_equal(flipped, image[:, ::-1])


def test_warp_image_downscales_without_aliasing() -> None:
    stripes = np.zeros((64, 64, 3), dtype=np.uint8)
    stripes[:, ::2] = 255
    small = warp_image(stripes, scale_translate_matrix(0.25), (16, 16))
    assert abs(float(small.mean()) - 127.5) < 2 and small.std() < 2


def test_warp_masks_matches_nearest_pixels() -> None:
    masks = np.zeros((1, 10, 10), dtype=np.uint8)
    masks[0, 2:5, 3:7] = 1
    doubled = warp_masks(masks, scale_translate_matrix(2.0), (20, 20))
    assert _mask_box(doubled[0]) == [6.0, 4.0, 14.0, 10.0]
    sheared = warp_masks(masks, np.array([[1.0, 0.2, 0.0], [0.0, 1.0, 0.0]]), (10, 10))
    assert sheared.sum() > 0


def test_eval_transform_letterboxes_with_centred_grey_padding() -> None:
    source = _Source([(40, 80)])
    sample = EvalTransform(64)(source, 0, np.random.default_rng(0))
    assert sample["image"].shape == (3, 64, 64) and sample["image"].dtype == torch.uint8
    assert sample["frames"] == [letterbox_frame((40, 80), 64)]
    assert (sample["image"][:, :16] == 114).all() and (sample["image"][:, 48:] == 114).all()
    assert sample["tiles"] == [(0.0, 0.0, 64.0, 64.0)]
    assert sample["orig_size"] == (40, 80) and sample["id"] == "image0"
    expected = sample["frames"][0].apply_boxes(source.raws[0]["boxes"])
    np.testing.assert_allclose(sample["boxes"].numpy(), expected, atol=1e-4)


@pytest.mark.parametrize("seed", range(4))
def test_box_through_frame_matches_transformed_mask(seed: int) -> None:
    """Letterbox + scale + translate + flip: boxes follow the frame and agree with masks."""
    source = _Source([(90, 140)])
    transform = TrainTransform(
        128, {"mosaic": 0.0, "fliplr": 1.0, "scale": 0.5, "translate": 0.2, **NO_COLOUR}
    )
    sample = transform(source, 0, np.random.default_rng(seed))
    (frame,) = sample["frames"]
    assert frame.matrix[0, 0] < 0  # flipped
    _assert_boxes_match_masks(sample)
    _assert_boxes_follow_frame(sample["boxes"].numpy(), frame, source.raws[0]["boxes"])


def test_image_content_moves_with_the_frame() -> None:
    source = _Source([(60, 100)])
    raw = source.raws[0]
    raw["image"][:] = 0
    raw["image"][20:30, 40:50] = (255, 0, 0)
    transform = TrainTransform(
        96, {"mosaic": 0.0, "fliplr": 1.0, "scale": 0.3, "translate": 0.1, **NO_COLOUR}
    )
    sample = transform(source, 0, np.random.default_rng(1))
    centre = sample["frames"][0].apply_points(np.array([[45.0, 25.0]]))[0]
    x, y = int(centre[0]), int(centre[1])
    assert sample["image"][:, y, x].tolist() == [255, 0, 0]


@pytest.mark.parametrize("seed", range(4))
def test_mosaic_frames_map_each_source_into_its_tile(seed: int) -> None:
    source = _Source([(90, 140), (120, 80), (64, 64), (100, 150)])
    transform = TrainTransform(
        128, {"mosaic": 1.0, "fliplr": 0.5, "scale": 0.5, "translate": 0.1, **NO_COLOUR}
    )
    sample = transform(source, 0, np.random.default_rng(seed))
    frames, tiles = sample["frames"], sample["tiles"]
    assert 1 <= len(frames) == len(tiles) == len(sample["source_ids"]) <= 4
    assert sample["image"].shape == (3, 128, 128)
    _assert_boxes_match_masks(sample)
    boxes = sample["boxes"].numpy()
    for frame, tile, source_id in zip(frames, tiles, sample["source_ids"]):
        x0, y0, x1, y1 = tile
        assert 0 <= x0 < x1 <= 128 and 0 <= y0 < y1 <= 128
        # The frame's content lies inside its tile.
        assert frame.valid[0] >= x0 - 1e-6 and frame.valid[2] <= x1 + 1e-6
        assert frame.valid[1] >= y0 - 1e-6 and frame.valid[3] <= y1 + 1e-6
        raw = source.raws[int(source_id.removeprefix("image"))]
        assert frame.source_size == raw["image"].shape[:2]
        inside = boxes[
            (boxes[:, 0] >= x0 - 1e-3)
            & (boxes[:, 2] <= x1 + 1e-3)
            & (boxes[:, 1] >= y0 - 1e-3)
            & (boxes[:, 3] <= y1 + 1e-3)
        ]
        _assert_boxes_follow_frame(inside, frame, raw["boxes"])
        # A pixel inside the valid region shows the source pixel the frame points at.
        point = np.array([[(frame.valid[0] + frame.valid[2]) / 2, (frame.valid[1] + frame.valid[3]) / 2]])
        if frame.valid[2] - frame.valid[0] > 4 and frame.valid[3] - frame.valid[1] > 4:
            x, y = (int(value) for value in point[0])
            origin = frame.invert_points(np.array([[x + 0.5, y + 0.5]]))[0]
            assert 0 <= origin[0] < raw["image"].shape[1] and 0 <= origin[1] < raw["image"].shape[0]


def test_mosaic_tiles_cover_disjoint_regions() -> None:
    source = _Source([(90, 140), (120, 80), (64, 64), (100, 150)])
    transform = TrainTransform(128, {"mosaic": 1.0, "scale": 0.0, "translate": 0.0, **NO_COLOUR})
    sample = transform(source, 0, np.random.default_rng(3))
    coverage = np.zeros((128, 128), dtype=int)
    for x0, y0, x1, y1 in sample["tiles"]:
        coverage[int(y0) : int(y1), int(x0) : int(x1)] += 1
    assert coverage.max() == 1 and (coverage == 1).all()


def test_hsv_jitter_changes_colours_but_not_frames() -> None:
    source = _Source([(90, 140), (120, 80)])
    settings = {"mosaic": 0.5, "fliplr": 0.5, "scale": 0.5, "translate": 0.1}
    plain = TrainTransform(96, {**settings, **NO_COLOUR})(source, 0, np.random.default_rng(5))
    jittered = TrainTransform(96, {**settings, "hsv_h": 0.1, "hsv_s": 0.7, "hsv_v": 0.4})(
        source, 0, np.random.default_rng(5)
    )
    assert plain["frames"] == jittered["frames"] and plain["tiles"] == jittered["tiles"]
    assert torch.equal(plain["boxes"], jittered["boxes"])
    assert not torch.equal(plain["image"], jittered["image"])


def test_hsv_jitter_keeps_greys_grey_without_hue_or_saturation_gain() -> None:
    grey = np.full((4, 4, 3), 100, dtype=np.uint8)
    out = hsv_jitter(grey, 0.0, 0.0, 0.5, np.random.default_rng(0))
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_render_sample_without_masks_and_invisible_tiles() -> None:
    raw = _raw(40, 40, 0)
    raw["masks"] = None
    frame = Frame.identity(40, 40)
    hidden = frame.then(scale_translate_matrix(1.0, 1.0, 100, 0), (40, 40))
    sample = render_sample([raw, raw], [frame, hidden], [(0, 0, 40, 40), (0, 0, 40, 40)], (40, 40))
    assert sample["masks"] is None and len(sample["frames"]) == 1
    assert sample["boxes"].dtype == torch.float32 and sample["cls"].dtype == torch.int64


@pytest.mark.parametrize("size", [(178, 249), (100, 200), (101, 200), (300, 97), (64, 64)])
def test_downscaled_letterbox_keeps_content_inside_the_valid_region(size):
    # Downscaling by 2x or more box-reduces first; a partial last block must neither stretch
    # the image nor spill content past frame.valid.
    image = np.full((*size, 3), 200, np.uint8)
    frame = letterbox_frame(size, 64)
    out = warp_image(image, frame.matrix, (64, 64))[..., 0]
    x0, y0, x1, y1 = (int(round(value)) for value in frame.valid)
    inside = np.zeros((64, 64), bool)
    inside[y0:y1, x0:x1] = True
    assert (out[~inside] == PAD_VALUE).all()
    assert (out[y0 + 1 : y1 - 1, x0 + 1 : x1 - 1] == 200).all()
