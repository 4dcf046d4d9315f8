"""Distillation in the training loop: planning, alignment, offline/online mix, gradients."""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers.covariant_teacher import CovariantTeacher  # noqa: F401  (registers covariant_probe)
from vfmkd.cli import main
from vfmkd.config import ConfigError, validate_config
from vfmkd.core.trainer import Trainer
from vfmkd.datasets import build_dataset
from vfmkd.features.extract import extract_features
from vfmkd.teachers import build_teacher


@pytest.fixture(scope="module")
def probe_store(tmp_path_factory, synthetic_data_yaml):
    root = tmp_path_factory.mktemp("distill")
    data_yaml = synthetic_data_yaml
    teacher = build_teacher("covariant_probe", random_init=True, image_size=128)
    dataset = build_dataset({"dataset": str(data_yaml), "img_size": 64}, "train", train=False)
    extract_features(teacher, dataset, root / "store", batch_size=4, num_workers=0, progress=False, split="train")
    return root, data_yaml


def _config(root, data_yaml, **distillation):
    return validate_config(
        {
            "experiment_name": "distill",
            "model": {"backbone": {"type": "yolov8", "scale": "n"},
                      "heads": {"detection": {"type": "yolo_head", "num_classes": 6}}},
            "teachers": {"probe": {"name": "covariant_probe", "feature_path": str(root / "store"),
                                   "allow_random_init": True, "image_size": 128}},
            "distillation": {"offline_ratio": 0.5,
                             "losses": {"probe_p4": {"type": "cos_l1", "teacher": "probe", "student": "p4"},
                                        "feature_mse": {"teacher": "probe", "student": ["p3", "p5"],
                                                        "align_to": "student", "adapter": "mlp"},
                                        "detection": {"weight": 2.0}},
                             **distillation},
            "data": {"dataset": str(data_yaml), "img_size": 64, "batch_size": 3, "num_workers": 0},
            "train": {"max_steps": 2, "output_dir": str(root / "runs"), "eval_interval": 100, "log_interval": 1},
        }
    )


def test_hybrid_distillation_trains_and_logs_every_term(probe_store, caplog):
    root, data_yaml = probe_store
    seen: list[dict] = []

    class Recording(Trainer):
        def after_step(self) -> None:
            teacher = self.model.distiller.teachers._online.get("probe")
            seen.append({"teacher_grads": teacher is not None and any(p.requires_grad for p in teacher.parameters())})

    caplog.set_level("INFO")
    trainer = Recording(_config(root, data_yaml))
    assert "distillation alignment" in caplog.text and "p4" in caplog.text and "cos_l1" in caplog.text
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    adapters = list(trainer.model.distiller.adapters.parameters())
    assert adapters and all(id(p) in optimised for p in adapters)
    result = trainer.train()
    assert result["step"] == 2 and not any(entry["teacher_grads"] for entry in seen)
    teacher = trainer.model.distiller.teachers._online.get("probe")
    if teacher is not None:
        assert all(id(p) not in optimised for p in teacher.parameters())
    lines = (root / "runs/distill/metrics.jsonl").read_text()
    for name in ("distill/probe/embed<-p4", "distill/probe/embed<-p3", "distill/probe/embed<-p5", "det/box",
                 "fidelity/probe/embed<-p4/cosine", "fidelity/probe/embed<-p5/nmse"):
        assert name in lines
    checkpoint = torch.load(result["last"], weights_only=True)
    # the student and the distiller apart, no teacher weights
    assert set(checkpoint["model"]) == set(trainer.model.student.state_dict())
    assert set(checkpoint["distiller"]) == set(trainer.model.distiller.state_dict())
    assert any(key.startswith("adapters.") for key in checkpoint["distiller"])
    assert not any("covariant" in key or "_online" in key for state in (checkpoint["model"], checkpoint["distiller"])
                   for key in state)


def test_impossible_pairing_fails_before_training(probe_store):
    root, data_yaml = probe_store
    config = _config(root, data_yaml)
    config.distillation.losses["probe_p4"].student = "p9"
    with pytest.raises(ConfigError, match=r"distillation\.losses\.probe_p4\.student.*p9"):
        Trainer(config)
    config = _config(root, data_yaml)
    config.distillation.losses["probe_p4"].adapter = "none"
    with pytest.raises(ConfigError, match=r"adapter.*equal channels"):
        Trainer(config)


def test_store_of_another_setup_is_refused(probe_store):
    root, data_yaml = probe_store
    config = _config(root, data_yaml)
    config.teachers["probe"].image_size = 256
    with pytest.raises(ConfigError, match=r"preprocessing\.image_size: store 128, asked 256"):
        Trainer(config)
    config = _config(root, data_yaml)
    config.teachers["probe"].allow_random_init = False
    with pytest.raises(ConfigError, match=r"random_init: store true, asked false"):
        Trainer(config)


def test_all_offline_never_loads_the_teacher(probe_store, monkeypatch):
    root, data_yaml = probe_store
    import vfmkd.teachers

    def refuse(*args, **kwargs):
        raise AssertionError("the teacher was built although every sample is offline")

    monkeypatch.setattr(vfmkd.teachers, "build_teacher", refuse)
    Trainer(_config(root, data_yaml, offline_ratio=1.0)).train()


