"""Distillation in the training loop: planning, alignment, offline/online mix, gradients."""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

# Importing the helper registers the `covariant_probe` teacher.
from tests.helpers.covariant_teacher import CHANNELS, STRIDE, CovariantTeacher
from vfmkd.cli import main
from vfmkd.config import ConfigError, ExperimentConfig, validate_config
from vfmkd.core.build import build_trainer
from vfmkd.core.trainer import Trainer
from vfmkd.datasets import build_dataset
from vfmkd.datasets.collate import batch_to_device
from vfmkd.distillation.distiller import DistilledModel, build_distiller
from vfmkd.distillation.plan import TermPlan, alignment_table
from vfmkd.features.extract import extract_features
from vfmkd.models import build_model
from vfmkd.teachers import build_teacher

TEACHER_SIZE = 128
IMG_SIZE = 64
TERMS = ("distill/probe/embed<-p4", "distill/probe/embed<-p3", "distill/probe/embed<-p5")
DETECTION_TERMS = ("det/box", "det/cls", "det/dfl")


@pytest.fixture(scope="module")
def probe_store(tmp_path_factory, synthetic_data_yaml):
    root = tmp_path_factory.mktemp("distill")
    data_yaml = synthetic_data_yaml
    teacher = build_teacher("covariant_probe", random_init=True, image_size=TEACHER_SIZE)
    dataset = build_dataset({"dataset": str(data_yaml), "img_size": IMG_SIZE}, "train", train=False)
    extract_features(teacher, dataset, root / "store", batch_size=4, num_workers=0, progress=False, split="train")
    return root, data_yaml


def _config(root, data_yaml, **distillation) -> ExperimentConfig:
    return validate_config(
        {
            "experiment_name": "distill",
            "model": {"backbone": {"type": "yolov8", "scale": "n"},
                      "heads": {"detection": {"type": "yolo_head", "num_classes": 6}}},
            "teachers": {"probe": {"name": "covariant_probe", "feature_path": str(root / "store"),
                                   "allow_random_init": True, "image_size": TEACHER_SIZE}},
            "distillation": {"offline_ratio": 0.5,
                             "losses": {"probe_p4": {"type": "cos_l1", "teacher": "probe", "student": "p4"},
                                        "feature_mse": {"teacher": "probe", "student": ["p3", "p5"],
                                                        "align_to": "student", "adapter": "mlp"},
                                        "detection": {"weight": 2.0}},
                             **distillation},
            "data": {"dataset": str(data_yaml), "img_size": IMG_SIZE, "batch_size": 3, "num_workers": 0},
            "train": {"max_steps": 2, "output_dir": str(root / "runs"), "eval_interval": 100, "log_interval": 1},
        }
    )


def _records(run_dir, kind: str) -> list[dict]:
    """The ``kind`` records of a run's ``metrics.jsonl``."""
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if record["kind"] == kind]


def _losses(record: dict) -> dict[str, float]:
    """A train record's loss terms by name, without ``total``."""
    return {
        key[len("loss/") :]: value for key, value in record.items() if key.startswith("loss/") and key != "loss/total"
    }


def _check_fidelity(metrics: dict, terms=TERMS) -> None:
    """Every term's fidelity is in range: cosine in [-1, 1], normalised MSE >= 0."""
    bases = [term.replace("distill/", "fidelity/", 1) for term in terms]
    fidelity = {name: value for name, value in metrics.items() if name.startswith("fidelity/")}
    assert set(fidelity) == {f"{base}/{metric}" for base in bases for metric in ("cosine", "nmse")}
    cosines, errors = [fidelity[f"{base}/cosine"] for base in bases], [fidelity[f"{base}/nmse"] for base in bases]
    assert all(-1.0 <= value <= 1.0 for value in cosines), cosines
    assert all(0.0 <= value < math.inf for value in errors), errors


def _eval_metrics(output: str) -> dict:
    """The JSON block `vfmkd eval` prints (before the per-class lines)."""
    return json.loads(output[output.index("{") : output.index("\n}") + 2])


