import pytest

from vfmkd.config import validate_config
from vfmkd.core.build import build_trainer
from vfmkd.core.trainer import Trainer
from vfmkd.datasets.synthetic import generate_synthetic_dataset


@pytest.mark.slow
def test_mosaic_closes_for_the_last_epochs(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("VFMKD_CACHE_DIR", str(tmp_path / "cache"))
    data_yaml = generate_synthetic_dataset(tmp_path / "shapes", num_train=4, num_val=2, seed=1)
    config = validate_config(
        {
            "model": {"backbone": {"type": "yolov8", "scale": "n"},
                      "heads": {"detection": {"type": "yolo_head", "num_classes": 6}}},
            "data": {"dataset": str(data_yaml), "img_size": 64, "batch_size": 4, "num_workers": 0,
                     "augment": {"mosaic": 1.0, "close_mosaic": 2}},
            "train": {"epochs": 4, "ema": False, "eval_interval": 100, "output_dir": str(tmp_path / "runs")},
        }
    )

    class Recording(Trainer):
        def after_step(self) -> None:
            seen.append((self.epoch, self.train_dataset.transform.settings["mosaic"]))

    seen: list[tuple[int, float]] = []
    with caplog.at_level("WARNING", logger="vfmkd"):
        build_trainer(config, trainer_class=Recording).train()
    assert seen == [(0, 1.0), (1, 1.0), (2, 0.0), (3, 0.0)]
    assert "close_mosaic" not in caplog.text  # half the run: as meant

    # Most of a run of few, long epochs without mosaic: said before training.
    config.data.augment.close_mosaic = 3
    config.train.epochs = 4
    config.train.output_dir = str(tmp_path / "runs_long_close")
    seen.clear()
    with caplog.at_level("WARNING", logger="vfmkd"):
        build_trainer(config, trainer_class=Recording).train()
    assert seen[0] == (0, 1.0) and seen[1] == (1, 0.0)
    assert "data.augment.close_mosaic is 3 epochs of this run's 4 (1 steps each): mosaic only in the first 1" in caplog.text
