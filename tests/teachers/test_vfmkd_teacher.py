"""The ``vfmkd`` teacher: a vfmkd checkpoint or an Ultralytics YOLOv8 state dict as a teacher."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.helpers.ultralytics_oracle import import_ultralytics
from vfmkd.config import TeacherConfig
from vfmkd.datasets.transforms import EvalTransform
from vfmkd.features.extract import extract_features
from vfmkd.features.store import FeatureStore
from vfmkd.geometry import letterbox_frame
from vfmkd.models import build_model
from vfmkd.teachers import build_teacher, build_teacher_from_config

IMAGE_SIZE = 64
NUM_CLASSES = 3
MODEL_CONFIG = {
    "backbone": {"type": "yolov8", "scale": "n"},
    "heads": {"detection": {"type": "yolo_head", "num_classes": NUM_CLASSES}},
}


def _write_checkpoint(path: Path, *, ema: bool = True) -> torch.nn.Module:
    """A vfmkd checkpoint of a seeded YOLOv8n whose raw weights differ from its EMA; returns the EMA model."""
    torch.manual_seed(0)
    model = build_model(MODEL_CONFIG).eval()
    raw = {key: value + 1.0 if value.is_floating_point() else value for key, value in model.state_dict().items()}
    checkpoint = {
        "format_version": 2,
        "model": raw if ema else model.state_dict(),
        "model_config": model.config,
        "ema": {"module": model.state_dict(), "distiller": None, "updates": 1} if ema else None,
        "config": {"data": {"img_size": IMAGE_SIZE}},
    }
    torch.save(checkpoint, path)
    return model


class _Images:
    """The minimal data set extraction reads: ids and raw RGB images."""

    def __init__(self, images: list[np.ndarray]) -> None:
        self.images = images
        self.ids = [f"image_{index}" for index in range(len(images))]

    def __len__(self) -> int:
        return len(self.images)

    def load_raw(self, index: int) -> dict[str, Any]:
        return {"image": self.images[index], "id": self.ids[index], "path": f"{self.ids[index]}.png",
                "boxes": np.zeros((0, 4)), "cls": np.zeros((0,), dtype=np.int64)}


def test_store_features_equal_the_models_neck_outputs(tmp_path: Path, non_square_image: np.ndarray) -> None:
    model = _write_checkpoint(tmp_path / "best.pt")
    names = ["p3", "p4", "p5", "detection.cls_p3", "detection.cls_p5"]  # neck levels and the head's class logits
    teacher = build_teacher_from_config("big", TeacherConfig(
        name="vfmkd", model_path=str(tmp_path / "best.pt"), features=names))
    assert teacher.image_size == IMAGE_SIZE
    assert teacher.preprocessing()["weights"] == "ema"
    images = _Images([non_square_image, np.ascontiguousarray(non_square_image[:, :90])])
    store = extract_features(teacher, images, tmp_path / "store", dtype="float32", batch_size=2, num_workers=0,
                             progress=False)
    store = FeatureStore.open(tmp_path / "store")
    for index, sample_id in enumerate(images.ids):
        # The student pipeline's own evaluation input for this image.
        sample = EvalTransform(IMAGE_SIZE)(images, index, np.random.default_rng(0))
        assert store.frame(sample_id) == letterbox_frame(images.images[index].shape[:2], IMAGE_SIZE)
        with torch.no_grad():
            outputs = model(sample["image"][None].float() / 255.0)
        expected = {**outputs["features"], "detection.cls_p3": outputs["detection"][0][:, -NUM_CLASSES:],
                    "detection.cls_p5": outputs["detection"][2][:, -NUM_CLASSES:]}
        stored = store.read(sample_id)
        for name in names:
            torch.testing.assert_close(torch.from_numpy(np.asarray(stored[name])), expected[name][0], atol=1e-5, rtol=1e-5)


def test_any_named_map_and_the_raw_weights_without_ema(tmp_path: Path, non_square_image: np.ndarray) -> None:
    model = _write_checkpoint(tmp_path / "last.pt", ema=False)
    teacher = build_teacher("vfmkd", weights=tmp_path / "last.pt", features=["backbone.p4", "p5"])
    assert teacher.preprocessing()["weights"] == "model"
    pixels, frames = teacher.preprocess([non_square_image])
    with torch.no_grad():
        maps = model(pixels)["maps"]
    features = teacher.extract(pixels)
    torch.testing.assert_close(features["backbone.p4"], maps["backbone.p4"])
    assert teacher.feature_specs["backbone.p4"].stride == 16
    # Online passes pad with the pipeline's grey, like the stored path.
    online, _ = teacher.preprocess_tensor(torch.from_numpy(non_square_image).permute(2, 0, 1)[None] / 255.0)
    assert torch.allclose(online[0, :, 0, 0], torch.full((3,), 114 / 255.0))
    assert frames[0].valid[1] > 0


def test_ultralytics_yolov8_state_dict_is_a_teacher(tmp_path: Path, non_square_image: np.ndarray) -> None:
    tasks = import_ultralytics("ultralytics.nn.tasks")
    torch.manual_seed(0)
    oracle = tasks.DetectionModel("yolov8n.yaml", nc=5, verbose=False).eval()
    torch.save(oracle.state_dict(), tmp_path / "yolov8n_state_dict.pt")
    teacher = build_teacher("vfmkd", weights=tmp_path / "yolov8n_state_dict.pt", image_size=IMAGE_SIZE)
    assert teacher.model.config["backbone"]["scale"] == "n"
    assert teacher.model.heads["detection"].num_classes == 5
    pixels, _ = teacher.preprocess([non_square_image])
    features = teacher.extract(pixels)
    # Ultralytics' Detect layer (22) receives the neck's p3, p4, p5 (layers 15, 18, 21).
    captured: dict[str, list[torch.Tensor]] = {}
    hook = oracle.model[22].register_forward_pre_hook(lambda module, inputs: captured.setdefault("x", [t.clone() for t in inputs[0]]))
    with torch.no_grad():
        oracle(pixels)
    hook.remove()
    for level, expected in zip(("p3", "p4", "p5"), captured["x"]):
        torch.testing.assert_close(features[level], expected, atol=1e-4, rtol=1e-4)


def test_bad_checkpoints_fail_before_any_work(tmp_path: Path) -> None:
    _write_checkpoint(tmp_path / "best.pt")
    with pytest.raises(KeyError, match="no feature.*'p6'.*available: p3, p4, p5"):
        build_teacher("vfmkd", weights=tmp_path / "best.pt", features=["p6"])
    with pytest.raises(ValueError, match="multiple of the model's largest stride 32"):
        build_teacher("vfmkd", weights=tmp_path / "best.pt", image_size=80)
    torch.save({"weights": torch.zeros(1)}, tmp_path / "odd.pt")
    with pytest.raises(ValueError, match="neither a vfmkd checkpoint"):
        build_teacher("vfmkd", weights=tmp_path / "odd.pt")
    with pytest.raises(ValueError, match="needs model_path"):
        build_teacher_from_config("big", TeacherConfig(name="vfmkd", allow_random_init=True))
