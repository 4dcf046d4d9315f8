"""Promptable segmentation as two graphs (image encoder once, prompt decoder per prompt set)
against the PyTorch mask head through the predictor.

A YOLOv8n student with a detector and a small SAM 2 (or SAM) mask head, exported from
its checkpoint (three files); on non-square images, box prompts and point prompts (one and
two points, padded) in original pixels: masks IoU >= 0.99 and predicted IoUs within 1e-3
of ``Predictor(prompts=...)``. A previous mask fed back (``has_mask_input``) changes the
answer as the PyTorch head's ``mask_input`` does.
"""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from tests.export.export_models import student, write_checkpoint
from vfmkd.export import export_checkpoint
from vfmkd.inference import Predictor, letterbox
from vfmkd.inference.onnx_engine import read_metadata

IMAGES = {"wide": (40, 100), "tall": (90, 36)}


@pytest.fixture(scope="module", params=["sam2", "sam"])
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("segmenter")
    checkpoint = write_checkpoint(folder / "best.pt", student(heads=("yolo", request.param)))
    summary = export_checkpoint(checkpoint)
    return checkpoint, summary


def _mask_iou(first: np.ndarray, second: np.ndarray) -> float:
    union = np.logical_or(first, second).sum()
    return 1.0 if union == 0 else float(np.logical_and(first, second).sum() / union)


