"""End to end: a YOLOv8s trained by vfmkd becomes, through its checkpoint and a store, the
teacher of a YOLOv8n (the YOLO-to-YOLO distillation), with labelled and unlabelled images."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from vfmkd.config import validate_config
from vfmkd.core.build import build_trainer
from vfmkd.features.cli import ExtractionOptions, extract_teacher_entry
from vfmkd.features.store import FeatureStore

IMG_SIZE = 64
LEVELS = ("p3", "p4", "p5")
CLASS_MAPS = tuple(f"detection.cls_{level}" for level in LEVELS)


def _config(tmp_path: Path, data_yaml: Path, name: str, scale: str, **extra) -> dict:
    return {
        "experiment_name": name,
        "model": {"backbone": {"type": "yolov8", "scale": scale},
                  "heads": {"detection": {"type": "yolo_head", "num_classes": 6}}},
        "data": {"dataset": str(data_yaml), "img_size": IMG_SIZE, "batch_size": 4, "num_workers": 0,
                 "augment": {"mosaic": 0.0}},
        "train": {"max_steps": 2, "output_dir": str(tmp_path / "runs"), "eval_interval": 100, "log_interval": 1,
                  "device": "cpu", "amp": False, "optimizer": "sgd", "lr": 0.01},
        **extra,
    }


def test_a_trained_checkpoint_teaches_a_smaller_student(tmp_path, synthetic_data_yaml):
    teacher_run = build_trainer(validate_config(_config(tmp_path, synthetic_data_yaml, "teacher", "s")))
    teacher_run.train()
    checkpoint = teacher_run.last_path
    assert checkpoint is not None and checkpoint.is_file()

    store = tmp_path / "store"
    config = validate_config(
        _config(
            tmp_path, synthetic_data_yaml, "student", "n",
            teachers={"yolov8s": {"name": "vfmkd", "model_path": str(checkpoint),
                                  "features": [*LEVELS, *CLASS_MAPS], "feature_path": str(store),
                                  "offline_ratio": 0.5}},
            distillation={"losses": {
                **{f"kd_{level}": {"type": "cwd", "teacher": "yolov8s", "feature": level, "student": level}
                   for level in LEVELS},
                # The head's class scores into the student's own (response distillation).
                **{f"kd_{name}": {"type": "bce", "teacher": "yolov8s", "feature": name, "student": name,
                                  "adapter": "none", "weight": 0.5} for name in CLASS_MAPS},
            }},
        )
    )
    config.data.label_fraction = 0.5
    extract_teacher_entry(config, "yolov8s", options=ExtractionOptions(batch_size=4, num_workers=0, progress=False))
    # The teacher's frame is the checkpoint's letterbox at its training size; its p3 is 128 channels (s).
    specs = FeatureStore.open(store).specs
    assert {name: (spec.channels, spec.height, spec.width) for name, spec in specs.items()} == {
        "p3": (128, 8, 8), "p4": (256, 4, 4), "p5": (512, 2, 2),
        "detection.cls_p3": (6, 8, 8), "detection.cls_p4": (6, 4, 4), "detection.cls_p5": (6, 2, 2),
    }
    student = build_trainer(config)
    result = student.train()
    records = [json.loads(line) for line in (Path(result["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    logged = {key: value for record in records if record["kind"] == "train" for key, value in record.items()}
    for level in [*LEVELS, *CLASS_MAPS]:
        value = logged[f"loss/distill/yolov8s/{level}<-{level}"]
        assert torch.isfinite(torch.tensor(value)) and value > 0
    assert any(record.get("samples/unlabeled", 0) > 0 for record in records if record["kind"] == "data")
