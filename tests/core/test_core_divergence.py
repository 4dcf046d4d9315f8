"""A diverging run stops with a clear error and never saves non-finite weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from vfmkd.cli import main
from vfmkd.core.checkpoint import save_checkpoint
from vfmkd.errors import TrainingDivergedError
from vfmkd.models import build_model


def _finite(path: Path) -> bool:
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    states = [checkpoint["model"], (checkpoint.get("ema") or {}).get("module") or {}]
    return all(
        bool(torch.isfinite(value).all())
        for state in states
        for value in state.values()
        if torch.is_tensor(value) and value.is_floating_point()
    )


def test_an_absurd_learning_rate_stops_the_run_and_keeps_finite_checkpoints(tmp_path, synthetic_data_yaml, capsys):
    config = {
        "experiment_name": "diverge",
        "model": {"backbone": {"type": "yolov8", "scale": "n"},
                  "heads": {"detection": {"type": "yolo_head", "num_classes": 6}}},
        "data": {"dataset": str(synthetic_data_yaml), "img_size": 64, "batch_size": 2, "num_workers": 0},
        "train": {"max_steps": 40, "optimizer": "sgd", "lr": 1.0e6, "warmup_epochs": 0, "grad_clip": None,
                  "output_dir": str(tmp_path / "runs"), "eval_interval": 1, "save_interval": 1, "log_interval": 10,
                  "device": "cpu", "amp": False},
    }
    config_file = tmp_path / "diverge.yaml"
    config_file.write_text(yaml.safe_dump(config))
    assert main(["train", "--config", str(config_file)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert "train.lr" in err and ("non-finite" in err)
    checkpoints = list((tmp_path / "runs" / "diverge" / "checkpoints").glob("*.pt"))
    assert all(_finite(path) for path in checkpoints)


def test_skipped_steps_name_the_terms_and_the_limit_is_a_setting(tmp_path, caplog):
    from tests.core.test_core_trainer import make_config, make_trainer

    def nan_term(model, outputs, batch):
        value = outputs["detection"][0].float().mean()
        return {"fine": value, "broken": value * float("nan")}

    config = make_config(tmp_path, "limit", max_steps=20, accumulate=1, amp=False)
    config.train.max_bad_steps = 3
    trainer = make_trainer(config, loss_fn=nan_term)
    with caplog.at_level("WARNING"), pytest.raises(TrainingDivergedError, match=r"3 optimizer steps in a row") as caught:
        trainer.train()
    assert trainer.step == 2  # the third step raised before it counted
    assert "non-finite loss (broken)" in caplog.text and "No step had a finite loss" in str(caught.value)


def test_save_checkpoint_refuses_non_finite_weights_and_keeps_the_old_file(tmp_path):
    model = build_model({"backbone": {"type": "yolov8", "scale": "n"},
                         "heads": {"detection": {"type": "yolo_head", "num_classes": 2}}})
    path = tmp_path / "last.pt"
    save_checkpoint(path, model=model, step=1)
    before = path.read_bytes()
    with torch.no_grad():
        next(model.parameters()).fill_(float("inf"))
    with pytest.raises(TrainingDivergedError, match="unchanged"):
        save_checkpoint(path, model=model, step=2)
    assert path.read_bytes() == before
    with pytest.raises(TrainingDivergedError, match="was not written"):
        save_checkpoint(tmp_path / "best.pt", model=model, step=2)
    assert not (tmp_path / "best.pt").exists()
