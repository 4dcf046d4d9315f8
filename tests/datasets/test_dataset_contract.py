"""Contract tests for every dataset format: the sample, ground truth and batching every consumer relies on.

A format is a subclass of :class:`~vfmkd.datasets.ImageDataset` defined in vfmkd (what
:func:`~vfmkd.datasets.build_dataset` returns for a ``data.dataset`` entry). Each one is
built from the shared synthetic data set (see ``tests/conftest.py``), converted to the
format's layout by an entry of :data:`FORMAT_CASES`, and checked against what the
synthetic generator wrote: a new format only needs a new entry there.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from torch.utils.data import DataLoader

from tests.conftest import SYNTHETIC_TRAIN_IMAGES, SYNTHETIC_VAL_IMAGES
from tests.datasets.mask_checks import check_masks_follow_frames
from vfmkd.datasets import (
    BUILTIN_SYNTHETIC,
    CocoDataset,
    FolderDataset,
    ImageDataset,
    YoloDataset,
    build_dataset,
    collate_samples,
)
from vfmkd.datasets.synthetic import SHAPE_CLASSES
from vfmkd.datasets.transforms import PAD_VALUE
from vfmkd.geometry import Frame, transform_boxes

IMG_SIZE = 64
MASK_IMG_SIZE = 128
SPLIT_SIZES = {"train": SYNTHETIC_TRAIN_IMAGES, "val": SYNTHETIC_VAL_IMAGES}
# Boxes of the YOLO layout are written with 6 decimals of normalised coordinates.
BOX_TOLERANCE = 1e-2
# Sparse category ids in reverse class order, so a COCO json's labels differ from the generator's.
COCO_CATEGORY_IDS = {name: 90 - 10 * index for index, name in enumerate(SHAPE_CLASSES)}


@dataclass(frozen=True)
class FormatCase:
    """A tiny instance of one format built from the synthetic data set.

    Attributes:
        data: the ``data`` config for :func:`build_dataset` (without ``img_size``, masks, augment).
        category_ids: the evaluation category id of each class name (empty without labels).
    """

    data: dict[str, Any]
    category_ids: dict[str, int]


# Views over another format's records, built by build_train_dataset rather than read from
# disk by build_dataset (tests/datasets/test_mixed.py covers them).
VIEWS = {"UnlabeledImages"}


def _registered_formats() -> dict[str, type[ImageDataset]]:
    """Every :class:`ImageDataset` subclass that vfmkd defines and build_dataset reads, by class name."""
    found: dict[str, type[ImageDataset]] = {}
    pending = [ImageDataset]
    while pending:
        for subclass in pending.pop().__subclasses__():
            pending.append(subclass)
            if subclass.__module__.split(".")[0] == "vfmkd" and subclass.__name__ not in VIEWS:
                found[subclass.__name__] = subclass
    return dict(sorted(found.items()))


FORMATS = _registered_formats()


# --------------------------------------------------------------------------- per-format fixtures
def _shapes_case(project: Path, scratch: Path) -> FormatCase:
    """The built-in ``shapes`` set by name: the YOLO layout the generator writes."""
    return FormatCase(
        {"dataset": BUILTIN_SYNTHETIC, "root": str(project)},
        {name: index + 1 for index, name in enumerate(SHAPE_CLASSES)},
    )


def _coco_case(project: Path, scratch: Path) -> FormatCase:
    """The generator's COCO json with sparse category ids in reverse class order."""
    shapes = project / "datasets" / "shapes"
    folder = scratch / "coco"
    (folder / "annotations").mkdir(parents=True)
    os.symlink(shapes / "images", folder / "images")
    old_to_new = {index + 1: COCO_CATEGORY_IDS[name] for index, name in enumerate(SHAPE_CLASSES)}
    for split in SPLIT_SIZES:
        data = json.loads((shapes / "annotations" / f"instances_{split}.json").read_text())
        for category in data["categories"]:
            category["id"] = old_to_new[category["id"]]
        for annotation in data["annotations"]:
            annotation["category_id"] = old_to_new[annotation["category_id"]]
        (folder / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
    return FormatCase({"dataset": str(folder / "annotations" / "instances_train.json")}, dict(COCO_CATEGORY_IDS))


def _folder_case(project: Path, scratch: Path) -> FormatCase:
    """The generator's images alone (``images/<split>``), without labels."""
    return FormatCase({"dataset": str(project / "datasets" / "shapes" / "images")}, {})


FORMAT_CASES: dict[str, Callable[[Path, Path], FormatCase]] = {
    YoloDataset.__name__: _shapes_case,
    CocoDataset.__name__: _coco_case,
    FolderDataset.__name__: _folder_case,
}


@pytest.fixture(scope="module")
def format_cases(synthetic_project: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, FormatCase]:
    scratch = tmp_path_factory.mktemp("formats")
    return {name: build(synthetic_project, scratch / name) for name, build in FORMAT_CASES.items()}


def _build(
    format_cases: dict[str, FormatCase], name: str, split: str, *, train: bool, **options: Any
) -> tuple[ImageDataset, FormatCase]:
    if name not in format_cases:
        pytest.fail(
            f"dataset format {name} has no contract fixture: add an entry to FORMAT_CASES in {__file__} "
            "that builds a tiny instance of it from the synthetic data set"
        )
    case = format_cases[name]
    dataset = build_dataset({"img_size": IMG_SIZE, **case.data, **options}, split, train=train)
    assert type(dataset) is FORMATS[name], f"{case.data} built a {type(dataset).__name__}, not a {name}"
    return dataset, case


@pytest.fixture(scope="module")
def synthetic_truth(synthetic_project: Path) -> dict[str, dict[str, Any]]:
    """What the generator drew, per split and sample id: ``boxes`` ``[N, 4]`` xyxy original
    pixels, class ``names`` and the image ``size`` (h, w)."""
    truth: dict[str, dict[str, Any]] = {}
    for split in SPLIT_SIZES:
        path = synthetic_project / "datasets" / "shapes" / "annotations" / f"instances_{split}.json"
        data = json.loads(path.read_text())
        split_truth = {}
        for image in data["images"]:
            annotations = [a for a in data["annotations"] if a["image_id"] == image["id"]]
            boxes = np.array([a["bbox"] for a in annotations], dtype=np.float64).reshape(-1, 4)
            boxes[:, 2:] += boxes[:, :2]
            split_truth[Path(image["file_name"]).stem] = {
                "boxes": boxes,
                "names": [SHAPE_CLASSES[a["category_id"] - 1] for a in annotations],
                "size": (image["height"], image["width"]),
            }
        truth[split] = split_truth
    return truth


def _expected_targets(dataset: ImageDataset, truth: dict[str, Any]) -> tuple[np.ndarray, list[str]]:
    """The generator's objects of one image, or none for a data set without labels."""
    if dataset.has_labels:
        return truth["boxes"], truth["names"]
    return np.zeros((0, 4)), []


def _check_sample_contract(sample: dict[str, Any], dataset: ImageDataset, size: int) -> None:
    """Keys, dtypes and shapes of one sample, targets inside the input, sources that exist."""
    assert {"image", "boxes", "cls", "masks", "frames", "tiles", "source_ids", "source_paths", "id", "path",
            "orig_size"} <= set(sample)
    image, boxes, labels = sample["image"], sample["boxes"], sample["cls"]
    assert image.dtype == torch.uint8 and image.shape == (3, size, size)
    count = len(labels)
    assert boxes.dtype == torch.float32 and boxes.shape == (count, 4)
    assert labels.dtype == torch.int64 and labels.shape == (count,)
    assert ((labels >= 0) & (labels < len(dataset.names))).all(), labels
    assert (boxes >= 0).all() and (boxes <= size).all(), boxes
    assert (boxes[:, 2:] > boxes[:, :2]).all(), boxes
    frames = sample["frames"]
    assert 1 <= len(frames) <= 4 and all(isinstance(frame, Frame) for frame in frames)
    assert len(sample["tiles"]) == len(sample["source_ids"]) == len(sample["source_paths"]) == len(frames)
    assert all(frame.input_size == (size, size) for frame in frames)
    assert set(sample["source_ids"]) <= set(dataset.ids)
    for tile in sample["tiles"]:
        x0, y0, x1, y1 = tile
        assert 0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size, tile
    primary = dataset.records[dataset.ids.index(sample["id"])]
    assert sample["path"] == str(primary.path) and sample["orig_size"] == (primary.height, primary.width)
    for frame, source_id, source_path in zip(frames, sample["source_ids"], sample["source_paths"]):
        assert Path(source_path) == dataset.records[dataset.ids.index(source_id)].path
        with Image.open(source_path) as opened:
            assert frame.source_size == (opened.height, opened.width)


def _outside(valid: tuple[float, float, float, float], size: int, grow: int = 0) -> torch.Tensor:
    """``[size, size]`` bool: True outside the region ``valid`` grown by ``grow`` pixels."""
    x0, y0, x1, y1 = (int(round(value)) for value in valid)
    outside = torch.ones(size, size, dtype=torch.bool)
    outside[max(y0 - grow, 0) : y1 + grow, max(x0 - grow, 0) : x1 + grow] = False
    return outside


# --------------------------------------------------------------------------- the contract
@pytest.mark.parametrize("name", FORMATS)
def test_format_reads_the_synthetic_set(
    name: str, format_cases: dict[str, FormatCase], synthetic_truth: dict[str, dict[str, Any]]
) -> None:
    for split, count in SPLIT_SIZES.items():
        dataset, case = _build(format_cases, name, split, train=False)
        assert len(dataset) == count and dataset.ids == sorted(synthetic_truth[split])
        assert isinstance(dataset.has_labels, bool) and dataset.problems == []
        assert all(isinstance(class_name, str) for class_name in dataset.names)
        assert sorted(dataset.names) == (sorted(SHAPE_CLASSES) if dataset.has_labels else [])
        assert [case.category_ids[class_name] for class_name in dataset.names] == dataset.eval_category_ids
        assert dataset.mosaic_active is False
        for index, sample_id in enumerate(dataset.ids):
            raw = dataset.load_raw(index)
            expected_boxes, expected_names = _expected_targets(dataset, synthetic_truth[split][sample_id])
            assert raw["id"] == sample_id and raw["image"].shape == (*synthetic_truth[split][sample_id]["size"], 3)
            np.testing.assert_allclose(raw["boxes"], expected_boxes, atol=BOX_TOLERANCE)
            assert [dataset.names[label] for label in raw["cls"]] == expected_names


@pytest.mark.parametrize("name", FORMATS)
def test_eval_sample_is_the_letterboxed_image_and_its_targets(
    name: str, format_cases: dict[str, FormatCase], synthetic_truth: dict[str, dict[str, Any]]
) -> None:
    dataset, _ = _build(format_cases, name, "val", train=False)
    for index in range(len(dataset)):
        sample = dataset[index]
        _check_sample_contract(sample, dataset, IMG_SIZE)
        truth = synthetic_truth["val"][dataset.ids[index]]
        (frame,) = sample["frames"]
        assert sample["id"] == dataset.ids[index] and sample["source_ids"] == [sample["id"]]
        assert sample["path"] == str(dataset.records[index].path) and sample["source_paths"] == [sample["path"]]
        assert sample["orig_size"] == truth["size"] == frame.source_size
        assert sample["tiles"] == [(0.0, 0.0, float(IMG_SIZE), float(IMG_SIZE))]
        assert sample["masks"] is None
        # Letterbox: the longer side scaled to the input (whole pixels), centred, grey padding around.
        height, width = truth["size"]
        scale = IMG_SIZE / max(height, width)
        new_w, new_h = round(width * scale), round(height * scale)
        x0, y0 = (IMG_SIZE - new_w) // 2, (IMG_SIZE - new_h) // 2
        x1, y1 = x0 + new_w, y0 + new_h
        np.testing.assert_allclose(frame.matrix, [[new_w / width, 0, x0], [0, new_h / height, y0]], atol=1e-9)
        assert frame.valid == (x0, y0, x1, y1)
        # NOTE: one pixel of slack: content may spill one row or column past frame.valid
        # (test_letterbox_content_stays_inside_frame_valid).
        padding = _outside(frame.valid, IMG_SIZE, grow=1)
        assert (sample["image"][:, padding] == PAD_VALUE).all()
        assert (sample["image"][:, ~_outside(frame.valid, IMG_SIZE)] != PAD_VALUE).any()
        expected_boxes, expected_names = _expected_targets(dataset, truth)
        np.testing.assert_allclose(
            sample["boxes"].numpy(), transform_boxes(frame.matrix, expected_boxes), atol=BOX_TOLERANCE * scale
        )
        assert [dataset.names[label] for label in sample["cls"]] == expected_names


@pytest.mark.parametrize("name", FORMATS)
def test_letterbox_content_stays_inside_frame_valid(name: str, format_cases: dict[str, FormatCase]) -> None:
    dataset, _ = _build(format_cases, name, "val", train=False)
    for index in range(len(dataset)):
        sample = dataset[index]
        (frame,) = sample["frames"]
        outside = _outside(frame.valid, IMG_SIZE)
        assert (sample["image"][:, outside] == PAD_VALUE).all(), f"{sample['id']}: content outside {frame.valid}"


@pytest.mark.parametrize("name", FORMATS)
def test_masks_when_loaded_cover_their_boxes(name: str, format_cases: dict[str, FormatCase]) -> None:
    dataset, _ = _build(format_cases, name, "val", train=False, img_size=MASK_IMG_SIZE, load_masks=True)
    for index in range(len(dataset)):
        sample = dataset[index]
        _check_sample_contract(sample, dataset, MASK_IMG_SIZE)
        masks = sample["masks"]
        assert masks.dtype == torch.uint8 and masks.shape == (len(sample["cls"]), MASK_IMG_SIZE, MASK_IMG_SIZE)
        assert set(masks.unique().tolist()) <= {0, 1}
        for mask, box in zip(masks, sample["boxes"]):
            rows, columns = torch.nonzero(mask, as_tuple=True)
            assert len(rows) > 0, f"{dataset.ids[index]}: empty mask for box {box.tolist()}"
            tight = torch.stack([columns.min(), rows.min(), columns.max() + 1, rows.max() + 1]).float()
            # Nearest-neighbour resampling moves a mask edge by up to one input pixel.
            torch.testing.assert_close(tight, box, atol=1.5, rtol=0.0)


@pytest.mark.parametrize("name", FORMATS)
def test_ground_truth_holds_every_object_in_original_pixels(
    name: str, format_cases: dict[str, FormatCase], synthetic_truth: dict[str, dict[str, Any]]
) -> None:
    dataset, case = _build(format_cases, name, "val", train=False)
    ground_truth = dataset.coco_ground_truth()
    assert ground_truth["categories"] == [
        {"id": case.category_ids[class_name], "name": class_name} for class_name in dataset.names
    ]
    assert [image["id"] for image in ground_truth["images"]] == list(range(len(dataset)))
    name_of_id = {category["id"]: category["name"] for category in ground_truth["categories"]}
    for image, sample_id in zip(ground_truth["images"], dataset.ids):
        truth = synthetic_truth["val"][sample_id]
        assert Path(image["file_name"]).stem == sample_id
        assert (image["height"], image["width"]) == truth["size"]
        annotations = [a for a in ground_truth["annotations"] if a["image_id"] == image["id"]]
        expected_boxes, expected_names = _expected_targets(dataset, truth)
        assert [name_of_id[a["category_id"]] for a in annotations] == expected_names
        assert all(a["iscrowd"] == 0 and a["area"] > 0 for a in annotations)
        xywh = np.array([a["bbox"] for a in annotations]).reshape(-1, 4)
        np.testing.assert_allclose(xywh[:, :2], expected_boxes[:, :2], atol=BOX_TOLERANCE)
        np.testing.assert_allclose(xywh[:, :2] + xywh[:, 2:], expected_boxes[:, 2:], atol=BOX_TOLERANCE)
    assert [a["id"] for a in ground_truth["annotations"]] == list(range(1, len(ground_truth["annotations"]) + 1))
    coco = COCO()
    coco.dataset = ground_truth
    coco.createIndex()
    assert sorted(coco.getCatIds()) == sorted(case.category_ids.values())


@pytest.mark.parametrize("name", FORMATS)
def test_train_samples_are_repeatable_for_a_seed(name: str, format_cases: dict[str, FormatCase]) -> None:
    dataset, _ = _build(format_cases, name, "train", train=True, augment={"mosaic": 0.5})
    assert dataset.mosaic_active is True

    def draw(seed: int) -> list[dict[str, Any]]:
        torch.manual_seed(seed)
        return [dataset[index] for index in range(len(dataset))]

    first, again, other = draw(0), draw(0), draw(1)
    for index, (sample, repeat) in enumerate(zip(first, again)):
        _check_sample_contract(sample, dataset, IMG_SIZE)
        assert sample["id"] == dataset.ids[index]
        assert torch.equal(sample["image"], repeat["image"])
        assert torch.equal(sample["boxes"], repeat["boxes"]) and torch.equal(sample["cls"], repeat["cls"])
        assert sample["frames"] == repeat["frames"] and sample["tiles"] == repeat["tiles"]
        assert sample["source_ids"] == repeat["source_ids"]
    assert any(not torch.equal(a["image"], b["image"]) for a, b in zip(first, other)), "seed 1 drew seed 0's samples"
    # mosaic: 0.5 over six samples and two seeds draws both kinds.
    assert {len(sample["frames"]) == 1 for sample in first + other} == {True, False}


@pytest.mark.parametrize("name", FORMATS)
def test_collate_batches_the_samples(name: str, format_cases: dict[str, FormatCase]) -> None:
    dataset, _ = _build(format_cases, name, "train", train=True, load_masks=True)
    torch.manual_seed(0)
    samples = [dataset[index] for index in range(4)]
    batch = collate_samples(samples)
    counts = [len(sample["cls"]) for sample in samples]
    assert batch["images"].dtype == torch.uint8 and batch["images"].shape == (4, 3, IMG_SIZE, IMG_SIZE)
    assert torch.equal(batch["images"], torch.stack([sample["image"] for sample in samples]))
    targets = batch["targets"]
    assert targets["batch_idx"].dtype == torch.int64
    assert targets["batch_idx"].tolist() == [index for index, count in enumerate(counts) for _ in range(count)]
    assert torch.equal(targets["cls"], torch.cat([sample["cls"] for sample in samples]))
    assert torch.equal(targets["boxes"], torch.cat([sample["boxes"] for sample in samples]))
    assert targets["boxes"].dtype == torch.float32 and targets["boxes"].shape == (sum(counts), 4)
    assert [masks.shape for masks in targets["masks"]] == [(count, IMG_SIZE, IMG_SIZE) for count in counts]
    assert targets["has_labels"].tolist() == [dataset.has_labels] * 4
    for key in ("frames", "tiles", "source_ids"):
        assert batch[key] == [sample[key] for sample in samples]
    assert batch["ids"] == dataset.ids[:4] and batch["paths"] == [sample["path"] for sample in samples]
    assert batch["orig_sizes"] == [sample["orig_size"] for sample in samples]

    # The loader's own generator draws its base seed, so the global stream stays the samples' stream.
    loader = DataLoader(
        dataset, batch_size=4, collate_fn=collate_samples, num_workers=0, generator=torch.Generator().manual_seed(0)
    )
    torch.manual_seed(0)
    loaded = next(iter(loader))
    assert torch.equal(loaded["images"], batch["images"]) and loaded["ids"] == batch["ids"]
    assert torch.equal(loaded["targets"]["boxes"], targets["boxes"])


@pytest.mark.parametrize("name", FORMATS)
def test_masks_are_the_generators_and_follow_the_frames(
    name: str, format_cases: dict[str, FormatCase], synthetic_project: Path
) -> None:
    dataset, _ = _build(format_cases, name, "train", train=True, load_masks=True, augment={"mosaic": 0.5})
    shapes = COCO(str(synthetic_project / "datasets" / "shapes" / "annotations" / "instances_train.json"))
    image_ids = {Path(image["file_name"]).stem: image["id"] for image in shapes.dataset["images"]}
    for index, sample_id in enumerate(dataset.ids):
        drawn = [shapes.annToMask(a) for a in shapes.loadAnns(shapes.getAnnIds(imgIds=image_ids[sample_id]))]
        masks = dataset.load_raw(index)["masks"]
        expected = np.stack(drawn) if dataset.has_labels else np.zeros((0, *drawn[0].shape), dtype=np.uint8)
        assert masks.dtype == np.uint8
        np.testing.assert_array_equal(masks, expected)
    torch.manual_seed(0)
    distances = [0.0]
    for index in range(len(dataset)):
        sample = dataset[index]
        _check_sample_contract(sample, dataset, IMG_SIZE)
        distances += check_masks_follow_frames(sample, dataset, IMG_SIZE)
    assert len(distances) > len(dataset) or not dataset.has_labels
    # NOTE: nearest sampling of a mosaic shrunk up to 5x misses the thinnest parts of a
    # few objects (occluded slivers, star tips): their masks end short of their boxes.
    assert np.mean(np.array(distances) <= 2.0) >= 0.9
