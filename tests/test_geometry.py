"""Frames (compose, invert, serialise) and feature warping through frames."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vfmkd.geometry import (
    Frame,
    compose_matrices,
    hflip_matrix,
    letterbox_frame,
    longest_side_frame,
    merge_tiles,
    resize_frame,
    scale_translate_matrix,
    warp_features,
    warp_features_batch,
)


def _augmented_frame(source_hw: tuple[int, int] = (120, 200)) -> Frame:
    """Letterbox to 96, scale about the centre, shift, flip."""
    frame = letterbox_frame(source_hw, 96)
    step = compose_matrices(
        scale_translate_matrix(1.0, 1.0, -48, -48),
        scale_translate_matrix(1.3),
        scale_translate_matrix(1.0, 1.0, 48 + 7, 48 - 5),
        hflip_matrix(96),
    )
    return frame.then(step, (96, 96))


def test_identity_maps_points_to_themselves() -> None:
    frame = Frame.identity(30, 40)
    points = np.array([[0.0, 0.0], [39.5, 29.5], [12.25, 3.0]])
    np.testing.assert_array_equal(frame.apply_points(points), points)
    assert frame.valid == (0.0, 0.0, 40.0, 30.0)
    assert frame.input_size == (30, 40) and frame.source_size == (30, 40)


def test_apply_then_invert_round_trip() -> None:
    frame = _augmented_frame()
    rng = np.random.default_rng(0)
    points = rng.uniform(0, 200, (50, 2))
    np.testing.assert_allclose(frame.invert_points(frame.apply_points(points)), points, atol=1e-9)
    boxes = np.array([[10.0, 20.0, 50.0, 90.0], [0.0, 0.0, 200.0, 120.0]])
    np.testing.assert_allclose(frame.invert_boxes(frame.apply_boxes(boxes)), boxes, atol=1e-9)
    product = np.vstack([frame.inverse_matrix(), [0, 0, 1]]) @ np.vstack([frame.matrix, [0, 0, 1]])
    np.testing.assert_allclose(product, np.eye(3), atol=1e-12)


def test_then_equals_compose_with_a_frame() -> None:
    first = letterbox_frame((120, 200), 128, center=False)
    step = scale_translate_matrix(0.5, 0.5, 3, 4)
    second = Frame(step, (64, 64), (0.0, 0.0, 64.0, 64.0), (128, 128))
    assert first.compose(second).isclose(first.then(step, (64, 64)))
    with pytest.raises(ValueError, match="source size"):
        first.compose(Frame.identity(10, 10))


def test_valid_region_follows_the_steps() -> None:
    frame = letterbox_frame((100, 200), 64)  # content 64 x 32, centred vertically
    assert frame.valid == (0.0, 16.0, 64.0, 48.0)
    np.testing.assert_allclose(frame.matrix, [[0.32, 0, 0], [0, 0.32, 16]])
    # Shifted right by 40 px: the content is cut at the canvas edge.
    shifted = frame.then(scale_translate_matrix(1.0, 1.0, 40, 0), (64, 64))
    assert shifted.valid == (40.0, 16.0, 64.0, 48.0)
    flipped = frame.then(hflip_matrix(64), (64, 64))
    assert flipped.valid == (0.0, 16.0, 64.0, 48.0)


def test_flip_reorders_box_corners() -> None:
    frame = Frame.identity(50, 100).then(hflip_matrix(100), (50, 100))
    np.testing.assert_allclose(
        frame.apply_boxes(np.array([[10.0, 5.0, 30.0, 25.0]])), [[70.0, 5.0, 90.0, 25.0]]
    )


def test_helper_frames() -> None:
    sam = longest_side_frame((480, 640), 1024)
    assert sam.input_size == (1024, 1024) and sam.valid == (0.0, 0.0, 1024.0, 768.0)
    np.testing.assert_allclose(sam.apply_points(np.array([[640.0, 480.0]])), [[1024.0, 768.0]])
    stretched = resize_frame((100, 50), (64, 64))
    np.testing.assert_allclose(stretched.apply_points(np.array([[50.0, 100.0]])), [[64.0, 64.0]])
    top_left = letterbox_frame((100, 200), 64, center=False)
    assert top_left.valid == (0.0, 0.0, 64.0, 32.0)


def test_serialisation_round_trip_and_equality() -> None:
    frame = _augmented_frame()
    restored = Frame.from_dict(json.loads(json.dumps(frame.to_dict())))
    assert restored == frame and hash(restored) == hash(frame)
    assert frame != Frame.identity(96, 96)
    assert len({frame, restored}) == 1
    with pytest.raises(ValueError, match="invertible"):
        Frame(np.zeros((2, 3)), (4, 4), (0, 0, 4, 4), (4, 4))


def test_warp_with_identity_frames_returns_the_input() -> None:
    feature = torch.randn(5, 6, 8)
    frame = Frame.identity(48, 64)
    warped, valid = warp_features(feature, frame, 8, frame, (6, 8), 8)
    assert warped.shape == (5, 6, 8) and valid.shape == (1, 6, 8) and valid.dtype == torch.bool
    torch.testing.assert_close(warped, feature, atol=1e-5, rtol=0)
    assert valid.all()


def test_warp_of_a_flipped_frame_flips_the_map() -> None:
    feature = torch.randn(2, 3, 6, 8)
    source = Frame.identity(48, 64)
    flipped = source.then(hflip_matrix(64), (48, 64))
    warped, valid = warp_features(feature, source, 8, flipped, (6, 8), 8)
    torch.testing.assert_close(warped, feature.flip(-1), atol=1e-5, rtol=0)
    assert valid.all()


def test_warp_to_a_coarser_stride_averages_blocks() -> None:
    feature = torch.randn(1, 4, 8, 8)
    frame = Frame.identity(64, 64)
    warped, _ = warp_features(feature, frame, 8, frame, (4, 4), 16)
    torch.testing.assert_close(warped, F.avg_pool2d(feature, 2), atol=1e-5, rtol=0)


def test_warp_between_teacher_and_student_frames_follows_coordinates() -> None:
    """A map holding each cell's original-image coordinates comes out holding the
    original coordinates of the target cells (bilinear reproduces linear maps)."""
    source_hw = (90, 160)
    teacher = longest_side_frame(source_hw, 128)  # stride 8 -> 16 x 16 grid
    stride = 8
    centres = (np.stack(np.meshgrid(np.arange(16), np.arange(16)), -1).reshape(-1, 2) + 0.5) * stride
    original = teacher.invert_points(centres).reshape(16, 16, 2)
    feature = torch.from_numpy(original).permute(2, 0, 1).float()
    student = _augmented_frame(source_hw)
    warped, valid = warp_features(feature, teacher, stride, student, (24, 24), 4)
    student_centres = (np.stack(np.meshgrid(np.arange(24), np.arange(24)), -1).reshape(-1, 2) + 0.5) * 4
    expected = (
        torch.from_numpy(student.invert_points(student_centres).reshape(24, 24, 2)).permute(2, 0, 1).float()
    )
    # Cells more than one teacher cell inside the content are exact; edges clamp.
    inner = valid[0] & (expected[0] > 8) & (expected[0] < 152) & (expected[1] > 8) & (expected[1] < 82)
    assert inner.sum() > 50
    torch.testing.assert_close(warped[:, inner], expected[:, inner], atol=1e-3, rtol=0)
    # Valid cells map inside the image; invalid cells are padding or off-image.
    inside = (expected[0] >= 0) & (expected[0] < 160) & (expected[1] >= 0) & (expected[1] < 90)
    assert not (valid[0] & ~inside).any()
    assert (~valid[0]).any()


def test_valid_mask_excludes_letterbox_padding() -> None:
    source = Frame.identity(32, 64)
    student = letterbox_frame((32, 64), 64)  # rows 16..48 hold content
    _, valid = warp_features(torch.randn(3, 4, 8), source, 8, student, (8, 8), 8)
    expected = torch.zeros(8, dtype=torch.bool)
    expected[2:6] = True
    assert torch.equal(valid[0, :, 0], expected)


def test_batched_warp_equals_single_warps() -> None:
    features = torch.randn(3, 2, 8, 8)
    sources = [Frame.identity(64, 64), longest_side_frame((40, 64), 64), Frame.identity(64, 64)]
    targets = [
        letterbox_frame((64, 64), 32),
        letterbox_frame((40, 64), 32).then(hflip_matrix(32), (32, 32)),
        resize_frame((64, 64), (32, 32)),
    ]
    warped, valid = warp_features_batch(features, sources, 8, targets, (8, 8), 4)
    for index in range(3):
        single, single_valid = warp_features(features[index], sources[index], 8, targets[index], (8, 8), 4)
        torch.testing.assert_close(warped[index], single)
        assert torch.equal(valid[index], single_valid)
    with pytest.raises(ValueError, match="one source and one target frame"):
        warp_features_batch(features, sources[:2], 8, targets, (8, 8), 4)


def test_half_precision_features_warp_on_cpu() -> None:
    feature = torch.randn(1, 2, 4, 4).half()
    frame = Frame.identity(32, 32)
    warped, _ = warp_features(feature, frame, 8, frame, (4, 4), 8)
    assert warped.dtype == torch.float16
    torch.testing.assert_close(warped, feature, atol=1e-3, rtol=0)


def test_merge_tiles_averages_valid_tiles_per_sample() -> None:
    warped = torch.stack([torch.full((1, 2, 2), 1.0), torch.full((1, 2, 2), 3.0), torch.full((1, 2, 2), 5.0)])
    valid = torch.tensor([[[1, 0], [0, 0]], [[1, 1], [0, 0]], [[0, 0], [0, 1]]], dtype=torch.bool)[:, None]
    merged, merged_valid = merge_tiles(warped, valid, torch.tensor([0, 0, 1]), 2)
    torch.testing.assert_close(merged[0, 0], torch.tensor([[2.0, 3.0], [0.0, 0.0]]))
    torch.testing.assert_close(merged[1, 0], torch.tensor([[0.0, 0.0], [0.0, 5.0]]))
    assert merged_valid[:, 0].tolist() == [[[True, True], [False, False]], [[False, False], [False, True]]]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_warp_on_cuda_matches_cpu() -> None:
    features = torch.randn(2, 3, 8, 8)
    sources = [longest_side_frame((40, 64), 64)] * 2
    targets = [letterbox_frame((40, 64), 32), letterbox_frame((40, 64), 32).then(hflip_matrix(32), (32, 32))]
    expected, expected_valid = warp_features_batch(features, sources, 8, targets, (8, 8), 4)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        warped, valid = warp_features_batch(features.cuda().to(dtype), sources, 8, targets, (8, 8), 4)
        assert warped.dtype == dtype and warped.device.type == "cuda"
        torch.testing.assert_close(warped.float().cpu(), expected, atol=3e-2, rtol=0)
        assert torch.equal(valid.cpu(), expected_valid)
