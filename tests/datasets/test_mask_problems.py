"""Bad mask input is named (COCO annotation id, YOLO ``file:line``) when a data set is read,
never a crash in the middle of an epoch: polygons of fewer than 3 points, RLE of the wrong
size, segments without a mask or without a box, images without instances."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from pycocotools import mask as mask_utils
from torch.utils.data import DataLoader

from vfmkd.datasets import CocoDataset, YoloDataset, collate_samples
from vfmkd.datasets.check import check_dataset, format_problems
from vfmkd.datasets.masks import clean_segment
from vfmkd.datasets.transforms import TrainTransform

HEIGHT, WIDTH = 40, 60
SQUARE = [10.0, 10.0, 30.0, 10.0, 30.0, 30.0, 10.0, 30.0]


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VFMKD_CACHE_DIR", str(tmp_path / "cache"))


def _rle(mask: np.ndarray) -> dict[str, Any]:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}


def _block(height: int = HEIGHT, width: int = WIDTH) -> np.ndarray:
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[5:15, 20:40] = 1
    return mask


# Annotation id -> (segmentation, what the problem must say, or None when the annotation is fine).
BAD_SEGMENTS: dict[int, tuple[Any, str | None]] = {
    1: ([SQUARE], None),
    2: ([[10.0, 10.0, 30.0, 30.0]], "2 point(s); a polygon needs 3 or more"),
    3: ([[10.0, 10.0, 30.0, 10.0, 30.0]], "odd number of coordinates"),
    4: ([[10.0, 10.0, float("nan"), 10.0, 30.0, 30.0]], "not finite"),
    5: ([[10.0, 10.0, 20.0, 20.0, 30.0, 30.0]], "no area"),
    6: ([[100.0, 100.0, 120.0, 100.0, 120.0, 120.0]], "outside the 40x60 image"),
    7: (_rle(_block(20, 30)), "RLE size [20, 30] differs from the image's [40, 60]"),
    8: ({"size": [20, 30], "counts": [0, 600]}, "RLE size [20, 30] differs"),
    9: ({"size": [HEIGHT, WIDTH], "counts": [10, 20]}, "cover 30 pixels"),
    10: ({"size": [HEIGHT, WIDTH], "counts": "@@@~"}, "malformed"),
    11: ({"size": [HEIGHT, WIDTH], "counts": [HEIGHT * WIDTH]}, "mask is empty"),
    12: ({"counts": [HEIGHT * WIDTH]}, "no valid `size`"),
    13: ("polygon", "neither polygons nor an RLE"),
    14: ([], None),  # no segmentation at all: the box is the mask
    15: ([SQUARE, [1.0, 2.0]], None),  # one bad part dropped, a warning
    16: ({"size": [HEIGHT, WIDTH], "counts": [200, 30, HEIGHT * WIDTH - 230]}, None),
    17: (_rle(_block()), None),
}


def _coco_file(root: Path, annotations: list[dict[str, Any]], images: int = 2) -> Path:
    (root / "images").mkdir(parents=True, exist_ok=True)
    entries = []
    for index in range(images):
        pixels = np.full((HEIGHT, WIDTH, 3), 60 * index, dtype=np.uint8)
        Image.fromarray(pixels).save(root / "images" / f"{index}.png")
        entries.append({"id": index + 1, "file_name": f"{index}.png", "height": HEIGHT, "width": WIDTH})
    (root / "annotations").mkdir(exist_ok=True)
    path = root / "annotations" / "instances_train.json"
    data = {"images": entries, "annotations": annotations, "categories": [{"id": 1, "name": "thing"}]}
    path.write_text(json.dumps(data))
    return path


def _annotation(identifier: int, segmentation: Any, bbox: list[float] | None = None, image: int = 1) -> dict:
    annotation = {
        "id": identifier,
        "image_id": image,
        "category_id": 1,
        "iscrowd": 0,
        "segmentation": segmentation,
    }
    if bbox is not None:
        annotation["bbox"] = bbox
    return annotation


def test_clean_segment_accepts_good_segments_and_names_bad_ones() -> None:
    for identifier, (segment, expected) in BAD_SEGMENTS.items():
        if identifier == 14:
            continue
        cleaned, message = clean_segment(segment, HEIGHT, WIDTH)
        if expected is None:
            assert cleaned is not None, (identifier, message)
        else:
            assert cleaned is None and expected in message, (identifier, message)
    cleaned, message = clean_segment(BAD_SEGMENTS[15][0], HEIGHT, WIDTH)
    assert cleaned == [SQUARE] and "polygon 1 has 1 point(s)" in message and "1 polygon(s) kept" in message


def test_coco_segmentation_problems_name_the_annotation_and_drop_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    annotations = [_annotation(key, segment, [10, 10, 20, 20]) for key, (segment, _) in BAD_SEGMENTS.items()]
    path = _coco_file(tmp_path, annotations)
    with caplog.at_level(logging.WARNING):
        dataset = CocoDataset(path, load_masks=True)
    errors = {problem.message for problem in dataset.problems if problem.severity == "error"}
    warnings = [problem.message for problem in dataset.problems if problem.severity == "warning"]
    for identifier, (_, expected) in BAD_SEGMENTS.items():
        if expected is not None:
            assert any(message.startswith(f"annotation {identifier}: ") and expected in message and
                       message.endswith("; dropped") for message in errors), (identifier, errors)
    assert len(errors) == sum(expected is not None for _, expected in BAD_SEGMENTS.values())
    assert len(warnings) == 1 and warnings[0].startswith("annotation 15: polygon 1 has 1 point(s)")
    assert all(problem.file == str(path) for problem in dataset.problems)
    assert "annotation 7: its RLE size [20, 30]" in caplog.text
    kept = dataset.records[0].object_ids.tolist()
    assert kept == [1, 14, 15, 16, 17]
    raw = dataset.load_raw(0)
    assert raw["masks"].shape == (5, HEIGHT, WIDTH)
    assert [int(mask.sum()) for mask in raw["masks"]] == [400, 400, 400, 30, 200]
    # A clean second image without annotations: no objects, no masks.
    assert dataset.load_raw(1)["masks"].shape == (0, HEIGHT, WIDTH)
    # `vfmkd data check` lists the same problems.
    checked = check_dataset(path)
    assert [problem.message for problem in checked] == [problem.message for problem in dataset.problems]
    assert format_problems(checked).endswith(f"{len(errors)} error(s), 1 warning(s)")


def test_coco_mask_without_box_takes_its_extent_and_box_without_anything_is_dropped(tmp_path: Path) -> None:
    rle = _rle(_block())
    path = _coco_file(
        tmp_path,
        [
            _annotation(1, rle),
            _annotation(2, [SQUARE]),
            _annotation(3, None),
            _annotation(4, [[1.0, 1.0, 2.0, 2.0]]),
        ],
    )
    dataset = CocoDataset(path, load_masks=True)
    raw = dataset.load_raw(0)
    np.testing.assert_allclose(raw["boxes"], [[20, 5, 40, 15], [10, 10, 30, 30]])
    np.testing.assert_array_equal(raw["masks"][0], _block())
    messages = [(problem.severity, problem.message) for problem in dataset.problems]
    assert ("warning", "annotation 1 has no bbox; its box is its segmentation's extent") in messages
    assert ("error", "annotation 3 has an invalid bbox None; dropped") in messages
    assert any(severity == "error" and message.startswith("annotation 4: polygon 0 has 2 point(s)")
               for severity, message in messages)


def test_a_polygon_thinner_than_a_pixel_gives_an_empty_mask_named_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sliver = [10.1, 10.1, 30.0, 10.2, 30.0, 10.3]  # has area, covers no pixel centre
    annotations = [_annotation(7, [sliver], [10, 10, 20, 1]), _annotation(8, [SQUARE], [10, 10, 20, 20])]
    path = _coco_file(tmp_path, annotations)
    dataset = CocoDataset(path, load_masks=True)
    assert dataset.problems == []
    with caplog.at_level(logging.WARNING):
        first, again = dataset.load_raw(0), dataset.load_raw(0)
    assert [int(mask.sum()) for mask in first["masks"]] == [0, 400] and len(first["boxes"]) == 2
    assert caplog.text.count(f"{path}: annotation 7: its mask has no pixel") == 1
    assert np.array_equal(first["masks"], again["masks"])


def _yolo_layout(root: Path, labels: dict[str, str]) -> Path:
    for name in labels:
        (root / "images" / "train").mkdir(parents=True, exist_ok=True)
        pixels = np.zeros((HEIGHT, WIDTH, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "images" / "train" / f"{name}.png")
    (root / "labels" / "train").mkdir(parents=True, exist_ok=True)
    for name, text in labels.items():
        if text is not None:
            (root / "labels" / "train" / f"{name}.txt").write_text(text)
    data = {"path": str(root), "train": "images/train", "names": ["a", "b"]}
    (root / "data.yaml").write_text(yaml.safe_dump(data))
    return root / "data.yaml"


def test_yolo_segmentation_problems_name_file_and_line(tmp_path: Path) -> None:
    text = "\n".join(
        [
            "0 0.1 0.1 0.5 0.1 0.5 0.6",  # 1 ok: triangle
            "1 0.5 0.5",  # 2 a polygon of one point
            "0 0.1 0.1 0.5 0.1 0.5",  # 3 an odd number of coordinates
            "1 0.1 0.1 0.3 0.3 0.6 0.6",  # 4 points on a line
            "0 0.1 0.1 0.5 0.1 0.5 0.6 0.1",  # 5 odd again
            "1 0.2 0.2 0.4 0.2 0.4 0.4 0.2 0.4",  # 6 ok: square
        ]
    )
    data_yaml = _yolo_layout(tmp_path, {"a": text, "empty": "", "missing": None})
    dataset = YoloDataset(data_yaml, "train", load_masks=True)
    label_file = str(tmp_path / "labels" / "train" / "a.txt")
    reported = [(problem.file, problem.line) for problem in dataset.problems]
    assert reported == [(label_file, line) for line in (2, 3, 4, 5)]
    assert "no area" in dataset.problems[2].message
    assert dataset.records[0].object_ids.tolist() == [1, 6]
    raw = dataset.load_raw(0)
    assert raw["masks"].shape == (2, HEIGHT, WIDTH) and all(mask.any() for mask in raw["masks"])
    assert dataset.object_origin(0, 1) == f"{label_file}:6"
    for index in (1, 2):  # empty and missing label files: images without instances
        assert dataset.load_raw(index)["masks"].shape == (0, HEIGHT, WIDTH)


def test_box_only_labels_with_load_masks_are_named(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data_yaml = _yolo_layout(tmp_path, {"a": "0 0.5 0.5 0.2 0.2\n1 0.1 0.1 0.5 0.1 0.5 0.6\n"})
    with caplog.at_level(logging.WARNING):
        YoloDataset(data_yaml, "train", load_masks=True)
    assert "1 of 2 objects have no segmentation" in caplog.text


def test_a_training_epoch_over_bad_input_does_not_crash(tmp_path: Path) -> None:
    """Every bad annotation above, images without instances, mosaic and masks: one epoch runs."""
    annotations = [_annotation(key, segment, [10, 10, 20, 20]) for key, (segment, _) in BAD_SEGMENTS.items()]
    annotations.append(_annotation(99, [[10.1, 10.1, 30.0, 10.2, 30.0, 10.3]], [10, 10, 20, 1], image=2))
    path = _coco_file(tmp_path, annotations, images=4)
    transform = TrainTransform(64, {"mosaic": 0.5})
    dataset = CocoDataset(path, load_masks=True, transform=transform)
    generator = torch.Generator().manual_seed(0)
    loader = DataLoader(dataset, batch_size=2, collate_fn=collate_samples, generator=generator)
    torch.manual_seed(0)
    for batch in loader:
        masks, boxes = batch["targets"]["masks"], batch["targets"]["boxes"]
        assert sum(len(image_masks) for image_masks in masks) == len(boxes)
        assert all(image_masks.shape[1:] == (64, 64) for image_masks in masks)