def _image(height: int, width: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.random((1, 3, height // 8 + 1, width // 8 + 1))).float()
    smooth = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    return (smooth[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)


def _prompts(height: int, width: int) -> dict:
    """Two boxes, then a one-point and a two-point prompt, in original pixels."""
    boxes = np.array([[0.1, 0.2, 0.6, 0.9], [0.5, 0.1, 0.95, 0.5]]) * [width, height, width, height]
    one, first, second = (np.array(xy) * [width, height] for xy in ([0.3, 0.5], [0.7, 0.3], [0.2, 0.8]))
    points = [[one.tolist(), 1], [[first.tolist(), 1], [second.tolist(), 0]]]
    return {"boxes": boxes.tolist(), "points": points}


def _decode(session, maps, coords, labels, size, image_size, mask_input=None) -> list[np.ndarray]:
    count = len(coords)
    low = np.zeros((count, 1, image_size // 4, image_size // 4), np.float32) if mask_input is None else mask_input
    feeds = dict(maps)
    feeds.update(
        point_coords=np.asarray(coords, np.float32),
        point_labels=np.asarray(labels, np.float32),
        mask_input=low,
        has_mask_input=np.array([0.0 if mask_input is None else 1.0], np.float32),
        orig_im_size=np.array(size, np.float32),
    )
    return session.run(None, feeds)


def test_the_two_graphs_answer_prompts_as_the_mask_head(exported) -> None:
    checkpoint, summary = exported
    assert [file.graph for file in summary.files] == ["detector", "image_encoder", "prompt_decoder"]
    encoder_path, decoder_path = summary.files[1].path, summary.files[2].path
    assert encoder_path.name == "best_encoder.onnx" and decoder_path.name == "best_decoder.onnx"
    family = read_metadata(decoder_path).extra["decoder"]
    size = read_metadata(encoder_path).input_size
    encoder = ort.InferenceSession(str(encoder_path), providers=["CPUExecutionProvider"])
    decoder = ort.InferenceSession(str(decoder_path), providers=["CPUExecutionProvider"])
    predictor = Predictor.from_checkpoint(checkpoint, device="cpu")
    for seed, (height, width) in enumerate(IMAGES.values()):
        image = _image(height, width, seed)
        prompts = _prompts(height, width)
        [expected] = predictor(image, prompts=prompts)
        batch = letterbox([image], size)
        names = [output.name for output in encoder.get_outputs()]
        maps = dict(zip(names, encoder.run(None, {"images": batch["images"].float().div(255).numpy()})))
        corners = np.asarray(prompts["boxes"]).reshape(-1, 2, 2)
        by_boxes = _decode(decoder, maps, corners, [[2, 3]] * len(corners), (height, width), size)
        # NOTE: the one-point prompt padded with a -1 point, as the prompts file's points are.
        (one, _), ((first, _), (second, _)) = prompts["points"]
        points, labels = [[one, [0.0, 0.0]], [first, second]], [[1, -1], [1, 0]]
        if family == "sam":
            # NOTE: SAM's convention: the caller ends a prompt without a box with a padding point.
            points, labels = [[*row, [0.0, 0.0]] for row in points], [[*row, -1] for row in labels]
        by_points = _decode(decoder, maps, points, labels, (height, width), size)
        masks = np.concatenate([by_boxes[0][:, 0], by_points[0][:, 0]]) > 0
        scores = np.concatenate([by_boxes[1][:, 0], by_points[1][:, 0]])
        assert masks.shape == expected.masks.shape == (4, height, width)
        for got, wanted in zip(masks, expected.masks):
            assert wanted.sum() > 0 and _mask_iou(got, wanted) >= 0.99
        np.testing.assert_allclose(scores, expected.scores, atol=1e-3)


def test_a_previous_mask_is_fed_back_as_in_the_head(exported) -> None:
    checkpoint, summary = exported
    decoder_path = summary.files[2].path
    size = read_metadata(decoder_path).input_size
    encoder = ort.InferenceSession(str(summary.files[1].path), providers=["CPUExecutionProvider"])
    decoder = ort.InferenceSession(str(decoder_path), providers=["CPUExecutionProvider"])
    image = _image(40, 100, 3)
    batch = letterbox([image], size)
    names = [output.name for output in encoder.get_outputs()]
    maps = dict(zip(names, encoder.run(None, {"images": batch["images"].float().div(255).numpy()})))
    coords, labels = [[[30.0, 20.0]]], [[1]]
    if read_metadata(decoder_path).extra["decoder"] == "sam":
        coords, labels = [[[30.0, 20.0], [0.0, 0.0]]], [[1, -1]]
    first = _decode(decoder, maps, coords, labels, (40, 100), size)
    again = _decode(decoder, maps, coords, labels, (40, 100), size, mask_input=first[2])
    model = Predictor.from_checkpoint(checkpoint, device="cpu").engine.model
    head = model.heads["segmentation"]
    frame = batch["frames"][0][0]
    point = torch.as_tensor(frame.apply_points(np.array([[30.0, 20.0]])), dtype=torch.float32)[None]
    with torch.no_grad():
        outputs = model(batch["images"].float() / 255)["segmentation"]
        prompts = {"points": point, "point_labels": torch.ones(1, 1, dtype=torch.int64)}
        low_res, iou = head.decode_prompts(outputs, 0, {**prompts, "mask_input": torch.from_numpy(first[2])})
    np.testing.assert_allclose(again[2], low_res.numpy(), atol=1e-3)
    np.testing.assert_allclose(again[1], iou.numpy(), atol=1e-3)
    assert np.abs(again[2] - first[2]).max() > 1e-2


def _assert_same_masks(got: np.ndarray, expected: np.ndarray) -> None:
    assert got.shape == expected.shape
    for got_mask, wanted in zip(got, expected):
        assert _mask_iou(got_mask, wanted) >= 0.99


def test_the_onnxruntime_predictor_segments_detections_as_the_checkpoint(exported) -> None:
    checkpoint, summary = exported
    settings = {"conf": 0.3, "max_det": 20, "batch_size": 2}
    by_onnx = Predictor.from_onnx(summary.files[0].path, **settings)  # the segmenter found beside it
    by_torch = Predictor.from_checkpoint(checkpoint, device="cpu", **settings)
    images = [_image(height, width, seed) for seed, (height, width) in enumerate(IMAGES.values())]
    got, expected = by_onnx(images), by_torch(images)
    assert sum(len(prediction.boxes) for prediction in expected) > 3
    for got_prediction, wanted in zip(got, expected):
        assert got_prediction.names == wanted.names
        np.testing.assert_allclose(got_prediction.boxes, wanted.boxes, atol=1e-3)
        _assert_same_masks(got_prediction.masks, wanted.masks)
    assert any(prediction.masks.any() for prediction in expected)
    assert Predictor.from_onnx(summary.files[0].path, segmenter=False, **settings)(images)[0].masks is None


def test_predict_with_onnxruntime_answers_a_prompts_file_as_the_checkpoint(exported, tmp_path) -> None:
    from PIL import Image

    from tests.predict.predict_models import rle_masks
    from vfmkd.cli import main

    checkpoint, summary = exported
    prompts = {}
    for seed, (name, (height, width)) in enumerate(IMAGES.items()):
        Image.fromarray(_image(height, width, seed)).save(tmp_path / f"{name}.png")
        prompts[f"{name}.png"] = _prompts(height, width)
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    common = ["--source", str(tmp_path / "*.png"), "--prompts", str(tmp_path / "prompts.json"), "--no-progress"]
    encoder = str(summary.files[1].path)
    runs = {
        "pt": ["--checkpoint", str(checkpoint), "--device", "cpu"],
        "ort": ["--engine", "onnxruntime", "--model", str(summary.files[0].path)],
        "ort_segmenter_only": ["--engine", "onnxruntime", "--model", encoder],
    }
    rows = {}
    for run, options in runs.items():
        assert main(["predict", *options, *common, "--out", str(tmp_path / run)]) == 0
        rows[run] = json.loads((tmp_path / run / "predictions.json").read_text())
    assert len(rows["pt"]) == 2 * 4 and {row["category_name"] for row in rows["pt"]} == {"prompt"}
    for run in ("ort", "ort_segmenter_only"):
        assert [row["file_name"] for row in rows[run]] == [row["file_name"] for row in rows["pt"]]
        for name in prompts:  # NOTE: one image at a time: pycocotools decodes masks of one size together.
            per_image = [[row for row in rows[key] if row["file_name"] == name] for key in (run, "pt")]
            _assert_same_masks(*(rle_masks(image_rows) for image_rows in per_image))
        np.testing.assert_allclose([row["score"] for row in rows[run]], [row["score"] for row in rows["pt"]], atol=1e-3)
