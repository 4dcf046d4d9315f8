"""The Python API of predict: ``Predictor`` and ``vfmkd.predict``.

Checked: detections in original pixels equal the model's own predictions computed by
hand (letterbox, forward, head, inverse frame) on non-square images; every input kind
(path, array, PIL) and batch size gives the same; with a mask head one mask per
detection at the original size; prompts in original pixels give one mask per prompt,
the same masks as the mask head answers the prompts mapped by hand; images without
prompts fall back to their detections; what a model cannot answer is a clear error.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import vfmkd
from tests.predict.predict_models import IMAGE_SIZES, IMG_SIZE, build_student
from vfmkd.datasets.image_io import load_image_rgb
from vfmkd.datasets.warp import PAD_VALUE, warp_image
from vfmkd.geometry import letterbox_frame
from vfmkd.inference import PredictError, Predictor
from vfmkd.inference.engine import TorchEngine, mask_boxes

OPTIONS = {"conf": 0.25, "iou": 0.7, "max_det": 20}


def _letterboxed(image: np.ndarray):
    frame = letterbox_frame(image.shape[:2], IMG_SIZE, center=True)
    pixels = warp_image(image, frame.matrix, (IMG_SIZE, IMG_SIZE), PAD_VALUE)
    return frame, torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255


@pytest.fixture(scope="module")
def detector():
    return Predictor(TorchEngine(build_student(), "cpu"), img_size=IMG_SIZE, names=list("abcdef"), **OPTIONS)


@pytest.fixture(scope="module")
def segmenter():
    model = build_student(segmentation=True)
    return Predictor(TorchEngine(model, "cpu"), img_size=IMG_SIZE, names=list("abcdef"), **OPTIONS)


def test_detections_are_the_models_own_in_original_pixels(detector, image_folder) -> None:
    model = detector.engine.model
    for name, (height, width) in IMAGE_SIZES.items():
        image = load_image_rgb(image_folder / name)
        [prediction] = detector(image_folder / name)
        frame, inputs = _letterboxed(image)
        with torch.no_grad():
            [expected] = model.heads["detection"].predict(
                model(inputs)["detection"], None, conf_threshold=0.25, iou_threshold=0.7, max_det=20
            )
        boxes = frame.invert_boxes(expected["boxes"].double().numpy())
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
        assert 3 <= len(prediction.boxes) <= 20
        np.testing.assert_allclose(prediction.boxes, boxes, atol=1e-4)
        np.testing.assert_allclose(prediction.scores, expected["scores"].numpy(), atol=1e-6)
        np.testing.assert_array_equal(prediction.labels, expected["labels"].numpy())
        assert prediction.names == ["abcdef"[label] for label in prediction.labels]
        assert prediction.image_size == (height, width) and prediction.masks is None
        assert prediction.name == name.split("/")[-1]


def test_paths_arrays_pil_and_batches_agree(detector, image_folder) -> None:
    paths = [image_folder / name for name in IMAGE_SIZES]
    arrays = [load_image_rgb(path) for path in paths]
    by_path = detector(paths)
    by_array = detector(arrays)
    by_pil = detector([Image.fromarray(array) for array in arrays])
    batched = Predictor(detector.engine, img_size=IMG_SIZE, names=detector.names, batch_size=2, **OPTIONS)(paths)
    for predictions in (by_array, by_pil, batched):
        for first, other in zip(by_path, predictions):
            np.testing.assert_allclose(other.boxes, first.boxes, atol=1e-4)
            np.testing.assert_array_equal(other.labels, first.labels)
    assert [prediction.name for prediction in by_array] == ["image0", "image1"]


def test_one_mask_per_detection_at_the_original_size(segmenter, image_folder) -> None:
    for name, (height, width) in IMAGE_SIZES.items():
        [prediction] = segmenter(image_folder / name)
        assert len(prediction.boxes) > 0
        assert prediction.masks.dtype == bool and prediction.masks.shape == (len(prediction.boxes), height, width)


def test_prompts_give_one_mask_per_prompt_mapped_through_the_frame(segmenter, image_folder) -> None:
    image = load_image_rgb(image_folder / "wide.png")
    boxes = [[10.0, 5.0, 60.0, 40.0], [70.0, 10.0, 95.0, 45.0]]
    points = [[[30.5, 20.5], 1], [[[80.5, 30.5], 1], [[20.5, 10.5], 0]]]
    [prediction] = segmenter(image, prompts={"boxes": boxes, "points": points})
    assert prediction.masks.shape == (4, 48, 100)
    assert prediction.labels.tolist() == [-1] * 4 and prediction.names == ["prompt"] * 4
    np.testing.assert_array_equal(prediction.boxes, mask_boxes(torch.from_numpy(prediction.masks)).numpy())
    # The box prompts by hand: original pixels -> input pixels by the letterbox frame.
    model = segmenter.engine.model
    frame, inputs = _letterboxed(image)
    with torch.no_grad():
        outputs = model(inputs)
        input_boxes = torch.as_tensor(frame.apply_boxes(np.asarray(boxes)), dtype=torch.float32)
        [expected] = model.predict(outputs, {"frames": [[frame]]}, prompts=[{"boxes": input_boxes}])
    np.testing.assert_array_equal(prediction.masks[:2], expected["masks"].numpy())
    np.testing.assert_allclose(prediction.scores[:2], expected["mask_scores"].numpy(), atol=1e-6)


def test_images_without_prompts_use_their_detections(segmenter, image_folder) -> None:
    paths = [image_folder / name for name in IMAGE_SIZES]
    prompted, unprompted = segmenter(paths, prompts=[{"boxes": [[1, 1, 20, 20]]}, None])
    assert prompted.labels.tolist() == [-1] and prompted.masks.shape == (1, 48, 100)
    assert len(unprompted.labels) > 0 and (unprompted.labels >= 0).all()
    assert unprompted.masks.shape[0] == len(unprompted.boxes)


def test_what_a_model_cannot_answer_is_a_clear_error(detector, image_folder) -> None:
    with pytest.raises(PredictError, match="no promptable segmentation head"):
        detector(image_folder / "wide.png", prompts={"boxes": [[1, 1, 5, 5]]})
    engine = TorchEngine(build_student(detection=False, segmentation=True), "cpu")
    masks_only = Predictor(engine, img_size=IMG_SIZE, names=[])
    with pytest.raises(PredictError, match="no detection head"):
        masks_only(image_folder / "wide.png")
    [prediction] = masks_only(image_folder / "wide.png", prompts={"points": [[[5.5, 5.5], 1]]})
    assert prediction.masks.shape == (1, 48, 100)
    with pytest.raises(PredictError, match="--img-size 100"):
        Predictor(detector.engine, img_size=100, names=detector.names)


def test_vfmkd_predict_and_from_checkpoint(detector_checkpoint, image_folder, tmp_path) -> None:
    predictor = vfmkd.Predictor.from_checkpoint(detector_checkpoint, device="cpu", **OPTIONS)
    assert predictor.img_size == IMG_SIZE
    assert predictor.names == ["circle", "rectangle", "triangle", "ellipse", "star", "cross"]
    summary = vfmkd.predict(detector_checkpoint, image_folder, out_dir=tmp_path, device="cpu", **OPTIONS)
    assert summary.processed == 2 and [path for path, _ in summary.skipped] == [str(image_folder / "broken.jpg")]
    assert json.loads(summary.results_file.read_text()) == summary.results
    [expected] = predictor(image_folder / "wide.png")
    rows = [row for row in summary.results if row["file_name"] == "wide.png"]
    assert [row["category_id"] for row in rows] == (expected.labels + 1).tolist()
    assert [row["category_name"] for row in rows] == expected.names
    x1, y1, x2, y2 = expected.boxes.T
    np.testing.assert_allclose([row["bbox"] for row in rows], np.stack([x1, y1, x2 - x1, y2 - y1], 1), atol=1e-3)


def test_a_config_names_the_classes_and_the_size(detector_checkpoint, synthetic_data_yaml, tmp_path) -> None:
    config = tmp_path / "experiment.yaml"
    config.write_text(f"data:\n  dataset: {synthetic_data_yaml}\n  img_size: 96\n")
    predictor = Predictor.from_checkpoint(detector_checkpoint, config=config, device="cpu")
    assert predictor.img_size == 96 and predictor.names[0] == "circle"
    assert Predictor.from_checkpoint(detector_checkpoint, config=config, img_size=128, device="cpu").img_size == 128
    [prediction] = predictor(np.zeros((40, 70, 3), dtype=np.uint8))
    assert prediction.image_size == (40, 70)
