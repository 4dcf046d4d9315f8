"""YOLO-layout data sets: labels, malformed input, bad images, ground truth."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from vfmkd.datasets import DatasetError, EvalTransform, YoloDataset
from vfmkd.datasets.check import check_dataset, format_problems
from vfmkd.datasets.yolo import label_path_for


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VFMKD_CACHE_DIR", str(tmp_path / "cache"))


def _image(path: Path, height: int, width: int, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    Image.fromarray(array).save(path)


def _write_dataset(
    root: Path, labels: dict[str, str], names: list[str] | dict[int, str] | None = None
) -> Path:
    """Images ``a``..``e`` (PNG, 40x60) under images/train2017 with the given label texts."""
    for index, name in enumerate(["a", "b", "c", "d", "e"]):
        _image(root / "images" / "train2017" / f"{name}.png", 40, 60, index)
    (root / "labels" / "train2017").mkdir(parents=True, exist_ok=True)
    for name, text in labels.items():
        (root / "labels" / "train2017" / f"{name}.txt").write_text(text)
    data = {
        "path": str(root),
        "train": "images/train2017",
        "val": "images/train2017",
        "names": names or ["cat", "dog"],
    }
    (root / "data.yaml").write_text(yaml.safe_dump(data))
    return root / "data.yaml"


def test_label_path_replaces_the_last_images_component() -> None:
    assert label_path_for(Path("/data/images/coco/images/train2017/x.jpg")) == Path(
        "/data/images/coco/labels/train2017/x.txt"
    )
    assert label_path_for(Path("/data/pics/x.png")) == Path("/data/pics/x.txt")


def test_boxes_polygons_and_missing_labels(tmp_path: Path) -> None:
    data_yaml = _write_dataset(
        tmp_path,
        {
            "a": "0 0.5 0.5 0.5 0.5\n1 0.25 0.25 0.1 0.2\n",
            "b": "1 0.1 0.1 0.5 0.1 0.5 0.6 0.1 0.6\n",
            "c": "",
        },
        names={0: "cat", 1: "dog"},
    )
    dataset = YoloDataset(data_yaml, "train", load_masks=True)
    assert dataset.names == ["cat", "dog"] and dataset.ids == ["a", "b", "c", "d", "e"]
    raw = dataset.load_raw(0)
    assert raw["image"].shape == (40, 60, 3)
    np.testing.assert_allclose(raw["boxes"], [[15, 10, 45, 30], [12, 6, 18, 14]], atol=1e-4)
    assert raw["cls"].tolist() == [0, 1] and raw["masks"].shape == (2, 40, 60)
    assert raw["masks"][0].sum() == 30 * 20  # box-only objects get their box as mask
    polygon = dataset.load_raw(1)
    np.testing.assert_allclose(polygon["boxes"], [[6, 4, 30, 24]], atol=1e-4)
    assert 0.9 * 24 * 20 < polygon["masks"][0].sum() <= 25 * 21
    for index in (2, 3):  # empty label file, missing label file
        assert len(dataset.load_raw(index)["boxes"]) == 0
    assert dataset.problems == []


def test_malformed_label_lines_are_reported_with_file_and_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    text = "\n".join(
        [
            "0 0.5 0.5 0.2 0.2",  # 1 ok
            "0 0.5 0.5 0.2",  # 2 field count
            "0 0.5 abc 0.2 0.2",  # 3 not a number
            "7 0.5 0.5 0.2 0.2",  # 4 class out of range
            "1 nan 0.5 0.2 0.2",  # 5 NaN
            "1 0.5 0.5 0.0 0.2",  # 6 zero width
            "1 0.5 0.5 inf 0.2",  # 7 inf
            "0.5 0.5 0.5 0.2 0.2",  # 8 class not an integer
            "1 1.5 0.5 0.2 0.2",  # 9 not normalised
            "1 0.3 0.3 0.2 -0.1",  # 10 negative height
            "1 0.4 0.4 0.1 0.1",  # 11 ok
        ]
    )
    data_yaml = _write_dataset(tmp_path, {"a": text})
    with caplog.at_level(logging.WARNING):
        dataset = YoloDataset(data_yaml, "train")
    assert dataset.load_raw(0)["cls"].tolist() == [0, 1]
    label_file = str(tmp_path / "labels" / "train2017" / "a.txt")
    assert [(problem.file, problem.line) for problem in dataset.problems] == [
        (label_file, line) for line in range(2, 11)
    ]
    assert f"{label_file}:2" in caplog.text and "dropped" in caplog.text


def test_bad_images_are_skipped_and_reported(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data_yaml = _write_dataset(tmp_path, {"a": "0 0.5 0.5 0.2 0.2\n"})
    folder = tmp_path / "images" / "train2017"
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "noise.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8) + 90).save(buffer, format="JPEG")
    (folder / "truncated.jpg").write_bytes(buffer.getvalue()[:-200])
    with caplog.at_level(logging.WARNING):
        dataset = YoloDataset(data_yaml, "train", transform=EvalTransform(64))
    assert dataset.ids == ["a", "b", "c", "d", "e"]
    reported = {Path(problem.file).name for problem in dataset.problems}
    assert reported == {"zero.jpg", "noise.png", "truncated.jpg"}
    for name in reported:
        assert name in caplog.text
    assert dataset[0]["image"].shape == (3, 64, 64)


def test_an_image_corrupted_after_the_check_is_replaced_and_reported_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data_yaml = _write_dataset(tmp_path, {})
    dataset = YoloDataset(data_yaml, "train")
    (tmp_path / "images" / "train2017" / "b.png").write_bytes(b"broken")
    with caplog.at_level(logging.WARNING):
        first = dataset.load_raw(1)
        second = dataset.load_raw(1)
    assert first["id"] == second["id"] == "c"
    assert caplog.text.count("b.png") == 1


def test_grayscale_rgba_and_sixteen_bit_images_load_as_rgb(tmp_path: Path) -> None:
    data_yaml = _write_dataset(tmp_path, {})
    folder = tmp_path / "images" / "train2017"
    Image.fromarray(np.full((30, 20), 77, dtype=np.uint8), "L").save(folder / "grey.png")
    Image.fromarray(np.full((30, 20, 4), 200, dtype=np.uint8), "RGBA").save(folder / "rgba.png")
    Image.fromarray(np.full((30, 20), 65535, dtype=np.uint16)).save(folder / "deep.png")
    dataset = YoloDataset(data_yaml, "train")
    for name, value in (("grey", 77), ("rgba", 200), ("deep", 255)):
        raw = dataset.load_raw(dataset.ids.index(name))
        assert raw["image"].shape == (30, 20, 3) and (raw["image"] == value).all()


def test_empty_dataset_and_inconsistent_names_are_errors(tmp_path: Path) -> None:
    (tmp_path / "images" / "train").mkdir(parents=True)
    (tmp_path / "data.yaml").write_text(
        yaml.safe_dump({"path": str(tmp_path), "train": "images/train", "names": ["x"]})
    )
    with pytest.raises(DatasetError, match="no usable images"):
        YoloDataset(tmp_path / "data.yaml", "train")
    with pytest.raises(DatasetError, match="no `val:` entry"):
        YoloDataset(tmp_path / "data.yaml", "val")
    (tmp_path / "bad.yaml").write_text(
        yaml.safe_dump({"train": "images/train", "nc": 3, "names": ["x", "y"]})
    )
    with pytest.raises(DatasetError, match="nc: 3"):
        YoloDataset(tmp_path / "bad.yaml", "train")
    (tmp_path / "gaps.yaml").write_text(yaml.safe_dump({"train": "images/train", "names": {0: "x", 2: "y"}}))
    with pytest.raises(DatasetError, match="without gaps"):
        YoloDataset(tmp_path / "gaps.yaml", "train")
    (tmp_path / "missing.yaml").write_text(yaml.safe_dump({"train": "images/nothing", "names": ["x"]}))
    with pytest.raises(DatasetError, match="does not exist"):
        YoloDataset(tmp_path / "missing.yaml", "train")


def test_split_as_a_list_file_and_relative_path(tmp_path: Path) -> None:
    _write_dataset(tmp_path, {"a": "1 0.5 0.5 0.2 0.2\n"})
    (tmp_path / "train.txt").write_text("./images/train2017/a.png\n./images/train2017/c.png\n")
    (tmp_path / "list.yaml").write_text(
        yaml.safe_dump({"path": ".", "train": "train.txt", "names": ["cat", "dog"]})
    )
    dataset = YoloDataset(tmp_path / "list.yaml", "train")
    assert dataset.ids == ["a", "c"] and dataset.load_raw(0)["cls"].tolist() == [1]


def test_ground_truth_is_coco_format_in_original_pixels(tmp_path: Path) -> None:
    data_yaml = _write_dataset(
        tmp_path, {"a": "0 0.5 0.5 0.5 0.5\n", "b": "1 0.1 0.1 0.5 0.1 0.5 0.6 0.1 0.6\n"}
    )
    dataset = YoloDataset(data_yaml, "train")
    ground_truth = dataset.coco_ground_truth()
    assert dataset.eval_category_ids == [1, 2]
    assert [image["id"] for image in ground_truth["images"]] == [0, 1, 2, 3, 4]
    assert ground_truth["annotations"][0]["bbox"] == pytest.approx([15, 10, 30, 20])
    coco = COCO()
    coco.dataset = ground_truth
    coco.createIndex()
    detections = [
        {
            "image_id": annotation["image_id"],
            "category_id": annotation["category_id"],
            "bbox": annotation["bbox"],
            "score": 1.0,
        }
        for annotation in ground_truth["annotations"]
    ]
    evaluation = COCOeval(coco, coco.loadRes(detections), "bbox")
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
    assert evaluation.stats[0] == pytest.approx(1.0)


def test_check_lists_every_problem(tmp_path: Path) -> None:
    data_yaml = _write_dataset(tmp_path, {"a": "0 0.5 0.5 0.2\n5 0.5 0.5 0.2 0.2\n"})
    (tmp_path / "images" / "train2017" / "zero.jpg").write_bytes(b"")
    problems = check_dataset(data_yaml)
    # Each problem once per split (train and val name the same folder here).
    assert len(problems) == 6
    text = format_problems(problems)
    assert "a.txt:1" in text and "a.txt:2" in text and "zero.jpg" in text and "6 error(s)" in text
    assert check_dataset(tmp_path / "nothing.yaml")[0].message.startswith("data set")
