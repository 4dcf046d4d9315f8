"""Prompt sampling for the mask head: which instances, box or point, points inside masks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from vfmkd.datasets import build_dataset, collate_samples
from vfmkd.models.heads.prompts import PADDING_LABEL, Prompts, add_points, sample_prompts

SIZE = 32


def _targets() -> dict:
    """Four images: 0 labelled with five instances (instance 3 has an empty mask), 1
    unlabelled with two, 2 labelled without instances, 3 labelled with two instances."""
    masks = [torch.zeros(5, SIZE, SIZE, dtype=torch.uint8), torch.zeros(2, SIZE, SIZE, dtype=torch.uint8)]
    boxes = []
    rectangles = [(2, 3, 9, 7), (10, 10, 20, 30), (0, 0, 32, 32), (4, 4, 8, 8), (25, 1, 27, 2)]
    for index, (x0, y0, x1, y1) in enumerate(rectangles):
        if index != 3:
            masks[0][index, y0:y1, x0:x1] = 1
        boxes.append([x0, y0, x1, y1])
    masks[0][2, 10:20] = 0  # not a rectangle
    masks[1][:, 5:9, 5:9] = 1
    boxes += [[5, 5, 9, 9], [5, 5, 9, 9]]
    masks.append(torch.zeros(0, SIZE, SIZE, dtype=torch.uint8))
    masks.append(torch.zeros(2, SIZE, SIZE, dtype=torch.uint8))
    masks[3][0, 0:1, 31:32] = 1  # one pixel
    masks[3][1, 16:32, 0:16] = 1
    boxes += [[31, 0, 32, 1], [0, 16, 16, 32]]
    return {
        "batch_idx": torch.tensor([0] * 5 + [1] * 2 + [3] * 2),
        "cls": torch.zeros(9, dtype=torch.int64),
        "boxes": torch.tensor(boxes, dtype=torch.float32),
        "has_labels": torch.tensor([True, False, True, True]),
        "masks": masks,
    }


def _check_prompts(prompts: Prompts, targets: dict) -> None:
    """Dtypes and shapes; box prompts carry their instance's box, point prompts a pixel centre of its mask."""
    count = len(prompts)
    assert prompts.image_index.dtype == prompts.instance.dtype == torch.int64
    assert prompts.boxes.dtype == prompts.points.dtype == torch.float32
    assert prompts.has_box.dtype == torch.bool and prompts.point_labels.dtype == torch.int64
    assert prompts.boxes.shape == (count, 4) and prompts.points.shape[::2] == (count, 2)
    assert prompts.point_labels.shape == prompts.points.shape[:2] and prompts.points.shape[1] >= 1
    rows_of = {
        image: torch.nonzero(targets["batch_idx"] == image).flatten().tolist()
        for image in range(len(targets["masks"]))
    }
    for row in range(count):
        image, instance = int(prompts.image_index[row]), int(prompts.instance[row])
        mask = targets["masks"][image][instance].cpu()
        assert mask.any()
        if prompts.has_box[row]:
            box = targets["boxes"][rows_of[image][instance]]
            assert torch.equal(prompts.boxes[row].cpu(), box.cpu())
            assert (prompts.point_labels[row] == PADDING_LABEL).all()
        else:
            assert (prompts.boxes[row] == 0).all()
            assert prompts.point_labels[row].tolist() == [1]
            x, y = prompts.points[row, 0].tolist()
            assert x % 1 == 0.5 and y % 1 == 0.5
            assert mask[int(y), int(x)] == 1, f"point {(x, y)} outside the mask of {image}/{instance}"


def test_counts_per_image_and_only_labelled_non_empty_instances() -> None:
    targets = _targets()
    for seed in range(20):
        prompts = sample_prompts(targets, max_instances=3, generator=torch.Generator().manual_seed(seed))
        _check_prompts(prompts, targets)
        # Image 0: 4 non-empty instances, 3 kept; image 1 unlabelled; image 2 empty; image 3: both.
        assert prompts.image_index.tolist() == [0, 0, 0, 3, 3]
        chosen = prompts.instance[:3].tolist()
        assert chosen == sorted(chosen) and 3 not in chosen and len(set(chosen)) == 3
        assert prompts.instance[3:].tolist() == [0, 1]
    everything = sample_prompts(targets, max_instances=10, generator=torch.Generator().manual_seed(0))
    assert everything.image_index.tolist() == [0, 0, 0, 0, 3, 3]
    assert everything.instance.tolist() == [0, 1, 2, 4, 0, 1]