# --------------------------------------------------------------------------- planning, no training
def test_plan_pairs_each_student_map_with_the_teacher_feature(probe_store, caplog):
    root, data_yaml = probe_store
    config = _config(root, data_yaml)
    torch.manual_seed(0)
    student = build_model(config.to_dict()["model"])
    caplog.set_level(logging.INFO, logger="vfmkd.distillation")
    distiller = build_distiller(config, student)

    def term(level, loss, adapter, align_to, channels, stride):
        return TermPlan(f"distill/probe/embed<-{level}", "probe", "embed", level, loss, 1.0, align_to, adapter,
                        channels, stride, CHANNELS, STRIDE)

    assert distiller.terms == [
        term("p4", "cos_l1", "conv1x1", "teacher", 128, 16),
        term("p3", "mse", "mlp", "student", 64, 8),
        term("p5", "mse", "mlp", "student", 256, 32),
    ]
    for planned in distiller.terms:
        adapted = distiller.adapters[planned.module_key](torch.zeros(1, planned.student_channels, 4, 4))
        assert adapted.shape == (1, CHANNELS, 4, 4), planned.name
    assert distiller.teacher_dropout == 0.0 and distiller.teachers.teacher_plans["probe"].offline_ratio == 0.5

    table = alignment_table(distiller.terms, distiller.teachers.teacher_plans, IMG_SIZE)
    logged = [record.getMessage() for record in caplog.records if record.name == "vfmkd.distillation.distiller"]
    assert logged == [f"distillation alignment:\n{table}"]
    rows = [re.split(r"\s{2,}", line) for line in table.splitlines()]
    assert rows[0] == ["student", "adapter", "teacher feature", "grid", "loss", "weight", "source"]
    assert set(rows[1]) == {"-" * len(cell) for cell in rows[1]}
    teacher = "probe.embed 8x8x8 s16"
    assert rows[2:] == [
        ["p4 128x4x4 s16", "conv1x1 128->8", teacher, "4x4 (s16, teacher)", "cos_l1", "1", "50% offline"],
        ["p3 64x8x8 s8", "mlp 64->8", teacher, "8x8 (s8, student)", "mse", "1", "50% offline"],
        ["p5 256x2x2 s32", "mlp 256->8", teacher, "2x2 (s32, student)", "mse", "1", "50% offline"],
    ]


def test_terms_are_the_weighted_losses_of_the_aligned_pairs(probe_store):
    root, data_yaml = probe_store
    config = _config(root, data_yaml, offline_ratio=1.0)
    config.distillation.losses["probe_p4"].weight = 3.0
    trainer = build_trainer(config)
    model = trainer.model
    batch = batch_to_device(next(iter(trainer.train_loader)), trainer.device)
    model.eval()
    with torch.no_grad():
        outputs = model.student(batch["images"])
        losses = model(batch)
        targets = model.distiller.teachers.teacher_targets(batch, trainer.device)
        for planned in model.distiller.terms:
            student, teacher, valid = model.distiller.aligned_pair(planned, outputs["maps"], targets)
            grid = IMG_SIZE // (STRIDE if planned.align_to == "teacher" else planned.student_stride)
            assert student.shape == teacher.shape == (3, CHANNELS, grid, grid) and valid.shape == (3, 1, grid, grid)
            # Every sample is offline and every cell of the letterboxed input is covered by the store.
            assert bool(valid.any()) and bool(teacher[valid.expand_as(teacher)].abs().sum() > 0)
            cells = valid[:, 0]
            cosine = F.cosine_similarity(student, teacher, dim=1, eps=1e-8)[cells]
            smooth_l1 = F.smooth_l1_loss(student, teacher, reduction="none", beta=1.0).permute(0, 2, 3, 1)[cells]
            squared = (student - teacher).pow(2).permute(0, 2, 3, 1)[cells]
            # cos_l1 defaults: 0.9 cosine distance + 0.1 smooth L1 (beta 1), means over valid cells.
            expected = {"cos_l1": 0.9 * (1.0 - cosine).mean() + 0.1 * smooth_l1.mean(), "mse": squared.mean()}
            torch.testing.assert_close(losses[planned.name], planned.weight * expected[planned.loss_type])
    assert [planned.weight for planned in model.distiller.terms] == [3.0, 1.0, 1.0]

    # The detection entry's weight scales every task loss and nothing else.
    single = DistilledModel(model.student, model.distiller, task_weights={"detection": 1.0})
    with torch.no_grad():
        unweighted = single(batch)
    assert set(losses) == set(unweighted) == {*DETECTION_TERMS, *TERMS}
    for name in DETECTION_TERMS:
        torch.testing.assert_close(losses[name], 2.0 * unweighted[name])
    for name in TERMS:
        torch.testing.assert_close(losses[name], unweighted[name])


