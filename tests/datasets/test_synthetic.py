"""The built-in synthetic data set: layout, COCO json validity, determinism, atomicity."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from vfmkd.datasets.synthetic import SHAPE_CLASSES, generate_synthetic_dataset


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_synthetic_dataset(
        tmp_path_factory.mktemp("synthetic") / "shapes", num_train=12, num_val=4
    ).parent


def _files(folder: Path) -> dict[str, bytes]:
    return {
        path.relative_to(folder).as_posix(): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def test_layout(shapes: Path) -> None:
    data = yaml.safe_load((shapes / "data.yaml").read_text())
    assert data["path"] == "." and data["train"] == "images/train" and data["val"] == "images/val"
    assert data["names"] == dict(enumerate(SHAPE_CLASSES))
    for split, count in (("train", 12), ("val", 4)):
        images = sorted((shapes / "images" / split).glob("*.jpg"))
        labels = sorted((shapes / "labels" / split).glob("*.txt"))
        assert len(images) == len(labels) == count
        assert (shapes / "annotations" / f"instances_{split}.json").is_file()
    sizes = {Image.open(path).size for path in (shapes / "images" / "train").glob("*.jpg")}
    assert len(sizes) > 3 and any(width != height for width, height in sizes)


def test_coco_json_is_valid_and_matches_labels(shapes: Path) -> None:
    coco = COCO(str(shapes / "annotations" / "instances_train.json"))
    assert sorted(coco.getCatIds()) == list(range(1, len(SHAPE_CLASSES) + 1))
    kinds = set()
    occluded_or_cut = 0
    for image_id in coco.getImgIds():
        info = coco.loadImgs(image_id)[0]
        assert Image.open(shapes / "images" / "train" / info["file_name"]).size == (
            info["width"],
            info["height"],
        )
        annotations = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
        label_lines = (
            (shapes / "labels" / "train" / Path(info["file_name"]).with_suffix(".txt").name)
            .read_text()
            .split("\n")
        )
        label_lines = [line for line in label_lines if line]
        assert len(label_lines) == len(annotations)
        for annotation, line in zip(annotations, label_lines):
            assert annotation["iscrowd"] == 0
            mask = coco.annToMask(annotation)
            kinds.add("rle" if isinstance(annotation["segmentation"], dict) else "polygon")
            occluded_or_cut += isinstance(annotation["segmentation"], dict)
            assert int(mask.sum()) == annotation["area"] > 0
            assert int(mask_utils.area(coco.annToRLE(annotation))) == annotation["area"]
            ys, xs = np.nonzero(mask)
            x, y, width, height = annotation["bbox"]
            assert (x, y, x + width, y + height) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            # The label line is the visible mask traced along pixel edges: its extent is the
            # bbox and it rasterises back to exactly the json's mask.
            label, *coordinates = line.split()
            assert int(label) + 1 == annotation["category_id"] and len(coordinates) % 2 == 0
            polygon = np.array(coordinates, dtype=np.float64).reshape(-1, 2) * [info["width"], info["height"]]
            np.testing.assert_allclose(
                [*polygon.min(axis=0), *polygon.max(axis=0)], [x, y, x + width, y + height], atol=1e-3
            )
            traced = mask_utils.frPyObjects([polygon.ravel().tolist()], info["height"], info["width"])
            np.testing.assert_array_equal(mask_utils.decode(traced)[:, :, 0], mask)
    assert kinds == {"rle", "polygon"} and occluded_or_cut > 0


def test_visible_masks_do_not_overlap(shapes: Path) -> None:
    coco = COCO(str(shapes / "annotations" / "instances_val.json"))
    for image_id in coco.getImgIds():
        masks = [coco.annToMask(annotation) for annotation in coco.loadAnns(coco.getAnnIds(imgIds=image_id))]
        if masks:
            assert np.stack(masks).sum(axis=0).max() <= 1


def test_same_seed_gives_identical_bytes(tmp_path: Path) -> None:
    first = generate_synthetic_dataset(tmp_path / "first", num_train=3, num_val=2, seed=7).parent
    second = generate_synthetic_dataset(tmp_path / "second", num_train=3, num_val=2, seed=7).parent
    other = generate_synthetic_dataset(tmp_path / "other", num_train=3, num_val=2, seed=8).parent
    assert _files(first) == _files(second)
    assert _files(first) != _files(other)


def test_generation_is_atomic_and_refuses_to_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "shapes"
    generate_synthetic_dataset(out, num_train=2, num_val=1)
    with pytest.raises(FileExistsError):
        generate_synthetic_dataset(out, num_train=2, num_val=1)
    generate_synthetic_dataset(out, num_train=3, num_val=1, overwrite=True)
    assert len(list((out / "images" / "train").glob("*.jpg"))) == 3
    assert sorted(path.name for path in tmp_path.iterdir()) == ["shapes"]


def test_failed_generation_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        generate_synthetic_dataset(tmp_path / "bad", min_size=300, max_size=200)
    assert list(tmp_path.iterdir()) == []


def test_json_counts_are_strings_for_rle(shapes: Path) -> None:
    data = json.loads((shapes / "annotations" / "instances_train.json").read_text())
    rles = [
        annotation["segmentation"]
        for annotation in data["annotations"]
        if isinstance(annotation["segmentation"], dict)
    ]
    assert rles and all(isinstance(rle["counts"], str) for rle in rles)
