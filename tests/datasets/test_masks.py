"""Instance masks from every source (COCO polygons, compressed and uncompressed RLE, YOLO
segmentation labels, the built-in data) and through every augmentation (letterbox, flip,
scale, translate, mosaic): each mask is its object's original mask warped through the
frame of its source image, and its tight box is the sample's box."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from pycocotools import mask as mask_utils

from tests.datasets.mask_checks import BOX_TOLERANCE, check_masks_follow_frames, tight_box
from vfmkd.datasets import CocoDataset, ImageDataset, YoloDataset, build_dataset, collate_samples
from vfmkd.datasets.masks import mask_to_polygon, rle_counts, segment_to_mask
from vfmkd.datasets.transforms import EvalTransform, TrainTransform

SIZE = 96
NO_COLOUR = {"hsv_h": 0.0, "hsv_s": 0.0, "hsv_v": 0.0}
AUGMENTATIONS = {
    "flip": {"mosaic": 0.0, "fliplr": 1.0, "scale": 0.0, "translate": 0.0},
    "scale": {"mosaic": 0.0, "fliplr": 0.0, "scale": 0.6, "translate": 0.0},
    "translate": {"mosaic": 0.0, "fliplr": 0.0, "scale": 0.0, "translate": 0.3},
    "all": {"mosaic": 0.0, "fliplr": 0.5, "scale": 0.5, "translate": 0.2},
    "mosaic": {"mosaic": 1.0, "fliplr": 0.5, "scale": 0.5, "translate": 0.1},
}


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VFMKD_CACHE_DIR", str(tmp_path / "cache"))


def _uncompressed_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO's uncompressed RLE: run lengths of the column-major pixels, zeros first."""
    flat = mask.astype(np.uint8).ravel(order="F")
    changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    return {"size": list(mask.shape), "counts": np.diff(np.concatenate([[0], changes])).tolist()}


def _compressed_rle(mask: np.ndarray) -> dict[str, Any]:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}


def _objects() -> list[dict[str, Any]]:
    """Per image: size, and per object its class, mask and COCO segmentation (every kind)."""
    first = np.zeros((6, 48, 64), dtype=np.uint8)
    first[0, 6:18, 4:20] = 1  # rectangle: polygon
    first[1, 20:44, 2:8] = 1  # L shape: polygon
    first[1, 38:44, 2:22] = 1
    ys, xs = np.mgrid[0:48, 0:64]
    radius = np.hypot(xs - 44.5, ys - 14.5)
    first[2] = (radius < 11) & (radius >= 4)  # ring: compressed RLE
    first[3, 30:36, 30:40] = 1  # two parts: uncompressed RLE
    first[3, 40:47, 50:56] = 1
    triangle = [40.0, 24.0, 62.0, 46.0, 34.0, 46.0]  # not along pixel edges: pycocotools decides
    first[4] = segment_to_mask([triangle], np.zeros(4), 48, 64)
    first[5, 0:12, 58:64] = 1  # on the image border: compressed RLE
    second = np.zeros((2, 60, 40), dtype=np.uint8)
    ys, xs = np.mgrid[0:60, 0:40]
    second[0] = np.hypot(xs - 19.5, ys - 29.5) < 14  # disc: traced polygon
    second[1, 45:60, 0:12] = 1  # bottom-left corner: uncompressed RLE
    return [
        {
            "size": (48, 64),
            "masks": first,
            "segmentations": [
                [mask_to_polygon(first[0])],
                [mask_to_polygon(first[1])],
                _compressed_rle(first[2]),
                _uncompressed_rle(first[3]),
                [triangle],
                _compressed_rle(first[5]),
            ],
        },
        {
            "size": (60, 40),
            "masks": second,
            "segmentations": [[mask_to_polygon(second[0])], _uncompressed_rle(second[1])],
        },
        {"size": (36, 50), "masks": np.zeros((0, 36, 50), dtype=np.uint8), "segmentations": []},
    ]


