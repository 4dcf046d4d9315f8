"""COCO-json data sets: non-contiguous category ids, crowd regions, masks, image folders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from vfmkd.datasets import CocoDataset, DatasetError
from vfmkd.datasets.coco import find_image_dir, sibling_json


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VFMKD_CACHE_DIR", str(tmp_path / "cache"))


def _coco_layout(root: Path) -> Path:
    """COCO's own layout: annotations/instances_val2017.json and val2017/."""
    (root / "val2017").mkdir(parents=True)
    for index in range(3):
        Image.fromarray(np.full((50, 80, 3), index * 40, dtype=np.uint8)).save(
            root / "val2017" / f"{index:012d}.jpg"
        )
    crowd_rle = mask_utils.encode(
        np.asfortranarray(np.pad(np.ones((10, 10), np.uint8), ((30, 10), (60, 10))))
    )
    data = {
        "images": [
            {"id": 42 + index, "file_name": f"{index:012d}.jpg", "height": 50, "width": 80}
            for index in range(3)
        ],
        "categories": [{"id": 18, "name": "dog"}, {"id": 3, "name": "car"}, {"id": 90, "name": "toothbrush"}],
        "annotations": [
            {
                "id": 1,
                "image_id": 42,
                "category_id": 18,
                "bbox": [10, 5, 20, 15],
                "area": 300,
                "iscrowd": 0,
                "segmentation": [[10, 5, 30, 5, 30, 20, 10, 20]],
            },
            {
                "id": 2,
                "image_id": 42,
                "category_id": 90,
                "bbox": [40, 10, 30, 30],
                "area": 900,
                "iscrowd": 0,
                "segmentation": [[40, 10, 70, 10, 70, 40, 40, 40]],
            },
            {
                "id": 3,
                "image_id": 42,
                "category_id": 3,
                "bbox": [60, 30, 10, 10],
                "area": 100,
                "iscrowd": 1,
                "segmentation": {"size": [50, 80], "counts": crowd_rle["counts"].decode("ascii")},
            },
            {
                "id": 4,
                "image_id": 43,
                "category_id": 3,
                "bbox": [0, 0, 80, 50],
                "area": 4000,
                "iscrowd": 0,
                "segmentation": [[0, 0, 80, 0, 80, 50, 0, 50]],
            },
            {"id": 5, "image_id": 99, "category_id": 3, "bbox": [0, 0, 5, 5], "area": 25, "iscrowd": 0},
            {"id": 6, "image_id": 44, "category_id": 7, "bbox": [0, 0, 5, 5], "area": 25, "iscrowd": 0},
            {"id": 7, "image_id": 44, "category_id": 3, "bbox": [0, 0, 0, 5], "area": 0, "iscrowd": 0},
        ],
    }
    (root / "annotations").mkdir()
    path = root / "annotations" / "instances_val2017.json"
    path.write_text(json.dumps(data))
    return path


def test_non_contiguous_ids_map_to_contiguous_labels(tmp_path: Path) -> None:
    dataset = CocoDataset(_coco_layout(tmp_path))
    assert dataset.names == ["car", "dog", "toothbrush"] and dataset.category_ids == [3, 18, 90]
    assert dataset.eval_category_ids == [3, 18, 90]
    assert dataset.ids == ["000000000000", "000000000001", "000000000002"]
    raw = dataset.load_raw(0)
    assert raw["cls"].tolist() == [1, 2]
    np.testing.assert_allclose(raw["boxes"], [[10, 5, 30, 20], [40, 10, 70, 40]])
    assert dataset.load_raw(1)["cls"].tolist() == [0]
    # Unknown image, unknown category and an empty box are reported, not trained on.
    assert len(dataset.problems) == 3


def test_crowd_is_not_a_target_but_stays_in_the_ground_truth(tmp_path: Path) -> None:
    dataset = CocoDataset(_coco_layout(tmp_path), load_masks=True)
    raw = dataset.load_raw(0)
    assert len(raw["boxes"]) == 2 and raw["masks"].shape == (2, 50, 80)
    ground_truth = dataset.coco_ground_truth()
    crowd = [annotation for annotation in ground_truth["annotations"] if annotation["iscrowd"]]
    assert len(crowd) == 1 and crowd[0]["category_id"] == 3 and crowd[0]["image_id"] == 0
    assert {annotation["category_id"] for annotation in ground_truth["annotations"]} == {3, 18, 90}
    # A detection on the crowd region is ignored, not a false positive.
    coco = COCO()
    coco.dataset = ground_truth
    coco.createIndex()
    detections = [
        {
            "image_id": annotation["image_id"],
            "category_id": annotation["category_id"],
            "bbox": annotation["bbox"],
            "score": 0.9,
        }
        for annotation in ground_truth["annotations"]
    ]
    evaluation = COCOeval(coco, coco.loadRes(detections), "bbox")
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
    assert evaluation.stats[0] == pytest.approx(1.0)


def test_image_folder_and_sibling_json_discovery(tmp_path: Path) -> None:
    annotation_file = _coco_layout(tmp_path)
    assert find_image_dir(annotation_file) == tmp_path / "val2017"
    train = tmp_path / "annotations" / "instances_train2017.json"
    train.write_text(annotation_file.read_text())
    assert sibling_json(train, "val") == annotation_file
    assert sibling_json(annotation_file, "val") == annotation_file
    with pytest.raises(DatasetError, match="data.images"):
        find_image_dir(tmp_path / "elsewhere" / "instances_x.json")


def test_synthetic_coco_json_masks_match_its_rle_and_polygons(synthetic_data_yaml: Path) -> None:
    root = synthetic_data_yaml.parent
    annotation_file = root / "annotations" / "instances_train.json"
    dataset = CocoDataset(annotation_file, load_masks=True)
    assert dataset.names[0] == "circle" and dataset.category_ids == list(range(1, 7))
    coco = COCO(str(annotation_file))
    for index, sample_id in enumerate(dataset.ids):
        image_id = next(
            image["id"] for image in coco.dataset["images"] if image["file_name"] == f"{sample_id}.jpg"
        )
        expected = [
            coco.annToMask(annotation) for annotation in coco.loadAnns(coco.getAnnIds(imgIds=image_id))
        ]
        raw = dataset.load_raw(index)
        assert len(raw["masks"]) == len(expected)
        for mask, reference in zip(raw["masks"], expected):
            np.testing.assert_array_equal(mask, reference)


def test_missing_categories_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    path = tmp_path / "instances_x.json"
    path.write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    with pytest.raises(DatasetError, match="categories"):
        CocoDataset(path, tmp_path / "images")
