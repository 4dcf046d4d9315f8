"""Distillation terms on any named map of the student: neck levels, backbone stages, head maps."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.covariant_teacher import CHANNELS  # noqa: F401  (registers covariant_probe)
from vfmkd.config import ConfigError, validate_config
from vfmkd.datasets import build_dataset
from vfmkd.datasets.collate import batch_to_device
from vfmkd.distillation.distiller import DistilledModel, build_distiller
from vfmkd.distillation.plan import alignment_table
from vfmkd.distillation.sources import DistillationDataset, TeacherFeatureCollate
from vfmkd.models import build_model

IMG_SIZE = 64


def _config(data_yaml, student) -> object:
    return validate_config(
        {
            "model": {"backbone": {"type": "yolov8", "scale": "n"},
                      "heads": {"detection": {"type": "yolo_head", "num_classes": 6}}},
            "teachers": {"probe": {"name": "covariant_probe", "allow_random_init": True, "image_size": 128}},
            "distillation": {"offline_ratio": 0.0,
                             "losses": {"probe": {"type": "mse", "teacher": "probe", "student": student},
                                        "detection": {"weight": 3.0}}},
            "data": {"dataset": str(data_yaml), "img_size": IMG_SIZE, "batch_size": 2, "num_workers": 0},
        }
    )


def test_a_backbone_stage_is_distilled_and_shown_in_the_alignment_table(synthetic_data_yaml) -> None:
    torch.manual_seed(0)
    student = build_model(_config(synthetic_data_yaml, "p4").to_dict()["model"])
    config = _config(synthetic_data_yaml, ["backbone.p4", "p4"])
    distiller = build_distiller(config, student)
    by_map = {term.level: term for term in distiller.terms}
    assert set(by_map) == {"backbone.p4", "p4"}
    assert by_map["backbone.p4"].student_channels == student.backbone.feature_dims["p4"]
    assert by_map["backbone.p4"].student_stride == 16 and by_map["backbone.p4"].teacher_channels == CHANNELS
    table = alignment_table(distiller.terms, distiller.teachers.teacher_plans, IMG_SIZE).splitlines()
    assert any(row.startswith(f"backbone.p4 {student.backbone.feature_dims['p4']}x4x4 s16") for row in table)

    model = DistilledModel(student, distiller, task_weights={"detection": 3.0})
    dataset = DistillationDataset(
        build_dataset(config.data, "train", train=False), distiller.teachers.offline_plans()
    )
    batch = batch_to_device(TeacherFeatureCollate()([dataset[0], dataset[1]]), torch.device("cpu"))
    losses = model(batch)
    stage_term = "distill/probe/embed<-backbone.p4"
    assert {stage_term, "distill/probe/embed<-p4", "det/box"} <= set(losses)
    assert torch.isfinite(losses[stage_term]) and losses[stage_term] > 0
    losses[stage_term].backward()
    neck_gradients = [p.grad for p in student.neck.parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert not neck_gradients  # the stage term reaches the backbone, not the neck
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.backbone.parameters())


def test_the_default_map_is_a_neck_level_and_unknown_maps_are_named(synthetic_data_yaml) -> None:
    student = build_model(_config(synthetic_data_yaml, "p4").to_dict()["model"])
    default = build_distiller(_config(synthetic_data_yaml, None), student)
    assert [term.level for term in default.terms] == ["p4"]  # stride 16, like the teacher's embed
    with pytest.raises(ConfigError, match=r"student has no map 'backbone\.p9' \(maps: p3, p4, p5, backbone\.p3"):
        build_distiller(_config(synthetic_data_yaml, "backbone.p9"), student)


def test_a_head_map_is_distilled(synthetic_data_yaml) -> None:
    torch.manual_seed(0)
    config = validate_config(
        {
            "model": {"backbone": {"type": "yolov8", "scale": "n"},
                      "heads": {"segmentation": {"type": "sam_mask_head", "transformer_depth": 1, "mlp_dim": 32}}},
            "teachers": {"probe": {"name": "covariant_probe", "allow_random_init": True, "image_size": 128}},
            "distillation": {"offline_ratio": 0.0,
                             "losses": {"probe": {"type": "mse", "teacher": "probe", "student": "segmentation.embed"}}},
            "data": {"dataset": str(synthetic_data_yaml), "img_size": IMG_SIZE, "batch_size": 2, "num_workers": 0},
        }
    )
    student = build_model(config.to_dict()["model"])
    distiller = build_distiller(config, student)
    (term,) = distiller.terms
    assert (term.level, term.student_channels, term.student_stride) == ("segmentation.embed", 256, 16)
    dataset = DistillationDataset(build_dataset(config.data, "train", train=False), distiller.teachers.offline_plans())
    batch = batch_to_device(TeacherFeatureCollate()([dataset[0], dataset[1]]), torch.device("cpu"))
    losses = DistilledModel(student, distiller, task_losses=False)(batch)
    value = losses["distill/probe/embed<-segmentation.embed"]
    value.backward()
    head = student.heads["segmentation"]
    assert torch.isfinite(value) and head.neck[0].weight.grad.abs().sum() > 0
