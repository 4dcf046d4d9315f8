"""Labelled + unlabelled images in one distillation run: per-sample masking of the task
losses, the store covering the unlabelled images, label counts in the logs, exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

# Importing the helper registers the `covariant_probe` teacher.
from tests.helpers.covariant_teacher import CovariantTeacher  # noqa: F401
from tests.conftest import SYNTHETIC_TRAIN_IMAGES, SYNTHETIC_VAL_IMAGES
from vfmkd.config import ExperimentConfig, validate_config
from vfmkd.core.build import build_trainer
from vfmkd.core.trainer import Trainer
from vfmkd.datasets.collate import batch_to_device
from vfmkd.datasets.mixed import build_train_dataset
from vfmkd.distillation.distiller import DistilledModel, build_distiller, task_loss_weights
from vfmkd.distillation.sources import DistillationDataset, TeacherFeatureCollate
from vfmkd.features.cli import ExtractionOptions, extract_teacher_entry
from vfmkd.features.store import FeatureStore
from vfmkd.models import build_model

IMG_SIZE = 64
TEACHER_SIZE = 128


def _config(tmp_path: Path, data_yaml: Path, name: str = "mixed", **data) -> ExperimentConfig:
    return validate_config(
        {
            "experiment_name": name,
            "model": {"backbone": {"type": "yolov8", "scale": "n"},
                      "heads": {"detection": {"type": "yolo_head", "num_classes": 6}}},
            "teachers": {"probe": {"name": "covariant_probe", "feature_path": str(tmp_path / "store"),
                                   "allow_random_init": True, "image_size": TEACHER_SIZE}},
            "distillation": {"offline_ratio": 0.5,
                             "losses": {"probe_p4": {"type": "mse", "teacher": "probe", "student": "p4"}}},
            "data": {"dataset": str(data_yaml), "img_size": IMG_SIZE, "batch_size": 4, "num_workers": 0,
                     "augment": {"mosaic": 0.0}, "unlabeled": [str(data_yaml.parent / "images" / "val")], **data},
            "train": {"max_steps": 2, "output_dir": str(tmp_path / "runs"), "eval_interval": 100,
                      "log_interval": 1, "device": "cpu", "amp": False, "optimizer": "sgd", "lr": 0.01},
        }
    )


def test_unlabeled_rows_get_gradients_from_distillation_only(tmp_path, synthetic_data_yaml):
    config = _config(tmp_path, synthetic_data_yaml)
    config.teachers["probe"].offline = False
    torch.manual_seed(0)
    student = build_model(config.to_dict()["model"])
    distiller = build_distiller(config, student)
    model = DistilledModel(student, distiller, task_weights=task_loss_weights(config)).eval()
    dataset = build_train_dataset(config.data, "train", train=False)
    wrapped = DistillationDataset(dataset, distiller.teachers.offline_plans())
    rows = [0, 1, len(dataset) - 2, len(dataset) - 1]  # two labelled, two unlabelled
    batch = batch_to_device(TeacherFeatureCollate()([wrapped[index] for index in rows]), torch.device("cpu"))
    assert batch["targets"]["has_labels"].tolist() == [True, True, False, False]
    images = batch["images"].requires_grad_(True)
    # NOTE: eval mode, so batch norm uses its running statistics and rows do not mix.
    losses = model({**batch, "images": images})
    task = sum(value for name, value in losses.items() if name.startswith("det/"))
    distill = sum(value for name, value in losses.items() if name.startswith("distill/"))
    (task_grad,) = torch.autograd.grad(task, images, retain_graph=True)
    (distill_grad,) = torch.autograd.grad(distill, images)
    per_row = lambda grad: grad.abs().flatten(1).sum(1)  # noqa: E731
    assert per_row(task_grad)[2:].tolist() == [0.0, 0.0]
    assert (per_row(task_grad)[:2] > 0).all()
    assert (per_row(distill_grad) > 0).all()


def test_extraction_covers_the_unlabeled_images(tmp_path, synthetic_data_yaml):
    config = _config(tmp_path, synthetic_data_yaml)
    extract_teacher_entry(config, "probe", options=ExtractionOptions(batch_size=4, num_workers=0, progress=False))
    ids = set(FeatureStore.open(tmp_path / "store").ids)
    mixed = build_train_dataset(config.data, "train")
    assert ids == set(mixed.ids)
    assert len(ids) == SYNTHETIC_TRAIN_IMAGES + SYNTHETIC_VAL_IMAGES


class _StopAt(Trainer):
    stop_step = 0

    def after_step(self) -> None:
        if self.step == self.stop_step:
            self.request_stop()


def _data_records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if record["kind"] == "data"]


def test_mixed_run_logs_label_counts_and_resumes_exactly(tmp_path, synthetic_data_yaml, caplog):
    # 6 labelled + 3 unlabelled, batches of 4 with half unlabelled: 2 batches (one partial dropped).
    keys = {"unlabeled_ratio": 0.5}
    extract_teacher_entry(
        _config(tmp_path, synthetic_data_yaml), "probe", options=ExtractionOptions(batch_size=4, num_workers=0, progress=False)
    )
    reference_config = _config(tmp_path, synthetic_data_yaml, "reference", **keys)
    reference_config.train.max_steps = 4
    reference = build_trainer(reference_config)
    with caplog.at_level("INFO", logger="vfmkd"):
        result = reference.train()
    counts = _data_records(Path(result["run_dir"]))
    assert [(r["samples/labeled"], r["samples/unlabeled"]) for r in counts] == [(4, 4), (4, 4)]
    assert "epoch 0: 4 labelled and 4 unlabelled samples" in caplog.text

    _StopAt.stop_step = 1
    resumed_config = _config(tmp_path, synthetic_data_yaml, "resumed", **keys)
    resumed_config.train.max_steps = 4
    interrupted = build_trainer(resumed_config, trainer_class=_StopAt)
    assert interrupted.train()["step"] == 1
    resumed = build_trainer(resumed_config, resume=True)
    resumed.train()
    assert resumed.step == 4
    for name, value in reference.model.state_dict().items():
        torch.testing.assert_close(value, resumed.model.state_dict()[name], rtol=0, atol=0, msg=name)


def test_label_fraction_without_distillation_trains_on_its_labels(tmp_path, synthetic_data_yaml, caplog):
    config = _config(tmp_path, synthetic_data_yaml, label_fraction=0.5, unlabeled=[])
    config.distillation.losses = {}
    with caplog.at_level("WARNING"):
        trainer = build_trainer(config)
    assert len(trainer.train_dataset) == 3
    assert "the 3 unlabelled images are left out" in caplog.text


@pytest.mark.parametrize("ratio", [None, 0.25])
def test_label_fraction_mixes_the_rest_as_unlabeled(tmp_path, synthetic_data_yaml, ratio):
    config = _config(tmp_path, synthetic_data_yaml, label_fraction=0.5, unlabeled=[], unlabeled_ratio=ratio)
    config.teachers["probe"].offline = False
    trainer = build_trainer(config)
    assert len(trainer.train_dataset) == SYNTHETIC_TRAIN_IMAGES
    labeled = [bool(trainer.train_dataset[index]["has_labels"]) for index in range(SYNTHETIC_TRAIN_IMAGES)]
    assert labeled == [True] * 3 + [False] * 3
    result = trainer.train()
    counts = _data_records(Path(result["run_dir"]))[-1]
    assert counts["samples/labeled"] + counts["samples/unlabeled"] == 4
    if ratio == 0.25:
        assert counts["samples/unlabeled"] == 1


def test_unlabeled_batch_size_adds_unlabeled_samples_to_each_batch(tmp_path, synthetic_data_yaml):
    # 3 labelled + 3 unlabelled; batches of 2 labelled + 1 unlabelled: 2 batches of 3.
    config = _config(tmp_path, synthetic_data_yaml, label_fraction=0.5, unlabeled=[], unlabeled_batch_size=1)
    config.data.batch_size = 2
    config.teachers["probe"].offline = False
    trainer = build_trainer(config)
    assert trainer.batch_size == 3
    counts = _data_records(Path(trainer.train()["run_dir"]))[-1]
    assert (counts["samples/labeled"], counts["samples/unlabeled"]) == (4, 2)
    # Without a distillation term the unlabelled images are left out, and so is their share of the batch.
    config.distillation.losses = {}
    assert build_trainer(config).batch_size == 2
