import random
from fractions import Fraction

import numpy as np
import pytest
import torch
from torch import nn

from vfmkd.core.checkpoint import (
    CheckpointError,
    capture_rng_state,
    load_checkpoint,
    load_model_from_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from vfmkd.core.ema import ModelEMA


def _draws() -> tuple:
    return random.random(), float(np.random.rand()), np.random.normal(), float(torch.rand(1))


def test_rng_state_round_trip_through_weights_only_file(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.normal()  # leaves a cached gaussian in numpy's state
    state = capture_rng_state()
    expected = _draws()
    save_checkpoint(tmp_path / "c.pt", model=nn.Linear(2, 2), rng_state=[state])
    _draws()
    restore_rng_state(load_checkpoint(tmp_path / "c.pt")["rng_state"][0])
    assert _draws() == expected


def test_full_checkpoint_loads_with_weights_only(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    optimizer.step()
    ema = ModelEMA(model)
    ema.update(model)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    path = save_checkpoint(
        tmp_path / "checkpoints" / "last.pt",
        model=model,
        optimizer=optimizer,
        scheduler_state={"base_lr": 0.1, "scheduler": "cosine"},
        ema=ema,
        scaler=scaler,
        step=7,
        epoch=2,
        config_dict={"experiment_name": "x", "model": {"backbone": {"type": "yolov8"}}},
        rng_state=[capture_rng_state()],
        best_fitness=0.25,
        metrics={"mAP": 0.2, "per_class": {"a": float("nan")}},
        batch_in_epoch=3,
    )
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["step"] == 7 and checkpoint["epoch"] == 2 and checkpoint["batch_in_epoch"] == 3
    assert checkpoint["ema"]["updates"] == 1
    restored = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    restored.load_state_dict(load_checkpoint(path)["optimizer"])
    assert not list(tmp_path.glob("checkpoints/*.tmp"))


class _Custom:
    pass


def test_file_needing_unpickling_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "extra": _Custom(), "ratio": Fraction(1, 3)}, path)
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_checkpoint(path)


def test_missing_and_foreign_files_have_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "none.pt")
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a vfmkd checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


def test_load_model_from_checkpoint_prefers_ema_weights(tmp_path):
    models = pytest.importorskip("vfmkd.models")
    config = {
        "backbone": {"type": "yolov8", "scale": "n"},
        "heads": {"detection": {"type": "yolo_head", "num_classes": 3}},
    }
    model = models.build_model(config)
    ema = ModelEMA(model)
    with torch.no_grad():
        for parameter in ema.module.parameters():
            parameter.fill_(0.5)
    save_checkpoint(tmp_path / "best.pt", model=model, ema=ema, config_dict={"model": config})
    loaded = load_model_from_checkpoint(tmp_path / "best.pt", "cpu")
    assert not loaded.training
    assert all(torch.all(p == 0.5) for p in loaded.parameters())
