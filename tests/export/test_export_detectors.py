"""Every student family's detector graph in onnxruntime against the PyTorch student.

Each family at its smallest size and 64 px (YOLOv8n, ViT-Tiny, RepViT M0.9 re-parameterised,
a timm ResNet-18 with its BatchNorms folded, VMamba nano with its scan unrolled) and the
DETR head: the exported graph on two images (a dynamic batch) gives the boxes and scores
of the unfused PyTorch model within 1e-3; the metadata says what the runtime needs; the
graph holds no BatchNormalization. The NMS graph keeps exactly the detections of the
head's own selection.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from tests.export.export_models import CATEGORY_IDS, IMG_SIZE, NAMES, images, student
from vfmkd import __version__
from vfmkd.export import export_model
from vfmkd.inference.onnx_engine import read_metadata
from vfmkd.models.heads.yolo_head import select_detections

TOLERANCE = 1e-3


def _run(path, **feeds: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _torch_decoded(model: torch.nn.Module, batch: torch.Tensor, max_det: int = 300) -> tuple[torch.Tensor, ...]:
    head = model.heads["detection"]
    with torch.no_grad():
        outputs = model(batch)["detection"]
    return head.decode(outputs, max_det) if hasattr(head, "aifi") else head.decode(outputs)


@pytest.mark.parametrize(
    ("backbone", "head"),
    [
        ("yolov8n", "yolo"),
        ("vit_tiny", "yolo"),
        ("repvit_m0_9", "yolo"),
        ("timm_resnet18", "yolo"),
        ("mamba_nano", "yolo"),
        ("yolov8n", "detr"),
    ],
)
def test_the_detector_graph_gives_the_students_boxes_and_scores(backbone, head, tmp_path) -> None:
    model = student(backbone, (head,))
    path = tmp_path / "model.onnx"
    summary = export_model(
        model, path, img_size=IMG_SIZE, names=NAMES, category_ids=CATEGORY_IDS, dynamic=True, max_det=50
    )
    batch = images(2)
    got = _run(path, images=batch.numpy())
    expected = _torch_decoded(model, batch, max_det=50)
    assert len(got) == len(expected) == (3 if head == "detr" else 2)
    boxes, scores = got[0], got[1]
    assert boxes.shape == tuple(expected[0].shape) and scores.shape == tuple(expected[1].shape)
    np.testing.assert_allclose(boxes, expected[0].numpy(), atol=TOLERANCE)
    np.testing.assert_allclose(scores, expected[1].numpy(), atol=TOLERANCE)
    if head == "detr":
        np.testing.assert_array_equal(got[2], expected[2].numpy())
    [exported] = summary.files
    assert set(exported.check) == set(exported.outputs) and max(exported.check.values()) < TOLERANCE
    graph = onnx.load(str(path))
    assert "BatchNormalization" not in {node.op_type for node in graph.graph.node}
    metadata = read_metadata(path)
    head_type = {"yolo": "yolo_head", "detr": "rtdetr_head"}[head]
    assert (metadata.graph, metadata.head_type, metadata.input_size) == ("detector", head_type, IMG_SIZE)
    assert (metadata.names, metadata.category_ids) == (NAMES, CATEGORY_IDS)
    assert metadata.letterbox == {"center": True, "pad_value": 114, "scale_up": True}
    assert metadata.extra["vfmkd_version"] == __version__
    if backbone == "mamba_nano":
        assert any("Mamba" in note and "64 x 64" in note for note in summary.notes)


def test_the_nms_graph_keeps_the_heads_own_detections(tmp_path) -> None:
    model = student("yolov8n")
    path = tmp_path / "nms.onnx"
    export_model(model, path, img_size=IMG_SIZE, names=NAMES, nms=True, dynamic=True)
    batch = images(2, seed=5)
    conf, iou = 0.3, 0.5
    thresholds = {"conf_threshold": np.array([conf], np.float32), "iou_threshold": np.array([iou], np.float32)}
    [detections] = _run(path, images=batch.numpy(), **thresholds)
    assert detections.shape[1] == 7 and json.loads(read_metadata(path).to_props()["nms"]) is True
    expected = select_detections(*_torch_decoded(model, batch), conf_threshold=conf, iou_threshold=iou)
    assert sum(len(result["scores"]) for result in expected) == len(detections) > 4
    for image, result in enumerate(expected):
        rows = detections[detections[:, 0] == image]
        rows = rows[np.argsort(-rows[:, 5], kind="stable")]
        np.testing.assert_allclose(rows[:, 1:5], result["boxes"].numpy(), atol=TOLERANCE)
        np.testing.assert_allclose(rows[:, 5], result["scores"].numpy(), atol=TOLERANCE)
        np.testing.assert_array_equal(rows[:, 6], result["labels"].numpy())