def test_impossible_pairing_fails_before_training(probe_store):
    root, data_yaml = probe_store
    config = _config(root, data_yaml)
    config.distillation.losses["probe_p4"].student = "p9"
    with pytest.raises(ConfigError, match=r"distillation\.losses\.probe_p4\.student.*p9"):
        build_trainer(config)
    config = _config(root, data_yaml)
    config.distillation.losses["probe_p4"].adapter = "none"
    with pytest.raises(ConfigError, match=r"adapter.*equal channels"):
        build_trainer(config)


def test_store_of_another_setup_is_refused(probe_store):
    root, data_yaml = probe_store
    config = _config(root, data_yaml)
    config.teachers["probe"].image_size = 256
    with pytest.raises(ConfigError, match=r"preprocessing\.image_size: store 128, asked 256"):
        build_trainer(config)
    config = _config(root, data_yaml)
    config.teachers["probe"].allow_random_init = False
    with pytest.raises(ConfigError, match=r"random_init: store true, asked false"):
        build_trainer(config)


def test_two_teachers_each_with_its_losses_and_normalisation(probe_store):
    root, data_yaml = probe_store
    config = _two_teacher_config(root, data_yaml)
    trainer = build_trainer(config)
    names = [term.name for term in trainer.model.distiller.terms]
    assert names == ["distill/probe/embed<-p4", "distill/second/embed<-p4"]
    batch = batch_to_device(next(iter(trainer.train_loader)), trainer.device)
    targets = trainer.model.distiller.teachers.teacher_targets(batch, trainer.device)
    raw, _ = targets[("probe", "embed", 16)]
    standardised, valid = targets[("second", "embed", 16)]
    mean, std = trainer.model.distiller.teachers.teacher_plans["second"].store.stats("embed")
    expected = (raw - torch.as_tensor(mean).view(1, -1, 1, 1)) / torch.as_tensor(std).view(1, -1, 1, 1)
    torch.testing.assert_close(standardised[valid.expand_as(raw)], expected[valid.expand_as(raw)])
    assert bool(valid.any())


def test_all_online_teacher_standardises_with_its_store_statistics(probe_store):
    root, data_yaml = probe_store
    runtimes = []
    for normalize in (False, True):
        config = _config(root, data_yaml)
        config.teachers["probe"].normalize = normalize
        config.teachers["probe"].offline_ratio = 0.0
        trainer = build_trainer(config)
        runtimes.append(trainer.model.distiller.teachers)
    assert runtimes[1].offline_plans() == []  # the store is read for its statistics only
    batch = batch_to_device(next(iter(trainer.train_loader)), trainer.device)
    raw, valid = runtimes[0].teacher_targets(batch, trainer.device)[("probe", "embed", 16)]
    standardised, _ = runtimes[1].teacher_targets(batch, trainer.device)[("probe", "embed", 16)]
    mean, std = runtimes[1].teacher_plans["probe"].store.stats("embed")
    expected = (raw - torch.as_tensor(mean).view(1, -1, 1, 1)) / torch.as_tensor(std).view(1, -1, 1, 1)
    cells = valid.expand_as(raw)
    assert bool(valid.any())
    torch.testing.assert_close(standardised[cells], expected[cells])


def _two_teacher_config(root, data_yaml) -> ExperimentConfig:
    config = _config(root, data_yaml)
    config.teachers["second"] = config.teachers["probe"].model_copy(update={"normalize": True})
    config.distillation.losses = {
        "first": config.distillation.losses["probe_p4"],
        "second_kl": config.distillation.losses["probe_p4"].model_copy(update={"teacher": "second", "type": "kl"}),
    }
    config.distillation.teacher_dropout = 0.5
    config.distillation.offline_ratio = 1.0  # both teachers read the store: comparable maps
    return config


