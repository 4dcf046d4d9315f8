"""``vfmkd export`` and ``vfmkd predict --engine onnxruntime`` as users type them.

Checked: a checkpoint exported with its class names, then predicted by both engines on
non-square images: the same detections (boxes and scores within 1e-3, same classes); the
same through the Python API for the DETR head and the in-graph NMS; class names travel
from the data set into the checkpoint and the ONNX file; every user error is one line on
stderr and exit 2.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.export.export_models import CATEGORY_IDS, NAMES, student, write_checkpoint, write_images
from vfmkd.cli import main
from vfmkd.inference import Predictor
from vfmkd.inference.onnx_engine import read_metadata

SIZES = {"wide.png": (40, 100), "tall.jpg": (90, 36), "square.png": (64, 64)}
FAST = ["--no-progress", "--max-det", "20", "--conf", "0.3"]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory: pytest.TempPathFactory):
    return write_images(tmp_path_factory.mktemp("images"), SIZES)


def _rows(folder) -> list[dict]:
    rows = json.loads((folder / "predictions.json").read_text())
    return sorted(rows, key=lambda row: (row["file_name"], -row["score"]))


def _assert_same_detections(got, expected) -> None:
    assert len(got) == len(expected) > 3
    assert [(row["file_name"], row["category_id"], row["category_name"]) for row in got] == [
        (row["file_name"], row["category_id"], row["category_name"]) for row in expected
    ]
    np.testing.assert_allclose([row["bbox"] for row in got], [row["bbox"] for row in expected], atol=1e-3)
    np.testing.assert_allclose([row["score"] for row in got], [row["score"] for row in expected], atol=1e-3)


def test_export_then_predict_with_onnxruntime_gives_the_torch_detections(image_folder, tmp_path, capsys) -> None:
    checkpoint = write_checkpoint(tmp_path / "best.pt", student())
    assert main(["export", "--checkpoint", str(checkpoint), "--format", "onnx", "--dynamic"]) == 0
    stdout = capsys.readouterr().out
    model = tmp_path / "best.onnx"
    assert f"wrote {model} (detector" in stdout and "images [B, 3, 64, 64]" in stdout
    assert "onnxruntime vs PyTorch" in stdout and "NMS is left to the runtime" in stdout
    assert read_metadata(model).names == NAMES and read_metadata(model).category_ids == CATEGORY_IDS
    source = ["--source", str(image_folder), *FAST, "--batch-size", "2"]
    by_onnx = ["--engine", "onnxruntime", "--model", str(model), "--out", str(tmp_path / "ort")]
    by_torch = ["--checkpoint", str(checkpoint), "--device", "cpu", "--out", str(tmp_path / "pt")]
    assert main(["predict", *by_onnx, *source]) == 0 and main(["predict", *by_torch, *source]) == 0
    _assert_same_detections(_rows(tmp_path / "ort"), _rows(tmp_path / "pt"))


@pytest.mark.parametrize("head, options", [("detr", []), ("yolo", ["--nms"])])
def test_the_detr_and_nms_graphs_predict_as_the_checkpoint(head, options, image_folder, tmp_path) -> None:
    checkpoint = write_checkpoint(tmp_path / "best.pt", student(heads=(head,)))
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "m.onnx"), *options]) == 0
    settings = {"conf": 0.3 if head == "yolo" else 0.02, "max_det": 20}
    # NOTE: exported with batch 1, run two images a batch: the engine runs them one by one.
    by_onnx = Predictor.from_onnx(tmp_path / "m.onnx", batch_size=2, **settings)
    by_torch = Predictor.from_checkpoint(checkpoint, device="cpu", **settings)
    paths = [image_folder / name for name in SIZES]
    for got, expected in zip(by_onnx(paths), by_torch(paths)):
        assert got.names == expected.names and len(got.names) > 0
        np.testing.assert_allclose(got.boxes, expected.boxes, atol=1e-3)
        np.testing.assert_allclose(got.scores, expected.scores, atol=1e-3)


def test_class_names_travel_from_the_data_set_to_the_onnx_file(synthetic_data_yaml, tmp_path) -> None:
    from vfmkd.config import load_config
    from vfmkd.core.build import default_hooks
    from vfmkd.core.hooks import CheckpointHook
    from vfmkd.datasets import build_dataset
    from vfmkd.datasets.synthetic import SHAPE_CLASSES

    config = load_config("configs/experiments/yolov8n_sam2_shapes_demo.yaml", [f"data.dataset={synthetic_data_yaml}"])
    dataset = build_dataset(config.data, config.data.val_split, train=False)
    [hook] = [hook for hook in default_hooks(config, dataset, []) if isinstance(hook, CheckpointHook)]
    assert hook.names == list(SHAPE_CLASSES) and hook.category_ids == list(range(1, len(SHAPE_CLASSES) + 1))
    # An older checkpoint without names: the data set's, here not matching the 3 classes: generic ones.
    checkpoint = write_checkpoint(tmp_path / "old.pt", student(), names=False)
    assert main(["export", "--checkpoint", str(checkpoint)]) == 0
    assert read_metadata(tmp_path / "old.onnx").names == ["class0", "class1", "class2"]


@pytest.fixture(scope="module")
def detr_checkpoint(tmp_path_factory: pytest.TempPathFactory):
    return write_checkpoint(tmp_path_factory.mktemp("detr") / "detr.pt", student(heads=("detr",)))


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["export", "--checkpoint", "{text}"], "not a PyTorch checkpoint"),
        (["export", "--checkpoint", "{missing}"], "checkpoint not found"),
        (["export", "--checkpoint", "{detr}", "--format", "tflite"], "--format tflite: unknown; choose one of onnx"),
        (["export", "--checkpoint", "{detr}", "--opset", "15"], "cannot export the rtdetr_head detector to ONNX"),
        (["export", "--checkpoint", "{detr}", "--img-size", "100"], "--img-size 100: must be a multiple of 32"),
        (["predict", "--engine", "onnxruntime", "--source", "{text}"], "give --model FILE.onnx"),
        (["predict", "--engine", "onnxruntime", "--model", "{detr}", "--source", "{text}"], "not a readable ONNX"),
        (["predict", "--model", "{text}", "--source", "{text}"], "--engine torch runs a checkpoint"),
    ],
)
def test_user_errors_are_one_line_and_exit_2(arguments, message, detr_checkpoint, tmp_path, capsys) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not a model")
    paths = {"text": text, "missing": tmp_path / "missing.pt", "detr": detr_checkpoint}
    code = main([argument.format(**paths) for argument in arguments])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.count("\n") == 1 and captured.err.startswith("error: ") and message in captured.err
    assert "Traceback" not in captured.out + captured.err and "graph(" not in captured.out


def test_a_model_without_heads_and_a_missing_onnxruntime_are_named(tmp_path, capsys, monkeypatch) -> None:
    from vfmkd.models import build_model

    bare = write_checkpoint(tmp_path / "bare.pt", build_model({"backbone": {"type": "yolov8", "scale": "n"}}))
    assert main(["export", "--checkpoint", str(bare)]) == 2
    assert "nothing to export: the model's heads (none) include no detection head" in capsys.readouterr().err
    real_import = __import__

    def without_onnxruntime(name, *args, **kwargs):
        if name == "onnxruntime":
            raise ImportError("No module named 'onnxruntime'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr("builtins.__import__", without_onnxruntime)
    monkeypatch.setattr("importlib.import_module", lambda name: without_onnxruntime(name))
    assert main(["export", "--checkpoint", str(bare)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and 'pip install "vfmkd[export]"' in err