def test_two_teachers_each_with_its_losses_and_normalisation(probe_store):
    root, data_yaml = probe_store
    config = _config(root, data_yaml)
    config.teachers["second"] = config.teachers["probe"].model_copy(update={"normalize": True})
    config.distillation.losses = {
        "first": config.distillation.losses["probe_p4"],
        "second_kl": config.distillation.losses["probe_p4"].model_copy(update={"teacher": "second", "type": "kl"}),
    }
    config.distillation.teacher_dropout = 0.5
    config.distillation.offline_ratio = 1.0  # both teachers read the store: comparable maps
    trainer = Trainer(config)
    names = [term.name for term in trainer.model.distiller.terms]
    assert names == ["distill/probe/embed<-p4", "distill/second/embed<-p4"]
    batch = next(iter(trainer.train_loader))
    batch = trainer._prepare_batch(batch)
    targets = trainer.model.distiller.teachers.teacher_targets(batch, trainer.device)
    raw, _ = targets[("probe", "embed", 16)]
    standardised, valid = targets[("second", "embed", 16)]
    mean, std = trainer.model.distiller.teachers.teacher_plans["second"].store.stats("embed")
    expected = (raw - torch.as_tensor(mean).view(1, -1, 1, 1)) / torch.as_tensor(std).view(1, -1, 1, 1)
    torch.testing.assert_close(standardised[valid.expand_as(raw)], expected[valid.expand_as(raw)])
    result = trainer.train()
    assert result["step"] == 2


def test_unlabelled_folder_trains_distillation_alone(probe_store, tmp_path, capsys):
    root, data_yaml = probe_store
    config = _config(root, data_yaml)
    # the training images alone, as a plain folder: no labels
    config.data.dataset = str(data_yaml.parent / "images")
    config.data.train_split = "train"
    config.data.val_split = "val"
    config.train.output_dir = str(tmp_path / "runs")
    result = Trainer(config).train()
    lines = (tmp_path / "runs/distill/metrics.jsonl").read_text()
    assert "distill/probe/embed<-p4" in lines and "det/box" not in lines
    assert result["step"] == 2

    capsys.readouterr()
    run_config = str(tmp_path / "runs/distill/config.yaml")
    assert main(["eval", "--config", run_config, "--checkpoint", str(result["last"])]) == 0
    output = capsys.readouterr().out
    assert "no labels, so no mAP" in output
    reported = _eval_metrics(output)
    assert "mAP50" not in reported and "fidelity/probe/embed<-p4/cosine" in reported


def _eval_metrics(output: str) -> dict:
    """The JSON block `vfmkd eval` prints (before the per-class lines)."""
    return json.loads(output[output.index("{") : output.index("\n}") + 2])


def test_eval_reports_the_fidelity_training_reported(probe_store, tmp_path, capsys, caplog):
    root, data_yaml = probe_store
    config = _config(root, data_yaml)
    config.train.output_dir = str(tmp_path / "runs")
    result = Trainer(config).train()
    trained = {name: value for name, value in result["metrics"].items() if name.startswith("fidelity/")}
    assert {"fidelity/probe/embed<-p4/cosine", "fidelity/probe/embed<-p3/nmse"} <= set(trained)
    run_config = str(tmp_path / "runs/distill/config.yaml")
    checkpoint = str(result["last"])
    capsys.readouterr()

    assert main(["eval", "--config", run_config, "--checkpoint", checkpoint]) == 0
    reported = _eval_metrics(capsys.readouterr().out)
    assert "mAP50" in reported
    assert {name: value for name, value in reported.items() if name.startswith("fidelity/")} == pytest.approx(
        trained, rel=1e-5, abs=1e-6
    )

    assert main(["eval", "--config", run_config, "--checkpoint", checkpoint, "--no-fidelity"]) == 0
    assert not any(name.startswith("fidelity/") for name in _eval_metrics(capsys.readouterr().out))

    # adapters trained for another pairing: a clear error, not a silently re-initialised adapter
    other = tmp_path / "other.yaml"
    other.write_text(
        (tmp_path / "runs/distill/config.yaml").read_text().replace("adapter: mlp", "adapter: conv1x1")
    )
    assert "adapter: conv1x1" in other.read_text()
    assert main(["eval", "--config", str(other), "--checkpoint", checkpoint]) == 2
    assert "do not fit the config's distillation terms" in capsys.readouterr().err

    # the training store is not on this machine: the mAP still comes, fidelity is skipped and says why
    elsewhere = tmp_path / "elsewhere.yaml"
    run_config_text = (tmp_path / "runs/distill/config.yaml").read_text()
    assert str(root / "store") in run_config_text
    elsewhere.write_text(run_config_text.replace(str(root / "store"), str(tmp_path / "moved_store")))
    caplog.set_level("WARNING")
    assert main(["eval", "--config", str(elsewhere), "--checkpoint", checkpoint]) == 0
    reported = _eval_metrics(capsys.readouterr().out)
    assert "mAP50" in reported and not any(name.startswith("fidelity/") for name in reported)
    assert "feature fidelity skipped" in caplog.text and "moved_store" in caplog.text


def test_unlabelled_data_without_distillation_is_a_config_error(probe_store, tmp_path):
    root, data_yaml = probe_store
    config = _config(root, data_yaml)
    config.data.dataset = str(data_yaml.parent / "images")
    config.distillation.losses = {"detection": config.distillation.losses["detection"]}
    config.train.output_dir = str(tmp_path / "runs")
    with pytest.raises(ConfigError, match="has no labels and the config has no distillation term"):
        Trainer(config)