@pytest.fixture(scope="module")
def layouts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same three images (the last without objects) as a COCO json and a YOLO layout;
    each object has its own class (the class of object k of image i is ``o{i}{k}``)."""
    root = tmp_path_factory.mktemp("masks")
    for folder in ("images/train", "labels/train", "annotations"):
        (root / folder).mkdir(parents=True)
    images, annotations, names = [], [], []
    for image_index, image in enumerate(_objects()):
        height, width = image["size"]
        pixels = np.random.default_rng(image_index).integers(0, 255, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "images" / "train" / f"{image_index}.png")
        entry = {"id": image_index + 1, "file_name": f"{image_index}.png", "height": height, "width": width}
        images.append(entry)
        lines = []
        for mask, segmentation in zip(image["masks"], image["segmentations"]):
            label = len(names)
            names.append(f"o{image_index}{len(lines)}")
            x0, y0, x1, y1 = tight_box(mask)
            annotations.append(
                {
                    "id": 100 + label,
                    "image_id": image_index + 1,
                    "category_id": label + 1,
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": int(mask.sum()),
                    "iscrowd": 0,
                    "segmentation": segmentation,
                }
            )
            polygon = np.array(mask_to_polygon(mask)).reshape(-1, 2) / np.array([width, height])
            lines.append(" ".join([str(label), *(f"{value:.8f}" for value in polygon.ravel())]) + "\n")
        (root / "labels" / "train" / f"{image_index}.txt").write_text("".join(lines))
    categories = [{"id": label + 1, "name": name} for label, name in enumerate(names)]
    coco = {"images": images, "annotations": annotations, "categories": categories}
    (root / "annotations" / "instances_train.json").write_text(json.dumps(coco))
    data = {"path": str(root), "train": "images/train", "names": names}
    (root / "data.yaml").write_text(yaml.safe_dump(data))
    return {"coco": root / "annotations" / "instances_train.json", "yolo": root / "data.yaml"}


def _dataset(layouts: dict[str, Path], layout: str, **options: Any) -> ImageDataset:
    if layout == "coco":
        return CocoDataset(layouts["coco"], load_masks=True, **options)
    return YoloDataset(layouts["yolo"], "train", load_masks=True, **options)


# --------------------------------------------------------------------------- sources
@pytest.mark.parametrize("layout", ["coco", "yolo"])
def test_masks_from_polygons_and_rle_equal_the_drawn_masks(layouts: dict[str, Path], layout: str) -> None:
    dataset = _dataset(layouts, layout)
    assert dataset.problems == []
    for index, image in enumerate(_objects()):
        raw = dataset.load_raw(index)
        assert raw["masks"].dtype == np.uint8 and raw["masks"].shape == (len(image["masks"]), *image["size"])
        np.testing.assert_array_equal(raw["masks"], image["masks"])
        expected_boxes = np.array([tight_box(mask) for mask in image["masks"]]).reshape(-1, 4)
        np.testing.assert_allclose(raw["boxes"], expected_boxes, atol=1e-4)


def test_compressed_rle_counts_decode_like_pycocotools() -> None:
    for mask in _objects()[0]["masks"]:
        compressed = _compressed_rle(mask)
        assert rle_counts(compressed) == _uncompressed_rle(mask)["counts"]
        uncompressed = {"size": compressed["size"], "counts": rle_counts(compressed)}
        rebuilt = mask_utils.frPyObjects(uncompressed, *mask.shape)
        np.testing.assert_array_equal(mask_utils.decode(rebuilt), mask)


def test_traced_polygons_rasterise_back_to_their_masks() -> None:
    rng = np.random.default_rng(0)
    for trial in range(60):
        height, width = (int(value) for value in rng.integers(3, 40, 2))
        mask = rng.random((height, width)) < (0.5 if trial % 2 else 0.15)  # holes, parts, diagonal touches
        if not mask.any():
            continue
        polygon = mask_to_polygon(mask)
        assert all(value == int(value) for value in polygon)
        np.testing.assert_array_equal(segment_to_mask([polygon], np.zeros(4), height, width), mask)
    with pytest.raises(ValueError, match="empty"):
        mask_to_polygon(np.zeros((4, 4)))


def test_builtin_yolo_labels_are_the_json_masks(synthetic_data_yaml: Path) -> None:
    """The built-in set's YOLO layout (segmentation polygons) gives the COCO json's masks and boxes."""
    folder = synthetic_data_yaml.parent
    yolo = YoloDataset(synthetic_data_yaml, "train", load_masks=True)
    coco = CocoDataset(folder / "annotations" / "instances_train.json", load_masks=True)
    assert yolo.ids == coco.ids and yolo.problems == coco.problems == []
    for index in range(len(yolo)):
        from_labels, from_json = yolo.load_raw(index), coco.load_raw(index)
        np.testing.assert_array_equal(from_labels["masks"], from_json["masks"])
        np.testing.assert_allclose(from_labels["boxes"], from_json["boxes"], atol=1e-2)
        for mask, box in zip(from_json["masks"], from_json["boxes"]):
            np.testing.assert_array_equal(tight_box(mask), box)


# --------------------------------------------------------------------------- augmentations
@pytest.mark.parametrize("layout", ["coco", "yolo"])
def test_masks_follow_the_letterbox(layouts: dict[str, Path], layout: str) -> None:
    dataset = _dataset(layouts, layout, transform=EvalTransform(SIZE))
    distances = [check_masks_follow_frames(dataset[index], dataset, SIZE) for index in range(len(dataset))]
    assert [len(per_image) for per_image in distances] == [6, 2, 0]
    assert max(sum(distances, [])) <= BOX_TOLERANCE


@pytest.mark.parametrize("layout", ["coco", "yolo"])
@pytest.mark.parametrize("augmentation", AUGMENTATIONS)
def test_masks_follow_every_augmentation(layouts: dict[str, Path], layout: str, augmentation: str) -> None:
    transform = TrainTransform(SIZE, {**AUGMENTATIONS[augmentation], **NO_COLOUR})
    dataset = _dataset(layouts, layout, transform=transform)
    distances, tiles = [], 0
    for seed in range(8):
        sample = dataset.transform(dataset, seed % len(dataset), np.random.default_rng(seed))
        distances += check_masks_follow_frames(sample, dataset, SIZE)
        tiles += len(sample["frames"])
        if augmentation == "flip":
            assert all(frame.matrix[0, 0] < 0 for frame in sample["frames"])
    assert len(distances) > 8 and max(distances) <= BOX_TOLERANCE
    if augmentation == "mosaic":
        assert tiles > 8 * 2


def test_objects_cut_to_nothing_are_dropped() -> None:
    """An L-shaped object whose visible part of the box holds none of its mask is not a target."""

    class Source:
        def __init__(self) -> None:
            masks = np.zeros((1, 100, 100), dtype=np.uint8)
            masks[0, 10:90, 10:14] = 1
            masks[0, 86:90, 10:90] = 1
            self.raw = {
                "image": np.zeros((100, 100, 3), np.uint8),
                "boxes": np.array([[10.0, 10, 90, 90]], np.float32),
                "cls": np.zeros(1, np.int64),
                "masks": masks,
                "id": "l",
                "path": "l.png",
            }

        def __len__(self) -> int:
            return 1

        def load_raw(self, index: int) -> dict[str, Any]:
            return self.raw

    settings = {"mosaic": 0.0, "fliplr": 0.0, "scale": 0.0, "translate": 0.45, **NO_COLOUR}
    transform = TrainTransform(64, settings)
    kept = dropped = 0
    for seed in range(60):
        sample = transform(Source(), 0, np.random.default_rng(seed))
        for mask, box in zip(sample["masks"].numpy(), sample["boxes"].numpy()):
            assert mask.any()
            np.testing.assert_allclose(box, tight_box(mask), atol=BOX_TOLERANCE)
        kept += len(sample["boxes"])
        dropped += len(sample["boxes"]) == 0
    assert kept > 0 and dropped > 0


def test_images_without_instances_batch_with_empty_masks(layouts: dict[str, Path]) -> None:
    dataset = _dataset(layouts, "coco", transform=TrainTransform(SIZE, {"mosaic": 0.0, **NO_COLOUR}))
    empty = dataset[2]
    assert empty["masks"].shape == (0, SIZE, SIZE) and empty["boxes"].shape == (0, 4)
    assert empty["frame_index"].shape == (0,)
    batch = collate_samples([empty, dataset[0]])
    assert [len(masks) for masks in batch["targets"]["masks"]] == [0, len(batch["targets"]["boxes"])]


def test_builtin_masks_through_mosaic_training_samples(synthetic_project: Path) -> None:
    dataset = build_dataset(
        {"dataset": "shapes", "root": str(synthetic_project), "img_size": SIZE, "load_masks": True,
         "augment": {"mosaic": 1.0, **NO_COLOUR}},
        "train",
        train=True,
    )
    torch.manual_seed(0)
    distances = []
    for index in range(len(dataset)):
        distances += check_masks_follow_frames(dataset[index], dataset, SIZE)
    assert len(distances) > len(dataset)
    # NOTE: a mosaic shrinks these images up to 5x; nearest sampling then misses parts
    # of objects thinner than 5 source pixels (occluded slivers, star tips), whose masks
    # end short of their boxes. Most objects are chunky.
    assert np.mean(np.array(distances) <= 2.0) >= 0.9, sorted(distances)