def test_unlabelled_data_without_distillation_is_a_config_error(probe_store, tmp_path):
    root, data_yaml = probe_store
    config = _config(root, data_yaml)
    config.data.dataset = str(data_yaml.parent / "images")
    config.distillation.losses = {"detection": config.distillation.losses["detection"]}
    config.train.output_dir = str(tmp_path / "runs")
    with pytest.raises(ConfigError, match="has no labels and the config has no distillation term"):
        build_trainer(config)


# --------------------------------------------------------------------------- training runs
@pytest.mark.slow
def test_hybrid_distillation_trains_without_touching_the_teacher(probe_store, tmp_path):
    root, data_yaml = probe_store
    config = _config(root, data_yaml)
    config.train.output_dir = str(tmp_path / "runs")
    seen: list[bool] = []

    class Recording(Trainer):
        def after_step(self) -> None:
            online = self.model.distiller.teachers._online.values()
            seen.append(any(parameter.requires_grad for teacher in online for parameter in teacher.parameters()))

    trainer = build_trainer(config, trainer_class=Recording)
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    adapters = list(trainer.model.distiller.adapters.parameters())
    assert adapters and all(id(p) in optimised for p in adapters)
    result = trainer.train()
    assert result["step"] == 2 and seen == [False, False]
    # Half the samples are online: the teacher was built, and it is not optimised.
    online = trainer.model.distiller.teachers._online
    assert list(online) == ["probe"] and isinstance(online["probe"], CovariantTeacher)
    assert not any(id(p) in optimised for p in online["probe"].parameters())

    train_records = _records(result["run_dir"], "train")
    assert [record["step"] for record in train_records] == [1, 2]
    for record in train_records:
        losses = _losses(record)
        assert set(losses) == {*DETECTION_TERMS, *TERMS}
        assert all(math.isfinite(value) and value > 0.0 for value in losses.values()), losses
        assert record["loss/total"] == pytest.approx(sum(losses.values()), rel=1e-5)
    _check_fidelity(result["metrics"])
    assert _records(result["run_dir"], "eval")[-1]["step"] == 2

    checkpoint = torch.load(result["last"], weights_only=True)
    # the student and the distiller apart, no teacher weights
    assert set(checkpoint["model"]) == set(trainer.model.student.state_dict())
    assert set(checkpoint["distiller"]) == set(trainer.model.distiller.state_dict())
    assert {key.split(".")[0] for key in checkpoint["distiller"]} == {"adapters"}
    assert not any("covariant" in key or "_online" in key or "teacher" in key
                   for state in (checkpoint["model"], checkpoint["distiller"]) for key in state)


@pytest.mark.slow
def test_all_offline_never_loads_the_teacher(probe_store, tmp_path, monkeypatch):
    root, data_yaml = probe_store
    config = _config(root, data_yaml, offline_ratio=1.0)
    config.train.output_dir = str(tmp_path / "runs")
    import vfmkd.teachers

    def refuse(*args, **kwargs):
        raise AssertionError("the teacher was built although every sample is offline")

    monkeypatch.setattr(vfmkd.teachers, "build_teacher", refuse)
    trainer = build_trainer(config)
    result = trainer.train()
    assert result["step"] == 2 and trainer.model.distiller.teachers._online == {}
    records = _records(result["run_dir"], "train")
    assert [record["step"] for record in records] == [1, 2]
    assert all(set(_losses(record)) == {*DETECTION_TERMS, *TERMS} for record in records)


@pytest.mark.slow
def test_two_teachers_train_with_teacher_dropout(probe_store, tmp_path):
    root, data_yaml = probe_store
    config = _two_teacher_config(root, data_yaml)
    config.train.output_dir = str(tmp_path / "runs")
    config.train.max_steps = 4
    result = build_trainer(config).train()
    assert result["step"] == 4
    terms = ("distill/probe/embed<-p4", "distill/second/embed<-p4")
    records = _records(result["run_dir"], "train")
    assert [record["step"] for record in records] == [1, 2, 3, 4]
    for record in records:
        values = [_losses(record)[name] for name in terms]
        # A dropped teacher's term is zero for the step; at least one teacher stays.
        assert all(math.isfinite(value) and value >= 0.0 for value in values) and max(values) > 0.0, values


