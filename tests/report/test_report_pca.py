"""The PCA colouring of feature maps, on maps with a known structure.

A teacher map of two constant regions has one direction of spread: exactly two colours,
the ends of the colour range on the first channel, 0.5 on the two others. The student's
map goes through the teacher's projection: the teacher's regions swapped give the
teacher's colours swapped, and values beyond the teacher's range saturate.
"""

from __future__ import annotations

import numpy as np
import torch

from vfmkd.report.pca import INVALID_COLOUR, FeatureProjection, colour_cosine, cosine_map, enlarge

CHANNELS, HEIGHT, WIDTH = 8, 6, 10


def _two_regions(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """``[C, H, W]``: ``first`` on the left 4 columns, ``second`` on the rest."""
    features = second.view(-1, 1, 1).expand(CHANNELS, HEIGHT, WIDTH).clone()
    features[:, :, :4] = first.view(-1, 1)[:, :, None]
    return features


def _colours(rgb: np.ndarray) -> set[tuple[int, int, int]]:
    return {tuple(int(value) for value in colour) for colour in rgb.reshape(-1, 3)}


def _two_vectors(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Generator]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(CHANNELS, generator=generator), torch.randn(CHANNELS, generator=generator), generator


def test_two_constant_regions_give_exactly_two_colours():
    a, b, _ = _two_vectors(0)
    teacher = _two_regions(a, b)
    projection = FeatureProjection.fit(teacher)
    rgb = projection.to_rgb(teacher)
    assert rgb.shape == (HEIGHT, WIDTH, 3) and rgb.dtype == np.uint8
    left, right = tuple(rgb[0, 0]), tuple(rgb[0, -1])
    assert _colours(rgb) == {left, right}
    assert _colours(rgb[:, :4]) == {left} and _colours(rgb[:, 4:]) == {right}
    # One direction of spread: the first channel spans the range, the others stay in the middle.
    assert sorted([left[0], right[0]]) == [0, 255]
    assert left[1:] == right[1:] == (128, 128)
    # The first direction is the difference of the two vectors (up to its sign).
    direction = (a - b) / (a - b).norm()
    assert abs(float(np.dot(projection.components[0], direction.numpy()))) > 1 - 1e-6
    assert not projection.components[1:].any()


def test_the_student_is_coloured_with_the_teachers_projection():
    a, b, generator = _two_vectors(1)
    projection = FeatureProjection.fit(teacher := _two_regions(a, b))
    teacher_rgb = projection.to_rgb(teacher)
    # The same features in swapped places: the same two colours, swapped.
    swapped = projection.to_rgb(_two_regions(b, a))
    assert tuple(swapped[0, 0]) == tuple(teacher_rgb[0, -1]) and tuple(swapped[0, -1]) == tuple(teacher_rgb[0, 0])
    # Halfway between the regions: the middle of the range; far beyond one region: saturated at its colour.
    middle = projection.to_rgb(_two_regions((a + b) / 2, (a + b) / 2))
    assert np.abs(middle.astype(int) - 128).max() <= 1
    beyond = projection.to_rgb(_two_regions(a + 10 * (a - b), b))
    assert tuple(beyond[0, 0]) == tuple(teacher_rgb[0, 0])
    # A student that differs from the teacher only orthogonally to its directions looks the same.
    orthogonal = torch.randn(CHANNELS, generator=generator)
    orthogonal -= (orthogonal @ (a - b)) / (a - b).norm() ** 2 * (a - b)
    np.testing.assert_array_equal(projection.to_rgb(teacher + orthogonal.view(-1, 1, 1)), teacher_rgb)


def test_invalid_cells_are_grey_and_do_not_shape_the_projection():
    a, b, generator = _two_vectors(2)
    teacher = _two_regions(a, b)
    valid = torch.ones(HEIGHT, WIDTH, dtype=torch.bool)
    valid[0] = False
    wild = teacher.clone()
    wild[:, 0] = 1000.0 * torch.randn(CHANNELS, WIDTH, generator=generator)  # padding, e.g.
    projection = FeatureProjection.fit(wild, valid)
    reference = FeatureProjection.fit(teacher)
    for name in ("mean", "low", "high"):
        np.testing.assert_allclose(getattr(projection, name), getattr(reference, name), atol=1e-9)
    rgb = projection.to_rgb(wild, valid)
    assert _colours(rgb[0]) == {INVALID_COLOUR}
    np.testing.assert_array_equal(rgb[1:], reference.to_rgb(teacher)[1:])


def test_three_directions_colour_three_channels():
    # Four vectors at the corners of a simplex: three directions of spread, every channel used.
    corners = torch.eye(CHANNELS)[:4] * torch.tensor([1.0, 2.0, 3.0, 4.0]).view(-1, 1)
    teacher = corners.T.reshape(CHANNELS, 2, 2).repeat_interleave(3, dim=1).repeat_interleave(3, dim=2)
    rgb = FeatureProjection.fit(teacher).to_rgb(teacher)
    assert len(_colours(rgb)) == 4
    for channel in range(3):
        assert rgb[..., channel].min() == 0 and rgb[..., channel].max() == 255


def test_cosine_map_and_its_colours():
    generator = torch.Generator().manual_seed(3)
    teacher = torch.randn(CHANNELS, HEIGHT, WIDTH, generator=generator)
    student = teacher.clone()
    student[:, :, :5] *= -2.0
    cosine = cosine_map(student, teacher)
    np.testing.assert_allclose(cosine[:, :5], -1.0, atol=1e-6)
    np.testing.assert_allclose(cosine[:, 5:], 1.0, atol=1e-6)
    valid = np.ones((HEIGHT, WIDTH), dtype=bool)
    valid[-1] = False
    rgb = colour_cosine(cosine, valid)
    red, green = rgb[0, 0].astype(int), rgb[0, -1].astype(int)
    assert red[0] > red[1] + 100 and green[1] > green[0] + 100
    assert _colours(rgb[-1]) == {INVALID_COLOUR}


def test_enlarge_keeps_cells_sharp():
    cells = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 10
    big = enlarge(cells, 20)
    assert big.shape == (20, 30, 3)
    np.testing.assert_array_equal(big[::10, ::10], cells)