def test_the_subset_is_random_over_the_instances() -> None:
    targets = _targets()
    generator = torch.Generator().manual_seed(0)
    picked = np.zeros(5)
    for _ in range(400):
        prompts = sample_prompts(targets, max_instances=1, generator=generator)
        picked[prompts.instance[prompts.image_index == 0].item()] += 1
    assert picked[3] == 0
    np.testing.assert_allclose(picked[[0, 1, 2, 4]] / 400, 0.25, atol=0.07)


def test_box_prompts_are_the_boxes_and_point_prompts_lie_inside_the_masks() -> None:
    targets = _targets()
    boxes_only = sample_prompts(targets, max_instances=8, point_probability=0.0)
    points_only = sample_prompts(targets, max_instances=8, point_probability=1.0)
    assert boxes_only.has_box.all() and not points_only.has_box.any()
    _check_prompts(boxes_only, targets)
    _check_prompts(points_only, targets)
    assert torch.equal(boxes_only.boxes, targets["boxes"][[0, 1, 2, 4, 7, 8]])
    # The one-pixel instance can only be prompted at that pixel's centre.
    assert points_only.points[4, 0].tolist() == [31.5, 0.5]


def test_points_are_uniform_over_the_mask_pixels() -> None:
    masks = torch.zeros(1, 4, 6, dtype=torch.uint8)
    pixels = [(0, 0), (1, 3), (3, 5), (2, 2)]  # (y, x), scattered
    for y, x in pixels:
        masks[0, y, x] = 1
    targets = {
        "batch_idx": torch.zeros(1, dtype=torch.int64),
        "boxes": torch.tensor([[0.0, 0, 6, 4]]),
        "has_labels": torch.tensor([True]),
        "masks": [masks],
    }
    generator = torch.Generator().manual_seed(0)
    seen: dict[tuple[int, int], int] = {}
    draws = 2000
    for _ in range(draws):
        prompts = sample_prompts(targets, max_instances=1, point_probability=1.0, generator=generator)
        x, y = prompts.points[0, 0]
        key = (int(y), int(x))
        seen[key] = seen.get(key, 0) + 1
    assert set(seen) == set(pixels)
    np.testing.assert_allclose(np.array(list(seen.values())) / draws, 0.25, atol=0.04)


@pytest.mark.parametrize("probability", [0.5, 0.2])
def test_point_share_over_many_draws(probability: float) -> None:
    targets = _targets()
    generator = torch.Generator().manual_seed(1)
    kinds = torch.cat(
        [
            sample_prompts(
                targets, max_instances=8, point_probability=probability, generator=generator
            ).has_box
            for _ in range(300)
        ]
    )
    assert len(kinds) == 300 * 6
    # 1800 Bernoulli draws: the standard deviation of the share is about 0.012.
    assert abs((~kinds).float().mean().item() - probability) < 0.04


def test_default_is_half_points_half_boxes() -> None:
    targets = _targets()
    torch.manual_seed(0)
    kinds = torch.cat([sample_prompts(targets, max_instances=8).has_box for _ in range(300)])
    assert abs(kinds.float().mean().item() - 0.5) < 0.04


def test_deterministic_for_a_generator() -> None:
    targets = _targets()

    def draw(seed: int) -> Prompts:
        return sample_prompts(targets, max_instances=2, generator=torch.Generator().manual_seed(seed))

    first, again = draw(3), draw(3)
    for name in ("image_index", "instance", "boxes", "has_box", "points", "point_labels"):
        assert torch.equal(getattr(first, name), getattr(again, name)), name
    others = [draw(seed) for seed in range(4, 12)]
    assert any(
        not torch.equal(other.instance, first.instance) or not torch.equal(other.points, first.points)
        for other in others
    )