@pytest.mark.slow
def test_unlabelled_folder_trains_distillation_alone(probe_store, tmp_path, capsys):
    root, data_yaml = probe_store
    config = _config(root, data_yaml)
    # the training images alone, as a plain folder: no labels
    config.data.dataset = str(data_yaml.parent / "images")
    config.data.train_split = "train"
    config.data.val_split = "val"
    config.train.output_dir = str(tmp_path / "runs")
    result = build_trainer(config).train()
    assert result["step"] == 2
    records = _records(result["run_dir"], "train")
    assert [record["step"] for record in records] == [1, 2]
    for record in records:
        losses = _losses(record)
        assert set(losses) == set(TERMS) and all(value > 0.0 for value in losses.values())
        assert record["loss/total"] == pytest.approx(sum(losses.values()), rel=1e-5)

    capsys.readouterr()
    run_config = str(tmp_path / "runs/distill/config.yaml")
    assert main(["eval", "--config", run_config, "--checkpoint", str(result["last"])]) == 0
    output = capsys.readouterr().out
    assert output.startswith(f"{config.data.dataset}: no labels, so no mAP")
    reported = _eval_metrics(output)
    assert not any(name.startswith("mAP") for name in reported)
    _check_fidelity(reported)


@pytest.mark.slow
def test_eval_reports_the_fidelity_training_reported(probe_store, tmp_path, capsys, caplog):
    root, data_yaml = probe_store
    config = _config(root, data_yaml)
    config.train.output_dir = str(tmp_path / "runs")
    result = build_trainer(config).train()
    trained = {name: value for name, value in result["metrics"].items() if name.startswith("fidelity/")}
    _check_fidelity(trained)
    run_config = str(tmp_path / "runs/distill/config.yaml")
    checkpoint = str(result["last"])
    capsys.readouterr()

    assert main(["eval", "--config", run_config, "--checkpoint", checkpoint]) == 0
    reported = _eval_metrics(capsys.readouterr().out)
    assert 0.0 <= reported["mAP50"] <= 1.0
    assert {name: value for name, value in reported.items() if name.startswith("fidelity/")} == pytest.approx(
        trained, rel=1e-5, abs=1e-6
    )

    assert main(["eval", "--config", run_config, "--checkpoint", checkpoint, "--no-fidelity"]) == 0
    without = _eval_metrics(capsys.readouterr().out)
    assert without["mAP50"] == pytest.approx(reported["mAP50"])
    assert not any(name.startswith("fidelity/") for name in without)

    # adapters trained for another pairing: a clear error, not a silently re-initialised adapter
    run_config_text = (tmp_path / "runs/distill/config.yaml").read_text()
    other = tmp_path / "other.yaml"
    other.write_text(run_config_text.replace("adapter: mlp", "adapter: conv1x1"))
    assert other.read_text() != run_config_text
    assert main(["eval", "--config", str(other), "--checkpoint", checkpoint]) == 2
    assert "do not fit the config's distillation terms" in capsys.readouterr().err

    # the training store is not on this machine: the mAP still comes, fidelity is skipped and says why
    elsewhere = tmp_path / "elsewhere.yaml"
    moved = run_config_text.replace(str(root / "store"), str(tmp_path / "moved_store"))
    assert moved != run_config_text
    elsewhere.write_text(moved)
    caplog.set_level(logging.WARNING, logger="vfmkd")
    assert main(["eval", "--config", str(elsewhere), "--checkpoint", checkpoint]) == 0
    reported = _eval_metrics(capsys.readouterr().out)
    assert reported["mAP50"] == pytest.approx(without["mAP50"])
    assert not any(name.startswith("fidelity/") for name in reported)
    messages = [record.getMessage() for record in caplog.records]
    skipped = [message for message in messages if message.startswith("feature fidelity skipped")]
    assert len(skipped) == 1 and str(tmp_path / "moved_store") in skipped[0]
