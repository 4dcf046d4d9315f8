"""What predict runs on: sources (image, folder, glob, .txt list), prompts files, class names."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from vfmkd.datasets.synthetic import SHAPE_CLASSES
from vfmkd.inference.classes import dataset_classes
from vfmkd.inference.sources import ImageEntry, PredictError, list_images, match_prompts, parse_prompts, read_prompts


def _names(entries) -> list[str]:
    return [entry.name for entry in entries]


def test_a_folder_is_searched_recursively_and_named_relative_to_it(image_folder) -> None:
    entries = list_images(image_folder)
    assert _names(entries) == ["broken.jpg", "sub/tall.jpg", "wide.png"]
    assert all(entry.path == image_folder / entry.name for entry in entries)
    assert _names(list_images(image_folder / "wide.png")) == ["wide.png"]


def test_a_glob_and_a_list_name_images_relative_to_the_folder_they_share(image_folder, tmp_path) -> None:
    assert _names(list_images(f"{image_folder}/**/*.jpg")) == ["broken.jpg", "sub/tall.jpg"]
    assert _names(list_images(f"{image_folder}/sub/*")) == ["tall.jpg"]
    listing = tmp_path / "images.txt"
    listing.write_text(
        f"# my images\n{image_folder / 'sub/tall.jpg'}\n\n{image_folder / 'wide.png'}\n{image_folder / 'wide.png'}\n"
        "missing.jpg\n"
    )
    entries = list_images(listing)
    # relative entries are taken from the list's folder; a missing file stays (skipped when read)
    expected = [image_folder / "sub/tall.jpg", image_folder / "wide.png", tmp_path / "missing.jpg"]
    assert [entry.path for entry in entries] == expected
    names = _names(entries)
    assert names[0].endswith("/sub/tall.jpg") and names[2].endswith("/missing.jpg") and len(set(names)) == 3


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda tmp: tmp / "nothing", "no such file or folder"),
        (lambda tmp: tmp, "no images in this folder"),
        (lambda tmp: f"{tmp}/*.png", "the glob matches no image files"),
        (lambda tmp: _write(tmp / "notes.md", "x"), "not an image"),
        (lambda tmp: _write(tmp / "empty.txt", "# nothing\n"), "names no images"),
    ],
)
def test_sources_without_images_are_errors_that_say_what_to_give(tmp_path, make, message) -> None:
    with pytest.raises(PredictError, match=message):
        list_images(make(tmp_path))


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_prompts_one_per_box_and_per_point_group() -> None:
    [(key, prompts)] = parse_prompts(
        {"a.jpg": {"boxes": [[1, 2, 30, 40]], "points": [[[5.5, 6.5], 1], [[[1, 1], 1], [[2, 2], 0], [[3, 3], 1]]]}}
    ).items()
    assert key == "a.jpg" and prompts.count == 3
    np.testing.assert_array_equal(prompts.boxes, [[1, 2, 30, 40]])
    assert prompts.points.shape == (2, 3, 2)
    np.testing.assert_array_equal(prompts.point_labels, [[1, -1, -1], [1, 0, 1]])
    empty = parse_prompts({"b.jpg": {}})["b.jpg"]
    assert empty.count == 0 and empty.boxes.shape == (0, 4)


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"box": [[1, 2, 3, 4]]}, r"'a.jpg': unknown key\(s\) \['box'\]"),
        ({"boxes": [[5, 2, 3, 4]]}, r"'a.jpg'.boxes\[0\] = \[5.0, 2.0, 3.0, 4.0\]: needs x1 < x2"),
        ({"boxes": [[1, 2, 3]]}, r"expected \[\[x1, y1, x2, y2\], ...\]"),
        ({"points": [[[1, 2], 2]]}, r"'a.jpg'.points\[0\]: .*label 1 .* or 0"),
        ({"points": [[[1, "x"], 1]]}, r"points\[0\]: expected numbers"),
        ([1, 2], r"'a.jpg': expected \{"),
    ],
)
def test_malformed_prompts_name_the_image_and_the_key(entry, message) -> None:
    with pytest.raises(PredictError, match=message):
        parse_prompts({"a.jpg": entry}, "p.json")


def test_a_prompts_file_that_is_not_json_is_named(tmp_path) -> None:
    with pytest.raises(PredictError, match="bad.json: not valid JSON"):
        read_prompts(_write(tmp_path / "bad.json", "{boxes"))
    with pytest.raises(PredictError, match="prompts file not found"):
        read_prompts(tmp_path / "none.json")
    written = _write(tmp_path / "ok.json", json.dumps({"a.jpg": {"boxes": [[0, 0, 1, 1]]}}))
    assert read_prompts(written)["a.jpg"].count == 1


def test_prompts_match_by_relative_name_path_or_file_name(caplog) -> None:
    entries = [ImageEntry(Path("/data") / name, name) for name in ("x/a.jpg", "b.jpg", "y/d.jpg")]
    prompts = parse_prompts({"x/a.jpg": {}, "/data/b.jpg": {}, "d.jpg": {}, "elsewhere.jpg": {}})
    with caplog.at_level(logging.WARNING):
        matched = match_prompts(entries, prompts)
    assert sorted(matched) == ["b.jpg", "x/a.jpg", "y/d.jpg"]
    assert "elsewhere.jpg" in caplog.text


def test_class_names_come_from_the_checkpoints_data_set(synthetic_data_yaml, caplog) -> None:
    shapes = list(SHAPE_CLASSES)
    assert dataset_classes({"dataset": "shapes"}, 6) == (shapes, [1, 2, 3, 4, 5, 6])
    assert dataset_classes({"dataset": str(synthetic_data_yaml)}, 6) == (shapes, [1, 2, 3, 4, 5, 6])
    coco = synthetic_data_yaml.parent / "annotations" / "instances_train.json"
    assert dataset_classes({"dataset": str(coco), "val_split": "val"}, 6) == (shapes, [1, 2, 3, 4, 5, 6])
    with caplog.at_level(logging.WARNING):
        assert dataset_classes({"dataset": "/nowhere/data.yaml"}, 2) == (["class0", "class1"], [1, 2])
        assert dataset_classes({"dataset": "shapes"}, 3)[0] == ["class0", "class1", "class2"]
        assert dataset_classes(None, 1) == (["class0"], [1])
    assert "give --config" in caplog.text and "has 6 classes but the detector predicts 3" in caplog.text
    assert "the checkpoint stores no data set" in caplog.text