def test_no_prompts_without_qualifying_instances() -> None:
    targets = _targets()
    unlabelled = {**targets, "has_labels": torch.zeros(4, dtype=torch.bool)}
    for case in (unlabelled, {**targets, "masks": None}):
        prompts = sample_prompts(case, max_instances=4)
        assert len(prompts) == 0
        assert prompts.boxes.shape == (0, 4) and prompts.points.shape == (0, 1, 2)
        assert prompts.point_labels.shape == (0, 1) and prompts.has_box.dtype == torch.bool
    empty_masks = {**targets, "masks": [torch.zeros_like(masks) for masks in targets["masks"]]}
    assert len(sample_prompts(empty_masks, max_instances=4)) == 0


def test_bad_arguments_and_inconsistent_targets_are_named() -> None:
    targets = _targets()
    with pytest.raises(ValueError, match="max_instances"):
        sample_prompts(targets, max_instances=0)
    with pytest.raises(ValueError, match="point_probability"):
        sample_prompts(targets, max_instances=1, point_probability=1.5)
    with pytest.raises(ValueError, match="image 3 .* 2 masks but 1 boxes"):
        sample_prompts({**targets, "batch_idx": targets["batch_idx"][:-1]}, max_instances=1)


def test_add_points_appends_one_slot_per_prompt() -> None:
    targets = _targets()
    prompts = sample_prompts(targets, max_instances=8, generator=torch.Generator().manual_seed(0))
    count = len(prompts)
    new_points = torch.arange(count * 2, dtype=torch.float32).reshape(count, 2) + 0.5
    labels = torch.tensor([1, 0, -1, 1, 0, -1])
    refined = add_points(prompts, new_points, labels)
    assert refined.points.shape == (count, 2, 2) and refined.point_labels.shape == (count, 2)
    assert torch.equal(refined.points[:, 0], prompts.points[:, 0])
    assert torch.equal(refined.point_labels[:, 1], labels)
    assert torch.equal(refined.points[labels != -1, 1], new_points[labels != -1])
    assert (refined.points[labels == -1, 1] == 0).all()
    assert torch.equal(refined.boxes, prompts.boxes) and torch.equal(refined.instance, prompts.instance)
    twice = add_points(refined, new_points, labels)
    assert twice.points.shape == (count, 3, 2)
    with pytest.raises(ValueError, match=r"points \[P, 2\]"):
        add_points(prompts, new_points[:-1], labels[:-1])
    with pytest.raises(ValueError, match="1, 0 or -1"):
        add_points(prompts, new_points, torch.full((count,), 2))
    empty = add_points(Prompts.empty(), torch.zeros(0, 2), torch.zeros(0, dtype=torch.int64))
    assert empty.points.shape == (0, 2, 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_same_prompts_on_cuda_as_on_cpu() -> None:
    targets = _targets()
    on_cuda = {
        **targets,
        **{key: targets[key].cuda() for key in ("batch_idx", "cls", "boxes", "has_labels")},
        "masks": [masks.cuda() for masks in targets["masks"]],
    }
    cpu = sample_prompts(targets, max_instances=3, generator=torch.Generator().manual_seed(5))
    cuda = sample_prompts(on_cuda, max_instances=3, generator=torch.Generator().manual_seed(5))
    assert cuda.device.type == "cuda"
    for name in ("image_index", "instance", "boxes", "has_box", "points", "point_labels"):
        assert torch.equal(getattr(cuda, name).cpu(), getattr(cpu, name)), name
    _check_prompts(cuda, on_cuda)
    cuda_generator = torch.Generator("cuda").manual_seed(5)
    seeded_on_cuda = sample_prompts(on_cuda, max_instances=3, generator=cuda_generator)
    _check_prompts(seeded_on_cuda, on_cuda)


def test_prompts_from_a_collated_batch_of_the_synthetic_set(synthetic_project: Path) -> None:
    dataset = build_dataset(
        {
            "dataset": "shapes",
            "root": str(synthetic_project),
            "img_size": 96,
            "load_masks": True,
            "augment": {"mosaic": 1.0},
        },
        "train",
        train=True,
    )
    torch.manual_seed(0)
    batch = collate_samples([dataset[index] for index in range(4)])
    targets = batch["targets"]
    prompts = sample_prompts(targets, max_instances=2, generator=torch.Generator().manual_seed(0))
    _check_prompts(prompts, targets)
    counts = [len(masks) for masks in targets["masks"]]
    expected = [min(2, int(masks.flatten(1).any(1).sum())) for masks in targets["masks"]]
    assert sum(counts) > 0 and torch.bincount(prompts.image_index, minlength=4).tolist() == expected
