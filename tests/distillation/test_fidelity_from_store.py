"""Feature fidelity reads a teacher's training store for the validation images it holds (same
id, same file) and runs the teacher live only for the rest."""

from __future__ import annotations

import torch

from tests.distillation.test_unlabeled_mix import _config
from vfmkd.core.build import build_evaluators
from vfmkd.datasets import build_dataset
from vfmkd.distillation.distiller import DistilledModel, build_distiller
from vfmkd.distillation.teacher_runtime import TeacherRuntime
from vfmkd.evaluation import run_evaluation
from vfmkd.features.cli import ExtractionOptions, extract_teacher_entry
from vfmkd.models import build_model


def _fidelity_with_live_rows(tmp_path, data_yaml, val_split, monkeypatch):
    config = _config(tmp_path, data_yaml, unlabeled=[])
    config.data.val_split = val_split
    extract_teacher_entry(config, "probe", options=ExtractionOptions(batch_size=4, num_workers=0, progress=False))
    live_rows = []
    original = TeacherRuntime._teacher_pass

    def counting(self, key, teacher, images, rows):
        live_rows.append(int(rows.numel()))
        return original(self, key, teacher, images, rows)

    monkeypatch.setattr(TeacherRuntime, "_teacher_pass", counting)
    torch.manual_seed(0)
    student = build_model(config.to_dict()["model"])
    distiller = build_distiller(config, student)
    dataset = build_dataset(config.data, val_split, train=False)
    metrics = run_evaluation(DistilledModel(student, distiller).eval(), dataset,
                             build_evaluators(student, dataset, distiller), batch_size=4, num_workers=0,
                             device="cpu")
    return metrics, sum(live_rows), len(dataset)


def test_validation_images_in_the_training_store_are_read_from_it(tmp_path, synthetic_data_yaml, monkeypatch):
    metrics, live, count = _fidelity_with_live_rows(tmp_path, synthetic_data_yaml, "train", monkeypatch)
    assert live == 0 and count > 0
    assert -1.0 <= metrics["fidelity/probe/embed<-p4/cosine"] <= 1.0


def test_same_ids_of_other_images_are_not_read_from_it(tmp_path, synthetic_data_yaml, monkeypatch):
    # The synthetic val split reuses the train split's ids (000000, ...) for other images.
    metrics, live, count = _fidelity_with_live_rows(tmp_path, synthetic_data_yaml, "val", monkeypatch)
    assert live == count
    assert "fidelity/probe/embed<-p4/cosine" in metrics
