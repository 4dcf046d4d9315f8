import gzip
import random
import shutil
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tests.helpers.covariant_teacher import CovariantTeacher  # noqa: F401  (registers covariant_probe)
from vfmkd.config import validate_config
from vfmkd.core.checkpoint import (
    CheckpointError,
    capture_rng_state,
    load_checkpoint,
    load_distiller_from_checkpoint,
    load_model_from_checkpoint,
    load_training_state,
    restore_rng_state,
    save_checkpoint,
)
from vfmkd.core.ema import ModelEMA
from vfmkd.distillation.distiller import DistilledModel, build_distiller
from vfmkd.models import build_model


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


FORMAT1_CHECKPOINT = Path(__file__).parent / "data" / "format1_last.pt.gz"


@pytest.fixture(scope="module")
def format1_checkpoint(tmp_path_factory) -> Path:
    """A last.pt written by vfmkd's format-1 trainer (see data/make_format1_checkpoint.py)."""
    path = tmp_path_factory.mktemp("format1") / "last.pt"
    with gzip.open(FORMAT1_CHECKPOINT, "rb") as source, path.open("wb") as target:
        shutil.copyfileobj(source, target)
    return path


def _pattern(index: int, parameter: torch.Tensor) -> torch.Tensor:
    """The values make_format1_checkpoint.py gave the index-th parameter of the training model."""
    return ((torch.arange(parameter.numel()) % 7 - 3).float() * 0.01 + index * 1e-3).view_as(parameter)


def test_format1_checkpoint_loads_student_and_distiller_apart(format1_checkpoint):
    raw = torch.load(format1_checkpoint, weights_only=True)
    assert raw["format_version"] == 1 and any(key.startswith("distill.") for key in raw["model"])
    checkpoint = load_checkpoint(format1_checkpoint)
    assert checkpoint["format_version"] == 2
    assert not any(key.startswith("distill.") for key in checkpoint["model"])
    assert not any(key.startswith("distill.") for key in checkpoint["ema"]["module"])
    assert {key.split(".")[0] for key in checkpoint["distiller"]} == {"adapters", "losses"}
    assert checkpoint["ema"]["distiller"].keys() == checkpoint["distiller"].keys()

    student = load_model_from_checkpoint(format1_checkpoint)
    parameters = list(student.parameters())
    for index, parameter in enumerate(parameters):
        torch.testing.assert_close(parameter, _pattern(index, parameter), rtol=0, atol=0)

    config = validate_config(checkpoint["config"])
    distiller = load_distiller_from_checkpoint(config, format1_checkpoint, student)
    distiller_parameters = list(distiller.parameters())
    assert distiller_parameters
    for index, parameter in enumerate(distiller_parameters, start=len(parameters)):
        torch.testing.assert_close(parameter, _pattern(index, parameter), rtol=0, atol=0)

    # A training model built from the same config takes the whole state back (as resume does).
    fresh_student = build_model(checkpoint["model_config"])
    training = DistilledModel(fresh_student, build_distiller(config, fresh_student, write_back=False))
    ema = ModelEMA(training)
    assert load_training_state(training, ema, checkpoint) and ema.updates == 3
    for index, parameter in enumerate(training.parameters()):
        torch.testing.assert_close(parameter, _pattern(index, parameter), rtol=0, atol=0)


def test_checkpoint_keeps_student_and_distiller_apart(format1_checkpoint, tmp_path):
    checkpoint = load_checkpoint(format1_checkpoint)
    config = validate_config(checkpoint["config"])
    student = build_model(checkpoint["model_config"])
    training = DistilledModel(student, build_distiller(config, student, write_back=False))
    save_checkpoint(tmp_path / "new.pt", model=training, ema=ModelEMA(training), config_dict=checkpoint["config"])
    saved = torch.load(tmp_path / "new.pt", weights_only=True)
    assert saved["format_version"] == 2
    assert saved["model"].keys() == student.state_dict().keys()
    assert saved["distiller"].keys() == training.distiller.state_dict().keys()
    assert saved["ema"]["module"].keys() == student.state_dict().keys()
    assert saved["ema"]["distiller"].keys() == training.distiller.state_dict().keys()
    # Another distillation config is refused with the reason.
    other = validate_config({**checkpoint["config"], "distillation": {"losses": {
        "probe_p3": {"type": "mse", "teacher": "probe", "student": "p3"}}}})
    with pytest.raises(CheckpointError, match="do not fit the config's distillation terms"):
        load_distiller_from_checkpoint(other, tmp_path / "new.pt", student)
