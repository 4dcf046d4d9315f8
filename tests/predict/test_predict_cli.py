"""``vfmkd predict`` as users type it.

Checked: a folder with an unreadable file (named, skipped, the rest done, exit 0); the
drawn images at their original sizes under their relative paths; ``predictions.json``
in original pixels (the Predictor's own boxes, COCO ``[x, y, w, h]``); a glob and a .txt
list; ``--prompts`` with a mask head (one RLE mask per prompt, at the original size); a
checkpoint trained by the trainer, its class names from its data set; every user error
one line on stderr and exit 2.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from PIL import Image

from tests.predict.predict_models import IMAGE_SIZES, rle_masks
from vfmkd.cli import main
from vfmkd.datasets.synthetic import SHAPE_CLASSES
from vfmkd.inference import Predictor

FAST = ["--device", "cpu", "--no-progress", "--max-det", "20"]


def _results(out) -> list[dict]:
    return json.loads((out / "predictions.json").read_text())


def test_a_folder_is_predicted_drawn_and_written_in_original_pixels(
    detector_checkpoint, image_folder, tmp_path, capsys, caplog
) -> None:
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        arguments = ["--checkpoint", str(detector_checkpoint), "--source", str(image_folder), "--out", str(out)]
        code = main(["predict", *arguments, *FAST])
    assert code == 0
    stdout = capsys.readouterr().out
    assert "2 image(s) predicted" in stdout and "1 skipped as unreadable" in stdout
    assert f"skipped {image_folder / 'broken.jpg'}" in stdout and "broken.jpg" in caplog.text
    for name, (height, width) in IMAGE_SIZES.items():
        with Image.open(out / name) as drawn:
            assert drawn.size == (width, height)
    results = _results(out)
    predictor = Predictor.from_checkpoint(detector_checkpoint, device="cpu", max_det=20)
    for image_id, name in ((1, "sub/tall.jpg"), (2, "wide.png")):
        rows = [row for row in results if row["file_name"] == name]
        [expected] = predictor(image_folder / name)
        assert len(rows) == len(expected.boxes) > 0 and {row["image_id"] for row in rows} == {image_id}
        x1, y1, x2, y2 = expected.boxes.T
        np.testing.assert_allclose([row["bbox"] for row in rows], np.stack([x1, y1, x2 - x1, y2 - y1], 1), atol=1e-3)
        assert [row["category_name"] for row in rows] == expected.names
        height, width = IMAGE_SIZES[name]
        boxes = np.array([row["bbox"] for row in rows])
        assert (boxes[:, :2] >= 0).all() and (boxes[:, :2] + boxes[:, 2:] <= [width + 1e-3, height + 1e-3]).all()


def test_a_glob_and_a_list_of_paths(detector_checkpoint, image_folder, tmp_path) -> None:
    base = ["predict", "--checkpoint", str(detector_checkpoint), *FAST]
    assert main([*base, "--source", f"{image_folder}/**/*.png", "--out", str(tmp_path / "glob")]) == 0
    assert {row["file_name"] for row in _results(tmp_path / "glob")} == {"wide.png"}
    listing = tmp_path / "list.txt"
    listing.write_text(f"{image_folder / 'sub' / 'tall.jpg'}\n{image_folder / 'broken.jpg'}\n")
    assert main([*base, "--source", str(listing), "--out", str(tmp_path / "list"), "--batch-size", "2"]) == 0
    assert {row["file_name"] for row in _results(tmp_path / "list")} == {"sub/tall.jpg"}
    assert (tmp_path / "list" / "sub" / "tall.jpg").is_file()


def test_prompts_give_one_rle_mask_per_prompt(segmenter_checkpoint, image_folder, tmp_path) -> None:
    prompts = tmp_path / "prompts.json"
    prompts.write_text(
        json.dumps({"wide.png": {"boxes": [[10, 5, 60, 40], [70, 10, 95, 45]], "points": [[[30.5, 20.5], 1]]}})
    )
    out = tmp_path / "out"
    code = main(["predict", "--checkpoint", str(segmenter_checkpoint), "--source", str(image_folder / "wide.png"),
                 "--prompts", str(prompts), "--out", str(out), *FAST])
    assert code == 0
    rows = _results(out)
    assert [row["prompt_index"] for row in rows] == [0, 1, 2]
    assert all(row["category_id"] is None and row["category_name"] == "prompt" for row in rows)
    assert rle_masks(rows).shape == (3, 48, 100)
    with Image.open(out / "wide.png") as drawn:
        assert drawn.size == (100, 48)


def test_a_checkpoint_from_the_trainer(synthetic_data_yaml, tmp_path, capsys) -> None:
    from vfmkd.config import validate_config
    from vfmkd.core.build import build_trainer

    config = {
        "experiment_name": "predict",
        "model": {
            "backbone": {"type": "yolov8", "scale": "n"},
            "heads": {"detection": {"type": "yolo_head", "num_classes": 6}},
        },
        "data": {
            "dataset": str(synthetic_data_yaml), "img_size": 64, "batch_size": 2, "num_workers": 0,
            "augment": {"mosaic": 0.0},
        },
        "train": {
            "max_steps": 1, "output_dir": str(tmp_path / "runs"), "eval_interval": 100, "device": "cpu", "amp": False,
        },
    }
    trainer = build_trainer(validate_config(config))
    trainer.train()
    images = synthetic_data_yaml.parent / "images" / "val"
    out = tmp_path / "out"
    code = main(["predict", "--checkpoint", str(trainer.last_path), "--source", str(images), "--out", str(out),
                 "--conf", "0.0", *FAST])
    assert code == 0 and "3 image(s) predicted" in capsys.readouterr().out
    rows = _results(out)
    assert rows and {row["category_name"] for row in rows} <= set(SHAPE_CLASSES)
    assert len(list(out.glob("*.jpg"))) == 3


@pytest.mark.parametrize(
    "case, message",
    [
        ("no_checkpoint", "checkpoint not found"),
        ("no_source", "no such file or folder"),
        ("bad_prompts", "not valid JSON"),
        ("bad_size", "--img-size 100: must be a multiple of 32"),
        ("unreadable", "none of the 1 image(s)"),
        ("prompts_without_mask_head", "no promptable segmentation head"),
    ],
)
def test_user_errors_are_one_line_and_exit_2(
    detector_checkpoint, image_folder, tmp_path, capsys, case, message
) -> None:
    (tmp_path / "bad.json").write_text("{")
    (tmp_path / "ok.json").write_text(json.dumps({"wide.png": {"boxes": [[1, 1, 9, 9]]}}))
    arguments = {
        "--checkpoint": str(detector_checkpoint), "--source": str(image_folder), "--out": str(tmp_path / "out")
    }
    arguments.update(
        {
            "no_checkpoint": {"--checkpoint": str(tmp_path / "none.pt")},
            "no_source": {"--source": str(tmp_path / "none")},
            "bad_prompts": {"--prompts": str(tmp_path / "bad.json")},
            "bad_size": {"--img-size": "100"},
            "unreadable": {"--source": str(image_folder / "broken.jpg")},
            "prompts_without_mask_head": {"--prompts": str(tmp_path / "ok.json")},
        }[case]
    )
    assert main(["predict", *[item for pair in arguments.items() for item in pair], *FAST]) == 2
    error = capsys.readouterr().err
    *warnings, last = error.strip().splitlines()
    assert last.startswith("error: ") and message in last and "Traceback" not in error, error
    # an unreadable image was named in a warning as it was skipped
    assert all(line.startswith("skipped ") for line in warnings), error
