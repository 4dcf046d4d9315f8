"""YOLOv8n learns the built-in data: mAP50 >= 0.5 on 8 images it trains on."""

import pytest

from vfmkd.config import validate_config
from vfmkd.core.build import build_trainer
from vfmkd.datasets.synthetic import generate_synthetic_dataset


@pytest.mark.slow
def test_yolov8n_learns_eight_builtin_images(tmp_path, monkeypatch):
    monkeypatch.setenv("VFMKD_CACHE_DIR", str(tmp_path / "cache"))
    data_yaml = generate_synthetic_dataset(tmp_path / "shapes", num_train=8, num_val=2, seed=0)
    no_augmentation = {"mosaic": 0.0, "fliplr": 0.0, "scale": 0.0, "translate": 0.0,
                       "hsv_h": 0.0, "hsv_s": 0.0, "hsv_v": 0.0}
    config = validate_config(
        {
            "experiment_name": "learn8",
            "model": {"backbone": {"type": "yolov8", "scale": "n"},
                      "heads": {"detection": {"type": "yolo_head", "num_classes": 6}}},
            "data": {"dataset": str(data_yaml), "val_split": "train", "img_size": 128,
                     "batch_size": 8, "num_workers": 0, "augment": no_augmentation},
            "train": {"max_steps": 250, "optimizer": "adamw", "lr": 0.002, "warmup_steps": 10,
                      "ema_tau": 50, "eval_interval": 1000, "save_interval": 1000, "log_interval": 50,
                      "output_dir": str(tmp_path / "runs"), "seed": 0},
        }
    )
    result = build_trainer(config).train()
    assert result["step"] == 250
    assert result["metrics"]["mAP50"] >= 0.5, result["metrics"]
